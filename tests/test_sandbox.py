"""Templates render in Jinja's sandbox (issue 12): whoever edits a template cannot reach the
environment, the SMTP password or the shell through the classic server-side template injection
routes; each attempt is a clear file:line problem, and ordinary templates work as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer.config import load
from mailer.contacts import Contact
from mailer.errors import TemplateError
from mailer.templates import Templates, context

EVENTS = """\
- {id: ev, title: Launch, start: 2030-01-22 09:30, end: 2030-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2030-01-04 10:00}
"""
SECRET = "hunter2-smtp-secret"

#: Classic SSTI payloads: Jinja's globals lead to their module's globals (os, sys), the string
#: class to every loaded class, the template reference to the render context.
PAYLOADS = {
    "cycler": "{{ cycler.__init__.__globals__.os.environ }}",
    "joiner": "{{ joiner.__init__.__globals__.os.environ }}",
    "namespace": "{{ namespace.__init__.__globals__.os.environ }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('touch PWNED').read() }}",
    "lipsum-item": "{{ lipsum['__globals__']['os'].environ }}",
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "self": "{{ self._TemplateReference__context }}",
    "format": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "contact": "{{ contact.get.__self__.__class__.__subclasses__() }}",
    "datetime": "{{ event.start.__class__.__init__.__globals__ }}",
    "set": "{% set g = cycler.__init__.__globals__ %}{{ g.os.environ }}",
}


def _campaign(tmp_path: Path, body: str) -> Path:
    templates = dict(SIMPLE_TEMPLATES)
    templates["invite/en/body.txt"] = "Dear {{ contact.name }},\n" + body + "\n"
    return write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=templates)


@pytest.mark.parametrize("name", PAYLOADS)
def test_injection_payloads_fail_with_file_and_line(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", SECRET)
    monkeypatch.chdir(tmp_path)
    cfg = _campaign(tmp_path, PAYLOADS[name])
    campaign = load(cfg)
    templates = Templates(campaign.templates_dir, campaign.language)
    assert templates.check(["invite"]) == []  # it parses; the sandbox acts when it runs
    contact = Contact("ann@example.org", "Ann", fields={"organisation": "Org"})
    ctx = context(campaign, campaign.events[0], campaign.steps[0], contact)
    with pytest.raises(TemplateError) as caught:
        templates.render("invite", None, ctx)
    message = str(caught.value)
    assert "invite/en/body.txt:2" in message, message
    assert "unsafe" in message or "SecurityError" in message, message
    assert SECRET not in message and os.environ["PATH"] not in message
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_check_reports_the_payload_and_leaks_nothing(tmp_path: Path) -> None:
    """`mailer check` as a process, with the SMTP password in its environment."""
    body = PAYLOADS["cycler"] + "\n" + PAYLOADS["lipsum"]
    cfg = _campaign(tmp_path, body)
    env = {**os.environ, "MAILER_SMTP_PASSWORD": SECRET}
    proc = subprocess.run(
        [sys.executable, "-m", "mailer", "check", "--config", str(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "body.txt:2" in text and "unsafe" in text, text
    assert SECRET not in text and "Traceback" not in text
    assert not (tmp_path / "PWNED").exists()


def test_ordinary_templates_still_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loops, filters, dict methods, string methods, macros and autoescape inside the sandbox."""
    monkeypatch.chdir(tmp_path)
    body = (
        "{% for l in contact.lists %}[{{ l | upper }}]{% endfor %} "
        "{{ contact.get('organisation', '-') | title }} {{ contact.name.split(' ')[0] }} "
        "{{ '%s/%s' % (1, 2) }} {{ '{}!'.format(event.title) }} {{ event.start | date('short') }} "
        "{{ cycler('a', 'b').next() }}{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
    )
    cfg = _campaign(tmp_path, body)
    (tmp_path / "templates/invite/en/body.html").write_text("<p>{{ contact.name }}</p>", encoding="utf-8")
    campaign = load(cfg)
    templates = Templates(campaign.templates_dir, campaign.language)
    contact = Contact(
        "ann@example.org", "Ann <b> Lee", lists=frozenset({"x", "y"}), fields={"organisation": "acme"}
    )
    out = templates.render("invite", None, context(campaign, campaign.events[0], campaign.steps[0], contact))
    assert out.text == "Dear Ann <b> Lee,\n[X][Y] Acme Ann 1/2 Launch! 22/01/2030 a2\n"
    assert out.html == "<p>Ann &lt;b&gt; Lee</p>"

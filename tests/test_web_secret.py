"""The web secret reaches every command that signs links (issue 14): MAILER_WEB_SECRET alone is
enough for send/preview to put the answer links in the mails, and `check` refuses a campaign
with `web.url` but no secret."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from click.testing import CliRunner
from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer import tokens
from mailer.cli import cli

EVENTS = "- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30}\n"
STEPS = "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n"
TEMPLATES = {
    **SIMPLE_TEMPLATES,
    "invite/en/body.txt": "{% if links %}Yes: {{ links.accept }}{% else %}no links{% endif %}\n",
}
WEB = "web: {url: 'https://rsvp.example.org/'}\n"


def test_the_web_secret_alone_signs_the_links_in_preview(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=TEMPLATES, extra=WEB)
    env = {"MAILER_WEB_SECRET": "s3cret-0123456789", "MAILER_UNSUBSCRIBE_SECRET": ""}
    r = CliRunner().invoke(cli, ["preview", "--config", str(cfg), "--out", str(tmp_path / "out")], env=env)
    assert r.exit_code == 0, r.output
    raw = (tmp_path / "out" / "invite" / "ann@example.org.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(("plain",))
    assert body is not None
    text = str(body.get_content())
    assert "Yes: https://rsvp.example.org/r/" in text, text
    token = text.split("/r/", 1)[1].split("?", 1)[0]
    assert tokens.verify("s3cret-0123456789", "rsvp", token) == ("test", "ev", "ann@example.org")
    assert str(msg["List-Unsubscribe"]).startswith("<https://rsvp.example.org/u/")


def test_check_refuses_web_url_without_a_secret(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=TEMPLATES, extra=WEB)
    env = {"MAILER_WEB_SECRET": "", "MAILER_UNSUBSCRIBE_SECRET": ""}
    r = CliRunner().invoke(cli, ["check", "--config", str(cfg)], env=env)
    assert r.exit_code == 1, r.output
    assert "web.url is set but MAILER_WEB_SECRET is not" in r.output and "Traceback" not in r.output


def test_a_secret_that_is_not_text_is_refused_with_its_name(tmp_path: Path) -> None:
    """``MAILER_WEB_SECRET=$(head -c 16 /dev/urandom)`` reaches Python as text with surrogates
    that cannot be encoded: signing a link, a Message-ID or an envelope token raised
    UnicodeEncodeError (a traceback). Every command now stops at once with what to do."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=TEMPLATES, extra=WEB)
    env = {"MAILER_WEB_SECRET": "r4nd\udcff\udc80om", "MAILER_UNSUBSCRIBE_SECRET": ""}
    for args in (["check"], ["preview", "--out", str(tmp_path / "out")], ["send", "--dry-run"]):
        r = CliRunner().invoke(cli, [*args, "--config", str(cfg)], env=env)
        assert r.exit_code != 0, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        assert "MAILER_WEB_SECRET" in r.output and "not text" in r.output, (args, r.output)
    assert not (tmp_path / "out").exists()

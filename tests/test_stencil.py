"""Render once per shape, fill per recipient (mailer.stencil, issue 16 target 6): the proof.

Every mail of the shipped campaign (its six steps, an update and a cancellation of each
event, every language folder and the fallbacks) is composed for many generated contacts, with
hostile values, by a Composer with stencils and by one without: the bytes must be identical.
Then templates written to trip the stencil (filters, blocks that capture, comparisons, repr of
a whole dict, autoescape blocks...) give the same texts too, and random values (seeded) as well.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import write_campaign

from mailer.compose import Composer
from mailer.config import Campaign, Event, Step, load
from mailer.contacts import Contact
from mailer.planner import dynamic_step, snapshot
from mailer.stencil import Stencils
from mailer.templates import Templates
from mailer.vocab import EventStatus

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-for-the-stencil-test-0123456789"

#: Values no template should be trusted with, for every optional field.
HOSTILE = [
    "",
    "Jan",
    "Peeters, Jan",
    "<script>alert('x')</script>",
    'Tom & "Jerry" O\'Neil',
    "&amp; &lt;b&gt; {{ contact.name }} {% if %}",
    "line one\nline two\r\nthree\tfour",
    "  leading and trailing spaces  ",
    "ليلى بنت أحمد",  # right to left
    "\u202eevil\u202c RTL override",
    "emoji 🎉👩‍👩‍👧 x",
    "\ue000\ue105&\ue001",  # exactly a sentinel of alphabet A
    "\uf000\uf101&<'\uf001 and \ue000",  # alphabet B and a stray private-use character
    "\ue000\ue100&amp;\ue001",  # an escaped sentinel
    "x" * 3000,
    "Ünïcödé Çédille ß",
    "%s %(name)s {0} \\ \\n",
    "None",
]
LANGUAGES = ["nl", "fr", "en", "nl_BE", "fr-be", "de", None, "xx"]
ZONES = [None, "Europe/Brussels", "America/New_York", "Asia/Tokyo"]


def contacts(n: int, seed: int) -> list[Contact]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        fields: dict[str, str] = {}
        for col in ("first_name", "salutation", "organisation"):
            if rnd.random() < 0.7:  # else the column is missing for this contact
                fields[col] = rnd.choice(HOSTILE)
        out.append(
            Contact(
                f"user{i}.{rnd.choice(['a', 'o-neil', 'x+tag'])}@example{i % 3}.be",
                rnd.choice(HOSTILE),
                rnd.choice(LANGUAGES),
                frozenset(rnd.sample(["indieners", "lerend-netwerk"], rnd.randint(1, 2))),
                frozenset(rnd.sample(["a", "b", "<c>"], rnd.randint(0, 2))),
                fields=fields,
                timezone=rnd.choice(ZONES),
                zones=frozenset({"Europe/Brussels", "America/New_York"}),
            )
        )
    return out


def shipped(folder: Path, extra: str) -> Campaign:
    for name in ("contacts", "templates"):
        shutil.copytree(ROOT / name, folder / name)
    (folder / "schedules.yaml").write_text(
        (ROOT / "schedules.yaml").read_text(encoding="utf-8") + extra, encoding="utf-8"
    )
    return load(folder / "schedules.yaml")


def mails(campaign: Campaign) -> list[tuple[Step, Event, int, dict[str, Any]]]:
    """(step, event, sequence, composer kwargs) of every step and of an update and a
    cancellation of every event."""
    when = datetime(2018, 1, 4, 9, tzinfo=campaign.timezone)
    out: list[tuple[Step, Event, int, dict[str, Any]]] = [
        (s, campaign.event(s.event), 0, {}) for s in campaign.steps
    ]
    for ev in campaign.events:
        moved = Event(**{**ev.__dict__, "start": ev.start.replace(hour=11), "location": "Gent <zaal> & co"})
        cancelled = Event(**{**ev.__dict__, "status": EventStatus.CANCELLED})
        for kind, after in (("update", moved), ("cancel", cancelled)):
            snaps = {(ev.id, 0): json.dumps(snapshot(ev)), (ev.id, 1): json.dumps(snapshot(after))}
            kw = {"revisions": {ev.id: (1, "", "")}, "snapshots": snaps}
            out.append((dynamic_step(campaign, ev.id, kind, 1, when), after, 1, kw))
    return out


VARIANTS = {
    "as shipped (mailto unsubscribe)": ("", None),
    "web.url and a secret (signed links)": ("\nweb: {url: https://rsvp.example.be/m}\n", SECRET),
    "unsubscribe.url and a secret": (
        "\n".join(
            [
                "",
                "unsubscribe:",
                "  mailto: afmelden@example.be",
                "  url: https://x.example.be/u?a=1&b=<2>",
                "",
            ]
        ),
        SECRET,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_shipped_mail_is_byte_identical_with_stencils(tmp_path: Path, variant: str) -> None:
    extra, secret = VARIANTS[variant]
    if "unsubscribe.url" in variant:  # replace the shipped unsubscribe block
        text = (
            (ROOT / "schedules.yaml")
            .read_text(encoding="utf-8")
            .replace("unsubscribe:\n  mailto: afmelden@example.be\n", "")
        )
        assert "unsubscribe:" not in text
        for name in ("contacts", "templates"):
            shutil.copytree(ROOT / name, tmp_path / name)
        (tmp_path / "schedules.yaml").write_text(text + extra, encoding="utf-8")
        campaign = load(tmp_path / "schedules.yaml")
    else:
        campaign = shipped(tmp_path, extra)
    when = datetime(2018, 1, 4, 9, 30, tzinfo=campaign.timezone)
    people = contacts(120, seed=len(variant))
    filled = total = 0
    for step, event, seq, kw in mails(campaign):
        on = Composer(campaign, Templates(campaign.templates_dir, "nl"), unsubscribe_secret=secret, **kw)
        off = Composer(
            campaign,
            Templates(campaign.templates_dir, "nl"),
            unsubscribe_secret=secret,
            stencil=False,
            **kw,
        )
        assert on.stencils is not None and off.stencils is None
        for who in people:
            a = on.compose_due(step, event, who, when=when, sequence=seq)
            b = off.compose_due(step, event, who, when=when, sequence=seq)
            assert a == b, (variant, step, who)
            assert on.render_due(step, event, who, sequence=seq) == off.render_due(
                step, event, who, sequence=seq
            )
        filled += on.stencils.filled
        total += on.stencils.filled + on.stencils.full
    # The proof is worth something only if many mails came from a stencil.
    assert filled > 0.4 * total, (filled, total)  # hostile values: many decisions go the other way


# -- templates written to trip it ----------------------------------------------------------

TRICKY = {
    "plain": "{{ contact.name }}|{{ contact.get('organisation') }}|{{ links.accept if links else '' }}",
    "filters": "{{ contact.name|upper }}|{{ contact.name|e }}|{{ contact.name|safe }}|{{ contact.name|length }}",
    "truncate": "{{ contact.name|truncate(12) }}|{{ contact.name[:3] }}|{{ contact.name.split(',')[0] }}",
    "tests": "{% if contact.name == 'Jan' %}JAN{% endif %}{% if 'a' in contact.name %}A{% endif %}"
    "{% if contact.name|length > 10 %}long{% endif %}{% if contact.name is string %}s{% endif %}{{ contact.name }}",
    "concat": "{{ 'Dear ' ~ contact.name ~ '!' }}|{{ (contact.name ~ 'x')|upper }}|{{ contact.name or 'nobody' }}",
    "filter block": "{% filter upper %}{{ contact.name }}{% endfilter %}|{{ contact.name }}",
    "set block": "{% set x %}{{ contact.name }}{% endset %}{{ x|length }}:{{ x }}",
    "macro": "{% macro m(v) %}[{{ v|replace('a', 'b') }}]{% endmacro %}{{ m(contact.name) }}{{ contact.name }}",
    "macro inside": "{% macro m() %}<{{ contact.name }}>{% endmacro %}{{ m()|lower }}{{ m() }}",
    "whole dict": "{{ contact }}|{{ links }}|{{ contact.items()|list|length }}",
    "loop": "{% for ch in contact.name %}{{ ch }}.{% endfor %}{% for k in contact %}{{ k }}{% endfor %}",
    "autoescape": "{% autoescape false %}{{ contact.name }}{% endautoescape %}|{{ contact.name }}",
    "alias": "{% set n = contact.name %}{% if n %}{{ n }}{% else %}-{% endif %}|{{ n ~ n }}",
    "self": "{% block b %}{{ contact.name }}{% endblock %}|{{ self.b()|length }}",
    "format": "{{ '%s!'|format(contact.name) }}|{{ contact.name|replace('<', '') }}|{{ contact.name.__len__ }}",
}


def tricky_campaign(folder: Path, body: str) -> Campaign:
    templates = {
        "t/en/subject.txt": "  Hi {{ contact.name }}\n  – {{ contact.get('organisation', 'none') }}  \n",
        "t/en/body.txt": body + "\n{{ links.accept if links else '' }}\n{{ campaign.unsubscribe_url }}\n",
        "t/en/body.html": "{% include '_inc.html' %}<p>"
        + body
        + '</p><a href="{{ campaign.unsubscribe_url }}">',
        "_inc.html": "<b>{{ contact.name }}</b>{% include '_inc.txt' %}",
        "_inc.txt": "[{{ contact.name }}]",
    }
    cfg = write_campaign(
        folder,
        events="- id: e\n  title: E <&>\n  start: 2030-06-24 09:30\n  end: 2030-06-24 16:30\n",
        steps="- id: s\n  event: e\n  template: t\n  at: 2030-06-01 09:00\n  audience: {lists: [a]}\n",
        templates=templates,
        extra="web: {url: https://rsvp.example.be}\nunsubscribe: {url: 'https://x.example.be/u?a=1&b=2'}\n",
    )
    return load(cfg)


@pytest.mark.parametrize("case", list(TRICKY))
def test_templates_that_use_values_otherwise_render_the_same(tmp_path: Path, case: str) -> None:
    campaign = tricky_campaign(tmp_path, TRICKY[case])
    step, event = campaign.step("s"), campaign.event("e")
    when = datetime(2030, 6, 1, 9, tzinfo=campaign.timezone)
    for secret in (SECRET, "other-secret-xxxxxxxxxxxxxxxxxxxxxxxxx"):
        on = Composer(campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=secret)
        off = Composer(
            campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=secret, stencil=False
        )
        for who in contacts(60, seed=hash(case) % 1000):
            try:
                b = off.compose(step, event, who, when=when)
            except Exception as exc:  # noqa: BLE001 - the same error with stencils
                with pytest.raises(type(exc)) as got:
                    on.compose(step, event, who, when=when)
                assert str(got.value) == str(exc)
                continue
            assert on.compose(step, event, who, when=when) == b, (case, who)


def test_a_plain_template_is_filled_and_a_tricky_one_is_not(tmp_path: Path) -> None:
    """The guards are what keeps the tricky cases right: the plain template is served from
    stencils, `{{ contact }}` (a repr of the sentinels) never is."""
    for case, expect in (("plain", True), ("whole dict", False)):
        campaign = tricky_campaign(tmp_path / case.replace(" ", "-"), TRICKY[case])
        stencils = Stencils(Templates(campaign.templates_dir, "en"))
        on = Composer(campaign, stencils.templates, unsubscribe_secret=SECRET)
        assert on.stencils is not None
        for who in contacts(40, seed=3):
            on.render(campaign.step("s"), campaign.event("e"), who)
        assert (on.stencils.filled > 30) is expect, (case, on.stencils.filled, on.stencils.full)


def test_random_values_render_the_same(tmp_path: Path) -> None:
    """Seeded random texts from an alphabet of markup, quotes, whitespace and private-use
    characters (hypothesis is not installed)."""
    body = (
        "{{ 'Dear ' ~ contact.name ~ '!' }}|{{ contact.name or 'nobody' }}|{{ contact.get('organisation') }}"
    )
    campaign = tricky_campaign(tmp_path, TRICKY["plain"] + body + TRICKY["alias"])
    rnd = random.Random(16)
    alphabet = "aZ ,<>&\"'\n\t\r\u00a0éß\u202e🎉\ue000\ue001\ue100\ue1ff\uf000\uf001\uf100" + "{}%#"
    on = Composer(campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=SECRET)
    off = Composer(
        campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=SECRET, stencil=False
    )
    step, event = campaign.step("s"), campaign.event("e")
    for i in range(400):

        def text() -> str:
            return "".join(rnd.choice(alphabet) for _ in range(rnd.choice([0, 1, 2, 5, 40])))

        who = Contact(f"r{i}@example.be", text(), "en", frozenset({"a"}), fields={"organisation": text()})
        assert on.render(step, event, who) == off.render(step, event, who), repr(who)
    assert on.stencils is not None and on.stencils.filled > 200


def test_mailer_stencil_off_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = tricky_campaign(tmp_path, TRICKY["plain"])
    monkeypatch.setenv("MAILER_STENCIL", "off")
    assert (
        Composer(campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=SECRET).stencils
        is None
    )
    monkeypatch.delenv("MAILER_STENCIL")
    assert (
        Composer(campaign, Templates(campaign.templates_dir, "en"), unsubscribe_secret=SECRET).stencils
        is not None
    )

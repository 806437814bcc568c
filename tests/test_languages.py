"""Issue 13, items 7 and 9: event texts per language, the calendar in the reader's language
(LANGUAGE=), and update texts in words, checked on the composed bytes (email package,
icalendar, vobject)."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import icalendar
import pytest
import vobject

from mailer import config, planner
from mailer.compose import Composer
from mailer.config import Campaign
from mailer.contacts import Contact
from mailer.errors import ConfigError
from mailer.review import review
from mailer.templates import Templates
from mailer.vocab import RevisionKind
from mailer.workspace import load_workspace

HEAD = """\
campaign: t
timezone: Europe/Brussels
language: nl
sender: {from: org@example.org, name: Org}
contacts: [contacts.csv]
templates: templates
"""

EVENTS = """\
events:
  - id: timed
    title: {nl: Infoavond, fr: "Soirée d'info", en: Info evening}
    location: {nl: Brussel, fr: Bruxelles}
    description: {nl: Welkom, fr: Bienvenue, en: Welcome}
    start: 2026-06-23 09:30
    end: 2026-06-23 16:30
  - id: allday
    title: {nl: Opendeurdag, fr: Portes ouvertes}
    date: 2026-06-23
  - id: multi
    title: Congres
    location: Gent
    date: 2026-06-22
    end_date: 2026-06-24
steps:
  - {id: inv-timed, event: timed, template: invite, at: 2026-06-01 09:00}
  - {id: inv-allday, event: allday, template: invite, at: 2026-06-01 09:00}
  - {id: inv-multi, event: multi, template: invite, at: 2026-06-01 09:00}
"""

#: The same events after an edit: later, moved a day, longer; one place changed per language.
CHANGED = (
    EVENTS.replace("2026-06-23 09:30", "2026-06-23 10:00")
    .replace("2026-06-23 16:30", "2026-06-23 17:00")
    .replace("{nl: Brussel, fr: Bruxelles}", "{nl: Gent, fr: Gand}")
    .replace("date: 2026-06-23\n", "date: 2026-06-24\n")
    .replace("date: 2026-06-22\n    end_date: 2026-06-24", "date: 2026-06-23\n    end_date: 2026-06-26")
)

UPDATE = "{{ event.title }}\n{% for c in changes %}{{ c.label }}: {{ c.before_text }} → {{ c.after_text }}\n{% endfor %}"
TEMPLATES = {
    f"{name}/{lang}/{part}": text
    for name, body in (("invite", "{{ event.title }} @ {{ event.location }}\n"), ("update", UPDATE))
    for lang in ("nl", "fr", "en")
    for part, text in (("subject.txt", "{{ event.title }}"), ("body.txt", body), ("body.html", body))
}

NL = Contact("jan@example.be", "Jan", "nl")
FR = Contact("marie@example.be", "Marie", "fr_BE")
EN = Contact("ann@example.org", "Ann", "en")
NY = Contact("bob@example.com", "Bob", "en", timezone="America/New_York")
WHEN = datetime(2026, 6, 10, 8, 0, tzinfo=UTC)


def campaign(folder: Path, events: str = EVENTS, contacts: str = "email,name,language\n") -> Campaign:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in TEMPLATES.items():
        (folder / "templates" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "templates" / rel).write_text(text, encoding="utf-8")
    (folder / "contacts.csv").write_text(contacts, encoding="utf-8")
    (folder / "schedules.yaml").write_text(HEAD + events, encoding="utf-8")
    return config.load(folder / "schedules.yaml")


def parse(data: bytes) -> tuple[EmailMessage, str, bytes]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text = (
        next(p for p in msg.walk() if p.get_content_type() == "text/plain")
        .get_content()
        .replace("\r\n", "\n")
    )
    cal = next(p for p in msg.walk() if p.get_content_type() == "text/calendar").get_payload(decode=True)
    assert isinstance(text, str) and isinstance(cal, bytes)
    return msg, text, cal


def texts(cal: bytes) -> dict[str, tuple[str, str | None]]:
    """SUMMARY/LOCATION/DESCRIPTION and their LANGUAGE as icalendar and vobject read them (they
    must agree)."""
    ev = icalendar.Calendar.from_ical(cal).walk("VEVENT")[0]
    vev = vobject.readOne(cal.decode("utf-8")).vevent
    out: dict[str, tuple[str, str | None]] = {}
    for name in ("SUMMARY", "LOCATION", "DESCRIPTION"):
        if name not in ev:
            assert not hasattr(vev, name.lower())
            continue
        prop = getattr(vev, name.lower())
        by_vobject = (prop.value, (prop.params.get("LANGUAGE") or [None])[0])
        by_icalendar = (str(ev[name]), ev[name].params.get("LANGUAGE"))
        assert by_icalendar == by_vobject, name
        out[name] = by_icalendar
    return out


def test_per_language_texts_load_and_fall_back(tmp_path: Path) -> None:
    c = campaign(tmp_path)
    timed, multi = c.event("timed"), c.event("multi")
    assert timed.title == "Infoavond"  # the campaign language's text is the event's own
    assert timed.text("title", "fr_BE") == ("Soirée d'info", "fr")
    assert timed.text("location", "en") == ("Brussel", "nl")  # no English place: the campaign's
    assert timed.text("title", None) == ("Infoavond", "nl")
    assert multi.text("title", "fr") == ("Congres", "nl") and not multi.texts  # a plain string


@pytest.mark.parametrize(
    ("title", "message"),
    [
        ("{fr: Soirée, en: Evening}", "events[0].title: no nl text (given: fr, en)"),
        ("{nl: Avond, xx-yyy: Soirée}", "events[0].title: 'xx-yyy' is not a language"),
        ("{nl: Avond, fr: ''}", "events[0].title: the fr text is empty"),
        ("{nl: Avond, NL: Soirée}", "events[0].title: 'NL' is given twice (as nl)"),
    ],
)
def test_bad_per_language_texts_name_file_and_line(tmp_path: Path, title: str, message: str) -> None:
    events = "events:\n  - id: ev\n    title: " + title + "\n    start: 2026-06-23 09:30\n"
    events += "    end: 2026-06-23 10:30\nsteps:\n  - {id: s, event: ev, template: invite, at: -1d}\n"
    with pytest.raises(ConfigError) as exc:
        campaign(tmp_path, events)
    assert any(str(p).endswith(message) or message in str(p) for p in exc.value.problems), exc.value.problems
    assert any(p.line == 9 for p in exc.value.problems)  # the title: line of schedules.yaml


def test_plain_texts_keep_their_fingerprint_and_any_language_change_is_an_update(tmp_path: Path) -> None:
    c = campaign(tmp_path / "a")
    # A plain text is still a string in the snapshot: ledgers recorded before issue 13 do not
    # see a change (and send an update) for nothing.
    assert planner.snapshot(c.event("multi"))["title"] == "Congres"
    recorded = {r.event: r for r in planner.revisions(c, {}, lambda _: True)}
    stored = {e: _recorded(r) for e, r in recorded.items()}
    assert planner.revisions(c, stored, lambda _: True) == []
    only_french = campaign(tmp_path / "b", EVENTS.replace("Soirée d'info", "Soirée"))
    revs = planner.revisions(only_french, stored, lambda _: True)
    assert [(r.event, r.kind, r.sequence) for r in revs] == [("timed", RevisionKind.UPDATE, 1)]


def _recorded(r: planner.Revision) -> Any:
    from mailer.store import RecordedRevision

    return RecordedRevision(r.event, r.sequence, r.kind, r.fingerprint, r.snapshot, WHEN)


def test_invitation_calendar_is_in_the_readers_language(tmp_path: Path) -> None:
    c = campaign(tmp_path)
    comp = Composer(c, Templates(c.templates_dir, c.language))
    step, event = c.step("inv-timed"), c.event("timed")
    by_lang = {}
    for who in (NL, FR, EN):
        msg, text, cal = parse(comp.compose(step, event, who, when=WHEN).data)
        by_lang[who.language] = (str(msg["Subject"]), text, texts(cal), cal)
    assert by_lang["nl"][2] == {
        "SUMMARY": ("Infoavond", "nl"),
        "LOCATION": ("Brussel", "nl"),
        "DESCRIPTION": ("Welkom", "nl"),
    }
    assert by_lang["fr_BE"][0] == "Soirée d'info" and by_lang["fr_BE"][1] == "Soirée d'info @ Bruxelles\n"
    assert by_lang["fr_BE"][2] == {
        "SUMMARY": ("Soirée d'info", "fr"),
        "LOCATION": ("Bruxelles", "fr"),
        "DESCRIPTION": ("Bienvenue", "fr"),
    }
    # English: its own title and description, the campaign language's place, each tagged so.
    assert by_lang["en"][2] == {
        "SUMMARY": ("Info evening", "en"),
        "LOCATION": ("Brussel", "nl"),
        "DESCRIPTION": ("Welcome", "en"),
    }
    # UID and SEQUENCE do not depend on the language.
    for _, _, _, cal in by_lang.values():
        ev = icalendar.Calendar.from_ical(cal).walk("VEVENT")[0]
        assert (str(ev["UID"]), ev["SEQUENCE"]) == ("timed.t@example.org", 0)
    # A plain text carries no LANGUAGE (mailer does not know what language it is in).
    _, _, cal = parse(comp.compose(c.step("inv-multi"), c.event("multi"), FR, when=WHEN).data)
    assert texts(cal) == {"SUMMARY": ("Congres", None), "LOCATION": ("Gent", None)}
    # One prototype per (event, language), not per recipient.
    assert len({k for k in comp._protos if k[0] == "timed"}) == 3


def _updates(tmp_path: Path, who: Contact) -> dict[str, tuple[str, str, dict[str, tuple[str, str | None]]]]:
    """The update mail of each event for ``who`` after the edit CHANGED: subject, text, calendar."""
    before, after = campaign(tmp_path / "before"), campaign(tmp_path / "after", CHANGED)
    snapshots = {}
    for ev in after.events:
        snapshots[(ev.id, 0)] = json.dumps(planner.snapshot(before.event(ev.id)))
        snapshots[(ev.id, 1)] = json.dumps(planner.snapshot(ev))
    revisions = {e: (1, "", snapshots[(e, 1)]) for e in ("timed", "allday", "multi")}
    comp = Composer(after, Templates(after.templates_dir, after.language), revisions, snapshots)
    out = {}
    for ev in after.events:
        step = planner.dynamic_step(after, ev.id, "update", 1, WHEN)
        msg, text, cal = parse(comp.compose_due(step, ev, who, when=WHEN, sequence=1).data)
        assert icalendar.Calendar.from_ical(cal).walk("VEVENT")[0]["SEQUENCE"] == 1
        out[ev.id] = (str(msg["Subject"]), text, texts(cal))
    return out


def test_update_in_dutch(tmp_path: Path) -> None:
    up = _updates(tmp_path, NL)
    assert up["timed"][1] == (
        "Infoavond\nWanneer: di 23 juni 09:30–16:30 → di 23 juni 10:00–17:00\nPlaats: Brussel → Gent\n"
    )
    assert up["allday"][1] == "Opendeurdag\nWanneer: di 23 juni → wo 24 juni\n"
    assert up["multi"][1] == "Congres\nWanneer: ma 22 juni – wo 24 juni → di 23 juni – vr 26 juni\n"
    assert up["timed"][2]["LOCATION"] == ("Gent", "nl")


def test_update_in_french(tmp_path: Path) -> None:
    up = _updates(tmp_path, FR)
    assert up["timed"][1] == (
        "Soirée d'info\nQuand: mar. 23 juin 09:30–16:30 → mar. 23 juin 10:00–17:00\nLieu: Bruxelles → Gand\n"
    )
    assert up["allday"][1] == "Portes ouvertes\nQuand: mar. 23 juin → mer. 24 juin\n"
    assert up["multi"][1] == "Congres\nQuand: lun. 22 juin – mer. 24 juin → mar. 23 juin – ven. 26 juin\n"
    assert up["timed"][2] == {
        "SUMMARY": ("Soirée d'info", "fr"),
        "LOCATION": ("Gand", "fr"),
        "DESCRIPTION": ("Bienvenue", "fr"),
    }
    assert up["allday"][0] == "Portes ouvertes"


def test_update_in_english(tmp_path: Path) -> None:
    up = _updates(tmp_path, EN)
    # No English place: the campaign language's, on both sides of the change.
    assert up["timed"][1] == (
        "Info evening\nWhen: Tue 23 June 09:30–16:30 → Tue 23 June 10:00–17:00\nWhere: Brussel → Gent\n"
    )
    assert up["allday"][1] == "Opendeurdag\nWhen: Tue 23 June → Wed 24 June\n"
    assert up["multi"][1] == "Congres\nWhen: Mon 22 June – Wed 24 June → Tue 23 June – Fri 26 June\n"
    assert up["allday"][2]["SUMMARY"] == ("Opendeurdag", "nl")


def test_update_names_the_zones_for_a_reader_elsewhere(tmp_path: Path) -> None:
    up = _updates(tmp_path, NY)
    assert up["timed"][1].splitlines()[1] == (
        "When: Tue 23 June 09:30–16:30 (Brussels) / 03:30–10:30 New York"
        " → Tue 23 June 10:00–17:00 (Brussels) / 04:00–11:00 New York"
    )
    assert up["allday"][1] == "Opendeurdag\nWhen: Tue 23 June → Wed 24 June\n"  # dates have no zone


def test_status_and_year_read_as_words(tmp_path: Path) -> None:
    from mailer.templates import describe_changes

    c = campaign(tmp_path)
    tz = c.timezone
    ctx = {"event": {}, "campaign": {"timezone": tz.key}, "contact": {}}
    day = [datetime(2026, 12, 31, tzinfo=tz), datetime(2027, 1, 1, tzinfo=tz)]
    changes = [
        {"field": "status", "before": "cancelled", "after": "confirmed"},
        {"field": "start", "before": day[0], "after": day[1]},
        {"field": "end", "before": day[1], "after": datetime(2027, 1, 2, tzinfo=tz)},
        {"field": "all_day", "before": True, "after": True},
        {"field": "location", "before": None, "after": {"nl": "Gent", "fr": "Gand"}},
    ]
    nl = describe_changes(changes, ctx, language="nl", reader="nl", default="nl")
    assert [c["text"] for c in nl] == [
        "Wanneer: do 31 december 2026 → vr 1 januari 2027",
        "Plaats: niet opgegeven → Gent",
        "Status: afgelast → gaat door",
    ]
    fr = describe_changes(changes, ctx, language="fr", reader="fr", default="nl")
    assert [c["text"] for c in fr][1:] == ["Lieu: non précisé → Gand", "Statut: annulé → a lieu"]


def test_check_warns_about_a_contact_language_without_text(tmp_path: Path) -> None:
    contacts = (
        "email,name,language\njan@example.be,Jan,nl\nhans@example.de,Hans,de\nmarie@example.be,Marie,fr\n"
    )
    c = campaign(tmp_path, contacts=contacts)
    ws = load_workspace(c.config_path)
    found = [p for p in review(ws) if "text for event" in p.message]
    assert {(p.field, p.line, p.severity) for p in found} == {
        ("events[0].title", 9, "warning"),  # de: no German title
        ("events[0].location", 10, "warning"),  # de and... en has nobody; fr has its own
        ("events[0].description", 11, "warning"),
        ("events[1].title", 15, "warning"),
    }
    assert all("no de text" in p.message and "hans@example.de" in p.message for p in found)
    assert all(p.file.endswith("schedules.yaml") for p in found)


def test_check_prints_the_warning_with_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mailer.cli import cli

    campaign(tmp_path, contacts="email,name,language\nhans@example.de,Hans,de\n")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["check"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "schedules.yaml:9: events[0].title: no de text for event 'timed'" in " ".join(r.output.split())

"""Recipients in other time zones (issue 13 items 10-11): the ``timezone`` contact column, the
``when`` filter on the produced mail, the calendar's own TZID, and ``check``'s per-zone schedule."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import icalendar
import pytest
import vobject
from conftest import write_campaign

from mailer import config
from mailer.compose import Composer
from mailer.contacts import load_contacts
from mailer.errors import ConfigError
from mailer.templates import Templates

EVENT = "- {id: day, title: Partner day, start: 2018-01-22 15:00, end: 2018-01-22 17:00, location: Gent}\n"
STEPS = "- {id: invite, event: day, template: invite, at: 2018-01-08 09:00}\n"
BODY = "{{ event.start | when(contact) }} | {{ event.start | when(contact, 'time') }} | {{ contact | zone_name }}\n"
TEMPLATES = {
    "invite/en/subject.txt": "{{ event.title }}",
    "invite/en/body.txt": BODY,
    "invite/en/body.html": "<p>" + BODY + "</p>",
    "invite/nl/subject.txt": "{{ event.title }}",
    "invite/nl/body.txt": BODY,
    "invite/nl/body.html": "<p>" + BODY + "</p>",
    "invite/fr/subject.txt": "{{ event.title }}",
    "invite/fr/body.txt": BODY,
    "invite/fr/body.html": "<p>" + BODY + "</p>",
}
THREE_ZONES = (
    "email,name,language,timezone\n"
    "ann@example.org,Ann,en,America/New_York\n"
    "bea@example.org,Bea,nl,\n"
    "chloe@example.org,Chloé,fr,asia/tokyo\n"
    "dirk@example.org,Dirk,nl,Mars/Olympus\n"
)


def _mails(folder: Path, contacts: str) -> dict[str, EmailMessage]:
    cfg = write_campaign(folder, events=EVENT, steps=STEPS, contacts=contacts, templates=TEMPLATES)
    camp = config.load(cfg)
    people = load_contacts(camp.contact_paths()).contacts
    comp = Composer(camp, Templates(camp.templates_dir, camp.language))
    step = camp.steps[0]
    out = {}
    for c in people:
        raw = comp.compose(step, camp.event(step.event), c, when=step.at).data
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out[c.email.split("@")[0]] = msg
    return out


def _text(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def _calendar(msg: EmailMessage) -> bytes:
    for part in msg.walk():
        if part.get_content_type() == "text/calendar":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload
    raise AssertionError("no calendar part")


def test_contact_timezone_column(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(THREE_ZONES, encoding="utf-8")
    cl = load_contacts([tmp_path / "c.csv"], display_root=tmp_path)
    zones = {c.email: c.timezone for c in cl.contacts}
    assert zones == {
        "ann@example.org": "America/New_York",
        "bea@example.org": None,
        "chloe@example.org": "Asia/Tokyo",  # any case, written as IANA spells it
        "dirk@example.org": None,  # unknown: the campaign's
    }
    (p,) = cl.problems
    assert (p.severity, p.file, p.row, p.field) == ("warning", "c.csv", 5, "timezone")
    assert "'Mars/Olympus' is not a time zone" in p.message and "campaign time zone is used" in p.message
    assert all(c.zones == {"America/New_York", "Asia/Tokyo"} for c in cl.contacts)


def test_new_york_contact_reads_new_york_time_calendar_keeps_brussels(tmp_path: Path) -> None:
    mails = _mails(tmp_path, THREE_ZONES)
    assert _text(mails["ann"]) == (
        "Monday, 22 January 2018 at 15:00 (Brussels) / 09:00 New York | 15:00 (Brussels) / 09:00 New York"
        " | New York\n"
    )
    html = mails["ann"].get_body(("html",))
    assert html is not None and "15:00 (Brussels) / 09:00 New York" in str(html.get_content())
    # Tokyo is a day later at 23:00; French city names; Bea (no column) is told it is Brussels'
    # time, since other contacts live elsewhere.
    assert _text(mails["chloe"]).startswith("lundi 22 janvier 2018 à 15:00 (Bruxelles) / 23:00 Tokyo | ")
    assert _text(mails["bea"]) == "maandag 22 januari 2018 om 15:00 (Brussel) | 15:00 (Brussel) | Brussel\n"
    # The calendar keeps the event's own zone; clients convert it.
    ics = _calendar(mails["ann"])
    assert b"DTSTART;TZID=Europe/Brussels:20180122T150000" in ics
    ev = icalendar.Calendar.from_ical(ics).walk("VEVENT")[0]
    vev = vobject.readOne(ics.decode()).vevent
    start = datetime(2018, 1, 22, 14, tzinfo=UTC)
    dtstart: Any = ev["DTSTART"]
    assert dtstart.dt.astimezone(UTC) == vev.dtstart.value.astimezone(UTC) == start


def test_one_zone_campaign_names_no_zone(tmp_path: Path) -> None:
    mails = _mails(tmp_path, "email,name,language\nbea@example.org,Bea,en\n")
    assert _text(mails["bea"]) == "Monday, 22 January 2018 at 15:00 | 15:00 | Brussels\n"


def test_local_step_parsed(tmp_path: Path) -> None:
    cfg = write_campaign(
        tmp_path,
        events=EVENT,
        steps=STEPS + "- {id: eve, event: day, template: invite, at: -1d 09:00 local}\n",
    )
    step = config.load(cfg).step("eve")
    assert step.local and step.wall == datetime(2018, 1, 21, 9)
    assert step.at.isoformat() == "2018-01-21T09:00:00+01:00"


def test_local_without_time_of_day_is_refused_at_its_line(tmp_path: Path) -> None:
    cfg = write_campaign(
        tmp_path, events=EVENT, steps=STEPS + "- {id: eve, event: day, template: invite, at: -2h local}\n"
    )
    with pytest.raises(ConfigError) as exc:
        config.load(cfg)
    (p,) = exc.value.problems
    assert p.field == "steps[1].at" and p.line is not None
    assert "'local' goes with a time of day" in p.message


def test_check_shows_each_zone_and_refuses_a_missing_hour(tmp_path: Path) -> None:
    """`check` (a real subprocess): one line per zone with its count, earliest first; 02:30 on
    the day New York springs forward is an error naming the zone, as for the campaign's own."""
    spring = "- {id: day, title: Spring, start: 2018-03-12 15:00, end: 2018-03-12 17:00}\n"
    steps = (
        "- {id: invite, event: day, template: invite, at: -7d 09:00 local}\n"
        "- {id: night, event: day, template: invite, at: -1d 02:30 local}\n"
    )
    contacts = THREE_ZONES.replace(
        "dirk@example.org,Dirk,nl,Mars/Olympus\n", "eve@example.org,Eve,en,America/New_York\n"
    )
    cfg = write_campaign(tmp_path, events=spring, steps=steps, contacts=contacts, templates=TEMPLATES)
    r = subprocess.run(
        [sys.executable, "-m", "mailer", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    lines = [" ".join(line.replace("│", " ").split()) for line in r.stdout.splitlines()]
    assert "invite day invitation Mon 2018-03-05 09:00 JST Asia/Tokyo -7d 09:00 local 1 yes" in lines
    assert "Mon 2018-03-05 09:00 CET Europe/Brussels 1" in lines
    assert "Mon 2018-03-05 09:00 EST America/New_York 2" in lines
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2018-03-11 02:30 does not exist in America/New_York" in r.stderr
    assert "for 2 contact(s) of this local step; pick another time" in r.stderr
    assert "Traceback" not in r.stderr

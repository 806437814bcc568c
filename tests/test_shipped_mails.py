"""The shipped templates on the produced bytes (issue 13, items 6, 8, 12, 13).

Every contact of the shipped campaign gets their own language (``mailer preview``), and the
invitation, reminder, update and cancel templates read right for a timed, an all-day, a
multi-day and an overnight event in nl, fr and en: each mail is composed by mailer's Composer
(the bytes that would be sent) and read back with the email package.
"""

from __future__ import annotations

import csv
import email
import email.policy
import json
import shutil
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import icalendar
import pytest
from babel.dates import format_date
from click.testing import CliRunner
from conftest import write_campaign

from mailer.cli import cli
from mailer.compose import Composer
from mailer.config import Campaign, Event, load
from mailer.contacts import Contact
from mailer.planner import dynamic_step, snapshot
from mailer.templates import Templates, locale_for
from mailer.vocab import EventStatus

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "templates"
LANGUAGES = ("nl", "fr", "en")
#: The kind word each language puts after the event's title in the subject.
KIND_WORD = {
    "invitation": {"nl": "uitnodiging", "fr": "invitation", "en": "invitation"},
    "reminder": {"nl": "herinnering", "fr": "rappel", "en": "reminder"},
    "update": {"nl": "gewijzigd", "fr": "modifié", "en": "updated"},
    "cancel": {"nl": "gaat niet door", "fr": "annulé", "en": "cancelled"},
}
#: The neutral greeting for "Peeters, Jan" (a name written last name first is never reordered).
NEUTRAL = {"nl": "Beste,", "fr": "Bonjour,", "en": "Hello,"}


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def bodies(msg: EmailMessage) -> tuple[str, str]:
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def plain(html: str) -> str:
    """The HTML's words without the <bdi> isolates, for phrase checks."""
    return html.replace("<bdi>", "").replace("</bdi>", "")


# -- the shipped campaign: every contact in their own language -------------------------------


def copy_shipped(folder: Path) -> Path:
    for name in ("schedules.yaml", "contacts", "templates"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, folder / name)
        else:
            shutil.copy(src, folder / name)
    return folder / "schedules.yaml"


def shipped_languages() -> dict[str, str]:
    """address -> language column, read from the shipped contact files themselves."""
    out: dict[str, str] = {}
    for path in sorted((ROOT / "contacts").glob("*.csv")):
        text = path.read_text(encoding="utf-8-sig")
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;")
        for row in csv.DictReader(text.splitlines(), dialect=dialect):
            out[row["email"].strip().lower()] = row["language"].strip()
    return out


def test_preview_gives_every_contact_their_own_language(tmp_path: Path) -> None:
    cfg = copy_shipped(tmp_path)
    languages = shipped_languages()
    assert set(languages.values()) == {"nl", "fr", "en"}
    result = CliRunner().invoke(cli, ["preview", "--config", str(cfg), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    seen: set[str] = set()
    files = sorted((tmp_path / "p").glob("*/*.eml"))
    assert len(files) == 8 * 3 + 14 * 3  # 8 indieners x 3 steps, 14 on both lists x 3 steps
    for eml in files:
        msg = parse(eml.read_bytes())
        address = msg["To"].addresses[0].addr_spec.lower()
        lang = languages[address]
        text, html = bodies(msg)
        assert msg["Content-Language"] == lang, eml
        assert f'<html lang="{lang}" dir="ltr">' in html, eml
        assert msg["Subject"].startswith(("Aan de slag INTEGRATIEPACT – ", "Administratief-technische")), eml
        seen.add(lang)
        if lang != "nl":  # no Dutch words around the facts
            for dutch in ("Wanneer", "Waar:", "Beste", "Met vriendelijke groeten"):
                assert dutch not in text and dutch not in html, (eml, dutch)
    assert seen == {"nl", "fr", "en"}


def test_check_warns_about_no_language_fallback_on_the_shipped_campaign(tmp_path: Path) -> None:
    cfg = copy_shipped(tmp_path)
    result = CliRunner().invoke(cli, ["check", "--strict", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "get mails in" not in result.output


# -- four event shapes x three languages -----------------------------------------------------

EVENTS = """\
- id: timed
  title: Werkatelier
  start: 2030-06-24 09:30
  end: 2030-06-24 16:30
  location: KVS zaal Top, Arduinkaai 7, 1000 Brussel
- id: allday
  title: Infodag
  date: 2030-06-25
- id: multiday
  title: Zomerschool
  date: 2030-06-24
  end_date: 2030-06-26
  location: Gent
- id: overnight
  title: Nachtwake
  start: 2030-06-24 22:00
  end: 2030-06-25 02:00
  location: Antwerpen
"""
SHAPES = ("timed", "allday", "multiday", "overnight")
STEPS = "".join(
    f"""\
- id: invite-{ev}
  event: {ev}
  template: uitnodiging-aan-de-slag
  at: 2030-06-01 09:00
  audience: {{lists: [a]}}
- id: remind-{ev}
  event: {ev}
  template: herinnering
  at: -3d 09:00
  audience: {{lists: [a]}}
"""
    for ev in SHAPES
)
CONTACTS = (
    "email,name,language,lists,first_name\n"
    'nl@example.be,"Peeters, Jan",nl,a,\n'
    'fr@example.be,"Lefèvre, François",fr,a,\n'
    'en@example.be,"Okafor, Sarah",en,a,\n'
    "nl-first@example.be,Jan Peeters,nl,a,Jan\n"
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Campaign, Templates]:
    folder = tmp_path_factory.mktemp("shapes")
    templates = {
        p.relative_to(SHIPPED).as_posix(): p.read_text(encoding="utf-8")
        for p in SHIPPED.rglob("*")
        if p.is_file()
    }
    cfg = write_campaign(
        folder,
        events=EVENTS,
        steps=STEPS,
        contacts=CONTACTS,
        templates=templates,
        extra="unsubscribe: {mailto: afmelden@example.be}\n",
    )
    campaign = load(cfg)
    return campaign, Templates(campaign.templates_dir, campaign.language)


def contact(lang: str, first_name: bool = False) -> Contact:
    if first_name:
        return Contact(
            "nl-first@example.be", "Jan Peeters", "nl", frozenset({"a"}), fields={"first_name": "Jan"}
        )
    names = {"nl": "Peeters, Jan", "fr": "Lefèvre, François", "en": "Okafor, Sarah"}
    return Contact(f"{lang}@example.be", names[lang], lang, frozenset({"a"}), fields={"first_name": ""})


def moved(event: Event) -> Event:
    """The event one day later (an update's new version)."""
    return Event(
        **{**event.__dict__, "start": event.start + timedelta(days=1), "end": event.end + timedelta(days=1)}
    )


def compose(campaign: Campaign, templates: Templates, kind: str, ev_id: str, who: Contact) -> bytes:
    """The bytes mailer would send for ``kind`` of event ``ev_id`` to ``who``."""
    event = campaign.event(ev_id)
    when = datetime(2030, 6, 1, 9, tzinfo=campaign.timezone)
    if kind in ("invitation", "reminder"):
        step = campaign.step(("invite-" if kind == "invitation" else "remind-") + ev_id)
        return Composer(campaign, templates).compose_due(step, event, who, when=when, sequence=0).data
    before = event if kind == "update" else event
    after = moved(event) if kind == "update" else Event(**{**event.__dict__, "status": EventStatus.CANCELLED})
    snapshots = {(ev_id, 0): json.dumps(snapshot(before)), (ev_id, 1): json.dumps(snapshot(after))}
    revisions = {ev_id: (1, "", "")}
    composer = Composer(campaign, templates, revisions, snapshots)
    step = dynamic_step(campaign, ev_id, kind, 1, when)
    return composer.compose_due(step, after, who, when=when, sequence=1).data


def day(d: date | datetime, lang: str) -> str:
    return format_date(d, "full", locale=locale_for(lang))


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["invitation", "reminder", "update", "cancel"])
def test_every_kind_reads_right_for_every_shape_and_language(
    shapes: tuple[Campaign, Templates], kind: str, shape: str, lang: str
) -> None:
    campaign, templates = shapes
    msg = parse(compose(campaign, templates, kind, shape, contact(lang)))
    text, html = bodies(msg)
    event = campaign.event(shape)
    if kind == "update":
        event = moved(event)
    title = event.title

    # Item 6: the subject starts with the title, then the kind word.
    assert msg["Subject"].startswith(f"{title} – {KIND_WORD[kind][lang]}"), msg["Subject"]
    assert msg["Content-Language"] == lang
    # Item 13: lang and dir, the title a heading, dark mode declared, the unsubscribe line.
    assert f'<html lang="{lang}" dir="ltr">' in html
    assert "<h1 " in html and f">{title}</h1>" in html
    assert '<meta name="color-scheme" content="light dark">' in html
    assert '<meta name="supported-color-schemes" content="light dark">' in html
    assert msg["List-Unsubscribe"] is not None
    assert "afmelden@example.be" in text and 'href="mailto:afmelden@example.be"' in html
    # Item 12: the greeting never misuses "Peeters, Jan"; the facts come before it.
    for body in (text, plain(html)):
        assert NEUTRAL[lang] in body
        assert (
            "Peeters, Jan," not in body and "Okafor, Sarah," not in body and "Lefèvre, François," not in body
        )
        assert body.index(title) < body.index(NEUTRAL[lang])
        # The whole span, in the reader's language, never "00:00" for a day without hours.
        assert day(event.start_date, lang) in body
        if event.all_day:
            assert "00:00" not in body
            assert day(event.last_date, lang) in body
        else:
            assert event.start.strftime("%H:%M") in body and event.end.strftime("%H:%M") in body
            if event.end.date() != event.start_date:  # overnight: the day it ends, too
                assert day(event.end, lang) in body
    if kind == "update":
        was = {"nl": "(was: ", "fr": "(auparavant : ", "en": "(was: "}[lang]
        assert was in text and was + "<s>" in html  # the old value said in words, not only struck


@pytest.mark.parametrize("kind", ["invitation", "reminder", "update", "cancel"])
def test_a_first_name_column_is_used_in_the_greeting(shapes: tuple[Campaign, Templates], kind: str) -> None:
    campaign, templates = shapes
    text, html = bodies(parse(compose(campaign, templates, kind, "timed", contact("nl", first_name=True))))
    assert "Beste Jan," in text and "Beste <bdi>Jan</bdi>," in html


def test_a_salutation_column_is_the_greeting_and_names_are_isolated(
    shapes: tuple[Campaign, Templates],
) -> None:
    campaign, templates = shapes
    who = Contact(
        "s@example.be",
        "Peeters, Jan",
        "nl",
        frozenset({"a"}),
        fields={"salutation": "Geachte heer Peeters", "first_name": "Jan"},
    )
    text, html = bodies(parse(compose(campaign, templates, "reminder", "timed", who)))
    assert "Geachte heer Peeters," in text and "<bdi>Geachte heer Peeters</bdi>," in html
    assert "Beste" not in text


def test_a_right_to_left_version_sets_dir_rtl(tmp_path: Path, shapes: tuple[Campaign, Templates]) -> None:
    """The layout serves every language: a campaign adding an Arabic reminder gets dir="rtl",
    with the recipient's name isolated."""
    campaign, _ = shapes
    root = tmp_path / "templates"
    shutil.copytree(SHIPPED, root)
    shutil.copytree(root / "herinnering" / "en", root / "herinnering" / "ar")
    who = Contact("ar@example.be", "ليلى", "ar", frozenset({"a"}))
    step = campaign.step("remind-timed")
    raw = Composer(campaign, Templates(root, "nl")).compose_due(
        step, campaign.event("timed"), who, when=datetime(2030, 6, 1, 9, tzinfo=campaign.timezone), sequence=0
    )
    _, html = bodies(parse(raw.data))
    assert '<html lang="ar" dir="rtl">' in html and '<div lang="ar" dir="rtl">' in html
    assert "<bdi>ليلى</bdi>" in html


@pytest.mark.parametrize("kind", ["invitation", "reminder", "update", "cancel"])
def test_a_reader_in_another_zone_reads_their_own_hours(
    shapes: tuple[Campaign, Templates], kind: str
) -> None:
    """Issue 13 item 10 in the shipped templates: the body names the event's city and gives a
    New York reader their own hours; the calendar keeps the event's TZID."""
    campaign, templates = shapes
    who = Contact(
        "ny@example.org",
        "Ann Avery",
        "en",
        frozenset({"a"}),
        fields={"first_name": ""},
        timezone="America/New_York",
    )
    msg = parse(compose(campaign, templates, kind, "timed", who))
    text, html = bodies(msg)
    # 09:30-16:30 in Brussels in June (UTC+2) is 03:30-10:30 in New York (UTC-4)
    assert "(Brussels) / 03:30–10:30 New York" in text, text
    assert "TZID" not in text
    assert "03:30–10:30 New York" in plain(html)
    for part in msg.walk():
        if part.get_content_type() == "text/calendar":
            ics = part.get_payload(decode=True)
            assert isinstance(ics, bytes)
            start: Any = icalendar.Calendar.from_ical(ics).walk("VEVENT")[0]["DTSTART"]
            day = 25 if kind == "update" else 24  # the update moves the event a day (moved())
            assert start.dt.astimezone(UTC) == datetime(2030, 6, day, 7, 30, tzinfo=UTC)


def test_a_reader_in_the_event_zone_reads_no_zone_names(shapes: tuple[Campaign, Templates]) -> None:
    campaign, templates = shapes
    text, _ = bodies(parse(compose(campaign, templates, "invitation", "timed", contact("nl"))))
    assert "Brussel)" not in text and "New York" not in text

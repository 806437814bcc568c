"""The calendar pages of `mailer web` (issue 14): the .ics download, the feed, the event page.

The routes run in the real `mailer web` app (create_app) through Starlette's TestClient: real
campaign files, a real SQLite ledger, a real `mailer send` to aiosmtpd for the mailed invitation
to compare with."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import icalendar
import pytest
import vobject
from click.testing import CliRunner
from starlette.testclient import TestClient

from mailer import config, ics, planner, tokens
from mailer.cli import cli
from mailer.clock import ManualClock
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer
from mailer.store import RecordedRevision
from mailer.web import create_app
from mailer.web_calendar import entries

SECRET = "test-secret-0123456789"
CID = "integratiepact-2018"
MEETING = "aan-de-slag"
NOW = datetime(2018, 1, 10, 12, 0, tzinfo=UTC)
TEMPLATES = Path(__file__).resolve().parent.parent / "mailer" / "web_templates"
#: The shipped meeting, 09:30-16:30 in Brussels (CET): in UTC.
MEETING_UTC = (datetime(2018, 1, 22, 8, 30, tzinfo=UTC), datetime(2018, 1, 22, 15, 30, tzinfo=UTC))


def client(folder: Path, clock: ManualClock | None = None) -> TestClient:
    """The real `mailer web` app (mailer.web.create_app mounts these routes) on the campaign in
    ``folder``, its ledger, and a clock that stands still."""
    db = folder / "mailer.db"
    if not db.exists():
        Ledger.create(db).close()
    cfg = folder / "schedules.yaml"
    text = cfg.read_text(encoding="utf-8")
    if "\nweb:" not in text:
        cfg.write_text(text + "web: {url: 'https://events.example.be/'}\n", encoding="utf-8")
    app = create_app(cfg, db, secret=SECRET, clock=clock or ManualClock(NOW))
    return TestClient(app, base_url="https://events.example.be")


def token(purpose: str, address: str, event: str = MEETING, campaign: str = CID) -> str:
    return tokens.sign(SECRET, purpose, campaign, event, address)


@dataclass(frozen=True)
class Read:
    uid: str
    sequence: int
    start: Any
    end: Any
    status: str
    summary: str


def read_both(raw: bytes) -> dict[str, Read]:
    """Every VEVENT as icalendar and vobject read it; both must agree (UTC start/end)."""
    assert b"\n" not in raw.replace(b"\r\n", b"") and raw.endswith(b"\r\n")
    assert all(len(line) <= 75 for line in raw.split(b"\r\n")), "folded at 75 octets"

    def utc(v: Any) -> Any:
        return v.astimezone(UTC) if isinstance(v, datetime) else v

    a: dict[str, Read] = {}
    for ev in icalendar.Calendar.from_ical(raw).walk("VEVENT"):
        r = Read(
            str(ev["UID"]),
            int(str(ev["SEQUENCE"])),
            utc(ev.decoded("DTSTART")),
            utc(ev.decoded("DTEND")),
            str(ev["STATUS"]),
            str(ev["SUMMARY"]),
        )
        a[r.uid] = r
    b: dict[str, Read] = {}
    cal = vobject.readOne(raw.decode("utf-8"))
    for ev in cal.vevent_list:
        r = Read(
            ev.uid.value,
            int(ev.sequence.value),
            utc(ev.dtstart.value),
            utc(ev.dtend.value),
            ev.status.value,
            ev.summary.value,
        )
        b[r.uid] = r
    assert a == b, f"icalendar and vobject disagree:\n{a}\n{b}"
    assert "ATTENDEE" not in raw.decode(), "a published calendar names no attendee"
    assert "\r\nMETHOD:PUBLISH\r\n" in raw.decode()
    return a


def mailed_calendars(smtp_server: SmtpServer, to: str) -> list[icalendar.cal.Component]:
    out: list[icalendar.cal.Component] = []
    for r in smtp_server.handler.received:
        msg = email.message_from_bytes(r.data, policy=email.policy.default)
        if to not in str(msg["To"]):
            continue
        for part in msg.walk():
            if part.get_content_type() == "text/calendar":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                out += list(icalendar.Calendar.from_ical(payload).walk("VEVENT"))
    return out


def send(now: str, env: dict[str, str]) -> None:
    r = CliRunner().invoke(cli, ["send", "--now", now], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------
# ics.publish, pure.
# --------------------------------------------------------------------------------------


def test_publish_two_events_one_cancelled_both_readers_agree() -> None:
    campaign = config.load(Path(__file__).resolve().parent.parent / "schedules.yaml")
    info, meeting = campaign.event("infosessie"), campaign.event(MEETING)
    stamp = datetime(2018, 1, 4, 9, tzinfo=UTC)
    raw = ics.publish(
        campaign,
        [ics.Entry(info, 0), ics.Entry(meeting, 2, cancelled=True)],
        dtstamp=stamp,
        name=campaign.name,
        refresh=timedelta(hours=1),
    )
    got = read_both(raw)
    assert got[meeting.uid] == Read(meeting.uid, 2, *MEETING_UTC, "CANCELLED", meeting.title)
    assert (got[info.uid].start, got[info.uid].end, got[info.uid].status) == (
        date(2018, 1, 16),
        date(2018, 1, 17),
        "CONFIRMED",
    )
    text = raw.decode()
    assert "\r\nREFRESH-INTERVAL;VALUE=DURATION:PT1H\r\n" in text and "\r\nX-PUBLISHED-TTL:PT1H\r\n" in text
    assert text.count("BEGIN:VTIMEZONE") == 1 and text.count("BEGIN:VCALENDAR") == 1


# --------------------------------------------------------------------------------------
# The routes.
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_download_and_feed_follow_the_mails(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .ics and the feed carry the mailed invitation's UID and SEQUENCE; after the meeting
    is cancelled (a CANCEL mail with SEQUENCE 1), both say STATUS:CANCELLED, SEQUENCE 1."""
    monkeypatch.setattr("mailer.web.RELOAD_EVERY", 0.0)  # `mailer web` sees an edit within seconds
    who = "els.vandevelde@example.be"  # indieners and lerend-netwerk: both events
    send("2018-01-04T10:00", smtp_env)
    mailed = {str(e["UID"]): int(str(e["SEQUENCE"])) for e in mailed_calendars(smtp_server, who)}
    web = client(shipped)

    r = web.get(f"/ics/{token('ics', who)}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/calendar; charset=utf-8"
    assert r.headers["content-disposition"] == 'attachment; filename="aan-de-slag.ics"'
    [got] = read_both(r.content).values()
    assert (got.uid, got.sequence) == (uid := next(u for u in mailed if u.startswith(MEETING)), mailed[uid])
    assert (got.start, got.end, got.status) == (*MEETING_UTC, "CONFIRMED")

    feed = read_both(web.get(f"/feed/{token('feed', who, '*')}.ics").content)
    assert {u: r.sequence for u, r in feed.items()} == mailed and len(feed) == 2

    cfg = shipped / "schedules.yaml"
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace("    end: 2018-01-22 16:30\n", "    end: 2018-01-22 16:30\n    status: cancelled\n")
    )
    # Before the next pass: the download already says what the cancellation will say.
    assert read_both(web.get(f"/ics/{token('ics', who)}").content)[uid].status == "CANCELLED"
    send("2018-01-05T10:00", smtp_env)
    cancel = [e for e in mailed_calendars(smtp_server, who) if str(e["STATUS"]) == "CANCELLED"]
    assert [int(str(e["SEQUENCE"])) for e in cancel] == [1]
    feed = read_both(web.get(f"/feed/{token('feed', who, '*')}.ics").content)
    assert (feed[uid].sequence, feed[uid].status) == (1, "CANCELLED")
    assert (feed[uid].start, feed[uid].end) == MEETING_UTC
    assert [r.status for u, r in feed.items() if u != uid] == ["CONFIRMED"]


def test_feed_lists_only_the_events_the_address_is_invited_to(shipped: Path) -> None:
    web = client(shipped)  # no pass yet: SEQUENCE 0, from the audiences
    only_meeting = read_both(web.get(f"/feed/{token('feed', 'helene.claes@example.be', '*')}.ics").content)
    assert [r.summary for r in only_meeting.values()] == ["Aan de slag INTEGRATIEPACT"]
    assert [r.sequence for r in only_meeting.values()] == [0]
    stranger = web.get(f"/feed/{token('feed', 'nobody@example.org', '*')}.ics")
    assert stranger.status_code == 200 and "BEGIN:VEVENT" not in stranger.text


def test_the_download_is_in_the_readers_language(shipped: Path) -> None:
    cfg = shipped / "schedules.yaml"
    cfg.write_text(
        cfg.read_text(encoding="utf-8").replace(
            "    title: Aan de slag INTEGRATIEPACT\n",
            "    title: {nl: Aan de slag INTEGRATIEPACT, fr: Au travail INTEGRATIEPACT}\n",
        ),
        encoding="utf-8",
    )
    web = client(shipped)
    fr = web.get(f"/ics/{token('ics', 'francois.lefevre@example.be')}")
    nl = web.get(f"/ics/{token('ics', 'an.declercq@example.be')}")
    assert [r.summary for r in read_both(fr.content).values()] == ["Au travail INTEGRATIEPACT"]
    assert [r.summary for r in read_both(nl.content).values()] == ["Aan de slag INTEGRATIEPACT"]
    assert "SUMMARY;LANGUAGE=fr:" in fr.text
    assert read_both(fr.content).keys() == read_both(nl.content).keys()  # one UID for every reader


@pytest.mark.parametrize(
    "path",
    [
        "/ics/{rsvp}",  # another purpose
        "/ics/{altered}",
        "/ics/{other_secret}",
        "/ics/{other_campaign}",
        "/ics/{unknown_event}",
        "/feed/{ics}.ics",  # an ics token is not a feed token
        "/feed/{feed_one_event}.ics",  # a feed token names "*"
        "/e/{ics}",
        "/e/{feed}",
        "/e/x",
        "/feed/.ics",
    ],
)
def test_a_forged_or_other_purpose_token_is_404(shipped: Path, path: str) -> None:
    who = "an.declercq@example.be"
    good = token("ics", who)
    altered = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
    toks = {
        "rsvp": token("rsvp", who),
        "ics": good,
        "altered": altered,
        "other_secret": tokens.sign("another-secret", "ics", CID, MEETING, who),
        "other_campaign": token("ics", who, campaign="other-campaign"),
        "unknown_event": token("ics", who, event="no-such-event"),
        "feed_one_event": token("feed", who),
        "feed": token("feed", who, "*"),
    }
    r = client(shipped).get(path.format(**toks))
    assert r.status_code == 404
    assert "BEGIN:VCALENDAR" not in r.text and who not in r.text


def test_event_page_shows_the_event_and_no_other_recipient(shipped: Path) -> None:
    who = "francois.lefevre@example.be"
    r = client(shipped).get(f"/e/{token('event', who)}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert '<html lang="fr">' in html
    assert "Aan de slag INTEGRATIEPACT" in html
    assert "lundi 22 janvier 2018, 09:30–16:30" in html  # the reader's language, Brussels hours
    assert "https://www.openstreetmap.org/search?query=KVS%20%28Koninklijke" in html
    # The answer links carry an rsvp token for this address and this event only.
    answers = re.findall(r'href="https://events\.example\.be/r/([A-Za-z0-9_-]+)\?answer=(\w+)"', html)
    assert [a for _, a in answers] == ["accepted", "tentative", "declined"]
    assert {tokens.verify(SECRET, "rsvp", t) for t, _ in answers} == {(CID, MEETING, who)}
    ics_link = re.search(r'href="https://events\.example\.be/ics/([A-Za-z0-9_-]+)"', html)
    assert ics_link and tokens.verify(SECRET, "ics", ics_link.group(1)) == (CID, MEETING, who)
    assert f"webcal://events.example.be/feed/{token('feed', who, '*')}.ics" in html
    assert "calendar.google.com/calendar/render?" in html and "20180122T083000Z" in html
    others = set(re.findall(r"[\w.+-]+@[\w.-]+", (shipped / "contacts" / "indieners.csv").read_text()))
    others |= set(re.findall(r"[\w.+-]+@[\w.-]+", (shipped / "contacts" / "lerend-netwerk.csv").read_text()))
    assert {a for a in others if a in html} <= {who}


def test_a_contact_in_another_zone_sees_their_hours(shipped: Path) -> None:
    with (shipped / "contacts" / "indieners.csv").open("a", encoding="utf-8") as f:
        f.write("ny@example.org,New Yorker,en,indieners,Org\n")
    path = shipped / "contacts" / "indieners.csv"
    rows = path.read_text(encoding="utf-8").splitlines()
    rows[0] += ",timezone"
    rows = [rows[0], *(r + ("," + "America/New_York" if r.startswith("ny@") else ",") for r in rows[1:])]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    web = client(shipped)
    html = web.get(f"/e/{token('event', 'ny@example.org')}").text
    assert "Monday, 22 January 2018, 09:30–16:30 (Brussels) / 03:30–10:30 New York" in html
    assert "ny@example.org" not in web.get(f"/e/{token('event', 'an.declercq@example.be')}").text


def test_a_cancelled_event_page_has_no_answer_buttons(shipped: Path) -> None:
    cfg = shipped / "schedules.yaml"
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace("    end: 2018-01-22 16:30\n", "    end: 2018-01-22 16:30\n    status: cancelled\n")
    )
    html = client(shipped).get(f"/e/{token('event', 'an.declercq@example.be')}").text
    assert "Deze activiteit is afgelast." in html and "/r/" not in html


def test_entries_take_the_sequence_the_next_pass_will_record(shipped: Path) -> None:
    """The ledger's SEQUENCE and its time as DTSTAMP; after an edit not yet recorded, the
    SEQUENCE the update mail will carry (an amend when nobody holds the entry keeps it)."""
    cfg = shipped / "schedules.yaml"
    before = config.load(cfg)
    recorded_at = datetime(2018, 1, 4, 9, tzinfo=UTC)
    with Ledger.create(shipped / "mailer.db") as led:
        for rev in planner.revisions(before, {}, lambda _: False):
            rec = RecordedRevision(
                rev.event, rev.sequence, rev.kind, rev.fingerprint, rev.snapshot, recorded_at
            )
            led.record_revision(CID, rec, "unused")
        recorded = led.latest_revisions(CID)
    now = entries(before, recorded, lambda _: True, NOW)
    assert (now[MEETING].sequence, now[MEETING].dtstamp) == (0, recorded_at)
    cfg.write_text(
        cfg.read_text(encoding="utf-8").replace("start: 2018-01-22 09:30", "start: 2018-01-22 10:00")
    )
    moved = config.load(cfg)
    held = entries(moved, recorded, lambda ev: ev == MEETING, NOW)
    assert (held[MEETING].sequence, held[MEETING].dtstamp) == (1, NOW)
    assert (held["infosessie"].sequence, held["infosessie"].dtstamp) == (0, recorded_at)
    assert entries(moved, recorded, lambda _: False, NOW)[MEETING].sequence == 0

"""Issue 13, "Calendar behaviour": what a calendar client does with the mails we send.

Every test sends over real SMTP (aiosmtpd on 127.0.0.1) into a real ledger file, or builds the
exact bytes, and reads them back with the email package (policy.default) and two calendar
parsers (icalendar and vobject, through tests/interop.py)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import SIMPLE_TEMPLATES, write_campaign
from interop import check_calendar, check_message

from mailer import config
from mailer.cli import cli
from mailer.errors import ConfigError
from mailer.ics import build_event
from mailer.ledger import Ledger
from mailer.planner import ORGANISER_REASON
from mailer.smtpd import MaildirHandler, Received, SmtpServer
from mailer.store import Claim

DTSTAMP = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
- {id: remind, event: ev, template: remind, at: -1d 09:00, attach_ics: true}
"""


def send(cfg: Path, now: str, server: SmtpServer) -> str:
    env = {"MAILER_SMTP_HOST": server.host, "MAILER_SMTP_PORT": str(server.port), "MAILER_SMTP_TLS": "none"}
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", now], env=env, catch_exceptions=False)
    return r.output


def parsed(item: Received) -> EmailMessage:
    msg = email.message_from_bytes(item.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def calendar_of(msg: EmailMessage) -> bytes:
    part = next(p for p in msg.walk() if p.get_content_type() == "text/calendar")
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def by_rcpt(handler: MaildirHandler) -> dict[str, list[Received]]:
    out: dict[str, list[Received]] = {}
    for r in handler.received:
        out.setdefault(r.rcpt_tos[0], []).append(r)
    return out


def rows(cfg: Path) -> dict[tuple[str, str], dict[str, Any]]:
    with Ledger(cfg.parent / "ledger.db") as led:
        return {(r["step"], r["email"]): r for r in led.log()}


# -- 1. a REQUEST to someone who answered carries their answer ------------------------------------


def test_reminder_with_calendar_carries_the_answer_and_the_same_sequence(tmp_path: Path) -> None:
    """Ann accepted, Bob declined (to SEQUENCE 0), Cleo did not answer: the reminder with
    attach_ics: true tells each client what it already knows, RSVP=FALSE once answered, and
    SEQUENCE stays 0 (a reminder does not raise it)."""
    contacts = "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\ncleo@example.org,Cleo,a\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
        with Ledger(cfg.parent / "ledger.db") as led:
            led.record_reply("test", "ev", "Ann@Example.ORG", "ACCEPTED", DTSTAMP, "<r1@x>", 0)
            led.record_reply("test", "ev", "bob@example.org", "DECLINED", DTSTAMP, "<r2@x>", 0)
        send(cfg, "2018-01-21T09:00", server)
    got = by_rcpt(handler)
    expect = {
        "ann@example.org": "ACCEPTED",
        "bob@example.org": "DECLINED",
        "cleo@example.org": "NEEDS-ACTION",
    }
    for addr, partstat in expect.items():
        invite, remind = got[addr]
        first = check_calendar(calendar_of(check_message(invite.data)))
        assert (first.partstat, first.rsvp, first.sequence) == ("NEEDS-ACTION", True, 0)
        msg = check_message(remind.data, partstat=partstat)  # icalendar and vobject read it so
        again = check_calendar(calendar_of(msg))
        assert (again.partstat, again.rsvp) == (partstat, partstat == "NEEDS-ACTION")
        assert again.sequence == first.sequence == 0
        assert again.uid == first.uid


def test_an_answer_is_fixed_with_the_claim(tmp_path: Path) -> None:
    """The answer a mail carries is recorded with its claim (schema 5): a row left ``sending``
    (its mail may be at the server) is claimed again with the same answer, so it goes again
    byte-identical; a pending or deferred row (never reached a server) takes the answer known
    now."""
    at = datetime(2018, 1, 4, 10, 0, tzinfo=UTC)
    with Ledger(tmp_path / "l.db") as led:

        def claim(email: str, partstat: str | None) -> str | None:
            item = Claim("remind", "ev", email, "", at, f"<{email}>", 0, True, partstat)
            (c,) = led.claim("test", [item], at)
            assert c is not None
            return c.partstat

        assert claim("ann@example.org", None) is None
        assert claim("ann@example.org", "ACCEPTED") is None  # still 'sending': in doubt, kept
        led.conn.execute("UPDATE deliveries SET status='deferred' WHERE email='ann@example.org'")
        assert claim("ann@example.org", "ACCEPTED") == "ACCEPTED"  # a 4xx: nothing reached anyone
        assert claim("ann@example.org", "DECLINED") == "ACCEPTED"


def test_a_mail_in_doubt_goes_again_identical_after_an_answer_came_in(tmp_path: Path) -> None:
    """The connection is cut after the reminder's payload (outcome unknown); Ann's answer comes
    in before the retry; the retry is byte-for-byte the first attempt (same answer, Date,
    DTSTAMP, SEQUENCE): the answer is part of the claim."""

    class Recording(MaildirHandler):
        cut = 1
        seen: list[bytes] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.seen.append(envelope.original_content or b"")
            if self.cut:
                self.cut -= 1
                server.transport.close()
                return "421 closing"
            return await super().handle_DATA(server, session, envelope)

    contacts = "email,name,lists\nann@example.org,Ann,a\n"
    steps = "- {id: remind, event: ev, template: remind, at: -1d 09:00, attach_ics: true}\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=contacts)
    with Ledger(cfg.parent / "ledger.db") as led:
        led.record_reply("test", "ev", "ann@example.org", "TENTATIVE", DTSTAMP, "<r1@x>", 0)
    handler = Recording()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-21T09:00", server)
        assert rows(cfg)[("remind", "ann@example.org")]["status"] == "sending"
        with Ledger(cfg.parent / "ledger.db") as led:
            led.record_reply("test", "ev", "ann@example.org", "ACCEPTED", DTSTAMP, "<r2@x>", 0)
        send(cfg, "2018-01-21T12:00", server)
    first, second = handler.seen
    assert first == second
    assert check_calendar(calendar_of(check_message(second, partstat="TENTATIVE"))).rsvp is False
    assert rows(cfg)[("remind", "ann@example.org")]["status"] == "sent"


def test_an_update_asks_again_and_a_later_reminder_carries_the_new_answer(tmp_path: Path) -> None:
    """After a significant change (SEQUENCE 1) an answer to SEQUENCE 0 no longer counts: the
    update asks again (NEEDS-ACTION, RSVP=TRUE); once Ann accepted SEQUENCE 1 the reminder
    carries ACCEPTED and SEQUENCE 1: never below the update she has."""
    contacts = "email,name,lists\nann@example.org,Ann,a\n"
    templates = {
        **SIMPLE_TEMPLATES,
        "update/en/subject.txt": "{{ event.title }} – changed",
        "update/en/body.txt": "Changed.\n",
        "update/en/body.html": "<p>Changed.</p>",
    }
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts, templates=templates)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
        with Ledger(cfg.parent / "ledger.db") as led:
            led.record_reply("test", "ev", "ann@example.org", "ACCEPTED", DTSTAMP, "<r1@x>", 0)
        cfg.write_text(cfg.read_text().replace("Hall 1", "Hall 2"), encoding="utf-8")
        send(cfg, "2018-01-10T10:00", server)
        with Ledger(cfg.parent / "ledger.db") as led:
            led.record_reply("test", "ev", "ann@example.org", "ACCEPTED", DTSTAMP, "<r2@x>", 1)
        send(cfg, "2018-01-21T09:00", server)
    invite, update, remind = (check_calendar(calendar_of(parsed(r))) for r in handler.received)
    assert (invite.sequence, update.sequence, remind.sequence) == (0, 1, 1)
    assert (update.partstat, update.rsvp) == ("NEEDS-ACTION", True)
    assert (remind.partstat, remind.rsvp) == ("ACCEPTED", False)


# -- 2. one spelling of an address with a non-ASCII domain ----------------------------------------


def test_a_non_ascii_domain_is_one_a_label_spelling_through_a_relay_without_smtputf8(tmp_path: Path) -> None:
    contacts = "email,name,lists\njan@münchen.de,Jan,a\n"
    steps = "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=contacts)
    handler = MaildirHandler()
    with SmtpServer(handler, enable_SMTPUTF8=False) as server:
        send(cfg, "2018-01-04T10:00", server)
    assert rows(cfg)[("invite", "jan@münchen.de")]["status"] == "sent"  # the ledger's own key
    (item,) = handler.received
    assert item.rcpt_tos == ("jan@xn--mnchen-3ya.de",)
    msg = check_message(item.data)  # To: == ATTENDEE, A-label (interop [13.2])
    assert msg["To"].addresses[0].addr_spec == "jan@xn--mnchen-3ya.de"
    assert check_calendar(calendar_of(msg)).attendees == ("jan@xn--mnchen-3ya.de",)


def test_a_non_ascii_local_part_keeps_its_unicode_domain_everywhere(tmp_path: Path) -> None:
    contacts = "email,name,lists\njösé@xn--mnchen-3ya.de,José,a\n"
    steps = "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=contacts)
    handler = MaildirHandler()
    with SmtpServer(handler, enable_SMTPUTF8=True) as server:
        send(cfg, "2018-01-04T10:00", server)
    (item,) = handler.received
    assert item.rcpt_tos == ("jösé@münchen.de",)
    msg = check_message(item.data)
    to = msg["To"].addresses[0].addr_spec.encode("utf-8", "surrogateescape").decode("utf-8")
    assert to == "jösé@münchen.de"
    assert check_calendar(calendar_of(msg)).attendees == ("jösé@münchen.de",)


# -- 3. the organiser is never an ATTENDEE of its own meeting -------------------------------------


def test_the_organiser_gets_no_calendar_and_a_recorded_reason(tmp_path: Path) -> None:
    contacts = "email,name,lists\nann@example.org,Ann,a\nEvents@Example.org,Events,a\n"
    steps = """\
    - {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
    - {id: remind, event: ev, template: remind, at: -1d 09:00, attach_ics: false}
    """
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=contacts)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
        send(cfg, "2018-01-21T09:00", server)
    got = by_rcpt(handler)
    assert [parsed(r).get_content_type() for r in got["ann@example.org"]] == [
        "multipart/mixed",
        "multipart/alternative",
    ]
    (remind,) = got["Events@example.org"]  # a mail without calendar still goes
    check_message(remind.data, expect_method=None)
    row = rows(cfg)[("invite", "Events@example.org")]
    assert (row["status"], row["reason"]) == ("skipped", ORGANISER_REASON)


# -- 4. TRANSP ------------------------------------------------------------------------------------

SHAPES = """\
- {id: timed, title: Timed, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
- {id: night, title: Overnight, start: 2018-01-22 22:00, end: 2018-01-23 04:00}
- {id: allday, title: All day, date: 2018-01-22}
- {id: multi, title: Three days, date: 2018-01-22, end_date: 2018-01-24}
- {id: long, title: Two days timed, start: 2018-01-22 09:00, end: 2018-01-23 17:00}
- {id: busy, title: Busy day, date: 2018-01-22, busy: true}
- {id: free, title: Free meeting, start: 2018-01-22 09:30, end: 2018-01-22 10:30, busy: false}
"""


@pytest.mark.parametrize(
    ("event", "transp"),
    [
        ("timed", "OPAQUE"),
        ("night", "OPAQUE"),
        ("allday", "TRANSPARENT"),
        ("multi", "TRANSPARENT"),
        ("long", "TRANSPARENT"),
        ("busy", "OPAQUE"),
        ("free", "TRANSPARENT"),
    ],
)
def test_all_day_and_multi_day_events_leave_the_attendee_free(
    tmp_path: Path, event: str, transp: str
) -> None:
    steps = f"- {{id: invite, event: {event}, template: invite, at: 2018-01-04 10:00}}\n"
    cfg = write_campaign(tmp_path, events=SHAPES, steps=steps)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
    busy = {"busy": True, "free": False}.get(event)
    assert len(handler.received) == 2
    for item in handler.received:
        cal = check_calendar(calendar_of(check_message(item.data, busy=busy)), busy=busy)
        assert cal.transp == transp


# -- 5. url: -------------------------------------------------------------------------------------


def test_url_is_percent_encoded_in_the_calendar_and_the_templates(tmp_path: Path) -> None:
    events = (
        "- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30,\n"
        '   url: "https://Inschrijven.Example.be/aan de slag/éü?naam=Jan Peeters"}\n'
    )
    templates = {
        "invite/en/subject.txt": "{{ event.title }} – invitation",
        "invite/en/body.txt": "Register: {{ event.url }}\n",
        "invite/en/body.html": '<p><a href="{{ event.url }}">register</a></p>',
    }
    steps = "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n"
    cfg = write_campaign(tmp_path, events=events, steps=steps, templates=templates)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
    want = "https://inschrijven.example.be/aan%20de%20slag/%C3%A9%C3%BC?naam=Jan%20Peeters"
    for item in handler.received:
        msg = check_message(item.data, title_subject=True)
        assert check_calendar(calendar_of(msg)).url == want  # icalendar and vobject read it so
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        assert text is not None and html is not None
        assert f"Register: {want}" in text.get_content()
        assert f'href="{want}"' in html.get_content()


@pytest.mark.parametrize(
    "url", ["www.example.be/inschrijven", "ftp://example.be/x", "https://", "mailto:jan@example.be", "/x"]
)
def test_url_that_is_not_an_absolute_http_url_is_a_config_error_at_its_line(tmp_path: Path, url: str) -> None:
    cfg = write_campaign(
        tmp_path,
        events=f'- {{id: ev, title: T, start: 2018-01-22 09:30, end: 2018-01-22 16:30,\n   url: "{url}"}}\n',
        steps="- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n",
    )
    with pytest.raises(ConfigError) as info:
        config.load(cfg)
    line = next(n for n, s in enumerate(cfg.read_text().splitlines(), 1) if "url:" in s)
    (problem,) = info.value.problems
    assert problem.line == line and problem.field is not None and "url" in problem.field
    assert "absolute http(s) URL" in problem.message
    r = CliRunner().invoke(cli, ["check", "--config", str(cfg)])
    assert r.exit_code != 0 and f"schedules.yaml:{line}" in r.output and "Traceback" not in r.output


# -- 6. the subject starts with the event's title -------------------------------------------------


def test_interop_checker_holds_a_subject_to_the_title(tmp_path: Path) -> None:
    """The checker's rule for every calendar mail of the shipped templates (issue 13 item 6):
    a subject that starts with the kind word fails it, one that starts with the title passes."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(cfg, "2018-01-04T10:00", server)
    item = handler.received[0]
    with pytest.raises(AssertionError, match=r"\[13.6\]"):
        check_message(item.data, title_subject=True)  # "Invitation: Launch"
    fixed = item.data.replace(b"Subject: Invitation: Launch", b"Subject: Launch - invitation")
    check_message(fixed, title_subject=True)


def test_ics_transp_and_partstat_on_the_bytes() -> None:
    """The calendar alone (no mail): build_event's answer and TRANSP, read by both parsers."""
    c = config.loads(
        "campaign: t\ntimezone: Europe/Brussels\nsender: {from: a@example.org}\ncontacts: [x.csv]\n"
        "events:\n"
        + "".join("  " + line + "\n" for line in SHAPES.splitlines())
        + "steps:\n  - {id: s, event: timed, template: t, at: 2018-01-04 10:00}\n"
    )
    for ev in c.events:
        ics = build_event(c, ev, attendee_email="b@example.org", dtstamp=DTSTAMP, partstat="TENTATIVE")
        cal = check_calendar(ics, partstat="TENTATIVE", busy=ev.busy)
        assert (cal.partstat, cal.rsvp) == ("TENTATIVE", False)


def test_every_calendar_mail_of_the_shipped_campaign_reads_right(shipped: Path) -> None:
    """The shipped campaign's invitations, as sent: every rule above on every mail (one spelling,
    NEEDS-ACTION for the first copy, TRANSP by the event's shape) and a Subject that starts with
    the event's title as the recipient's calendar shows it (SUMMARY)."""
    handler = MaildirHandler()
    with SmtpServer(handler) as server:
        send(shipped / "schedules.yaml", "2018-01-04T10:00", server)
    assert len(handler.received) >= 4
    for item in handler.received:
        msg = check_message(item.data, title_subject=True, partstat="NEEDS-ACTION")
        assert str(msg["Subject"]).startswith(check_calendar(calendar_of(msg)).summary + " – ")

"""The whole life of an invitation on the shipped campaign: invite, move, cancel, answers."""

from __future__ import annotations

import collections
import email
import email.policy
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import icalendar
import pytest
from click.testing import CliRunner
from interop import check_message

from mailer.cli import cli
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer

pytestmark = pytest.mark.slow  # whole campaigns through the CLI: several passes each


def send(now: str, env: dict[str, str]) -> str:
    r = CliRunner().invoke(cli, ["send", "--now", now], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def calendar(raw: bytes) -> icalendar.Event:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = next(p for p in msg.walk() if p.get_content_type() == "text/calendar")
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    event = next(iter(icalendar.Calendar.from_ical(payload).walk("VEVENT")))
    assert isinstance(event, icalendar.Event)
    return event


def sequence(raw: bytes) -> int:
    return int(str(calendar(raw)["SEQUENCE"]))


def plain_body(raw: bytes) -> str:
    body = email.message_from_bytes(raw, policy=email.policy.default).get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def test_move_then_cancel_the_meeting(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    received = smtp_server.handler.received
    cfg = shipped / "schedules.yaml"
    send("2018-01-04T10:00", smtp_env)
    # Subjects start with the event's title, then the kind word (issue 13): read the header.
    invites = [
        r
        for r in received
        if "uitnodiging" in str(email.message_from_bytes(r.data, policy=email.policy.default)["Subject"])
    ]
    meeting = [r for r in received if str(calendar(r.data)["UID"]).startswith("aan-de-slag.")]
    assert len(meeting) == 14 and invites
    uid = str(calendar(meeting[0].data)["UID"])
    assert {sequence(r.data) for r in meeting} == {0}

    # two invitees decline the meeting as first announced (SEQUENCE 0), as the inbox records it
    replied = datetime(2018, 1, 4, 12, 0, tzinfo=UTC)
    with Ledger(shipped / "mailer.db") as led:
        for who in ("an.declercq@example.be", "jan.peeters@example.org"):
            led.record_reply("integratiepact-2018", "aan-de-slag", who, "DECLINED", replied, None, 0)

    # the 22 January session moves by an hour
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace("start: 2018-01-22 09:30", "start: 2018-01-22 10:30").replace(
            "end: 2018-01-22 16:30", "end: 2018-01-22 17:30"
        ),
        encoding="utf-8",
    )
    r = CliRunner().invoke(cli, ["check"], catch_exceptions=False)
    assert "Event aan-de-slag changed since its invitations went out" in r.output
    assert "sends an update (SEQUENCE 1) to 14 recipient(s)" in r.output
    before = len(received)
    out = send("2018-01-05T09:00", smtp_env)
    assert "update (SEQUENCE 1) for 14 recipient(s)" in out
    updates = received[before:]
    assert len(updates) == 14
    assert sorted(u.rcpt_tos[0] for u in updates) == sorted(m.rcpt_tos[0] for m in meeting)
    for u in updates:
        check_message(u.data, expect_method="REQUEST")
        ev = calendar(u.data)
        assert str(ev["UID"]) == uid and sequence(u.data) == 1
        assert ev.decoded("DTSTART").astimezone(UTC) == datetime(2018, 1, 22, 9, 30, tzinfo=UTC)
        body = plain_body(u.data)
        # the old time said in words, in the reader's language (issue 13)
        assert "10:30" in body and "09:30" in body and ("(was: " in body or "(auparavant : " in body)
    # exactly one: a second pass sends nothing more
    assert "0 due" in send("2018-01-05T10:00", smtp_env)
    assert len(received) == before + 14
    # Jan declines the new time too (SEQUENCE 1); An's answer was for the old time only
    with Ledger(shipped / "mailer.db") as led:
        led.record_reply(
            "integratiepact-2018", "aan-de-slag", "jan.peeters@example.org", "DECLINED", replied, None, 1
        )

    # the reminder a week before carries the new time
    before = len(received)
    send("2018-01-15T09:00", smtp_env)
    bodies = [plain_body(r.data) for r in received[before:]]
    meeting_reminders = [b for b in bodies if "Arduinkaai 7" in b]
    reminded = {r.rcpt_tos[0] for r in received[before:] if b"Arduinkaai 7" in r.data}
    # the reminder (rsvp: accepted, tentative, no-reply) reaches An, who has not answered the
    # new time, and not Jan, who declined it
    assert "an.declercq@example.be" in reminded and "jan.peeters@example.org" not in reminded
    assert len(meeting_reminders) == 13 and len(bodies) == 13 + 8
    spans = ("van 10:30 tot 17:30", "de 10:30 à 17:30", "10:30 to 17:30")  # nl, fr, en (issue 13)
    assert all(any(span in b for span in spans) for b in meeting_reminders), meeting_reminders[0]

    # cancelled: METHOD:CANCEL to the same people, SEQUENCE 2, and no further reminders
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace(
            "    title: Aan de slag INTEGRATIEPACT\n",
            "    title: Aan de slag INTEGRATIEPACT\n    status: cancelled\n",
        ),
        encoding="utf-8",
    )
    before = len(received)
    out = send("2018-01-16T12:00", smtp_env)
    cancels = received[before:]
    assert len(cancels) == 14, out
    for c in cancels:
        check_message(c.data, expect_method="CANCEL")
        ev = calendar(c.data)
        assert str(ev["UID"]) == uid and sequence(c.data) == 2
        assert str(ev["STATUS"]) == "CANCELLED"
    before = len(received)
    send("2018-01-19T09:00", smtp_env)
    assert len(received) == before
    with Ledger(shipped / "mailer.db") as led:
        skipped = list(led.log(step="herinnering-aan-de-slag-dag"))
        assert {r["status"] for r in skipped} == {"skipped"}
        assert {r["reason"] for r in skipped} == {"the event is cancelled"}
    ids = [email.message_from_bytes(r.data, policy=email.policy.default)["Message-ID"] for r in received]
    assert len(ids) == len(set(ids))


def test_replies_bounces_and_unsubscribes_from_the_inbox(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], tmp_path: Path
) -> None:
    """A decline stops that person's reminders for that event; a hard bounce or an unsubscribe
    stops all mail to the address; all of it shows in status and log."""
    import mailbox

    from test_inbox import dsn_mail, reply_ics, reply_mail

    # with a secret, as a real campaign: the mailto unsubscribe carries each recipient's token
    # (issue 15), and only a mail with it is believed
    smtp_env = {**smtp_env, "MAILER_WEB_SECRET": "lifecycle-secret-0123456789"}
    send("2018-01-04T10:00", smtp_env)
    els_mail = next(m for m in smtp_server.handler.received if m.rcpt_tos == ("els.vandevelde@example.be",))
    unsubscribe = str(
        email.message_from_bytes(els_mail.data, policy=email.policy.default)["List-Unsubscribe"]
    )
    subject = unsubscribe.split("mailto:afmelden@example.be?subject=", 1)[1].split(">", 1)[0]
    with Ledger(shipped / "mailer.db") as led:
        an_invite = next(led.log(step="uitnodiging-aan-de-slag", email="an.declercq@example.be"))[
            "message_id"
        ]
    box = mailbox.Maildir(tmp_path / "inbox", create=True)
    box.add(
        reply_mail(
            reply_ics(
                "aan-de-slag.integratiepact-2018@example.be", "mailto:jan.peeters@example.org", "DECLINED"
            ),
            "Jan Peeters <jan.peeters@example.org>",
        )
    )
    box.add(dsn_mail([("an.declercq@example.be", "failed", "5.1.1", "550 5.1.1 user unknown")], an_invite))
    box.add(
        b"From: Els <els.vandevelde@example.be>\nTo: afmelden@example.be\nSubject: "
        + urllib.parse.unquote(subject).encode()
        + b"\nMessage-ID: <unsub.1@example.be>\n\nGraag afmelden.\n"
    )
    r = CliRunner().invoke(
        cli, ["inbox", "--maildir", str(tmp_path / "inbox")], env=smtp_env, catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert "1 reply, 1 bounce, 1 unsubscribe" in r.output
    r = CliRunner().invoke(cli, ["status"], catch_exceptions=False)
    assert "Answers per event" in r.output and "aan-de-slag" in r.output
    r = CliRunner().invoke(cli, ["log", "--email", "an.declercq@example.be"], catch_exceptions=False)
    assert "bounced" in r.output

    before = len(smtp_server.handler.received)
    send("2018-01-09T09:00", smtp_env)
    send("2018-01-15T09:00", smtp_env)
    got = collections.Counter(m.rcpt_tos[0] for m in smtp_server.handler.received[before:])
    assert "an.declercq@example.be" not in got and "els.vandevelde@example.be" not in got
    assert got["jan.peeters@example.org"] == 2  # both info-session reminders, not the meeting's
    with Ledger(shipped / "mailer.db") as led:
        row = next(led.log(step="herinnering-aan-de-slag-week", email="jan.peeters@example.org"))
        assert row["status"] == "skipped" and "answered declined" in row["reason"]
        row = next(led.log(step="herinnering-aan-de-slag-week", email="an.declercq@example.be"))
        assert row["status"] == "suppressed" and "hard bounce" in row["reason"]
        row = next(led.log(step="herinnering-infosessie-week", email="els.vandevelde@example.be"))
        assert row["status"] == "suppressed" and "unsubscribed" in row["reason"]
        assert (
            next(led.log(step="herinnering-aan-de-slag-week", email="zoe.vermeulen@example.org"))["status"]
            == "sent"
        )
    # processing the same inbox again changes nothing
    r = CliRunner().invoke(cli, ["inbox", "--maildir", str(tmp_path / "inbox")], catch_exceptions=False)
    assert "nothing new" in r.output

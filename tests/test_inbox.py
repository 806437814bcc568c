"""Inbox processing: iMIP replies, RFC 3464 DSNs and unsubscribe mails, over a real Dovecot
(IMAPS, STARTTLS) and a local Maildir, plus table tests of the pure classify()."""

from __future__ import annotations

import hashlib
import mailbox
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import icalendar
import pytest
import trustme
from dovecot import Dovecot, dovecot_fixture  # noqa: F401 - provides the dovecot fixture
from imapclient import IMAPClient

from mailer.bounces import unsubscribe_token
from mailer.config import Campaign, load
from mailer.errors import InboxError
from mailer.inbox import (
    Finding,
    apply,
    classify,
    inbox_id,
    normalise_address,
    process,
    process_configured,
    run_inbox,
    worth_fetching,
)
from mailer.ledger import Ledger
from mailer.mailboxes import ImapSource, MaildirSource
from mailer.message import message_id
from mailer.store import Claim, Outcome, RecordedRevision
from mailer.vocab import Attempt, InboxKind

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2018, 1, 10, 12, 0, tzinfo=UTC)
SENT_AT = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)
STEP = "uitnodiging-aan-de-slag"
#: Signs the unsubscribe token an unsubscribe mail must carry (MAILER_WEB_SECRET).
SECRET = "inbox-test-secret-0123456789abcdef"
SECRET_ENV = {"MAILER_WEB_SECRET": SECRET}


CAMPAIGN = load(ROOT / "schedules.yaml")


@pytest.fixture
def campaign() -> Campaign:
    return CAMPAIGN


def uid(campaign: Campaign, event: str = "aan-de-slag") -> str:
    return campaign.event(event).uid


# --------------------------------------------------------------------------------------
# Building the mails a mailbox receives.
# --------------------------------------------------------------------------------------


def reply_ics(
    event_uid: str, attendee: str, partstat: str, *, method: str = "REPLY", sequence: int | None = 0
) -> bytes:
    """An iMIP REPLY as a calendar client writes it (RFC 5546 3.2.3)."""
    cal = icalendar.Calendar()
    cal.add("prodid", "-//mailer tests//inbox//EN")
    cal.add("version", "2.0")
    cal.add("method", method)
    ev = icalendar.Event()
    ev.add("uid", event_uid)
    ev.add("dtstamp", datetime(2018, 1, 5, 8, 0, tzinfo=UTC))
    if sequence is not None:
        ev.add("sequence", sequence)
    ev.add("dtstart", datetime(2018, 1, 22, 8, 30, tzinfo=UTC))
    ev.add("organizer", icalendar.vCalAddress("mailto:integratiepact@example.be"))
    att = icalendar.vCalAddress(attendee)
    att.params["PARTSTAT"] = partstat
    att.params["CN"] = "Someone"
    ev.add("attendee", att)
    cal.add_component(ev)
    return bytes(cal.to_ical())


def reply_mail(
    ics: bytes | str,
    sender: str,
    *,
    attach: bool = False,
    inline: bool = True,
    mid: str = "",
    in_reply_to: str = "",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    msg["To"] = "Integratiepact <integratiepact@example.be>"
    msg["Subject"] = "Answer: Aan de slag INTEGRATIEPACT"
    msg["Date"] = "Fri, 05 Jan 2018 09:00:00 +0100"
    msg["Message-ID"] = (
        mid or f"<reply.{hashlib.sha1(repr((ics, sender)).encode()).hexdigest()[:16]}@client.example>"
    )
    msg.set_content("My answer is in the calendar object.\n")
    text = ics.decode() if isinstance(ics, bytes) else ics
    if inline:
        msg.add_alternative(text, subtype="calendar", params={"method": "REPLY"})
    if attach:
        msg.add_attachment(text.encode(), maintype="application", subtype="ics", filename="invite.ics")
    return bytes(msg)


def dsn_mail(
    recipients: list[tuple[str, str, str, str]],
    original: str | None,
    *,
    mid: str = "<dsn.1@mx.example.net>",
    rfc822: bool = False,
) -> bytes:
    """A delivery status notification shaped as RFC 3464 (Postfix style).

    ``recipients``: ``(address, action, status, diagnostic)``.
    """
    blocks = "\n".join(
        f"Final-Recipient: rfc822; {addr}\nOriginal-Recipient: rfc822;{addr}\nAction: {action}\n"
        f"Status: {status}\nRemote-MTA: dns; mx2.example.net\n"
        f"Diagnostic-Code: smtp; {diag[:40]}\n    {diag[40:]}\n"
        for addr, action, status, diag in recipients
    )
    if original is None:
        returned = ""
    elif rfc822:
        returned = (
            f"--BOUNDARY\nContent-Type: message/rfc822\n\nMessage-ID: {original}\n"
            "From: Integratiepact <integratiepact@example.be>\nSubject: Uitnodiging\n\nHallo\n\n"
        )
    else:
        returned = (
            f"--BOUNDARY\nContent-Type: text/rfc822-headers\n\nMessage-ID: {original}\n"
            "From: Integratiepact <integratiepact@example.be>\nSubject: Uitnodiging\n\n"
        )
    text = (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\n"
        "To: integratiepact@example.be\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "Date: Thu, 04 Jan 2018 10:00:05 +0100\n"
        f"Message-ID: {mid}\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"\n'
        "\nThis is a MIME-encapsulated message.\n\n"
        "--BOUNDARY\nContent-Type: text/plain; charset=us-ascii\n\n"
        "I'm sorry to have to inform you that your message could not be delivered.\n\n"
        "--BOUNDARY\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example.net\nArrival-Date: Thu,  4 Jan 2018 10:00:05 +0100\n\n"
        f"{blocks}\n{returned}--BOUNDARY--\n"
    )
    return text.replace("\n", "\r\n").encode()


def plain_mail(sender: str, to: str, subject: str, *, mid: str, extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n{extra}"
        "Date: Sat, 06 Jan 2018 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHello.\r\n"
    ).encode()


def mid_for(campaign: Campaign, email: str) -> str:
    return message_id(campaign.id, STEP, email, campaign.sender.domain)


def scenario(campaign: Campaign) -> dict[str, bytes]:
    """The mails of the end-to-end tests, by name."""
    u = uid(campaign)
    return {
        "accepted": reply_mail(reply_ics(u, "mailto:jan@example.be", "ACCEPTED"), "Jan <jan@example.be>"),
        "declined": reply_mail(
            reply_ics(u, "MAILTO:els@Example.BE", "DECLINED"), "els@example.be", attach=True
        ),
        "tentative": reply_mail(
            reply_ics(u, "mailto:piet@example.be", "TENTATIVE"),
            "piet@example.be",
            inline=False,
            attach=True,
        ),
        "bounce": dsn_mail(
            [
                (
                    "gone@example.net",
                    "failed",
                    "5.1.1",
                    "550 5.1.1 <gone@example.net>: Recipient "
                    "address rejected: User unknown in virtual mailbox table",
                )
            ],
            mid_for(campaign, "gone@example.net"),
        ),
        "delay": dsn_mail(
            [
                (
                    "slow@example.net",
                    "delayed",
                    "4.4.1",
                    "connect to mx.example.net[192.0.2.1]:25: Connection timed out",
                )
            ],
            mid_for(campaign, "slow@example.net"),
            mid="<dsn.2@mx.example.net>",
        ),
        "unsubscribe": plain_mail(  # the List-Unsubscribe mailto's subject carries leen's token
            "Leen <leen@example.be>",
            "afmelden@example.be",
            f"unsubscribe {unsubscribe_token(SECRET, campaign.id, 'leen@example.be')}",
            mid="<unsub.1@client.example>",
        ),
        "unrelated": plain_mail(
            "friend@example.com", "integratiepact@example.be", "Lunch?", mid="<lunch.1@example.com>"
        ),
    }


#: The invitees whose replies the scenario carries (a reply from anyone else is unmatched).
INVITEES = ("jan@example.be", "els@example.be", "piet@example.be")


def ledger_with_deliveries(path: Path, campaign: Campaign) -> Ledger:
    """A real ledger where the invitation (with a calendar) to the invitees, gone@ and slow@
    was sent (known Message-IDs)."""
    ledger = Ledger(path)
    for email in ("gone@example.net", "slow@example.net", *INVITEES):
        item = Claim(STEP, "aan-de-slag", email, "", SENT_AT, mid_for(campaign, email), 0, True)
        [claimed] = ledger.claim(campaign.id, [item], SENT_AT)
        assert claimed is not None
        ledger.record_outcomes([Outcome(claimed.id, Attempt.SENT, 250, "2.0.0 Ok: queued", SENT_AT)])
    return ledger


def assert_recorded(ledger: Ledger, campaign: Campaign) -> None:
    assert ledger.answers(campaign.id) == {
        ("aan-de-slag", "jan@example.be"): "ACCEPTED",
        ("aan-de-slag", "els@example.be"): "DECLINED",
        ("aan-de-slag", "piet@example.be"): "TENTATIVE",
    }
    row = ledger.row(campaign.id, STEP, "gone@example.net")
    assert row is not None and row.status == "bounced"
    row = ledger.row(campaign.id, STEP, "slow@example.net")
    assert row is not None and row.status == "sent"  # a delay changes nothing
    suppressed = ledger.suppressed()
    assert set(suppressed) == {"gone@example.net", "leen@example.be"}
    assert "5.1.1" in suppressed["gone@example.net"]
    assert suppressed["leen@example.be"] == "unsubscribed by mail"
    inbox = {
        r[0]: (r[1], r[2], r[3])
        for r in ledger.conn.execute("SELECT message_id, kind, email, detail FROM inbox")
    }
    assert inbox["<dsn.2@mx.example.net>"][:2] == ("delay", "slow@example.net")
    assert "4.4.1" in inbox["<dsn.2@mx.example.net>"][2]
    assert "<lunch.1@example.com>" not in inbox
    assert len(inbox) == 6


# --------------------------------------------------------------------------------------
# A real IMAP server.
# --------------------------------------------------------------------------------------


@pytest.fixture
def imap(dovecot: Dovecot) -> Iterator[IMAPClient]:
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, ssl_context=ctx, timeout=10)
    client.login(dovecot.user, dovecot.password)
    client.select_folder("INBOX")
    yield client
    client.logout()


def append_all(client: IMAPClient, mails: dict[str, bytes]) -> dict[str, int]:
    uids = {}
    for name, raw in mails.items():
        resp = client.append("INBOX", raw)
        uids[name] = int(resp.split(b"APPENDUID ")[1].split()[1].rstrip(b"]"))  # RFC 4315
    return uids


def flags(client: IMAPClient, uid_: int) -> set[bytes]:
    client.noop()
    return set(client.get_flags([uid_])[uid_])


def test_imap_end_to_end(tmp_path: Path, campaign: Campaign, dovecot: Dovecot, imap: IMAPClient) -> None:
    uids = append_all(imap, scenario(campaign))
    ledger_with_deliveries(tmp_path / "mailer.db", campaign).close()

    result = run_inbox(
        ROOT / "schedules.yaml", tmp_path / "mailer.db", None, dovecot.env("tls") | SECRET_ENV, now=NOW
    )
    assert dict(result.counts) == {"reply": 3, "bounce": 1, "delay": 1, "unsubscribe": 1}
    assert (result.handled, result.ignored) == (6, 1)
    assert (
        result.summary() == "3 replies, 1 bounce, 1 delay, 1 unsubscribe; 6 message(s) handled, 1 left alone."
    )
    assert any(line.startswith("bounce: gone@example.net 5.1.1 550 5.1.1") for line in result.lines)
    with Ledger(tmp_path / "mailer.db") as ledger:
        assert_recorded(ledger, campaign)

    for name, u in uids.items():
        if name == "unrelated":
            assert not flags(imap, u) & {b"\\Seen", b"$MailerProcessed"}
        else:
            assert {b"\\Seen", b"$MailerProcessed"} <= flags(imap, u), name

    # Second pass, over STARTTLS: nothing new.
    again = run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, dovecot.env("starttls"), now=NOW)
    assert (again.handled, again.ignored, sum(again.counts.values())) == (0, 1, 0)
    assert not flags(imap, uids["unrelated"]) & {b"\\Seen", b"$MailerProcessed"}

    # Flagging lost (say the connection dropped after the ledger write): the ledger still
    # knows the message, so it is flagged again and not handled twice.
    imap.remove_flags([uids["accepted"]], [b"$MailerProcessed"])
    with Ledger(tmp_path / "mailer.db") as ledger:
        ledger.record_reply(campaign.id, "aan-de-slag", "jan@example.be", "DECLINED", NOW, None)
        third = process_configured(campaign, ledger, dovecot.env("tls"), now=NOW)
        assert third is not None and third.handled == 0
        assert ledger.answers(campaign.id)[("aan-de-slag", "jan@example.be")] == "DECLINED"
    assert b"$MailerProcessed" in flags(imap, uids["accepted"])


def test_imap_certificate_is_checked(
    tmp_path: Path, campaign: Campaign, dovecot: Dovecot, imap: IMAPClient
) -> None:
    Ledger.create(tmp_path / "mailer.db").close()  # only send/run create one
    uids = append_all(imap, {"accepted": scenario(campaign)["accepted"]})
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    for tls in ("tls", "starttls"):
        env = dovecot.env(tls) | {"MAILER_IMAP_CA_FILE": str(other)}
        with pytest.raises(InboxError, match="TLS certificate not trusted.*MAILER_IMAP_CA_FILE"):
            run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, env, now=NOW)
    # Without a CA file the system store is used, which does not know the test CA either.
    env = dovecot.env() | {"MAILER_IMAP_CA_FILE": ""}
    with pytest.raises(InboxError, match="certificate not trusted"):
        run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, env, now=NOW)
    assert flags(imap, uids["accepted"]) - {b"\\Recent"} == set()


def test_imap_wrong_mailbox_or_password(tmp_path: Path, dovecot: Dovecot) -> None:
    Ledger.create(tmp_path / "mailer.db").close()  # only send/run create one
    env = dovecot.env() | {"MAILER_IMAP_MAILBOX": "Nope"}
    with pytest.raises(InboxError, match="IMAP 127.0.0.1:[0-9]+: select failed: Mailbox doesn't exist: Nope"):
        run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, env, now=NOW)
    # Last: after a failed login Dovecot slows down further logins from the address.
    env = dovecot.env() | {"MAILER_IMAP_PASSWORD": "not-the-Secret-42"}
    with pytest.raises(InboxError) as info:
        run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, env, now=NOW)
    assert "login as organiser refused" in str(info.value)
    assert "not-the-Secret-42" not in str(info.value)
    source = ImapSource.from_env(env)
    assert source is not None and "not-the-Secret-42" not in repr(source)


def test_imap_settings_from_environment(tmp_path: Path) -> None:
    with pytest.raises(InboxError, match="no inbox to read: pass --maildir DIR, or set MAILER_IMAP_HOST"):
        run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", None, {}, now=NOW)
    assert not (tmp_path / "mailer.db").exists()
    with pytest.raises(InboxError, match="set MAILER_IMAP_USER, MAILER_IMAP_PASSWORD"):
        ImapSource.from_env({"MAILER_IMAP_HOST": "imap.example.be"})
    with pytest.raises(InboxError, match="MAILER_IMAP_TLS='ssl'"):
        ImapSource.from_env(
            {
                "MAILER_IMAP_HOST": "h",
                "MAILER_IMAP_USER": "u",
                "MAILER_IMAP_PASSWORD": "p",
                "MAILER_IMAP_TLS": "ssl",
            }
        )
    with pytest.raises(InboxError, match="MAILER_IMAP_PORT='x'"):
        ImapSource.from_env(
            {
                "MAILER_IMAP_HOST": "h",
                "MAILER_IMAP_USER": "u",
                "MAILER_IMAP_PASSWORD": "p",
                "MAILER_IMAP_PORT": "x",
            }
        )
    s = ImapSource.from_env(
        {
            "MAILER_IMAP_HOST": "h",
            "MAILER_IMAP_USER": "u",
            "MAILER_IMAP_PASSWORD": "p",
            "MAILER_IMAP_TLS": "STARTTLS",
            "OTHER": "x",
        }
    )
    assert s is not None and (s.port, s.tls, s.mailbox, s.ca_file) == (
        143,
        "starttls",
        "INBOX",
        None,
    )
    assert repr(s) == "ImapSource('imap+starttls://u@h:143/INBOX')"
    assert ImapSource.from_env({"MAILER_SMTP_HOST": "x"}) is None


# --------------------------------------------------------------------------------------
# A local Maildir.
# --------------------------------------------------------------------------------------


def test_maildir_end_to_end(tmp_path: Path, campaign: Campaign) -> None:
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    keys = {}
    for name, raw in scenario(campaign).items():
        m = mailbox.MaildirMessage(raw)
        if name == "accepted":  # read by the organiser in a mail client, not processed yet
            m.set_subdir("cur")
            m.set_flags("S")
        keys[name] = md.add(m)
    ledger_with_deliveries(tmp_path / "mailer.db", campaign).close()

    result = run_inbox(
        ROOT / "schedules.yaml", tmp_path / "mailer.db", tmp_path / "Maildir", SECRET_ENV, now=NOW
    )
    assert dict(result.counts) == {"reply": 3, "bounce": 1, "delay": 1, "unsubscribe": 1}
    assert (result.handled, result.ignored) == (6, 1)
    with Ledger(tmp_path / "mailer.db") as ledger:
        assert_recorded(ledger, campaign)
    new = sorted((tmp_path / "Maildir" / "new").iterdir())
    cur = sorted((tmp_path / "Maildir" / "cur").iterdir())
    assert [p.name for p in new] == [keys["unrelated"]]
    assert len(cur) == 6 and all(p.name.endswith(":2,S") for p in cur)

    again = run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", tmp_path / "Maildir", {}, now=NOW)
    assert (again.handled, again.ignored, sum(again.counts.values())) == (0, 1, 0)
    assert sorted((tmp_path / "Maildir" / "cur").iterdir()) == cur

    # A copy that lost its flag (restored from a backup) is known to the ledger: not handled again.
    (tmp_path / "Maildir" / "new" / "restored").write_bytes(scenario(campaign)["declined"])
    with Ledger(tmp_path / "mailer.db") as ledger:
        third = process(MaildirSource(tmp_path / "Maildir"), ledger, campaign, NOW)
    assert third.handled == 0
    assert (tmp_path / "Maildir" / "cur" / "restored:2,S").exists()


def test_maildir_errors(tmp_path: Path, campaign: Campaign) -> None:
    Ledger.create(tmp_path / "mailer.db").close()  # only send/run create one
    with pytest.raises(InboxError, match="not a Maildir"):
        run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", tmp_path, {}, now=NOW)
    assert process_configured(campaign, Ledger(":memory:"), {}, now=NOW) is None


# --------------------------------------------------------------------------------------
# classify(): pure table tests.
# --------------------------------------------------------------------------------------

R = "mailto:jan@example.be"


def _cases(c: Campaign) -> list[tuple[str, bytes, list[Finding]]]:
    u = uid(c)
    mine = mid_for(c, "gone@example.net")
    hard = ("gone@example.net", "failed", "5.1.1", "550 5.1.1 user unknown")
    return [
        (
            "accepted",
            reply_mail(reply_ics(u, R, "ACCEPTED"), "jan@example.be"),
            [
                Finding(
                    InboxKind.REPLY,
                    "jan@example.be",
                    "aan-de-slag",
                    "ACCEPTED",
                    sequence=0,
                    sender="jan@example.be",
                )
            ],
        ),
        (
            "MAILTO upper-case, domain case",
            reply_mail(reply_ics(u, "MAILTO:Jan@Example.BE", "accepted"), "x@y.be"),
            [
                Finding(
                    InboxKind.REPLY, "Jan@example.be", "aan-de-slag", "ACCEPTED", sequence=0, sender="x@y.be"
                )
            ],
        ),
        (
            "other event",
            reply_mail(reply_ics(uid(c, "infosessie"), R, "DECLINED"), "jan@example.be"),
            [
                Finding(
                    InboxKind.REPLY,
                    "jan@example.be",
                    "infosessie",
                    "DECLINED",
                    sequence=0,
                    sender="jan@example.be",
                )
            ],
        ),
        (
            "inline and attached: once",
            reply_mail(reply_ics(u, R, "TENTATIVE"), "j@x.be", attach=True),
            [
                Finding(
                    InboxKind.REPLY, "jan@example.be", "aan-de-slag", "TENTATIVE", sequence=0, sender="j@x.be"
                )
            ],
        ),
        (
            "unknown UID",
            reply_mail(reply_ics("someone-else@example.org", R, "ACCEPTED"), "jan@example.be"),
            [],
        ),
        (
            "REQUEST, not REPLY",
            reply_mail(reply_ics(u, R, "ACCEPTED", method="REQUEST"), "jan@example.be"),
            [],
        ),
        (
            "an answer to revision 2",
            reply_mail(reply_ics(u, R, "ACCEPTED", sequence=2), "jan@example.be"),
            [
                Finding(
                    InboxKind.REPLY,
                    "jan@example.be",
                    "aan-de-slag",
                    "ACCEPTED",
                    sequence=2,
                    sender="jan@example.be",
                )
            ],
        ),
        (
            "no SEQUENCE",
            reply_mail(reply_ics(u, R, "ACCEPTED", sequence=None), "jan@example.be"),
            [
                Finding(
                    InboxKind.REPLY,
                    "jan@example.be",
                    "aan-de-slag",
                    "ACCEPTED",
                    sequence=None,
                    sender="jan@example.be",
                )
            ],
        ),
        ("NEEDS-ACTION", reply_mail(reply_ics(u, R, "NEEDS-ACTION"), "jan@example.be"), []),
        (
            "malformed calendar",
            reply_mail(
                "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID;=:\r\n"
                "ATTENDEE;PARTSTAT=ACCEPTED:mailto:jan@example.be\r\n",
                "j@x.be",
            ),
            [],
        ),
        ("truncated calendar", reply_mail(reply_ics(u, R, "ACCEPTED")[:-40], "j@x.be"), []),
        (
            "a broken DTSTART does not hide the answer",
            reply_mail(reply_ics(u, R, "DECLINED").replace(b"DTSTART:2018", b"DTSTART:xx18"), "j@x.be"),
            [
                Finding(
                    InboxKind.REPLY, "jan@example.be", "aan-de-slag", "DECLINED", sequence=0, sender="j@x.be"
                )
            ],
        ),
        ("not a calendar at all", reply_mail("\x00\x01 garbage", "j@x.be"), []),
        (
            "DSN, two recipients",
            dsn_mail([hard, ("late@example.net", "delayed", "4.4.1", "connection timed out")], mine),
            [
                Finding(
                    InboxKind.BOUNCE,
                    "gone@example.net",
                    status="5.1.1",
                    diagnostic="550 5.1.1 user unknown",
                    original_message_id=mine,
                ),
                Finding(
                    InboxKind.DELAY,
                    "late@example.net",
                    status="4.4.1",
                    diagnostic="connection timed out",
                    original_message_id=mine,
                ),
            ],
        ),
        (
            "DSN with message/rfc822",
            dsn_mail([hard], mine, rfc822=True),
            [
                Finding(
                    InboxKind.BOUNCE,
                    "gone@example.net",
                    status="5.1.1",
                    diagnostic="550 5.1.1 user unknown",
                    original_message_id=mine,
                )
            ],
        ),
        (
            "DSN without the original",
            dsn_mail([hard], None),
            [
                Finding(
                    InboxKind.BOUNCE,
                    "gone@example.net",
                    status="5.1.1",
                    diagnostic="550 5.1.1 user unknown",
                )
            ],
        ),
        ("DSN of another mail", dsn_mail([hard], "<123@mail.example.be>"), []),
        (
            "DSN: delivered",
            dsn_mail([("ok@example.net", "delivered", "2.0.0", "250 ok")], mine),
            [],
        ),
        (
            "unsubscribe, any case",
            plain_mail("Leen <Leen@Example.BE>", "AFMELDEN@example.be", "x", mid="<u@x>"),
            [Finding(InboxKind.UNSUBSCRIBE, "Leen@example.be", subject="x")],
        ),
        (
            "unsubscribe via Delivered-To",
            plain_mail(
                "a@b.be",
                "undisclosed-recipients:;",
                "x",
                mid="<u@x>",
                extra="Delivered-To: afmelden@example.be\r\n",
            ),
            [Finding(InboxKind.UNSUBSCRIBE, "a@b.be", subject="x")],
        ),
        (
            "auto-reply to unsubscribe",
            plain_mail(
                "a@b.be",
                "afmelden@example.be",
                "Out of office",
                mid="<u@x>",
                extra="Auto-Submitted: auto-replied\r\n",
            ),
            [],
        ),
        ("unrelated", plain_mail("a@b.be", "integratiepact@example.be", "Hi", mid="<u@x>"), []),
        ("empty", b"", []),
    ]


@pytest.mark.parametrize(("raw", "expected"), [pytest.param(r, e, id=n) for n, r, e in _cases(CAMPAIGN)])
def test_classify(raw: bytes, expected: list[Finding]) -> None:
    assert classify(raw, CAMPAIGN) == expected


def test_header_prefilter_and_ids(campaign: Campaign) -> None:
    head = scenario(campaign)
    for name, raw in head.items():
        header = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        assert worth_fetching(header, campaign) is (name != "unrelated"), name
    assert inbox_id(head["unrelated"]) == "<lunch.1@example.com>"
    assert (
        inbox_id(b"Subject: x\r\n\r\nbody")
        == inbox_id(b"Subject: x\r\n\r\nbody")
        != inbox_id(b"Subject: y\r\n\r\n")
    )
    assert normalise_address("not an address") is None
    assert normalise_address("mailto:jan%2Bnews@Example.be") == "jan+news@example.be"


def test_apply_lines(tmp_path: Path, campaign: Campaign) -> None:
    with ledger_with_deliveries(tmp_path / "mailer.db", campaign) as ledger:
        done = apply(
            [
                Finding(
                    InboxKind.REPLY, "Jan@example.be", "aan-de-slag", "DECLINED", sender="jan@example.be"
                ),
                Finding(InboxKind.REPLY, "a@b.be", "aan-de-slag", "ACCEPTED", sender="fwd@example.org"),
                Finding(
                    InboxKind.DELAY,
                    "slow@example.net",
                    status="4.2.2",
                    diagnostic="mailbox full",
                    original_message_id=mid_for(campaign, "slow@example.net"),
                ),
            ],
            ledger,
            campaign,
            "<m@x>",
            NOW,
        )
        assert done == [
            ("reply", "reply: jan@example.be declined aan-de-slag"),
            (
                "unmatched",
                "unmatched reply: a@b.be accepted aan-de-slag: no invitation to aan-de-slag with a "
                "calendar was sent to a@b.be (the mail came from fwd@example.org); not applied to anyone",
            ),
            ("delay", "delay: slow@example.net 4.2.2 mailbox full (recorded only)"),
        ]
        assert ledger.inbox_seen("<m@x>")
        assert ledger.suppressed() == {}
        assert ledger.answers(campaign.id) == {("aan-de-slag", "jan@example.be"): "DECLINED"}
        [row] = ledger.unmatched_replies()
        assert (row["attendee"], row["sender"], row["message_id"]) == ("a@b.be", "fwd@example.org", "<m@x>")
        kind = ledger.conn.execute("SELECT kind FROM inbox WHERE message_id='<m@x>'").fetchone()
        assert kind == ("reply+unmatched+delay",)


def test_cli_inbox(tmp_path: Path, campaign: Campaign) -> None:
    ledger_with_deliveries(tmp_path / "m.db", campaign).close()  # only send/run create one
    from click.testing import CliRunner

    from mailer.cli import cli

    if "inbox" not in cli.commands:
        pytest.skip("`mailer inbox` is not registered in cli.py yet")
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    md.add(scenario(campaign)["accepted"])
    md.add(scenario(campaign)["unrelated"])
    args = ["inbox", "--config", str(ROOT / "schedules.yaml"), "--db", str(tmp_path / "m.db")]
    no_imap = {f"MAILER_IMAP_{k}": None for k in ("PORT", "USER", "PASSWORD", "TLS", "MAILBOX")}
    r = CliRunner().invoke(cli, [*args, "--maildir", str(tmp_path / "Maildir")])
    assert r.exit_code == 0, r.output
    assert "reply: jan@example.be accepted aan-de-slag" in r.output
    assert "1 reply; 1 message(s) handled, 1 left alone." in r.output
    r = CliRunner().invoke(cli, args, env={"MAILER_IMAP_HOST": "imap.example.be", **no_imap})
    assert r.exit_code == 1
    assert "set MAILER_IMAP_USER, MAILER_IMAP_PASSWORD" in r.output
    assert "Traceback" not in r.output


def test_answers_to_an_earlier_version_stop_counting(tmp_path: Path, campaign: Campaign) -> None:
    """RFC 5546 2.1.5: after an update (SEQUENCE 1) an answer to SEQUENCE 0 is out of date."""
    ev = "aan-de-slag"
    with Ledger(tmp_path / "mailer.db") as ledger:
        ledger.record_reply(campaign.id, ev, "jan@example.be", "DECLINED", NOW, "<a@x>", 0)
        ledger.record_reply(campaign.id, ev, "els@example.be", "ACCEPTED", NOW, "<b@x>", None)
        ledger.record_reply(campaign.id, ev, "piet@example.be", "ACCEPTED", NOW, "<c@x>", 0)
        assert len(ledger.answers(campaign.id)) == 3
        ledger.record_revision(
            campaign.id, RecordedRevision(ev, 0, "invite", "f0", "{}", NOW), f"{ev}~invite0"
        )
        ledger.record_revision(
            campaign.id, RecordedRevision(ev, 1, "update", "f1", "{}", NOW), f"{ev}~update1"
        )
        # piet answers the new version; a late copy of his old answer does not undo it
        ledger.record_reply(campaign.id, ev, "piet@example.be", "TENTATIVE", NOW, "<d@x>", 1)
        ledger.record_reply(campaign.id, ev, "piet@example.be", "ACCEPTED", NOW, "<c@x>", 0)
        assert ledger.answers(campaign.id) == {
            (ev, "els@example.be"): "ACCEPTED",  # no SEQUENCE: counts for every version
            (ev, "piet@example.be"): "TENTATIVE",
        }
        counts = {(r["event"], r["partstat"]): r["n"] for r in ledger.reply_counts(campaign.id)}
        assert counts == {(ev, "ACCEPTED"): 1, (ev, "TENTATIVE"): 1}
        # jan answers the new version: he counts again
        ledger.record_reply(campaign.id, ev, "jan@example.be", "ACCEPTED", NOW, "<e@x>", 1)
        assert ledger.answers(campaign.id)[(ev, "jan@example.be")] == "ACCEPTED"

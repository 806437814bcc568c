"""The organiser's inbox attacked as an outsider would (issue 15): one mail each to the
organiser's address, with its exact bytes. Each forged DSN, REPLY and unsubscribe mail changes
nothing but the list staff read; the poison mail and the MIME bomb are skipped once while the
mails behind them are processed; genuine Outlook, Gmail, Apple replies and a Postfix DSN still
work, over a Maildir and over a real Dovecot."""

from __future__ import annotations

import dataclasses
import email.policy
import mailbox
import time
from email.parser import BytesParser
from pathlib import Path

import pytest
from dovecot import Dovecot, dovecot_fixture  # noqa: F401 - provides the dovecot fixture
from test_inbox import INVITEES, NOW, ROOT, STEP, ledger_with_deliveries, mid_for

from mailer.bounces import envelope_sender, unsubscribe_token
from mailer.compose import Composer
from mailer.config import Campaign, load
from mailer.contacts import Contact
from mailer.inbox import InboxResult, process, run_inbox
from mailer.ledger import Ledger
from mailer.mailboxes import ImapSource, MaildirSource, Source
from mailer.message import message_id
from mailer.store import Claim, Outcome
from mailer.templates import Templates
from mailer.vocab import Attempt

SECRET = "inbox-attack-test-secret-0123456789"
BOUNCES = "bounces@example.be"
SHIPPED = load(ROOT / "schedules.yaml")
#: The shipped campaign with VERP on (sender.bounces).
CAMPAIGN: Campaign = dataclasses.replace(SHIPPED, sender=dataclasses.replace(SHIPPED.sender, bounces=BOUNCES))
UID = CAMPAIGN.event("aan-de-slag").uid
JAN = "jan@example.be"


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def ledger(tmp_path: Path) -> Ledger:
    return ledger_with_deliveries(tmp_path / "mailer.db", CAMPAIGN)


def delivery_id(led: Ledger, email: str) -> int:
    return int(led.conn.execute("SELECT id FROM deliveries WHERE email=?", (email,)).fetchone()[0])


def run(source: Source, led: Ledger) -> InboxResult:
    return process(source, led, CAMPAIGN, NOW, secret=SECRET)


def box(path: Path, *mails: bytes) -> MaildirSource:
    md = mailbox.Maildir(path, create=True)
    for raw in mails:
        md.add(raw)
    return MaildirSource(path)


def inbox_rows(led: Ledger) -> dict[str, tuple[str, str]]:
    return {r[0]: (r[1], r[2]) for r in led.conn.execute("SELECT message_id, kind, detail FROM inbox")}


def statuses(led: Ledger) -> dict[str, str]:
    return dict(led.conn.execute("SELECT email, status FROM deliveries"))


SENT = {e: "sent" for e in ("gone@example.net", "slow@example.net", *INVITEES)}


# --------------------------------------------------------------------------------------
# The attacks, byte for byte.
# --------------------------------------------------------------------------------------

#: A DSN with no returned message: it names jan, whom we mailed, and nothing of ours.
FORGED_DSN = crlf(
    """From: MAILER-DAEMON@mx.evil.example (Mail Delivery System)
To: integratiepact@example.be
Subject: Undelivered Mail Returned to Sender
Message-ID: <made-up.1@mx.evil.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.evil.example

Final-Recipient: rfc822; jan@example.be
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 user unknown

--B--
"""
)


def mass_dsn(original: str, n: int = 100_000) -> bytes:
    """An 8 MB report with gone@ and ``n`` more Final-Recipients, returning ``original``."""
    head = crlf(
        """From: MAILER-DAEMON@mx.evil.example
To: integratiepact@example.be
Subject: Undelivered Mail Returned to Sender
Message-ID: <mass.1@mx.evil.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.evil.example

Final-Recipient: rfc822; gone@example.net
Action: failed
Status: 5.1.1

"""
    )
    blocks = b"".join(
        b"Final-Recipient: rfc822; victim%06d@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n" % i
        for i in range(n)
    )
    tail = crlf(
        f"""--B
Content-Type: text/rfc822-headers

Message-ID: {original}
From: integratiepact@example.be

--B--
"""
    )
    return head + blocks + tail


def forged_reply(sequence: str = "2147483647", sender: str = "mallory@evil.example") -> bytes:
    """Anyone's answer: jan's ATTENDEE line, our printed UID, from someone else."""
    return crlf(
        f"""From: {sender}
To: integratiepact@example.be
Subject: Declined: Aan de slag
Message-ID: <forged.{sequence}.{sender}>
MIME-Version: 1.0
Content-Type: text/calendar; method=REPLY; charset=UTF-8

BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//evil//EN
METHOD:REPLY
BEGIN:VEVENT
UID:{UID}
DTSTAMP:20180105T080000Z
SEQUENCE:{sequence}
ATTENDEE;PARTSTAT=DECLINED:mailto:jan@example.be
END:VEVENT
END:VCALENDAR
"""
    )


#: "Unsubscribe" with jan's address in From, and no token.
FORGED_UNSUBSCRIBE = crlf(
    """From: Jan <jan@example.be>
To: afmelden@example.be
Subject: unsubscribe
Message-ID: <unsub.forged@evil.example>
MIME-Version: 1.0
Content-Type: text/plain

unsubscribe
"""
)

#: One reply whose Message-ID makes the header parser raise.
POISON = crlf(
    f"""From: someone@example.org
To: integratiepact@example.be
Subject: Accepted: Aan de slag
Message-ID: <<x@y>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="P"

--P
Content-Type: text/calendar; method=REPLY

BEGIN:VCALENDAR
VERSION:2.0
METHOD:REPLY
BEGIN:VEVENT
UID:{UID}
SEQUENCE:0
ATTENDEE;PARTSTAT=ACCEPTED:mailto:someone@example.org
END:VEVENT
END:VCALENDAR
--P--
"""
)


def mime_bomb(parts: int = 200_000) -> bytes:
    head = crlf(
        """From: bomb@evil.example
To: integratiepact@example.be
Subject: many parts
Message-ID: <bomb.1@evil.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="Z"

"""
    )
    return head + b"--Z\r\nContent-Type: text/plain\r\n\r\nx\r\n" * parts + b"--Z--\r\n"


def deep_mail(depth: int = 12) -> bytes:
    text = "Content-Type: text/calendar; method=REPLY\n\nBEGIN:VCALENDAR\nEND:VCALENDAR\n"
    for level in range(depth):
        text = f'Content-Type: multipart/mixed; boundary="d{level}"\n\n--d{level}\n{text}\n--d{level}--\n'
    return crlf("From: deep@evil.example\nTo: integratiepact@example.be\nMessage-ID: <deep@evil>\n" + text)


# --------------------------------------------------------------------------------------
# Genuine mails, as the clients write them.
# --------------------------------------------------------------------------------------


def outlook_reply(email: str = "Celine.Mertens@Example.BE", partstat: str = "ACCEPTED") -> bytes:
    """outlook.com: MAILTO in upper case, no ORGANIZER, base64 calendar in an alternative."""
    import base64

    ics = crlf(
        f"""BEGIN:VCALENDAR
METHOD:REPLY
PRODID:Microsoft Exchange Server 2010
VERSION:2.0
BEGIN:VEVENT
ATTENDEE;PARTSTAT={partstat};CN=Jan Peeters:MAILTO:{email}
SUMMARY;LANGUAGE=nl-BE:Geaccepteerd: Aan de slag
DTSTART:20180122T083000Z
DTEND:20180122T120000Z
UID:{UID}
DTSTAMP:20180105T080000Z
SEQUENCE:0
END:VEVENT
END:VCALENDAR
"""
    )
    b64 = base64.encodebytes(ics).decode()
    return crlf(
        f"""From: Jan Peeters <{email}>
To: Integratiepact <integratiepact@example.be>
Subject: Geaccepteerd: Aan de slag
Thread-Topic: Aan de slag
Thread-Index: AQHYabcdefg==
Date: Fri, 5 Jan 2018 08:00:00 +0000
Message-ID: <AM0PR01MB1234.outlook.1@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>
Content-Language: nl-BE
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="_000_AM0PR_"

--_000_AM0PR_
Content-Type: text/plain; charset="us-ascii"

--_000_AM0PR_
Content-Type: text/calendar; charset="utf-8"; method=REPLY
Content-Transfer-Encoding: base64

{b64}
--_000_AM0PR_--
"""
    )


def gmail_reply(email: str = "els@example.be") -> bytes:
    """Gmail: inline text/calendar and the same as an invite.ics attachment; ORGANIZER present."""
    ics = f"""BEGIN:VCALENDAR
PRODID:-//Google Inc//Google Calendar 70.9054//EN
VERSION:2.0
CALSCALE:GREGORIAN
METHOD:REPLY
BEGIN:VEVENT
DTSTART:20180122T083000Z
DTEND:20180122T120000Z
DTSTAMP:20180105T080000Z
ORGANIZER;CN=Integratiepact:mailto:integratiepact@example.be
UID:{UID}
ATTENDEE;CUTYPE=INDIVIDUAL;ROLE=REQ-PARTICIPANT;PARTSTAT=DECLINED;CN={email};X-NUM-GUESTS=0:mailto:{email}
SEQUENCE:0
STATUS:CONFIRMED
SUMMARY:Aan de slag
END:VEVENT
END:VCALENDAR
"""
    return crlf(
        f"""MIME-Version: 1.0
From: Els <{email}>
Date: Fri, 5 Jan 2018 09:00:00 +0100
Message-ID: <CAGmail.els.1@mail.gmail.com>
Subject: Declined: Aan de slag
To: integratiepact@example.be
Content-Type: multipart/mixed; boundary="000000000000aaaa"

--000000000000aaaa
Content-Type: multipart/alternative; boundary="000000000000bbbb"

--000000000000bbbb
Content-Type: text/plain; charset="UTF-8"

Els has declined this invitation.

--000000000000bbbb
Content-Type: text/calendar; charset="UTF-8"; method=REPLY

{ics}
--000000000000bbbb--

--000000000000aaaa
Content-Type: application/ics; name="invite.ics"
Content-Disposition: attachment; filename="invite.ics"

{ics}
--000000000000aaaa--
"""
    )


def apple_reply(quoted: str, attendee: str = "piet@example.be") -> bytes:
    """Apple Calendar, sent from an iCloud alias: From differs from the ATTENDEE, but the reply
    quotes the invitation's Message-ID in In-Reply-To/References."""
    return crlf(
        f"""From: Piet <piet.alias@icloud.example>
Content-Type: multipart/alternative; boundary="Apple-Mail=_1"
Mime-Version: 1.0 (Mac OS X Mail 11.2)
Subject: Invitation: Aan de slag (accepted)
Date: Fri, 5 Jan 2018 10:00:00 +0100
In-Reply-To: {quoted}
References: <other@example.org> {quoted}
To: integratiepact@example.be
Message-Id: <A1B2C3D4-apple-1@icloud.example>

--Apple-Mail=_1
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

Piet accepted.

--Apple-Mail=_1
Content-Type: text/calendar; method=REPLY; charset=utf-8
Content-Transfer-Encoding: 7bit

BEGIN:VCALENDAR
METHOD:REPLY
VERSION:2.0
PRODID:-//Apple Inc.//Mac OS X 10.13.2//EN
BEGIN:VEVENT
UID:{UID}
DTSTAMP:20180105T090000Z
SEQUENCE:0
ATTENDEE;CN=Piet;PARTSTAT=TENTATIVE:mailto:{attendee}
END:VEVENT
END:VCALENDAR

--Apple-Mail=_1--
"""
    )


def postfix_dsn(verp: str, recipient: str = "gone@example.net", original: str | None = None) -> bytes:
    """A Postfix bounce to the VERP envelope sender; the final delivery adds Delivered-To and
    X-Original-To. ``original``: the returned headers' Message-ID (else a message of someone
    else's, so only the envelope ties it to us)."""
    returned = original or "<unrelated@elsewhere.example>"
    return crlf(
        f"""Return-Path: <>
Delivered-To: {verp}
X-Original-To: {verp}
Date: Thu,  4 Jan 2018 10:00:05 +0100 (CET)
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="4A1C2.1515056405/mx.example.net"
Message-Id: <20180104090005.4A1C2.{recipient}@mx.example.net>

--4A1C2.1515056405/mx.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--4A1C2.1515056405/mx.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: 4A1C2
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: Thu,  4 Jan 2018 10:00:04 +0100 (CET)

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx2.example.net
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:
    User unknown in virtual mailbox table

Final-Recipient: rfc822; jan@example.be
Action: failed
Status: 5.1.1

--4A1C2.1515056405/mx.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <{verp}>
From: Integratiepact <integratiepact@example.be>
Subject: Uitnodiging
Message-ID: {returned}

--4A1C2.1515056405/mx.example.net--
"""
    )


# --------------------------------------------------------------------------------------
# 1. DSNs
# --------------------------------------------------------------------------------------


def test_a_dsn_with_no_returned_message_changes_nothing(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        result = run(box(tmp_path / "in", FORGED_DSN), led)
        assert led.suppressed() == {}
        assert statuses(led) == SENT
        kind, detail = inbox_rows(led)["<made-up.1@mx.evil.example>"]
        assert kind == "unmatched-bounce"
        assert "jan@example.be" in detail and "matches no mail we sent" in detail
    assert "1 unmatched bounce" in result.summary()
    assert not any(line.startswith("bounce:") for line in result.lines)


@pytest.mark.slow
def test_a_report_of_100000_recipients_changes_nothing(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        made_up = mass_dsn("<" + "a" * 26 + mid_for(CAMPAIGN, "x@example.org")[27:])
        assert len(made_up) > 8_000_000
        started = time.monotonic()
        result = run(box(tmp_path / "in", made_up), led)
        elapsed = time.monotonic() - started
        assert led.suppressed() == {} and statuses(led) == SENT
        [(kind, detail)] = inbox_rows(led).values()
        assert kind == "skipped" and "more than 1,000 MIME parts" in detail
    assert dict(result.counts) == {"skipped": 1}
    assert elapsed < 5, elapsed  # counted in the raw bytes, never parsed


def test_a_report_naming_many_bounces_only_the_delivery_it_returns(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        made_up = mass_dsn("<" + "a" * 26 + mid_for(CAMPAIGN, "x@example.org")[27:], 300)
        real = mass_dsn(mid_for(CAMPAIGN, "gone@example.net"), 300).replace(b"<mass.1@", b"<mass.2@")
        result = run(box(tmp_path / "in", made_up, real), led)
        assert led.suppressed().keys() == {"gone@example.net"}
        assert statuses(led) == SENT | {"gone@example.net": "bounced"}
        rows = inbox_rows(led)
        assert rows["<mass.1@mx.evil.example>"][0] == "unmatched-bounce"
        assert rows["<mass.2@mx.evil.example>"][0] == "bounce+unmatched-bounce"
        assert len(rows["<mass.2@mx.evil.example>"][1]) < 1000  # staff read a line
    assert result.counts["bounce"] == 1 and result.counts["unmatched-bounce"] == 2


def test_a_verp_dsn_bounces_its_delivery_only(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        gone = envelope_sender(BOUNCES, SECRET, delivery_id(led, "gone@example.net"))
        other = envelope_sender(BOUNCES, "another secret", delivery_id(led, "slow@example.net"))
        result = run(box(tmp_path / "in", postfix_dsn(gone), postfix_dsn(other, "slow@example.net")), led)
        # jan is named in the same report, but the returned mail was gone@'s
        assert led.suppressed().keys() == {"gone@example.net"}
        assert statuses(led) == SENT | {"gone@example.net": "bounced"}
    assert result.counts["bounce"] == 1 and result.counts["unmatched-bounce"] == 2


def test_a_dsn_quoting_a_message_id_anyone_can_compute_changes_nothing(tmp_path: Path) -> None:
    """Our Message-IDs are a function of campaign, step and address, all of which an outsider
    knows; with a secret they are keyed by it, so only a returned copy of the real mail names
    one (without VERP, the Message-ID is what ties a DSN to its delivery)."""
    plain = dataclasses.replace(CAMPAIGN, sender=SHIPPED.sender)  # no VERP
    composer = Composer(plain, Templates(plain.templates_dir, plain.language), unsubscribe_secret=SECRET)
    step, event = plain.step(STEP), plain.event("aan-de-slag")
    jan = Contact(email=JAN, name="Jan", language="nl")
    sent = composer.compose_due(step, event, jan, when=NOW, sequence=0)
    real = str(BytesParser(policy=email.policy.default).parsebytes(sent.data)["Message-ID"])
    computable = message_id(plain.id, STEP, JAN, plain.sender.domain)
    assert real == sent.message_id == composer.message_id(step, JAN) != computable
    # the same secret gives the same id: a re-send after a crash is still collapsed
    again = Composer(plain, Templates(plain.templates_dir, plain.language), unsubscribe_secret=SECRET)
    assert again.message_id(step, JAN) == real
    with Ledger(tmp_path / "mailer.db") as led:
        [claimed] = led.claim(plain.id, [Claim(STEP, "aan-de-slag", JAN, "", NOW, real, 0, True)], NOW)
        assert claimed is not None
        led.record_outcomes([Outcome(claimed.id, Attempt.SENT, 250, "2.0.0 Ok", NOW)])
        forged = postfix_dsn("integratiepact@example.be", JAN, computable)
        # another DSN (its own Message-Id) that returns the real mail
        genuine = postfix_dsn("integratiepact@example.be", JAN, real).replace(
            b"Message-Id: <", b"Message-Id: <2"
        )
        forged_result = process(box(tmp_path / "forged", forged), led, plain, NOW, secret=SECRET)
        assert led.suppressed() == {} and forged_result.counts["bounce"] == 0
        process(box(tmp_path / "genuine", genuine), led, plain, NOW, secret=SECRET)
        assert led.suppressed().keys() == {JAN}


# --------------------------------------------------------------------------------------
# 2. iMIP REPLY
# --------------------------------------------------------------------------------------


def test_a_forged_reply_neither_counts_nor_locks_out_the_real_answer(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        first = run(box(tmp_path / "in", forged_reply(), forged_reply("0")), led)
        assert led.answers(CAMPAIGN.id) == {}
        assert first.counts["reply"] == 0 and first.counts["unmatched"] == 2
        assert "repl" not in first.summary().split("unmatched")[0]  # never printed as recorded
        # jan's own answer (SEQUENCE 0, from his address) arrives after
        jan = forged_reply("0", sender="Jan <jan@example.be>").replace(b"evil", b"jan")
        again = run(box(tmp_path / "in", jan), led)
        assert led.answers(CAMPAIGN.id) == {("aan-de-slag", JAN): "DECLINED"}
        assert again.counts["reply"] == 1
        why = {r["message_id"]: r["why"] for r in led.unmatched_replies()}
    assert "answers SEQUENCE 2147483647" in why["<forged.2147483647.mallory@evil.example>"]
    assert "mallory@evil.example" in why["<forged.0.mallory@evil.example>"]


# --------------------------------------------------------------------------------------
# 3. Unsubscribe by mail
# --------------------------------------------------------------------------------------


def test_an_unsubscribe_needs_the_token_of_the_address(tmp_path: Path) -> None:
    token = unsubscribe_token(SECRET, CAMPAIGN.id, "els@example.be")
    genuine = FORGED_UNSUBSCRIBE.replace(
        b"Subject: unsubscribe", b"Subject: Re: unsubscribe " + token.encode()
    )
    genuine = genuine.replace(b"<unsub.forged@", b"<unsub.genuine@")
    with ledger(tmp_path) as led:
        result = run(box(tmp_path / "in", FORGED_UNSUBSCRIBE, genuine), led)
        assert led.suppressed() == {"els@example.be": "unsubscribed by mail"}  # the token's, not From
        assert inbox_rows(led)["<unsub.forged@evil.example>"][0] == "unmatched-unsubscribe"
    assert result.counts["unsubscribe"] == 1 and result.counts["unmatched-unsubscribe"] == 1
    assert "1 unmatched unsubscribe" in result.summary()


# --------------------------------------------------------------------------------------
# 4. Each message in isolation
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_poison_and_the_bomb_are_skipped_once_and_the_rest_is_read(tmp_path: Path) -> None:
    source = box(tmp_path / "in", POISON, mime_bomb(), deep_mail(), gmail_reply())
    big = tmp_path / "in" / "new" / "0000.big"
    big.write_bytes(b"From: x@y\r\n\r\n" + b"x" * (10 * 1024 * 1024))
    with ledger(tmp_path) as led:
        started = time.monotonic()
        first = run(source, led)
        assert time.monotonic() - started < 20
        assert led.answers(CAMPAIGN.id) == {("aan-de-slag", "els@example.be"): "DECLINED"}
        assert first.counts["skipped"] == 4, first.lines
        skipped = {d for k, d in inbox_rows(led).values() if k == "skipped"}
        text = "\n".join(skipped)
        for reason in ("Message-ID", "more than 1,000 MIME parts", "deeper than 10", "over 10 MB"):
            assert reason in text, text
        started = time.monotonic()
        second = run(source, led)
        assert time.monotonic() - started < 2  # remembered, not parsed again
        assert (second.counts["skipped"], second.handled) == (0, 0)
    # left for a person: not flagged as processed
    assert len(list((tmp_path / "in" / "new").iterdir())) == 4
    assert len(list((tmp_path / "in" / "cur").iterdir())) == 1


# --------------------------------------------------------------------------------------
# 5. Genuine mail still works, over a Maildir and over Dovecot
# --------------------------------------------------------------------------------------


def genuine_and_forged(led: Ledger) -> list[bytes]:
    verp = envelope_sender(BOUNCES, SECRET, delivery_id(led, "gone@example.net"))
    return [
        POISON,
        outlook_reply("JAN@Example.BE"),
        forged_reply(),
        gmail_reply(),
        mime_bomb(),
        apple_reply(mid_for(CAMPAIGN, "piet@example.be")),
        postfix_dsn(verp),
        FORGED_DSN,
        FORGED_UNSUBSCRIBE,
    ]


def assert_genuine(led: Ledger, result: InboxResult) -> None:
    assert led.answers(CAMPAIGN.id) == {
        ("aan-de-slag", JAN): "ACCEPTED",
        ("aan-de-slag", "els@example.be"): "DECLINED",
        ("aan-de-slag", "piet@example.be"): "TENTATIVE",
    }
    assert led.suppressed().keys() == {"gone@example.net"}
    assert statuses(led) == SENT | {"gone@example.net": "bounced"}
    assert dict(result.counts) == {
        "reply": 3,
        "bounce": 1,
        "unmatched": 1,
        "unmatched-bounce": 2,
        "unmatched-unsubscribe": 1,
        "skipped": 2,
    }, result.lines


def test_genuine_mails_over_a_maildir(tmp_path: Path) -> None:
    with ledger(tmp_path) as led:
        source = box(tmp_path / "in", *genuine_and_forged(led))
        assert_genuine(led, run(source, led))
        again = run(source, led)
        assert sum(again.counts.values()) == 0 and again.handled == 0


def test_genuine_mails_over_dovecot(tmp_path: Path, dovecot: Dovecot) -> None:
    with ledger(tmp_path) as led:
        mails = genuine_and_forged(led)
    import ssl

    from imapclient import IMAPClient

    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, ssl_context=ctx) as client:
        client.login(dovecot.user, dovecot.password)
        for raw in mails:
            client.append("INBOX", raw)
        client.append("INBOX", b"From: x@y\r\nMessage-ID: <big@x>\r\n\r\n" + b"x" * (10 * 1024 * 1024 + 1))
    with Ledger.open(tmp_path / "mailer.db") as led:
        source = ImapSource.from_env(dovecot.env("tls"))
        assert source is not None
        result = run(source, led)
        result.counts["skipped"] -= 1  # the big one
        assert_genuine(led, result)
        assert any("over 10 MB" in d for k, d in inbox_rows(led).values() if k == "skipped")
        again = run(source, led)
        assert sum(again.counts.values()) == 0 and again.handled == 0


def test_the_cli_summary_shows_what_staff_must_read(tmp_path: Path) -> None:
    ledger_with_deliveries(tmp_path / "mailer.db", SHIPPED).close()
    md = box(tmp_path / "in", POISON, forged_reply(), FORGED_UNSUBSCRIBE)
    env = {"MAILER_WEB_SECRET": SECRET}
    result = run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", md.path, env, NOW)
    summary = result.summary()
    assert "1 unmatched reply" in summary and "1 unmatched unsubscribe" in summary
    assert "1 skipped" in summary
    assert any(line.startswith("skipped:") for line in result.lines)
    assert STEP  # the deliveries are the invitation step's

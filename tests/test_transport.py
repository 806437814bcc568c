"""The transport's own SMTP transaction (MAIL, RCPT, DATA with prepared bytes) on the wire.

``Transport`` does not call ``aiosmtplib.SMTP.sendmail`` (which re-normalises every message);
it writes the payload of :func:`mailer.transport.data_payload` itself. These tests hold it to
what aiosmtplib would send, byte for byte, and to a real aiosmtpd server's view of it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from mailer.smtpd import MaildirHandler, SmtpServer
from mailer.transport import Outgoing, Result, Transport, TransportSettings, data_payload


def reference_payload(message: bytes) -> bytes:
    """What ``aiosmtplib.SMTP.data`` puts on the wire for ``message`` (its own functions)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def test_data_payload_is_what_aiosmtplib_would_send() -> None:
    rng = random.Random(6)
    cases = [b"", b".", b"\r\n", b"\n.\n", b"..\r\n.\r\n", b"a\rb\r\n.c", b"\r\r\n\n."]
    cases += [bytes(rng.choice(b"a.\r\n") for _ in range(rng.randrange(40))) for _ in range(3000)]
    for message in cases:
        payload, size = data_payload(message)
        assert payload == reference_payload(message), message
        assert size == len(normalize_message_line_endings(message)), message


@dataclass
class Recorder(MaildirHandler):
    """Keeps what the server saw of each transaction; refuses what the test scripts."""

    mail_options: list[list[str]] = field(default_factory=list)
    utf8: list[bool] = field(default_factory=list)
    ehlos: int = 0
    refuse_mail: dict[str, str] = field(default_factory=dict)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_data: dict[str, str] = field(default_factory=dict)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlos += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse_mail:
            return self.refuse_mail[address]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if envelope.rcpt_tos[0] in self.refuse_data:
            return self.refuse_data[envelope.rcpt_tos[0]]
        self.mail_options.append(list(envelope.mail_options))
        self.utf8.append(bool(envelope.smtp_utf8))
        return await super().handle_DATA(server, session, envelope)


def send_all(server: SmtpServer, jobs: list[Outgoing], connections: int = 1) -> dict[int, Result]:
    settings = TransportSettings(host=server.host, port=server.port, tls="none", connections=connections)
    results: dict[int, Result] = {}

    async def main() -> None:
        queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        for _ in range(connections):
            queue.put_nowait(None)

        def on_result(job: Outgoing, result: Result) -> None:
            results[job.key] = result

        await Transport(settings).run(queue, on_result)

    asyncio.run(main())
    return results


MESSAGES = [
    b"Subject: plain\r\n\r\nHello\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nmiddle . dot\r\n.",
    b"Subject: bare line feeds\n\n.one\ntwo\r\nthree\r",
    b"Subject: no final line break\r\n\r\nlast line",
    b"Subject: long\r\n\r\n" + b"".join(b".%05d " % i + b"x" * 70 + b"\r\n" for i in range(3000)),
]


def test_messages_arrive_exactly_with_their_size_announced() -> None:
    handler = Recorder()
    jobs = [Outgoing(i, "organiser@example.org", f"r{i}@example.org", m) for i, m in enumerate(MESSAGES)]
    with SmtpServer(handler) as server:
        results = send_all(server, jobs)
    assert {k: r.outcome for k, r in results.items()} == {i: "sent" for i in range(len(MESSAGES))}
    assert all(r.code == 250 and "accepted" in r.text for r in results.values())
    got = {r.rcpt_tos[0]: r for r in handler.received}
    for i, message in enumerate(MESSAGES):
        expected = normalize_message_line_endings(message)
        received = got[f"r{i}@example.org"]
        # aiosmtpd removes the dot-stuffing: what arrives is the message, CRLF-normalised
        assert received.data == expected, i
        assert received.mail_from == "organiser@example.org"
    assert [opts for opts in handler.mail_options] == [
        [f"SIZE={len(normalize_message_line_endings(m))}"] for m in MESSAGES
    ]
    assert handler.ehlos == 1  # one connection, kept open for all five


def test_refusals_are_classified_and_the_connection_goes_on() -> None:
    handler = Recorder(
        refuse_mail={"blocked@example.org": "553 5.7.1 sender not allowed"},
        refuse_rcpt={"gone@example.org": "550 5.1.1 no such user", "busy@example.org": "450 4.2.1 busy"},
        refuse_data={"spam@example.org": "554 5.7.1 looks like spam"},
    )
    jobs = [
        Outgoing(1, "blocked@example.org", "a@example.org", b"Subject: 1\r\n\r\n1\r\n"),
        Outgoing(2, "organiser@example.org", "gone@example.org", b"Subject: 2\r\n\r\n2\r\n"),
        Outgoing(3, "organiser@example.org", "busy@example.org", b"Subject: 3\r\n\r\n3\r\n"),
        Outgoing(4, "organiser@example.org", "spam@example.org", b"Subject: 4\r\n\r\n4\r\n"),
        Outgoing(5, "organiser@example.org", "ok@example.org", b"Subject: 5\r\n\r\n5\r\n"),
    ]
    with SmtpServer(handler) as server:
        results = send_all(server, jobs)
    summary = {k: (r.outcome, r.code) for k, r in results.items()}
    assert summary == {
        1: ("failed", 553),
        2: ("failed", 550),
        3: ("deferred", 450),
        4: ("failed", 554),
        5: ("sent", 250),
    }
    assert "no such user" in results[2].text and "spam" in results[4].text
    # RSET after each refusal: the last mail went out on the same connection, to its recipient only
    assert handler.ehlos == 1
    assert [(r.mail_from, r.rcpt_tos) for r in handler.received] == [
        ("organiser@example.org", ("ok@example.org",))
    ]


def test_an_address_beyond_ascii_needs_smtputf8() -> None:
    jobs = [
        Outgoing(1, "organiser@example.org", "jörg@example.org", b"Subject: 1\r\n\r\n1\r\n"),
        Outgoing(2, "organiser@example.org", "jorg@example.org", b"Subject: 2\r\n\r\n2\r\n"),
    ]
    plain = Recorder()
    with SmtpServer(plain, enable_SMTPUTF8=False) as server:
        results = send_all(server, jobs)
    assert results[1].outcome == "failed" and "SMTPUTF8" in results[1].text
    assert results[2].outcome == "sent"
    assert [r.rcpt_tos for r in plain.received] == [("jorg@example.org",)]

    utf8 = Recorder()
    with SmtpServer(utf8, enable_SMTPUTF8=True) as server:
        results = send_all(server, jobs)
    assert {k: r.outcome for k, r in results.items()} == {1: "sent", 2: "sent"}
    assert [r.rcpt_tos for r in utf8.received] == [("jörg@example.org",), ("jorg@example.org",)]
    assert utf8.utf8 == [True, False]
    assert "SMTPUTF8" in utf8.mail_options[0] and "SMTPUTF8" not in utf8.mail_options[1]


def test_injection_through_an_address_is_refused_before_anything_is_sent() -> None:
    handler = Recorder()
    evil = "x@example.org>\r\nRCPT TO:<victim@example.org"
    jobs = [
        Outgoing(1, "organiser@example.org", evil, b"Subject: 1\r\n\r\n1\r\n"),
        Outgoing(2, "organiser@example.org", "ok@example.org", b"Subject: 2\r\n\r\n2\r\n"),
    ]
    with SmtpServer(handler) as server:
        results = send_all(server, jobs)
    assert results[1].outcome == "failed" and "control character" in results[1].text, results[1]
    assert results[2].outcome == "sent"
    assert [r.rcpt_tos for r in handler.received] == [("ok@example.org",)]

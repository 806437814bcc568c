"""The transport's own SMTP transaction (MAIL, RCPT, DATA with prepared bytes) on the wire.

``Transport`` does not call ``aiosmtplib.SMTP.sendmail`` (which re-normalises every message);
it writes the payload of :func:`mailer.message.data_payload` itself. These tests hold it to
what aiosmtplib would send, byte for byte, and to a real aiosmtpd server's view of it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.protocol import LINE_ENDINGS_REGEX, PERIOD_REGEX
from rawsmtp import CLOSE, DEFAULTS, SILENT, Pause, RawSmtp, Reply

from mailer.errors import TransportFatalError
from mailer.message import data_payload
from mailer.smtpd import MaildirHandler, SmtpServer
from mailer.transport import (
    Outgoing,
    Result,
    Transport,
    TransportSettings,
    _unstuff,
    protocol_wire,
)
from mailer.vocab import Attempt


def normalize_message_line_endings(message: bytes) -> bytes:
    """aiosmtplib's line-ending rule (a function of its own from 3.1 on; the regex in all)."""
    message = LINE_ENDINGS_REGEX.sub(b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


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


def send_all(
    server: SmtpServer, jobs: list[Outgoing], connections: int = 1, data_path: str = "auto"
) -> dict[int, Result]:
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

        await Transport(settings, data_path=data_path).run(queue, on_result)  # type: ignore[arg-type]

    asyncio.run(main())
    return results


MESSAGES = [
    b"Subject: plain\r\n\r\nHello\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nmiddle . dot\r\n.",
    b"Subject: bare line feeds\n\n.one\ntwo\r\nthree\r",
    b"Subject: no final line break\r\n\r\nlast line",
    b"Subject: long\r\n\r\n" + b"".join(b".%05d " % i + b"x" * 70 + b"\r\n" for i in range(3000)),
]


@pytest.mark.parametrize("data_path", ["auto", "public"])
def test_messages_arrive_exactly_with_their_size_announced(data_path: str) -> None:
    """The same bytes arrive through aiosmtplib's protocol object and through the public
    ``SMTP.data`` fallback (given the message back, un-stuffed), prepared payloads or not."""
    handler = Recorder()
    jobs = [Outgoing(i, "organiser@example.org", f"r{i}@example.org", m) for i, m in enumerate(MESSAGES)]
    jobs += [
        Outgoing(10 + i, "organiser@example.org", f"r{10 + i}@example.org", *data_payload(m))
        for i, m in enumerate(MESSAGES)
    ]
    with SmtpServer(handler) as server:
        results = send_all(server, jobs, data_path=data_path)
    assert {k: r.outcome for k, r in results.items()} == {j.key: Attempt.SENT for j in jobs}
    assert all(r.code == 250 and "accepted" in r.text for r in results.values())
    got = {r.rcpt_tos[0]: r for r in handler.received}
    for i, message in enumerate(MESSAGES):
        expected = normalize_message_line_endings(message)
        for key in (i, 10 + i):
            received = got[f"r{key}@example.org"]
            # aiosmtpd removes the dot-stuffing: what arrives is the message, CRLF-normalised
            assert received.data == expected, (key, data_path)
            assert received.mail_from == "organiser@example.org"
    assert [opts for opts in handler.mail_options] == [
        [f"SIZE={len(normalize_message_line_endings(m))}"] for m in MESSAGES
    ] * 2
    assert handler.ehlos == 1  # one connection, kept open for all ten


@pytest.mark.parametrize("data_path", ["auto", "public"])
def test_refusals_are_classified_and_the_connection_goes_on(data_path: str) -> None:
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
        results = send_all(server, jobs, data_path=data_path)
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


def test_the_fallback_gives_the_public_api_the_message_that_makes_the_same_payload() -> None:
    rng = random.Random(11)
    cases = [b"", b".", b"..", b"\r\n.\r\n", b".a\n..b\r\n...\r\n", b"x\r\n."]
    cases += [bytes(rng.choice(b"a.\r\n") for _ in range(rng.randrange(40))) for _ in range(3000)]
    for message in cases:
        payload, _ = data_payload(message)
        assert reference_payload(_unstuff(payload)) == payload, message


def test_protocol_wire_is_the_connected_protocol_or_none_for_another_shape() -> None:
    """The adapter finds aiosmtplib's internals on a real connection (the versions the pin
    allows), and says None, not a crash, when they are missing or shaped otherwise."""

    async def main(server: SmtpServer) -> None:
        client = aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False, timeout=5)
        assert protocol_wire(client) is None  # not connected
        await client.connect()
        wire = protocol_wire(client)
        assert wire is not None and wire.buffer == bytearray()
        await client.quit()

    with SmtpServer(Recorder()) as server:
        asyncio.run(main(server))

    class Reshaped:  # stand-ins for another aiosmtplib's protocol object
        _buffer = bytearray()

        def write(self, data: bytes) -> None: ...

        async def read_response(self) -> None: ...  # no timeout argument

    class NoBuffer:
        def write(self, data: bytes) -> None: ...

        async def read_response(self, timeout: float | None = None) -> None: ...

    class Blocking(NoBuffer):
        _buffer = bytearray()

        def read_response(self, timeout: float | None = None) -> None: ...  # type: ignore[override]

    for protocol in (Reshaped(), NoBuffer(), Blocking(), None):
        assert protocol_wire(SimpleNamespace(protocol=protocol)) is None, protocol  # type: ignore[arg-type]


# --- Reply mistakes, from a raw server (issue 11 items 10 and 11) -----------------------------
#
# Only a 2xx to the final dot means sent. A reply out of step (the wrong code for the command,
# an extra line, garbage, 999, 1xx/3xx) or a connection lost once the payload started leaves
# the outcome unknown: never sent, never failed, and the connection is not used again.

FIRST = b"Subject: first\r\n\r\n.dot\r\nbody\r\n"
SECOND = b"Subject: second\r\n\r\nbody\r\n"
EHLO = DEFAULTS["EHLO"]


async def send_raw(
    server: RawSmtp,
    jobs: list[Outgoing],
    *,
    connections: int = 1,
    data_path: str = "auto",
    results: dict[int, Result] | None = None,
    **settings: Any,
) -> dict[int, Result]:
    """Run the transport against ``server`` with ``jobs`` and collect each outcome (in
    ``results`` if given, so a test still has them when the run raises)."""
    settings.setdefault("timeout", 1.0)
    ts = TransportSettings(
        host=server.host, port=server.port, tls="none", connections=connections, **settings
    )
    queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    for _ in range(connections):
        queue.put_nowait(None)
    got: dict[int, Result] = {} if results is None else results

    def on_result(job: Outgoing, result: Result) -> None:
        got[job.key] = result

    transport = Transport(ts) if data_path == "auto" else Transport(ts, data_path=data_path)  # type: ignore[arg-type]
    await transport.run(queue, on_result)
    return got


@dataclass(frozen=True)
class Fault:
    replies: dict[str, list[Reply]]
    #: expected outcome on the protocol path, and on the public-API fallback when it differs
    outcome: Attempt
    public: Attempt | None = None
    #: the public API cannot see this mistake (a reply left waiting in aiosmtplib's buffer)
    public_blind: bool = False
    cut_payload_after: int | None = None
    #: the faulty connection is closed (the second mail needs a new one)
    closes: bool = True


U, D, F, S = Attempt.UNKNOWN, Attempt.DEFERRED, Attempt.FAILED, Attempt.SENT
LONG = b"250 " + b"x" * 9000 + b"\r\n"
FAULTS = {
    # out of step before any payload byte: the "sent while the server stored nothing"
    "250 to DATA instead of 354": Fault({"DATA": [b"250 2.0.0 OK\r\n"]}, U),
    "an extra 250 after MAIL (stream off by one)": Fault({"MAIL": [b"250 OK\r\n250 OK\r\n"]}, U),
    "an extra 250 after EHLO (stream off by one)": Fault({"EHLO": [EHLO + b"250 OK\r\n"]}, U),
    "251 to MAIL": Fault({"MAIL": [b"251 2.1.0 OK\r\n"]}, U),
    "354 to RCPT": Fault({"RCPT": [b"354 go ahead\r\n"]}, U),
    "garbage to MAIL": Fault({"MAIL": [b"hello?\r\n"]}, U),
    "999 to RCPT": Fault({"RCPT": [b"999 what\r\n"]}, U),
    # the fallback cannot see a line that waits in aiosmtplib's buffer: it would take the
    # extra 250 for the reply to the dot (a limit of the public API, README "aiosmtplib")
    "an extra 250 after 354": Fault({"DATA": [b"354 go\r\n250 OK\r\n"]}, U, public_blind=True),
    # after the final dot
    "an extra line after the reply to the dot": Fault(
        {".": [b"250 queued\r\n250 OK\r\n"]}, U, public_blind=True
    ),
    "garbage after the dot": Fault({".": [b"hello there\r\n"]}, U),
    "an over-long reply line after the dot": Fault({".": [LONG]}, U),
    "an endless reply after the dot": Fault({".": [b"250-" + b"x" * 40000]}, U),
    "999 after the dot": Fault({".": [b"999 what\r\n"]}, U),
    "1xx after the dot": Fault({".": [b"150 wait\r\n"]}, U),
    "3xx after the dot": Fault({".": [b"354 more please\r\n"]}, U),
    "-1 after the dot": Fault({".": [b"-12 minus\r\n"]}, U),
    # the connection lost once the payload started
    "closed in the middle of the payload": Fault({}, U, cut_payload_after=10),
    "closed after the dot, no reply": Fault({".": [CLOSE]}, U),
    "no reply to the dot (timeout)": Fault({".": [SILENT]}, U),
    # the connection lost before any payload byte: nothing can have been delivered
    "closed at MAIL": Fault({"MAIL": [CLOSE]}, D),
    "closed at RCPT": Fault({"RCPT": [CLOSE]}, D),
    # the public API writes DATA and the payload in one call: it cannot tell which was cut
    "closed at DATA": Fault({"DATA": [CLOSE]}, D, public=U),
    "no reply to RCPT (timeout)": Fault({"RCPT": [SILENT]}, D),
    # replies in step
    "451 to the dot": Fault({".": [b"451 4.3.0 later\r\n"]}, D, closes=False),
    "554 to the dot": Fault({".": [b"554 5.7.1 spam\r\n"]}, F, closes=False),
    "421 to the dot": Fault({".": [b"421 4.3.2 closing\r\n"]}, D),
    "450 to RCPT": Fault({"RCPT": [b"450 4.2.1 busy\r\n"]}, D, closes=False),
    "550 to DATA": Fault({"DATA": [b"550 5.7.1 no\r\n"]}, F, closes=False),
    "251 to RCPT (will forward)": Fault({"RCPT": [b"251 2.1.5 will forward\r\n"]}, S, closes=False),
    "252 to RCPT (cannot verify, will try)": Fault({"RCPT": [b"252 2.1.5 will try\r\n"]}, S, closes=False),
    "a multi-line 250 to the dot": Fault({".": [b"250-2.0.0 queued\r\n250 as 1234\r\n"]}, S, closes=False),
}


@pytest.mark.parametrize("data_path", ["auto", "public"])
@pytest.mark.parametrize("name", list(FAULTS))
async def test_reply_mistakes(name: str, data_path: str) -> None:
    fault = FAULTS[name]
    if data_path == "public" and fault.public_blind:
        pytest.skip("the public API cannot see a reply left in aiosmtplib's buffer")
    expected = fault.public if data_path == "public" and fault.public else fault.outcome
    replies = {verb: list(items) for verb, items in fault.replies.items()}
    jobs = [
        Outgoing(1, "organiser@example.org", "first@example.org", FIRST),
        Outgoing(2, "organiser@example.org", "second@example.org", SECOND),
    ]
    async with RawSmtp(replies, cut_payload_after=fault.cut_payload_after) as server:
        results = await send_raw(server, jobs, data_path=data_path)
    first = results[1]
    assert first.outcome == expected, (first, server.commands)
    if expected is Attempt.UNKNOWN:
        assert first.text, first
    if expected is Attempt.SENT:
        assert server.payloads[0] == data_payload(FIRST)[0]
    # the next mail goes through whole: over a new connection when the first one was out of
    # step or lost (never reused), over the same one after an in-step reply
    assert results[2].outcome == Attempt.SENT, (results[2], server.commands)
    assert server.payloads[-1] == data_payload(SECOND)[0]
    closes = fault.closes or expected is Attempt.UNKNOWN
    assert server.connections == (2 if closes else 1), server.commands
    assert server.quits == 1


async def test_a_stream_out_of_step_is_not_reused_for_the_next_mail() -> None:
    """Today's code answers the off-by-one stream with `sent` for mails the server never stored."""
    jobs = [Outgoing(i, "organiser@example.org", f"r{i}@example.org", SECOND) for i in range(4)]
    async with RawSmtp({"EHLO": [EHLO + b"250 OK\r\n"]}) as server:
        results = await send_raw(server, jobs)
    assert [results[i].outcome for i in range(4)] == [U, S, S, S]
    assert len(server.payloads) == 3
    assert server.connections == 2


# --- Stopping while mails are on the wire (issue 11 item 11, the transport's half) --------------

AUTH_EHLO = b"250-raw.test\r\n250-SIZE 10000000\r\n250 AUTH PLAIN\r\n"


async def test_a_login_failure_on_one_connection_lets_the_others_report_what_they_sent() -> None:
    """The mail another connection has on the wire gets its reply, and it is reported, before
    the fatal error stops the run (today it was cancelled unreported: the runner put it back
    to pending while the server had it)."""
    replies: dict[str, list[Reply]] = {
        "EHLO": [AUTH_EHLO, AUTH_EHLO],
        # the first login goes through at once, the second is refused a moment later, while
        # the first connection waits for the reply to its final dot
        "AUTH": [b"235 2.7.0 OK\r\n", Pause(0.2, b"535 5.7.8 bad credentials\r\n")],
        ".": [Pause(0.6, b"250 2.0.0 queued\r\n")],
    }
    jobs = [Outgoing(i, "organiser@example.org", f"r{i}@example.org", SECOND) for i in (1, 2, 3)]
    results: dict[int, Result] = {}
    async with RawSmtp(replies) as server:
        with pytest.raises(TransportFatalError, match="login refused"):
            await send_raw(
                server, jobs, connections=2, results=results, username="u", password="p", timeout=3.0
            )
    assert len(server.payloads) == 1
    assert [r.outcome for r in results.values()] == [S]
    # the connection that finished took no further mail
    assert sum(c.startswith("MAIL") for c in server.commands) == 1


async def test_cancelling_the_run_waits_for_the_reply_to_a_mail_on_the_wire() -> None:
    """Ctrl-C (the pass's task cancelled) while a payload is on the wire: its reply is read and
    reported, then the cancellation goes on; mails not started are not sent."""
    jobs = [Outgoing(i, "organiser@example.org", f"r{i}@example.org", SECOND) for i in (1, 2)]
    results: dict[int, Result] = {}
    async with RawSmtp({".": [Pause(0.5, b"250 2.0.0 queued\r\n")]}) as server:
        task = asyncio.create_task(send_raw(server, jobs, results=results, timeout=3.0))
        for _ in range(300):
            if server.payloads or task.done():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert {k: r.outcome for k, r in results.items()} == {1: S}
    assert len(server.payloads) == 1

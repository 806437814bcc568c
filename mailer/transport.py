"""SMTP delivery over a pool of kept-open aiosmtplib connections, with pacing and reply classification."""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import errors as smtp_errors

from .addresses import spelling
from .config import SmtpSettings
from .errors import TransportFatalError
from .message import data_payload
from .pacing import is_quota_reply
from .vocab import Attempt

__all__ = [
    "Outgoing",
    "Pacer",
    "ProtocolWire",
    "Result",
    "Transport",
    "TransportSettings",
    "classify",
    "is_loopback",
    "protocol_wire",
]
#: Replies that mean "you are going too fast / I am overloaded": slow the whole transport.
SLOW_DOWN_CODES = frozenset({421, 451, 452, 454})
#: Replies to MAIL or RCPT that refuse us, not the recipient: a login is wanted (530, RFC 4954
#: 6), the credentials are wrong (535) or the login needs encryption (538). The run stops.
LOGIN_CODES = frozenset({530, 535, 538})
_DEFAULT_PORTS = {"tls": 465, "starttls": 587, "none": 25}


@dataclass(frozen=True)
class TransportSettings:
    """Everything needed to reach the SMTP server. Secrets come only from the environment."""

    host: str = "localhost"
    port: int = 587
    tls: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    timeout: float = 30.0
    connections: int = 2
    rate: float | None = None
    per_hour: int | None = None
    local_hostname: str | None = None

    @classmethod
    def from_config(cls, smtp: SmtpSettings, environ: Mapping[str, str]) -> TransportSettings:
        """Combine schedules.yaml ``smtp:`` with ``MAILER_SMTP_*`` variables (which win).

        :raises TransportFatalError: a variable has a value we cannot use.
        """
        tls = environ.get("MAILER_SMTP_TLS", smtp.tls).strip().lower()
        if tls not in _DEFAULT_PORTS:
            raise TransportFatalError(f"MAILER_SMTP_TLS={tls!r}: use starttls, tls or none")
        port_text = environ.get("MAILER_SMTP_PORT")
        try:
            port = int(port_text) if port_text else (smtp.port or _DEFAULT_PORTS[tls])
        except ValueError:
            raise TransportFatalError(f"MAILER_SMTP_PORT={port_text!r} is not a port number") from None
        user = environ.get("MAILER_SMTP_USER") or None
        password = environ.get("MAILER_SMTP_PASSWORD") or None
        if user and password is None:
            raise TransportFatalError("MAILER_SMTP_USER is set but MAILER_SMTP_PASSWORD is not")
        host = environ.get("MAILER_SMTP_HOST") or smtp.host
        if user and tls == "none" and not smtp.allow_plaintext_login and not is_loopback(host):
            raise TransportFatalError(
                f"tls is none and a login is set (MAILER_SMTP_USER): the password would cross the "
                f"network to {host} in clear text. Use tls: starttls or tls (MAILER_SMTP_TLS), or, on a "
                "network you trust, write `allow_plaintext_login: true` under smtp: in schedules.yaml "
                "(smtp.allow_plaintext_login). Nothing was sent."
            )
        return cls(
            host=host,
            port=port,
            tls=tls,  # type: ignore[arg-type]
            username=user,
            password=password,
            ca_file=environ.get("MAILER_SMTP_CA_FILE") or smtp.ca_file,
            timeout=smtp.timeout,
            connections=smtp.connections,
            rate=smtp.rate,
            per_hour=smtp.per_hour,
            local_hostname=smtp.local_hostname,
        )

    def describe(self) -> str:
        """Where we send, for logs (never the password)."""
        who = f"{self.username}@" if self.username else ""
        return f"smtp://{who}{self.host}:{self.port} (tls={self.tls})"


def is_loopback(host: str) -> bool:
    """``host`` names this machine without a look-up: ``localhost`` (RFC 6761 6.3) or a
    loopback address. Anything else may be across a network.

    >>> [is_loopback(h) for h in ("localhost", "127.0.0.2", "[::1]", "10.0.0.1", "localhost.example.org")]
    [True, True, True, False, False]
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Outgoing:
    """One message for one recipient. ``key`` is the caller's handle (the ledger row id)."""

    key: int
    sender: str
    recipient: str
    #: The message, or (with ``size``) what :func:`data_payload` made of it: the runner has
    #: that done in its composing worker, off the process that runs the connections.
    data: bytes
    size: int | None = None


@dataclass(frozen=True)
class Result:
    """What one attempt came to, and the server's reply as far as there was one.

    ``outcome`` is :attr:`Attempt.SENT` only for a 2xx to the final dot. :attr:`Attempt.UNKNOWN`
    means the server may or may not have the mail (a reply out of step, or the connection lost
    once the payload was on its way): it must be neither counted as sent nor as failed.
    """

    outcome: Attempt
    code: int | None
    text: str
    slow_down: bool = False
    #: A quota reply (:func:`mailer.pacing.is_quota_reply`): the transport stops after it and
    #: the pass pauses until the quota frees (issue 17).
    quota: bool = False


def classify(code: int | None, text: str) -> Result:
    """Map a reply that ends a transaction in step to an outcome: 2xx sent, 4xx (or no reply
    before any of the payload was written) deferred, 5xx failed; any other code (1xx, 3xx,
    999, a line that was no reply at all) leaves the outcome unknown.

    >>> classify(550, "no such user").outcome
    <Attempt.FAILED: 'failed'>
    >>> classify(451, "try later").slow_down
    True
    >>> classify(999, "what").outcome
    <Attempt.UNKNOWN: 'unknown'>
    """
    if code is None or 400 <= code < 500:
        return Result(
            Attempt.DEFERRED, code, text, slow_down=code in SLOW_DOWN_CODES, quota=is_quota_reply(code, text)
        )
    if 200 <= code < 300:
        return Result(Attempt.SENT, code, text)
    if 500 <= code < 600:
        return Result(Attempt.FAILED, code, text)
    return Result(Attempt.UNKNOWN, code, text)


class Pacer:
    """Rate limits shared by all connections: ``rate`` per second, ``per_hour`` per hour, and
    a pause that doubles on each "slow down" reply (421/451/452/454) and resets on success."""

    def __init__(self, rate: float | None, per_hour: int | None, *, max_pause: float = 30.0) -> None:
        self.rate = rate
        self.per_hour = per_hour
        self.max_pause = max_pause
        self._next = 0.0
        self._hour: collections.deque[float] = collections.deque()
        self._pause_until = 0.0
        self._pause = 0.0
        self.pauses = 0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait = self._pause_until - now
            if self.per_hour is not None:
                while self._hour and self._hour[0] <= now - 3600:
                    self._hour.popleft()
                if len(self._hour) >= self.per_hour:
                    wait = max(wait, self._hour[0] + 3600 - now)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.rate is not None:
                slot = max(now, self._next)
                self._next = slot + 1.0 / self.rate
                if slot > now:
                    await asyncio.sleep(slot - now)
            if self.per_hour is not None:
                self._hour.append(loop.time())
            return

    def slow_down(self) -> float:
        """Pause every connection; each further call doubles the pause (up to ``max_pause``)."""
        self._pause = min(self.max_pause, self._pause * 2 if self._pause else 0.5)
        self._pause_until = asyncio.get_running_loop().time() + self._pause
        self.pauses += 1
        return self._pause

    def ok(self) -> None:
        self._pause = 0.0


OnResult = Callable[[Outgoing, Result], Awaitable[None] | None]


class Transport:
    """Sends :class:`Outgoing` messages from a queue over ``connections`` SMTP sessions.

    ``on_result`` is awaited for each message before that connection sends its next one, so
    the caller can commit the outcome first (the ledger's crash-safety rule).

    ``data_path="public"`` sends DATA through aiosmtplib's public ``SMTP.data`` only (the
    fallback :func:`protocol_wire` chooses when aiosmtplib's internals have another shape);
    tests use it to hold the fallback to the same bytes on the wire.
    """

    def __init__(
        self,
        settings: TransportSettings,
        *,
        log: Callable[[str], None] | None = None,
        data_path: Literal["auto", "public"] = "auto",
    ) -> None:
        self.settings = settings
        self.pacer = Pacer(settings.rate, settings.per_hour)
        self._log = log or (lambda msg: None)
        self._connect_failures = 0
        self._data_path = data_path
        self._said_fallback = False
        #: Why the rest of this run is deferred without trying: the server cannot be reached.
        self.unreachable: str | None = None
        #: A session was opened in this run (the server is there, whatever it said later).
        self.reached = False
        self._failures: list[BaseException] = []
        self._stopping = False
        #: Workers with a transaction under way (from MAIL until ``on_result`` returned).
        self._busy: set[asyncio.Task[None]] = set()
        #: The server's quota reply in this run ("452 4.5.3 ..."): every connection stopped
        #: after it (what was queued is taken out unsent), or None.
        self.quota_reply: str | None = None

    def _tls_context(self) -> ssl.SSLContext:
        # Certificates are always verified; a private CA is given with ca_file.
        ctx = ssl.create_default_context(cafile=self.settings.ca_file)
        return ctx

    async def connect(self) -> aiosmtplib.SMTP:
        """Open, secure and authenticate one session.

        STARTTLS is ours to start, not aiosmtplib's: a server that does not offer it stops the
        run (aiosmtplib raises a bare SMTPException for it, which reads like "unreachable").

        :raises TransportFatalError: TLS or login failure, STARTTLS or AUTH not offered (stop
            the run, nothing is sent).
        :raises OSError / SMTPException: the server is unreachable (caller defers).
        """
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.tls == "tls",
            start_tls=False,
            validate_certs=True,
            tls_context=self._tls_context() if s.tls != "none" else None,
            timeout=s.timeout,
            local_hostname=s.local_hostname,
        )
        try:
            await client.connect()
            await _hello(client)
            if s.tls == "starttls":
                if not client.supports_extension("starttls"):
                    raise TransportFatalError(
                        f"{s.describe()}: the server does not offer STARTTLS, so nothing was sent (never "
                        "in clear text); check the port, or set MAILER_SMTP_TLS (smtp.tls) to tls"
                    )
                await client.starttls()
                await _hello(client)  # RFC 3207 4.2: ask for the extensions again
            if s.username:
                if not client.supports_extension("auth"):
                    raise TransportFatalError(
                        f"{s.describe()}: a login is set (MAILER_SMTP_USER) but the server does not offer "
                        "AUTH" + (" over a plain connection; set MAILER_SMTP_TLS" if s.tls == "none" else "")
                    )
                await client.login(s.username, s.password or "")
        except TransportFatalError:
            await _quit(client)
            raise
        except smtp_errors.SMTPAuthenticationError as exc:
            await _close(client)
            raise TransportFatalError(
                f"{s.describe()}: login refused ({exc.code} {exc.message}); check "
                "MAILER_SMTP_USER and MAILER_SMTP_PASSWORD"
            ) from None
        except smtp_errors.SMTPNotSupported as exc:
            await _close(client)
            raise TransportFatalError(f"{s.describe()}: {exc}; check MAILER_SMTP_TLS") from None
        except (ssl.SSLError, smtp_errors.SMTPException, OSError) as exc:
            await _close(client)
            if _is_tls_error(exc):
                raise TransportFatalError(
                    f"{s.describe()}: TLS failed: {_root(exc)}; check the host name, "
                    "MAILER_SMTP_TLS and ca_file (certificates are always verified)"
                ) from None
            raise
        self.reached = True
        return client

    async def run(self, queue: asyncio.Queue[Outgoing | None], on_result: OnResult) -> None:
        """Send until each worker reads a ``None`` sentinel (put one per connection).

        A failure on one connection (a TLS or login failure, or ``on_result`` raising) stops
        the others after their current mail, whose outcome goes through ``on_result`` first:
        a mail a server accepted is never left without its outcome. Mails still queued are
        taken out unsent. Then the first failure is raised. Cancelling ``run`` (Ctrl-C) does
        the same: a mail on the wire gets its reply (within the timeout) and ``on_result``
        before the cancellation goes on; connections between mails stop at once.

        :raises TransportFatalError: a TLS or login failure.
        """
        self._failures = []
        self._stopping = False
        workers = [
            asyncio.create_task(self._worker(i, queue, on_result)) for i in range(self.settings.connections)
        ]
        try:
            # not gather(): cancelling a gather cancels the workers, mid-transaction too
            await asyncio.wait(workers)
        except asyncio.CancelledError:
            # Cancelled from outside (Ctrl-C, a stopping daemon): a mail on the wire gets its
            # reply and its outcome goes through on_result before the cancellation goes on;
            # workers between mails stop at once.
            self._stop_all(queue)
            busy = [t for t in workers if t in self._busy and not t.done()]
            for t in workers:
                if t not in self._busy:
                    t.cancel()
            if busy:
                self._log(f"stopping: waiting for the reply to {len(busy)} mail(s) on the wire")
                await asyncio.wait(busy)
            raise
        finally:
            for t in workers:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for t in workers:
            if not t.cancelled() and t.exception() is not None:
                self._failures.append(t.exception())  # type: ignore[arg-type]
        if self._failures:
            raise self._failures[0]

    @property
    def busy(self) -> int:
        """How many connections are in a transaction now (from MAIL until their outcome is taken)."""
        return len(self._busy)

    def _stop_all(self, queue: asyncio.Queue[Outgoing | None]) -> None:
        """Every connection stops after its current mail; queued mails are taken out unsent."""
        self._stopping = True
        while not queue.empty():
            queue.get_nowait()
        for _ in range(self.settings.connections):
            if not queue.full():
                queue.put_nowait(None)

    async def _worker(self, idx: int, queue: asyncio.Queue[Outgoing | None], on_result: OnResult) -> None:
        client: aiosmtplib.SMTP | None = None
        try:
            while not self._stopping:
                job = await queue.get()
                if job is None or self._stopping:
                    return
                result, client = await self._send_one(job, client)
                r = on_result(job, result)
                if r is not None:
                    await r
                self._busy.discard(asyncio.current_task())
                if result.quota and self.quota_reply is None:
                    # Issue 17: the provider's quota is used up; each further mail would get
                    # the same answer. Stop every connection after its current mail.
                    self.quota_reply = f"{result.code} {result.text}".strip()
                    self._log(f"the server answered a quota reply ({self.quota_reply}); stopping this pass")
                    self._stop_all(queue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, raised by run() once all stopped
            self._failures.append(exc)
            self._stop_all(queue)
        finally:
            self._busy.discard(asyncio.current_task())
            if client is not None:
                await _quit(client)

    async def _send_one(
        self, job: Outgoing, client: aiosmtplib.SMTP | None
    ) -> tuple[Result, aiosmtplib.SMTP | None]:
        if self.unreachable is not None:
            return Result(Attempt.DEFERRED, None, self.unreachable), client
        if client is None or not client.is_connected:
            try:
                client = await self.connect()
                self._connect_failures = 0
            except TransportFatalError:
                raise
            except (smtp_errors.SMTPException, OSError) as exc:
                self._connect_failures += 1
                nobody, text = _why_unreachable(exc, self.settings)
                if (nobody and not self.reached) or self._connect_failures >= 3:
                    # Stop hammering a server that is down (or not there at all: refused, no
                    # answer, no such host): the rest of this pass is deferred and retried
                    # later with backoff.
                    if self.unreachable is None:
                        self._log(f"server unreachable, deferring the rest of this pass: {text}")
                    self.unreachable = text
                code = getattr(exc, "code", None)
                if isinstance(exc, smtp_errors.SMTPResponseException) and exc.code in SLOW_DOWN_CODES:
                    self.pacer.slow_down()
                return Result(Attempt.DEFERRED, code, text, quota=is_quota_reply(code, text)), None
        await self.pacer.acquire()
        self._busy.add(asyncio.current_task())  # type: ignore[arg-type]
        wire = None if self._data_path == "public" else protocol_wire(client)
        if wire is None and self._data_path == "auto" and not self._said_fallback:
            self._said_fallback = True
            self._log(
                f"aiosmtplib {aiosmtplib.__version__}: its protocol internals are not the tested "
                "ones; DATA goes through SMTP.data (slower, and blind to a reply left waiting)"
            )
        try:
            reply = await _transaction(client, job, wire)
        except _Unsendable as exc:
            result = Result(Attempt.FAILED, None, str(exc))
        except _NotLoggedIn as exc:
            # Refused as a sender, not the recipient: every other mail would get the same.
            await _quit(client)
            raise TransportFatalError(self._login_hint(exc)) from None
        except _InDoubt as exc:
            # Out of step or lost with the payload on its way: the server may have the mail.
            # This connection cannot be trusted with another one.
            await _close(client)
            client = None
            result = Result(Attempt.UNKNOWN, exc.code, exc.text)
        except (smtp_errors.SMTPServerDisconnected, smtp_errors.SMTPTimeoutError, OSError) as exc:
            # Lost before any byte of the payload was written: nothing can have been delivered.
            await _close(client)
            return Result(
                Attempt.DEFERRED,
                None,
                f"connection lost before the message: {_root(exc, self.settings.timeout)}",
            ), None
        except smtp_errors.SMTPResponseException as exc:
            # A 4xx or 5xx in step: the transaction is over, the connection goes on.
            result = classify(exc.code, exc.message)
            if exc.code == 421:  # RFC 5321 4.2.2: the server is closing the channel
                await _close(client)
                client = None
            else:
                await _rset(client)
        else:
            result = Result(Attempt.SENT, reply.code, reply.message)
        if result.slow_down:
            pause = self.pacer.slow_down()
            self._log(f"server asked to slow down ({result.code}); pausing {pause:.1f}s")
        elif result.outcome is Attempt.SENT:
            self.pacer.ok()
        return result, client

    def _login_hint(self, exc: _NotLoggedIn) -> str:
        s, reply = self.settings, f"{exc.code} {exc.text}".strip()
        said = f"{s.describe()}: the server answered {reply} to {exc.verb}"
        if "starttls" in exc.text.lower():
            what = "it wants STARTTLS first; set MAILER_SMTP_TLS (smtp.tls) to starttls"
        elif exc.code == 538:
            what = (
                "the login needs an encrypted connection; set MAILER_SMTP_TLS (smtp.tls) to starttls or tls"
            )
        elif s.username is None:
            what = "it wants a login; set MAILER_SMTP_USER and MAILER_SMTP_PASSWORD"
        else:
            what = "login refused; check MAILER_SMTP_USER and MAILER_SMTP_PASSWORD"
        return f"{said}: {what}. The run stopped; what was not sent stays pending."


class _Unsendable(Exception):
    """This message cannot go over this connection as it is (nothing was sent for it)."""


class _NotLoggedIn(Exception):
    """MAIL or RCPT answered with a :data:`LOGIN_CODES` reply: the server refuses us, not the recipient."""

    def __init__(self, verb: str, code: int, text: str) -> None:
        super().__init__(text)
        self.verb, self.code, self.text = verb, code, text


class _InDoubt(Exception):
    """The server may or may not have the mail: the reply stream went out of step, or the
    connection was lost once the payload was on its way (outcome UNKNOWN)."""

    def __init__(self, code: int | None, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# -- aiosmtplib's private protocol object: contained here ------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolWire:
    """The parts of a connected ``aiosmtplib.SMTPProtocol`` the fast DATA path uses."""

    write: Callable[[bytes], None]
    read_response: Callable[..., Awaitable[aiosmtplib.SMTPResponse]]
    #: Bytes received and not yet read as a reply: after a reply, the stream is out of step.
    buffer: bytearray


def protocol_wire(client: aiosmtplib.SMTP) -> ProtocolWire | None:
    """aiosmtplib's protocol object, for writing a prepared DATA payload; None: use the public API.

    PRIVATE aiosmtplib API, used nowhere else in mailer: ``SMTP.protocol`` (the
    ``SMTPProtocol`` of the connection), its ``write(bytes)``, its coroutine
    ``read_response(timeout=...)`` and its receive buffer ``_buffer`` (a ``bytearray``;
    bytes left in it after a reply mean the stream is out of step). Tested with aiosmtplib
    3.0.0 and 5.1.3, the ends of the range pyproject.toml allows (``make
    test-aiosmtplib-range``). When any of these is missing or has another shape, this returns
    None and :func:`_public_data` sends through ``SMTP.data`` instead: the same bytes on the
    wire, a little slower, and blind to a reply left waiting in the buffer.
    """
    protocol = getattr(client, "protocol", None)
    buffer = getattr(protocol, "_buffer", None)
    if protocol is None or not isinstance(buffer, bytearray) or not _has_wire(type(protocol)):
        return None
    return ProtocolWire(protocol.write, protocol.read_response, buffer)


_SHAPES: dict[type, bool] = {}


def _has_wire(kind: type) -> bool:
    """``kind`` has ``write`` and a coroutine ``read_response`` that takes ``timeout`` (cached)."""
    known = _SHAPES.get(kind)
    if known is None:
        write, read = getattr(kind, "write", None), getattr(kind, "read_response", None)
        known = callable(write) and inspect.iscoroutinefunction(read)
        try:
            known = known and "timeout" in inspect.signature(read).parameters  # type: ignore[arg-type]
        except (TypeError, ValueError):
            known = False
        _SHAPES[kind] = known
    return known


async def _transaction(
    client: aiosmtplib.SMTP, job: Outgoing, wire: ProtocolWire | None
) -> aiosmtplib.SMTPResponse:
    """MAIL, RCPT, DATA for one message, its bytes written as they are; the reply to the dot.

    ``SMTP.sendmail`` would re-parse both addresses and run two regular expressions over the
    whole message (and a third for SIZE): more than half of the transport's CPU. The
    commands go through aiosmtplib's ``execute_command`` (which refuses control characters
    in arguments, so no data can inject a command); the payload from :func:`data_payload`
    through ``wire`` (:func:`protocol_wire`), or ``SMTP.data`` when there is none.

    Each reply must be the one its command expects (RFC 5321 4.3.2): MAIL 250, RCPT 250,
    251 or 252 (3.4, 7.3: the transaction goes on), DATA 354, the final dot 2xx.

    :raises SMTPResponseException: a 4xx or 5xx in step (``code`` says which).
    :raises _InDoubt: any other reply, a reply followed by more lines, a line that is no
        reply, or the connection lost after the payload started: the outcome is unknown.
    :raises SMTPServerDisconnected / SMTPTimeoutError / OSError: the connection broke before
        any byte of the payload was written.
    """
    # The envelope spells each address as the mail's To: and ATTENDEE do (issue 13): an
    # A-label domain, so an address whose only non-ASCII part is the domain needs no SMTPUTF8.
    sender, recipient = spelling(job.sender), spelling(job.recipient)
    addresses = sender + recipient
    if not addresses.isprintable() or " " in addresses or "<" in addresses or ">" in addresses:
        raise _Unsendable(f"{job.recipient!r}: an address with a control character, space or <> in it")
    payload, size = data_payload(job.data) if job.size is None else (job.data, job.size)
    mail = [b"MAIL", b"FROM:<" + sender.encode() + b">"]
    if client.supports_extension("size"):
        mail.append(b"SIZE=%d" % size)
    if not addresses.isascii():
        if not client.supports_extension("smtputf8"):
            raise _Unsendable(
                f"{job.recipient}: the address is not ASCII and the server does not offer SMTPUTF8 (RFC 6531)"
            )
        mail.append(b"SMTPUTF8")
    if wire is not None and wire.buffer:
        raise _InDoubt(None, f"out of step: unread reply {bytes(wire.buffer[:80])!r} before MAIL")
    await _command(client, wire, (250,), *mail)
    await _command(client, wire, (250, 251, 252), b"RCPT", b"TO:<" + recipient.encode() + b">")
    if wire is None:
        return await _public_data(client, payload)
    await _command(client, wire, (354,), b"DATA")
    wire.write(payload)  # raises SMTPServerDisconnected, nothing written, if the connection closed
    try:
        reply = await wire.read_response(timeout=client.timeout)
    except (smtp_errors.SMTPServerDisconnected, smtp_errors.SMTPTimeoutError, OSError) as exc:
        raise _InDoubt(
            None, f"connection lost after the message was sent: {_root(exc, client.timeout)}"
        ) from None
    except smtp_errors.SMTPResponseException as exc:  # a line that is no reply, over-long
        raise _InDoubt(exc.code, f"no valid reply to the end of the message: {exc.message}") from None
    return _in_step(reply, wire, "the end of the message", range(200, 300))


async def _command(
    client: aiosmtplib.SMTP, wire: ProtocolWire | None, expected: tuple[int, ...], *args: bytes
) -> aiosmtplib.SMTPResponse:
    try:
        reply = await client.execute_command(*args)
    except smtp_errors.SMTPResponseException as exc:  # a line that is no reply, over-long
        raise _InDoubt(exc.code, f"no valid reply to {args[0].decode()}: {exc.message}") from None
    verb = args[0].decode()
    if reply.code in LOGIN_CODES and verb in ("MAIL", "RCPT") and not (wire is not None and wire.buffer):
        raise _NotLoggedIn("MAIL FROM" if verb == "MAIL" else "RCPT TO", reply.code, reply.message)
    return _in_step(reply, wire, verb, expected)


def _in_step(
    reply: aiosmtplib.SMTPResponse, wire: ProtocolWire | None, what: str, expected: Collection[int]
) -> aiosmtplib.SMTPResponse:
    """``reply`` if it is the one expected; raise for a refusal (4xx, 5xx) or a stream out of step."""
    if wire is not None and wire.buffer:
        # Without PIPELINING a server says nothing more until the next command: the reply we
        # read may belong to an earlier command ("SMTP fixup" proxies add a 250).
        raise _InDoubt(
            reply.code, f"out of step: more lines after the reply to {what} ({reply.code} {reply.message})"
        )
    if reply.code in expected:
        return reply
    if 400 <= reply.code < 600:
        raise smtp_errors.SMTPResponseException(reply.code, reply.message)
    raise _InDoubt(reply.code, f"out of step: {reply.code} {reply.message} to {what}")


async def _public_data(client: aiosmtplib.SMTP, payload: bytes) -> aiosmtplib.SMTPResponse:
    """DATA through aiosmtplib's public ``SMTP.data``, which stuffs the message again: it is
    given the message back (the payload un-stuffed), so the same bytes go on the wire.

    ``SMTP.data`` sends DATA and the payload in one call, so a 2xx other than 250 (to DATA or
    to the dot) or a lost connection leaves the outcome unknown; a 4xx or 5xx is a refusal
    either way.
    """
    try:
        return await client.data(_unstuff(payload))
    except smtp_errors.SMTPDataError as exc:
        if 400 <= exc.code < 600:
            raise smtp_errors.SMTPResponseException(exc.code, exc.message) from None
        raise _InDoubt(exc.code, f"out of step: {exc.code} {exc.message} during DATA") from None
    except (smtp_errors.SMTPServerDisconnected, smtp_errors.SMTPTimeoutError, OSError) as exc:
        raise _InDoubt(None, f"connection lost during DATA: {_root(exc, client.timeout)}") from None
    except smtp_errors.SMTPResponseException as exc:
        raise _InDoubt(exc.code, f"no valid reply during DATA: {exc.message}") from None


def _unstuff(payload: bytes) -> bytes:
    r"""The message :func:`data_payload` made ``payload`` from, CRLF-normalised.

    >>> _unstuff(data_payload(b"..a\r\n.\r\nb")[0])
    b'..a\r\n.\r\nb\r\n'
    """
    body = payload[:-3]  # the final ".\r\n"
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def _why_unreachable(exc: BaseException, s: TransportSettings) -> tuple[bool, str]:
    """One line on why a session could not be opened, and whether nobody is there at all (no
    such host, the port refused, no answer within the timeout) rather than a server that
    answered with a refusal or went away (which may pass: another connection may get in).

    >>> s = TransportSettings(host="mx.example", port=25, timeout=30.0)
    >>> _why_unreachable(smtp_errors.SMTPConnectTimeoutError("Timed out"), s)
    (True, 'no answer from mx.example:25 in 30 s')
    >>> _why_unreachable(smtp_errors.SMTPConnectResponseError(421, "too busy"), s)
    (False, 'could not reach mx.example:25: the server answered 421 too busy')
    """
    where = f"{s.host}:{s.port}"
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if isinstance(exc, smtp_errors.SMTPResponseException):
        return False, f"could not reach {where}: the server answered {exc.code} {exc.message}".rstrip()
    if any(isinstance(x, socket.gaierror) for x in chain):
        dns = next(x for x in chain if isinstance(x, socket.gaierror))
        return True, f"could not reach {where}: unknown host (DNS: {dns.strerror or dns})"
    if any(isinstance(x, TimeoutError | asyncio.TimeoutError) for x in chain):
        return True, f"no answer from {where} in {s.timeout:g} s"
    if any(_refused(x) for x in chain):
        return True, f"could not reach {where}: connection refused"
    return False, f"could not reach {where}: {_root(exc)}"


def _refused(exc: BaseException) -> bool:
    """The port refused us; for a name with several addresses Python 3.11 raises one OSError
    that lists each (``Multiple exceptions: [Errno 111] ...``): refused when all were."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    if not isinstance(exc, OSError):
        return False
    codes = re.findall(r"\[Errno (\d+)\]", str(exc))
    return exc.errno == errno.ECONNREFUSED or (
        bool(codes) and all(int(c) == errno.ECONNREFUSED for c in codes)
    )


async def _hello(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO when refused), when the session has not said hello since it (re)started."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except smtp_errors.SMTPHeloError:
            await client.helo()


def _root(exc: BaseException, timeout: float | None = None) -> str:
    """The first cause of ``exc``, as a line; a timeout as one (not the ``CancelledError`` that
    asyncio's ``wait_for`` leaves at the root of aiosmtplib's timeout errors)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, TimeoutError | asyncio.TimeoutError):
            return f"no answer in {timeout:g} s" if timeout else "no answer within the timeout"
        e = e.__cause__
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def _is_tls_error(exc: BaseException) -> bool:
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, ssl.SSLError | ssl.CertificateError):
            return True
        e = e.__cause__ or e.__context__
    return False


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except (smtp_errors.SMTPException, OSError):
        await _close(client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await client.quit()
    except (smtp_errors.SMTPException, OSError):
        pass
    finally:
        await _close(client)


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a broken socket must never raise
        pass

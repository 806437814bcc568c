"""SMTP delivery over a pool of kept-open aiosmtplib connections, with pacing and reply classification."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import errors as smtp_errors

from .config import SmtpSettings
from .errors import TransportFatalError
from .message import data_payload

__all__ = ["Outgoing", "Pacer", "Result", "Transport", "TransportSettings", "classify", "data_payload"]

Outcome = Literal["sent", "deferred", "failed"]
#: Replies that mean "you are going too fast / I am overloaded": slow the whole transport.
SLOW_DOWN_CODES = frozenset({421, 451, 452, 454})
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
        return cls(
            host=environ.get("MAILER_SMTP_HOST") or smtp.host,
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
    outcome: Outcome
    code: int | None
    text: str
    slow_down: bool = False


def classify(code: int | None, text: str) -> Result:
    """Map an SMTP reply to an outcome: 2xx sent, 4xx (or no reply) deferred, 5xx failed.

    >>> classify(550, "no such user").outcome
    'failed'
    >>> classify(451, "try later").slow_down
    True
    """
    if code is None or 400 <= code < 500:
        return Result("deferred", code, text, slow_down=code in SLOW_DOWN_CODES)
    if 200 <= code < 300:
        return Result("sent", code, text)
    return Result("failed", code, text)


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
    """

    def __init__(self, settings: TransportSettings, *, log: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.pacer = Pacer(settings.rate, settings.per_hour)
        self._log = log or (lambda msg: None)
        self._connect_failures = 0
        self.unreachable: str | None = None

    def _tls_context(self) -> ssl.SSLContext:
        # Certificates are always verified; a private CA is given with ca_file.
        ctx = ssl.create_default_context(cafile=self.settings.ca_file)
        return ctx

    async def connect(self) -> aiosmtplib.SMTP:
        """Open, secure and authenticate one session.

        :raises TransportFatalError: TLS or login failure (stop the run, nothing is sent).
        :raises OSError / SMTPException: the server is unreachable (caller defers).
        """
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.tls == "tls",
            start_tls=True if s.tls == "starttls" else False,
            validate_certs=True,
            tls_context=self._tls_context() if s.tls != "none" else None,
            timeout=s.timeout,
            local_hostname=s.local_hostname,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # no STARTTLS or login did it: we need the extensions
                try:
                    await client.ehlo()
                except smtp_errors.SMTPHeloError:
                    await client.helo()
            if s.username:
                await client.login(s.username, s.password or "")
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
        return client

    async def run(self, queue: asyncio.Queue[Outgoing | None], on_result: OnResult) -> None:
        """Send until each worker reads a ``None`` sentinel (put one per connection).

        A failure on one connection (a TLS or login failure, or ``on_result`` raising) stops
        the others after their current mail, whose outcome goes through ``on_result`` first:
        a mail a server accepted is never left without its outcome. Mails still queued are
        taken out unsent. Then the first failure is raised.

        :raises TransportFatalError: a TLS or login failure.
        """
        self._failures: list[BaseException] = []
        self._stopping = False
        workers = [
            asyncio.create_task(self._worker(i, queue, on_result)) for i in range(self.settings.connections)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in workers:  # only when cancelled from outside
                if not t.done():
                    t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self._failures:
            raise self._failures[0]

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
                result = await self._send_one(job, client)
                client = result[1]
                r = on_result(job, result[0])
                if r is not None:
                    await r
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, raised by run() once all stopped
            self._failures.append(exc)
            self._stop_all(queue)
        finally:
            if client is not None:
                await _quit(client)

    async def _send_one(
        self, job: Outgoing, client: aiosmtplib.SMTP | None
    ) -> tuple[Result, aiosmtplib.SMTP | None]:
        if self.unreachable is not None:
            return Result("deferred", None, self.unreachable), client
        if client is None or not client.is_connected:
            try:
                client = await self.connect()
                self._connect_failures = 0
            except TransportFatalError:
                raise
            except (smtp_errors.SMTPException, OSError) as exc:
                self._connect_failures += 1
                text = f"cannot connect to {self.settings.host}:{self.settings.port}: {_root(exc)}"
                if self._connect_failures >= 3:
                    # Stop hammering a server that is down: the rest of this pass is deferred
                    # and retried later with backoff.
                    self.unreachable = text
                    self._log(f"server unreachable, deferring the rest of this pass: {text}")
                if isinstance(exc, smtp_errors.SMTPResponseException) and exc.code in SLOW_DOWN_CODES:
                    self.pacer.slow_down()
                return Result("deferred", getattr(exc, "code", None), text), None
        await self.pacer.acquire()
        try:
            reply = await _transaction(client, job)
        except (smtp_errors.SMTPServerDisconnected, smtp_errors.SMTPTimeoutError, OSError) as exc:
            # The connection broke, possibly in the middle of DATA: the mail's fate is
            # unknown; it is deferred and re-sent later with the same Message-ID.
            await _close(client)
            return Result("deferred", None, f"connection lost: {_root(exc)}"), None
        except smtp_errors.SMTPResponseException as exc:
            result = classify(exc.code, exc.message)
            if exc.code == 421:  # RFC 5321 4.2.2: the server is closing the channel
                await _close(client)
                client = None
            else:
                await _rset(client)
        except _Unsendable as exc:
            result = Result("failed", None, str(exc))
        else:
            result = Result("sent", reply.code, reply.message)
        if result.slow_down:
            pause = self.pacer.slow_down()
            self._log(f"server asked to slow down ({result.code}); pausing {pause:.1f}s")
        elif result.outcome == "sent":
            self.pacer.ok()
        return result, client


class _Unsendable(Exception):
    """This message cannot go over this connection as it is (nothing was sent for it)."""


async def _transaction(client: aiosmtplib.SMTP, job: Outgoing) -> aiosmtplib.SMTPResponse:
    """MAIL, RCPT, DATA for one message, its bytes written as they are.

    ``SMTP.sendmail`` would re-parse both addresses and run two regular expressions over the
    whole message (and a third for SIZE): more than half of the transport's CPU. The
    commands go through aiosmtplib's ``execute_command`` (which refuses control characters
    in arguments, so no data can inject a command); the payload from :func:`data_payload`
    through its protocol's ``write`` and ``read_response``.

    :raises SMTPResponseException: a reply other than the one expected (the subclass and
        code tell which command).
    :raises SMTPServerDisconnected / SMTPTimeoutError: the connection broke.
    """
    addresses = job.sender + job.recipient
    if not addresses.isprintable() or " " in addresses or "<" in addresses or ">" in addresses:
        raise _Unsendable(f"{job.recipient!r}: an address with a control character, space or <> in it")
    payload, size = data_payload(job.data) if job.size is None else (job.data, job.size)
    mail = [b"FROM:<" + job.sender.encode() + b">"]
    if client.supports_extension("size"):
        mail.append(b"SIZE=%d" % size)
    if not addresses.isascii():
        if not client.supports_extension("smtputf8"):
            raise _Unsendable(
                f"{job.recipient}: the address is not ASCII and the server does not offer SMTPUTF8 (RFC 6531)"
            )
        mail.append(b"SMTPUTF8")
    reply = await client.execute_command(b"MAIL", *mail)
    if reply.code != 250:
        raise smtp_errors.SMTPSenderRefused(reply.code, reply.message, job.sender)
    reply = await client.execute_command(b"RCPT", b"TO:<" + job.recipient.encode() + b">")
    if reply.code not in (250, 251):
        raise smtp_errors.SMTPRecipientRefused(reply.code, reply.message, job.recipient)
    reply = await client.execute_command(b"DATA")
    if reply.code != 354:
        raise smtp_errors.SMTPDataError(reply.code, reply.message)
    protocol = client.protocol
    if protocol is None:
        raise smtp_errors.SMTPServerDisconnected("Connection lost")
    protocol.write(payload)
    reply = await protocol.read_response(timeout=client.timeout)
    if reply.code != 250:
        raise smtp_errors.SMTPDataError(reply.code, reply.message)
    return reply


def _root(exc: BaseException) -> str:
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

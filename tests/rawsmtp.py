"""A raw asyncio SMTP server for fault injection: it answers what each test scripts, mistakes included.

aiosmtpd always speaks correct SMTP; the mistakes real servers and "SMTP fixup" proxies make
(a reply out of step, an extra line, garbage, ``999``, the socket closed in the middle of DATA)
need a server that writes raw bytes. This one listens on 127.0.0.1, port 0, in the test's own
event loop::

    async with RawSmtp({"DATA": [b"250 ok\\r\\n"]}) as server:
        ...  # connect to server.port

``replies`` maps a verb (``EHLO``, ``HELO``, ``MAIL``, ``RCPT``, ``DATA``, ``RSET``, ``NOOP``,
``QUIT``, and ``.`` for the end of the payload) to the raw bytes of its next answers, one item
per occurrence, used in order across connections; once a list is used up, the correct reply
goes. An item may hold several lines (an extra reply) or garbage, or be :data:`CLOSE` (close
the socket instead of answering), :data:`SILENT` (answer nothing) or a :class:`Pause` (answer
late).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["CLOSE", "SILENT", "Pause", "RawSmtp"]

#: Close the connection instead of answering this command.
CLOSE = b"<close>"
#: Answer nothing (the client waits until its timeout).
SILENT = b"<silent>"


@dataclass(frozen=True)
class Pause:
    """Answer ``reply`` after ``seconds``."""

    seconds: float
    reply: bytes


Reply = bytes | Pause

DEFAULTS: dict[str, bytes] = {
    "EHLO": b"250-raw.test\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
    "HELO": b"250 raw.test\r\n",
    "MAIL": b"250 2.1.0 OK\r\n",
    "RCPT": b"250 2.1.5 OK\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ".": b"250 2.0.0 queued\r\n",
    "RSET": b"250 2.0.0 OK\r\n",
    "NOOP": b"250 2.0.0 OK\r\n",
    "QUIT": b"221 2.0.0 bye\r\n",
}


@dataclass
class RawSmtp:
    """The scripted server; what it saw is kept in ``commands``, ``payloads`` and ``connections``."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    #: Close the socket once this many bytes of a DATA payload have arrived (one time).
    cut_payload_after: int | None = None
    greeting: bytes = b"220 raw.test ESMTP\r\n"
    #: Every command line received, without its CRLF, per connection in order.
    commands: list[str] = field(default_factory=list)
    #: Each complete DATA payload as it came over the wire (dot-stuffed, up to and with ``.\r\n``).
    payloads: list[bytes] = field(default_factory=list)
    #: Bytes of a payload that was cut short (the connection closed before its final dot).
    partial: list[bytes] = field(default_factory=list)
    connections: int = 0
    #: Connections the client ended with QUIT (the others were closed without it).
    quits: int = 0
    host: str = "127.0.0.1"
    port: int = 0

    async def __aenter__(self) -> RawSmtp:
        self._server = await asyncio.start_server(self._session, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _reply(self, verb: str) -> Reply:
        script = self.replies.get(verb)
        if script:
            return script.pop(0)
        return DEFAULTS.get(verb, b"500 5.5.2 unknown command\r\n")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(self.greeting)
            while True:
                line = await reader.readline()
                if not line:
                    return
                command = line.rstrip(b"\r\n").decode("utf-8", "replace")
                self.commands.append(command)
                verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
                reply = self._reply(verb)
                if not await self._answer(writer, reply):
                    return
                if verb == "QUIT":
                    self.quits += 1
                    return
                if verb == "DATA" and (reply.reply if isinstance(reply, Pause) else reply).startswith(b"354"):
                    payload = await self._payload(reader)
                    if payload is None:
                        return
                    if not await self._answer(writer, self._reply(".")):
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Write ``reply`` in one piece (so extra lines arrive with it); False: the session ends."""
        if isinstance(reply, Pause):
            await asyncio.sleep(reply.seconds)
            reply = reply.reply
        if reply == CLOSE:
            return False
        if reply != SILENT:
            writer.write(reply)
            await writer.drain()
        return True

    async def _payload(self, reader: asyncio.StreamReader) -> bytes | None:
        """Read up to the final dot; None when the script cut the connection first."""
        data = bytearray()
        while not (data.endswith(b"\r\n.\r\n") or data == b".\r\n"):
            chunk = await reader.read(65536)
            if not chunk:
                self.partial.append(bytes(data))
                return None
            data += chunk
            if self.cut_payload_after is not None and len(data) >= self.cut_payload_after:
                self.cut_payload_after = None
                self.partial.append(bytes(data))
                return None
        self.payloads.append(bytes(data))
        return bytes(data)

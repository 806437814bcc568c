"""An embedded SMTP server (aiosmtpd) that stores what it receives in a Maildir: for the demo."""

from __future__ import annotations

import mailbox
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["MaildirHandler", "Received", "SmtpServer", "free_port"]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass
class MaildirHandler:
    """Accepts every mail; keeps it in memory and, when ``maildir`` is set, in a Maildir."""

    maildir: Path | None = None
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._box = mailbox.Maildir(self.maildir, create=True) if self.maildir else None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        item = Received(envelope.mail_from or "", tuple(envelope.rcpt_tos), data)
        with self._lock:
            self.received.append(item)
            if self._box is not None:
                self._box.add(mailbox.MaildirMessage(data))
        return "250 2.0.0 Message accepted for delivery"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class SmtpServer:
    """aiosmtpd on a free loopback port, in its own thread (``with SmtpServer() as s:``)."""

    def __init__(
        self,
        handler: Any | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **smtp_kwargs: Any,
    ) -> None:
        self.handler = handler if handler is not None else MaildirHandler()
        # decode_data=False keeps the bytes exactly as sent (CRLF, 8-bit).
        smtp_kwargs.setdefault("decode_data", False)
        # aiosmtpd's Controller cannot start on port 0 (its readiness probe connects to the
        # port it was given), so ask the OS for a free port first.
        self.controller = Controller(self.handler, hostname=host, port=port or free_port(host), **smtp_kwargs)
        self.host = host

    @property
    def port(self) -> int:
        srv = self.controller.server
        sockets = getattr(srv, "sockets", None)  # an asyncio.Server once started
        assert sockets
        return int(sockets[0].getsockname()[1])

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

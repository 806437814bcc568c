"""Where the organiser's mail comes from: a local Maildir or an IMAP mailbox (verified TLS)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, get_args

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from .errors import InboxError

__all__ = ["KEYWORD", "ImapSource", "InboxMessage", "MaildirSource", "Source", "configured_source"]

Tls = Literal["tls", "starttls", "none"]

#: IMAP keyword set on every message we handled; the search skips flagged ones.
KEYWORD = "$MailerProcessed"
#: Larger messages are not read (replies and DSNs are small): they are offered without their
#: bytes, so the inbox records them once as skipped for a person to read.
MAX_BYTES = 10 * 1024 * 1024
_FETCH_BATCH = 200


class InboxMessage(NamedTuple):
    """A message a source offers: ``key`` is what :meth:`Source.mark` takes; ``ident`` names
    the message in its source for good without parsing it (a Maildir file's unique name, an
    IMAP UIDVALIDITY and UID); ``size`` is set, and ``raw`` empty, for a message over
    :data:`MAX_BYTES` that was not read."""

    key: str
    raw: bytes
    ident: str = ""
    size: int = 0


class Source(Protocol):
    """Where messages come from. Used as a context manager around :meth:`messages`."""

    def __enter__(self) -> Source: ...

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def messages(
        self, wanted: Callable[[bytes], bool], known: Callable[[str], bool] = lambda ident: False
    ) -> Iterator[InboxMessage]:
        """Messages not yet flagged as processed. A source that can read headers alone may
        skip the body of a message whose header block ``wanted`` rejects; a message whose
        ``ident`` is ``known`` (skipped before) is not read at all."""
        ...

    def mark(self, key: str) -> None:
        """Flag one message as processed (raises :class:`InboxError`)."""
        ...


class MaildirSource:
    """A local Maildir. Every message in ``new/`` and ``cur/`` is offered (a message the
    organiser already read is still unprocessed); handled ones move to ``cur/`` with the
    Maildir ``S`` flag, and the ledger's inbox table keeps them from being handled twice."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> MaildirSource:
        missing = [d for d in ("cur", "new") if not (self.path / d).is_dir()]
        if missing:
            raise InboxError(f"{self.path}: not a Maildir (no {' or '.join(missing)}/ folder)")
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def messages(
        self,
        wanted: Callable[[bytes], bool] = lambda header: True,
        known: Callable[[str], bool] = lambda ident: False,
    ) -> Iterator[InboxMessage]:
        for sub in ("new", "cur"):
            for name in sorted(os.listdir(self.path / sub)):  # names start with the arrival time
                if name.startswith("."):
                    continue
                ident = "maildir:" + name.partition(":2,")[0]  # flags change, the unique part does not
                if known(ident):
                    continue
                path = self.path / sub / name
                try:
                    size = path.stat().st_size
                    if size > MAX_BYTES:
                        yield InboxMessage(f"{sub}/{name}", b"", ident, size)
                        continue
                    raw = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue  # moved by a mail client meanwhile; seen next time
                yield InboxMessage(f"{sub}/{name}", raw, ident)

    def mark(self, key: str) -> None:
        sub, _, name = key.partition("/")
        unique, sep, flags = name.partition(":2,")
        target = f"{unique}:2,{''.join(sorted(set(flags) | {'S'}))}"
        if sub == "cur" and sep and target == name:
            return
        try:
            os.rename(self.path / sub / name, self.path / "cur" / target)
        except OSError as exc:
            raise InboxError(f"{self.path / sub / name}: cannot flag as processed: {exc.strerror}") from None


class ImapSource:
    """An IMAP mailbox (RFC 9051) over ``imapclient``; TLS certificates are always checked.

    Handled messages get ``\\Seen`` and the keyword :data:`KEYWORD`; the search skips them.
    Bodies are fetched with ``BODY.PEEK`` so that messages left alone stay unread.
    """

    def __init__(
        self,
        host: str,
        port: int | None,
        user: str,
        password: str,
        mailbox: str = "INBOX",
        tls: Tls = "tls",
        ca_file: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host, self.user, self.mailbox, self.tls = host, user, mailbox, tls
        self.port = port or (993 if tls == "tls" else 143)
        self._password = password  # never in repr, logs or errors
        self.ca_file, self.timeout = ca_file, timeout
        self._client: Any = None
        self._validity = 0  # UIDVALIDITY of the selected mailbox

    def __repr__(self) -> str:
        return f"ImapSource({self.where!r})"

    @property
    def where(self) -> str:
        scheme = {"tls": "imaps", "starttls": "imap+starttls", "none": "imap"}[self.tls]
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.mailbox}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ImapSource | None:
        """Settings from ``MAILER_IMAP_*``; None if none is set.

        :raises InboxError: a required variable is missing or a value is invalid.
        """
        env = {k: v for k, v in environ.items() if k.startswith("MAILER_IMAP_") and v.strip()}
        if not env:
            return None
        missing = [
            k for k in ("MAILER_IMAP_HOST", "MAILER_IMAP_USER", "MAILER_IMAP_PASSWORD") if k not in env
        ]
        if missing:
            raise InboxError(f"IMAP inbox: set {', '.join(missing)} (or pass --maildir DIR)")
        tls = env.get("MAILER_IMAP_TLS", "tls").strip().lower()
        if tls not in get_args(Tls):
            raise InboxError(f"MAILER_IMAP_TLS={tls!r}: write tls, starttls or none")
        port_text = env.get("MAILER_IMAP_PORT", "").strip()
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise InboxError(f"MAILER_IMAP_PORT={port_text!r}: not a port number")
        return cls(
            env["MAILER_IMAP_HOST"].strip(),
            int(port_text) if port_text else None,
            env["MAILER_IMAP_USER"].strip(),
            env["MAILER_IMAP_PASSWORD"],
            mailbox=env.get("MAILER_IMAP_MAILBOX", "INBOX").strip(),
            tls=tls,  # type: ignore[arg-type]  # checked above
            ca_file=env.get("MAILER_IMAP_CA_FILE"),
        )

    def _context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InboxError(
                f"MAILER_IMAP_CA_FILE={self.ca_file}: cannot load CA certificates: {exc}"
            ) from None

    def __enter__(self) -> ImapSource:
        where = f"IMAP {self.host}:{self.port}"
        try:
            ctx = self._context() if self.tls != "none" else None
            client = IMAPClient(
                self.host,
                port=self.port,
                ssl=self.tls == "tls",
                ssl_context=ctx,
                timeout=self.timeout,
            )
            self._client = client
            if self.tls == "starttls":
                client.starttls(ssl_context=ctx)
            client.login(self.user, self._password)
            selected = client.select_folder(self.mailbox)
            self._validity = int(selected.get(b"UIDVALIDITY", 0))
        except ssl.SSLCertVerificationError as exc:
            self._close()
            raise InboxError(
                f"{where}: TLS certificate not trusted ({exc.verify_message}); "
                "set MAILER_IMAP_CA_FILE to the CA that signed it"
            ) from None
        except LoginError as exc:
            self._close()
            raise InboxError(
                f"{where}: login as {self.user} refused ({_text_of(exc)}); check "
                "MAILER_IMAP_USER and MAILER_IMAP_PASSWORD"
            ) from None
        except (IMAPClientError, OSError) as exc:
            self._close()
            raise InboxError(f"{where}: {_text_of(exc)}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            try:
                self._client.logout()
            except (IMAPClientError, OSError):
                pass
        self._close()

    def _close(self) -> None:
        if self._client is not None:
            try:
                self._client.shutdown()
            except (IMAPClientError, OSError):
                pass
            self._client = None

    def messages(
        self,
        wanted: Callable[[bytes], bool] = lambda header: True,
        known: Callable[[str], bool] = lambda ident: False,
    ) -> Iterator[InboxMessage]:
        def ident(uid: int) -> str:
            return f"imap:{self._validity}:{uid}"

        try:
            uids = [u for u in self._client.search(["NOT", "KEYWORD", KEYWORD]) if not known(ident(u))]
            for i in range(0, len(uids), _FETCH_BATCH):
                heads = self._client.fetch(uids[i : i + _FETCH_BATCH], ["RFC822.SIZE", "BODY.PEEK[HEADER]"])
                fetch = []
                for uid in uids[i : i + _FETCH_BATCH]:
                    if uid not in heads:
                        continue
                    size = int(heads[uid].get(b"RFC822.SIZE", 0))
                    if size > MAX_BYTES:
                        yield InboxMessage(str(uid), b"", ident(uid), size)
                    elif wanted(heads[uid].get(b"BODY[HEADER]") or b""):
                        fetch.append(uid)
                bodies = self._client.fetch(fetch, ["BODY.PEEK[]"]) if fetch else {}
                for uid in fetch:
                    raw = bodies.get(uid, {}).get(b"BODY[]")
                    if raw:
                        yield InboxMessage(str(uid), raw, ident(uid))
        except (IMAPClientError, OSError) as exc:
            raise InboxError(f"{self.where}: {_text_of(exc)}") from None

    def mark(self, key: str) -> None:
        try:
            self._client.add_flags([int(key)], [b"\\Seen", KEYWORD.encode()], silent=True)
        except (IMAPClientError, OSError) as exc:
            raise InboxError(f"{self.where}: cannot flag message {key}: {_text_of(exc)}") from None


def _text_of(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):  # imaplib wraps server text in bytes reprs
        text = text[2:-1]
    return text or type(exc).__name__


def configured_source(environ: Mapping[str, str], maildir: Path | None = None) -> Source | None:
    """``maildir`` if given, else ``MAILER_INBOX_MAILDIR``, else IMAP from ``MAILER_IMAP_*``;
    None when none is set.

    :raises InboxError: some IMAP variables are set but not all that are needed.
    """
    if maildir is None and environ.get("MAILER_INBOX_MAILDIR", "").strip():
        maildir = Path(environ["MAILER_INBOX_MAILDIR"].strip())
    return MaildirSource(maildir) if maildir else ImapSource.from_env(environ)

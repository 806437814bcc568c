"""The dashboard's HTTP guards: the Host names it answers to, and CSV downloads whose cells a
spreadsheet does not run as formulas (used by the ASGI wrapper in mailer/dashboard.py)."""

from __future__ import annotations

import codecs
import csv
import io
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .csvcells import protect

__all__ = ["HOSTS_ENV", "LOOPBACK_NAMES", "CsvCells", "HostNames", "is_csv_request"]

#: The names of this machine a browser uses for a dashboard on loopback.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: More names to answer to, comma-separated (e.g. the name an HTTPS proxy forwards).
HOSTS_ENV = "MAILER_DASHBOARD_HOSTS"
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::([0-9]{1,5}))?")
_WILDCARDS = frozenset({"0.0.0.0", "[::]"})


@dataclass(frozen=True)
class HostNames:
    """The ``Host`` header values the dashboard answers to.

    DNS rebinding: a web page on ``evil.example`` makes that name resolve to 127.0.0.1 and then
    reads ``http://evil.example:8001/`` as its own origin; the browser sends
    ``Host: evil.example:8001``, which is refused. ``port`` None accepts any port (an in-process
    client); ``any_address`` (listening on 0.0.0.0 or ::) also accepts any IP address, which no
    rebinding page can be served from.

    >>> h = HostNames.serving("127.0.0.1", 8001)
    >>> [h.allows(v) for v in ("127.0.0.1:8001", "LOCALHOST:8001", "[::1]:8001", "localhost")]
    [True, True, True, True]
    >>> [h.allows(v) for v in ("evil.example:8001", "localhost:8002", "localhost.evil.example", "")]
    [False, False, False, False]
    """

    names: frozenset[str]
    port: int | None = None
    any_address: bool = False

    @classmethod
    def serving(cls, host: str, port: int | None, extra: Iterable[str] = ()) -> HostNames:
        """The names for a dashboard listening on ``host``: loopback's, ``host`` itself, the
        machine's own names when ``host`` is a wildcard, and ``extra``."""
        h = host.strip().lower()
        if ":" in h and not h.startswith("["):
            h = f"[{h}]"  # an IPv6 address, as a Host header writes it
        names = {*LOOPBACK_NAMES, h, *(e.strip().lower() for e in extra)}
        any_address = h in _WILDCARDS
        if any_address:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return cls(frozenset(names - _WILDCARDS - {""}), port, any_address)

    def to_json(self) -> dict[str, Any]:
        return {"names": sorted(self.names), "port": self.port, "any_address": self.any_address}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HostNames:
        if not data:
            return cls(frozenset(LOOPBACK_NAMES))
        return cls(frozenset(data["names"]), data.get("port"), bool(data.get("any_address")))

    def allows(self, header: str) -> bool:
        """True when a request with this ``Host`` header value is for this dashboard."""
        m = _HOST.fullmatch(header.strip().lower())
        if not m:
            return False
        name, port = m[1], m[2]
        if port is not None and self.port is not None and int(port) != self.port:
            return False
        if name in self.names:
            return True
        if self.any_address:
            try:
                ipaddress.ip_address(name.strip("[]"))
            except ValueError:
                return False
            return True
        return False

    def describe(self) -> str:
        """The names for people: ``127.0.0.1:8001, localhost:8001, [::1]:8001``."""
        port = f":{self.port}" if self.port is not None else ""
        shown = [n + port for n in sorted(self.names, key=lambda n: (n not in LOOPBACK_NAMES, n))]
        return ", ".join(shown) + (" or any IP address" if self.any_address else "")


def is_csv_request(scope: dict[str, Any]) -> bool:
    """A Datasette CSV download: ``/ledger/failed.csv``, ``/ledger.csv?sql=...``, ``?_format=csv``."""
    return str(scope.get("path", "")).endswith(".csv") or b"_format=csv" in scope.get("query_string", b"")


_FIRST = frozenset("=+-@\t'")  # a cell to protect() starts with one of these ...
_FIRST_QUOTED = frozenset("=+-@\t\r'")  # ... or, inside quotes, one of these (CR needs quotes)


def _needs_care(text: str) -> bool:
    """True when a cell of these whole records may start like a formula. Split on commas and
    line ends, ignoring quotes: a false hit only takes the slower, exact path. (About 4 µs a
    row; a regular expression over the text took 5-45 µs, measured.)"""
    starts = {cell[:2] for cell in text.replace("\n", ",").split(",")}  # a few distinct ones
    return any(s[:1] in _FIRST or (s[:1] == '"' and s[1:2] in _FIRST_QUOTED) for s in starts)


class CsvCells:
    """An ASGI ``send`` that passes a CSV response body on with every cell through
    :func:`mailer.csvcells.protect`, record by record as Datasette streams it (a streamed table
    of a million rows is never held in memory). Other responses pass unchanged."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._send = send
        self._active = False
        self._tail = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            # text/plain is how Datasette serves CSV unless _dl=1; its ?_trace=1 page is HTML.
            self._active = message["status"] == 200 and ctype.startswith((b"text/csv", b"text/plain"))
            if self._active:  # the body's length may change
                message = {
                    **message,
                    "headers": [(k, v) for k, v in headers if k.lower() != b"content-length"],
                }
        elif message["type"] == "http.response.body" and self._active:
            more = bool(message.get("more_body", False))
            text = self._tail + self._decoder.decode(message.get("body", b""), final=not more)
            cut = _record_end(text) if more else len(text)
            self._tail = text[cut:]
            message = {**message, "body": _protect_csv(text[:cut]).encode("utf-8")}
        await self._send(message)


def _record_end(text: str) -> int:
    """The end of the last whole CSV record in ``text`` (a line end outside quotes), or 0.

    >>> _record_end('a,b\\r\\n"c\\r\\nd",e\\r\\n"f')
    15
    """
    i = text.rfind("\n")
    while i >= 0:
        if text.count('"', 0, i) % 2 == 0:
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


def _protect_csv(text: str) -> str:
    """Whole CSV records with every cell protected; the same text when no cell needs it.

    >>> _protect_csv('name,n\\r\\n=1+1,-2\\r\\n"@x, y",3\\r\\n')
    'name,n\\r\\n\\'=1+1,\\'-2\\r\\n"\\'@x, y",3\\r\\n'
    """
    if not _needs_care(text):
        return text
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # the dialect Datasette writes with: the other cells stay as they were
    for row in csv.reader(io.StringIO(text, newline="")):
        writer.writerow([protect(cell) for cell in row])
    return buffer.getvalue()

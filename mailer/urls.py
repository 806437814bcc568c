"""An event's ``url:``: checked as an absolute http(s) URL and written percent-encoded (issue 13)."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, urlsplit, urlunsplit

import idna

__all__ = ["http_url"]

# RFC 3986 2.2/2.3: reserved and unreserved characters stay as they are, and so does "%" (a
# URL may already be percent-encoded: encoding it twice would change the link).
_SAFE = "!#$%&'()*+,/:;=?@[]~-._"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _quote(part: str) -> str:
    """Percent-encode ``part``, keeping ``%XX`` escapes and encoding a ``%`` that starts none."""
    return quote(_LONE_PERCENT.sub("%25", part), safe=_SAFE)


def http_url(value: str) -> str:
    """``value`` as an absolute http or https URL in RFC 3986 characters only: a non-ASCII host
    becomes its A-label (RFC 5890), a space, a non-ASCII character and anything else a URI may
    not hold is percent-encoded as UTF-8 (RFC 3987 3.1), a ``%`` already there stays.

    Calendar clients and mail readers cut a link at a space and show raw ``éü`` as mojibake;
    the ICS ``URL`` property (a URI, RFC 5545 3.8.4.6) has no escaping at all.

    :raises ValueError: not an absolute http(s) URL with a host, or a control character in it
        (pydantic reports it with the file and line of ``url:``).

    >>> http_url("https://example.be/inschrijven nu/café?q=a b#Über")
    'https://example.be/inschrijven%20nu/caf%C3%A9?q=a%20b#%C3%9Cber'
    >>> http_url("HTTP://Münster.de:8080/x%20y?p=100%")
    'http://xn--mnster-3ya.de:8080/x%20y?p=100%25'
    """
    text = unicodedata.normalize("NFC", value.strip())
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text):
        raise ValueError("the URL has a line break or control character in it; put it on one line")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("http", "https") or not host:
        raise ValueError(
            f"{value!r} is not an absolute http(s) URL; write it in full, e.g. https://example.org/page"
        )
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"{value!r}: the host {host!r} is not a valid domain name: {exc}") from None
    if " " in host or not host.strip("."):
        raise ValueError(f"{value!r}: the host {host!r} is not a valid domain name")
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    if parts.username is not None:
        user = quote(parts.username, safe=_SAFE.replace("@", "").replace(":", ""))
        if parts.password is not None:
            user += ":" + quote(parts.password, safe=_SAFE.replace("@", ""))
        netloc = f"{user}@{netloc}"
    return urlunsplit(
        (
            scheme,
            netloc,
            _quote(parts.path),
            _quote(parts.query),
            _quote(parts.fragment),
        )
    )

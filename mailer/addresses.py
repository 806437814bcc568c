"""One spelling per mailbox: :func:`address_key`, how replies are matched to invitees."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from urllib.parse import unquote

import idna

__all__ = ["address_key"]


def address_key(addr: str) -> str:
    """The key two spellings of one mailbox share, as mail systems match addresses: the domain
    case-insensitively and as one IDNA name (``xn--mnchen-3ya.de`` is ``münchen.de``), the
    local part case-insensitively (RFC 5321 allows a case-sensitive local part; no provider in
    use makes one). A ``mailto:`` URI (an iCalendar CAL-ADDRESS) gives its address. Total:
    anything that is not an address comes back trimmed and lower-cased, never an error (the
    ledger calls it from SQL).

    >>> address_key("MAILTO:Celine.Mertens@Example.BE")
    'celine.mertens@example.be'
    >>> address_key("Jan@xn--mnchen-3ya.DE") == address_key("jan@MÜNCHEN.de") == "jan@münchen.de"
    True
    """
    text = addr.strip().strip("<>").strip()
    if text[:7].lower() == "mailto:":
        text = unquote(text[7:]).strip()
    if text.isascii() and "xn--" not in text.lower():
        return text.lower().rstrip(".")  # the common case, without a cache
    return _key(text)


@lru_cache(maxsize=4096)
def _key(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", text).lower()
    domain = domain.rstrip(".")
    try:
        domain = idna.decode(domain, uts46=True)
    except (idna.IDNAError, UnicodeError, ValueError):
        domain = domain.lower()
    return f"{unicodedata.normalize('NFC', local).lower()}@{unicodedata.normalize('NFC', domain)}"

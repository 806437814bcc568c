"""One spelling per mailbox: :func:`address_key`, how replies are matched to invitees."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from urllib.parse import unquote

import idna

__all__ = ["address_key", "spelling"]


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


@lru_cache(maxsize=4096)
def spelling(addr: str) -> str:
    """The one spelling of an address in a mail: the ``To:`` header, the calendar's ATTENDEE
    and the SMTP envelope all use it (issue 13). The domain is its A-label (``xn--mnchen-3ya.de``,
    RFC 5890) and the local part is kept as it is, so an address whose only non-ASCII part is
    the domain is plain ASCII and goes through any relay (no SMTPUTF8 needed). An address
    whose local part is not ASCII needs SMTPUTF8 (RFC 6531) anyway: it keeps its Unicode
    (U-label, NFC) domain, so that it too is spelled one way. A domain that is no valid IDNA
    name is only lower-cased (the relay will refuse it, as it would have before).

    >>> spelling("Jan@MÜNCHEN.de")
    'Jan@xn--mnchen-3ya.de'
    >>> spelling("jösé@xn--mnchen-3ya.de")
    'jösé@münchen.de'
    >>> spelling("ann@Example.ORG")
    'ann@example.org'
    """
    local, at, domain = addr.strip().rpartition("@")
    if not at:
        return addr.strip()
    domain = domain.rstrip(".")
    if domain.isascii() and "xn--" not in domain.lower():
        return f"{local}@{domain.lower()}"
    try:
        if local.isascii():
            domain = idna.encode(domain, uts46=True).decode("ascii")
        else:
            domain = unicodedata.normalize("NFC", idna.decode(domain, uts46=True))
    except (idna.IDNAError, UnicodeError, ValueError):
        domain = domain.lower()
    return f"{local}@{domain}"

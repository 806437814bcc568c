"""Tokens that tie a returned mail to what we sent: the envelope sender per delivery (VERP) and
the per-recipient token in the List-Unsubscribe ``mailto:`` subject (issue 15).

The envelope token is ``<delivery id in base36><tag>``: the tag is :data:`TAG_CHARS` characters
of an HMAC-SHA256 over the id, in lower-case base32, because relays and mailbox software may
fold the case of a local part (RFC 5321 2.4 lets them only at the final destination, but some do
it on the way). It is a pure function of the ledger row, so a re-send after a crash goes out with
the same ``MAIL FROM``. The unsubscribe token is :mod:`mailer.unsubscribe`'s (the very token of
the one-click link), found back in a reply's subject.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from . import unsubscribe
from .errors import ConfigError, Problem

if TYPE_CHECKING:
    from .config import Campaign

__all__ = [
    "TAG_CHARS",
    "delivery_of",
    "envelope_for",
    "envelope_sender",
    "no_secret",
    "unsubscribe_token",
    "unsubscribed_address",
]

#: Characters of the signature at the end of an envelope token (60 bits: a forger has to send
#: about 2**59 bounces to get one accepted, each a mail through someone's relay).
TAG_CHARS: Final = 12
_DIGITS: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
#: An RFC 5321 local part is at most 64 octets; a longer token is not ours, refused unread.
_MAX_TOKEN: Final = 64


def _tag(secret: str, delivery_id: int) -> str:
    # Its own domain-separation prefix: an envelope tag never equals any mailer.tokens signature.
    msg = f"mailer-verp-v1\0{delivery_id}".encode()
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:TAG_CHARS]


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if n == 0:
            return out


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an address")
    return local, domain


def envelope_sender(bounces: str, secret: str, delivery_id: int) -> str:
    """The ``MAIL FROM`` address of delivery ``delivery_id``: ``bounces+TOKEN@domain`` for
    ``bounces`` (``sender.bounces``).

    :raises ValueError: an empty secret, a negative id or a ``bounces`` that is not an address.

    >>> envelope_sender("bounces@example.be", "s3cret", 1234)  # 1234 is "ya" in base36
    'bounces+ya3gx7hirupvma@example.be'
    """
    if not secret:
        raise ValueError("an empty secret signs nothing")
    if delivery_id < 0:
        raise ValueError("a delivery id is not negative")
    local, domain = _split(bounces)
    return f"{local}+{_base36(delivery_id)}{_tag(secret, delivery_id)}@{domain}"


def delivery_of(bounces: str, secret: str, address: str) -> int | None:
    """The delivery id :func:`envelope_sender` put in ``address`` (a DSN's recipient, in any
    letter case, with or without ``<>``), or None when the address is not ``bounces`` with a
    token, or the token is altered, truncated or signed with another secret. The tag is compared
    in constant time; any input gives None or an id, never an error."""
    if not secret or not address.isascii():
        return None
    try:
        local, domain = _split(bounces)
        got_local, got_domain = _split(address)
    except ValueError:
        return None
    prefix = local.lower() + "+"
    if got_domain.lower() != domain.lower() or not got_local.lower().startswith(prefix):
        return None
    token = got_local[len(prefix) :].lower()
    if not (TAG_CHARS < len(token) <= _MAX_TOKEN) or not token.isalnum():
        return None
    ident, tag = token[:-TAG_CHARS], token[-TAG_CHARS:]
    delivery_id = int(ident, 36)
    if _base36(delivery_id) != ident:  # leading zeros: not a spelling we make
        return None
    if not hmac.compare_digest(tag, _tag(secret, delivery_id)):
        return None
    return delivery_id


def envelope_for(campaign: Campaign, secret: str | None) -> Callable[[int], str]:
    """The ``MAIL FROM`` of each delivery id of ``campaign``: :func:`envelope_sender` with
    ``sender.bounces``, else the From address for all.

    :raises ConfigError: ``sender.bounces`` is set but there is no secret to sign with."""
    bounces, sender = campaign.sender.bounces, campaign.sender.address
    if bounces is None:
        return lambda delivery_id: sender
    if not secret:
        raise ConfigError([no_secret(campaign)])
    return lambda delivery_id: envelope_sender(bounces, secret, delivery_id)


def no_secret(campaign: Campaign) -> Problem:
    """What is wrong when ``sender.bounces`` is set without a signing secret."""
    return Problem(
        campaign.config_path.name,
        "sender.bounces is set but MAILER_WEB_SECRET (or MAILER_UNSUBSCRIBE_SECRET) is not; set it to a "
        "long random string (the bounce addresses are signed with it), or leave sender.bounces out",
        field="sender.bounces",
    )


def unsubscribe_token(secret: str, campaign: str, address: str) -> str:
    """The token the List-Unsubscribe ``mailto:`` subject carries for ``address``: the same
    signed token as the one-click link (:func:`mailer.unsubscribe.token`).

    >>> t = unsubscribe_token("s3cret", "camp", "Jan@Example.BE")
    >>> unsubscribed_address("s3cret", "camp", f"Re: unsubscribe {t}")
    'jan@example.be'
    """
    return unsubscribe.token(secret, campaign, address)


#: A token in a subject: the URL-safe base64 alphabet, longer than a signature.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{23,2048}")


def unsubscribed_address(secret: str, campaign: str, subject: str) -> str | None:
    """The address whose :func:`unsubscribe_token` for ``campaign`` is in ``subject`` ("Re:
    unsubscribe TOKEN", "unsubscribe TOKEN", folded or not), or None when there is none, it is
    forged, or it is another campaign's."""
    if not secret:
        return None
    for word in _TOKEN_RE.findall(" ".join(subject.split())):
        found = unsubscribe.verify(secret, word)
        if found is not None and found[0] == campaign:
            return found[1]
    return None

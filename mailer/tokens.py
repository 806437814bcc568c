"""Signed per-recipient tokens for the links in mails (RSVP, unsubscribe, .ics, feed, event page).

A token is ``<payload><signature>`` in the URL-safe base64 alphabet, with no separator (so it
sits in a path segment such as ``/feed/<token>.ics`` without ambiguity): the payload names the
campaign, the event and the address; the last :data:`SIG_CHARS` characters are an HMAC-SHA256
(truncated to 128 bits) over the purpose and those three fields. The purpose is not in the
payload but is signed, so a token made for one purpose never verifies for another, and one made
for one address never for another. Nothing in a token enumerates anything: without the secret
no other valid token can be made from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from .addresses import address_key

__all__ = ["PURPOSES", "SIG_CHARS", "secret_from", "sign", "verify"]

#: What a token may be for; :func:`sign` refuses any other purpose.
PURPOSES: Final = frozenset({"rsvp", "unsubscribe", "ics", "feed", "event"})

_SIG_BYTES: Final = 16
#: Characters of the signature at the end of every token (16 bytes, unpadded base64).
SIG_CHARS: Final = 22
_SEP: Final = "\0"
#: A longer token is not ours; refusing it early keeps verification cheap for any input.
_MAX_TOKEN: Final = 2048


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, purpose: str, payload: str) -> str:
    msg = f"mailer-token-v1{_SEP}{purpose}{_SEP}{payload}".encode()
    return _b64(hmac.new(secret.encode(), msg, hashlib.sha256).digest()[:_SIG_BYTES])


def sign(secret: str, purpose: str, campaign: str, event: str, address: str) -> str:
    """A URL-safe token for ``address`` (by its :func:`~mailer.addresses.address_key`, so two
    spellings of one mailbox share a token) and ``event`` of ``campaign``, valid for ``purpose``.

    ``event`` is ``"*"`` for a token not tied to one event (the feed, unsubscribe).

    :raises ValueError: an unknown purpose, an empty secret, or a field containing NUL.

    >>> t = sign("s3cret", "rsvp", "camp", "meeting", "Jan@Example.BE")
    >>> verify("s3cret", "rsvp", t)
    ('camp', 'meeting', 'jan@example.be')
    >>> verify("s3cret", "unsubscribe", t) is None  # another purpose
    True
    >>> verify("other", "rsvp", t) is None  # another secret
    True
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose!r}")
    if not secret:
        raise ValueError("an empty secret signs nothing")
    fields = (campaign, event, address_key(address))
    if any(_SEP in f for f in fields):
        raise ValueError("a token field contains NUL")
    payload = _b64(_SEP.join(fields).encode())
    return payload + _mac(secret, purpose, payload)


def verify(secret: str, purpose: str, token: str) -> tuple[str, str, str] | None:
    """The ``(campaign, event, address_key)`` ``token`` was signed for with ``purpose``, or None
    when it is forged, altered, truncated, for another purpose or signed with another secret.
    The signature is compared in constant time; any input, however odd, gives None, never an
    error."""
    if not secret or purpose not in PURPOSES or not (SIG_CHARS < len(token) <= _MAX_TOKEN):
        return None
    if not token.isascii():
        return None
    payload, sig = token[:-SIG_CHARS], token[-SIG_CHARS:]
    if not hmac.compare_digest(sig, _mac(secret, purpose, payload)):
        return None
    try:
        fields = _unb64(payload).decode("utf-8").split(_SEP)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if len(fields) != 3 or not all(fields):
        return None
    return fields[0], fields[1], fields[2]


def secret_from(environ: Mapping[str, str]) -> str | None:
    """The signing secret: ``MAILER_WEB_SECRET``, else the older ``MAILER_UNSUBSCRIBE_SECRET``
    (the name before the web service existed), else None. A blank value counts as unset; any
    other value is used as it is, so links signed before keep verifying.

    >>> secret_from({"MAILER_UNSUBSCRIBE_SECRET": "old"})
    'old'
    >>> secret_from({"MAILER_WEB_SECRET": "new", "MAILER_UNSUBSCRIBE_SECRET": "old"})
    'new'
    >>> secret_from({"MAILER_WEB_SECRET": " "}) is None
    True

    :raises ConfigError: the value is not text (random bytes, ``$(head -c 16 /dev/urandom)``):
        it could sign nothing (links, Message-IDs, envelope tokens are HMACs over its UTF-8).
    """
    for name in ("MAILER_WEB_SECRET", "MAILER_UNSUBSCRIBE_SECRET"):
        value = environ.get(name, "")
        if value.strip():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                from .errors import ConfigError, Problem

                raise ConfigError(
                    [
                        Problem(
                            name,
                            "is not text (bytes that are not UTF-8); set it to a long random string, "
                            "e.g. `openssl rand -hex 32`",
                        )
                    ]
                ) from None
            return value
    return None

"""One-click unsubscribe links (RFC 8058): the token is :mod:`mailer.tokens`' ``unsubscribe``
token (campaign-wide, event ``*``); links signed before it (``<payload>.<signature>``) still
verify, so a mail already in someone's inbox keeps working."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from . import tokens

__all__ = ["link", "token", "verify"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token(secret: str, campaign: str, email: str) -> str:
    """The unsubscribe token of ``email`` in ``campaign``: what ``mailer web`` serves at
    ``/u/<token>`` (:func:`mailer.tokens.sign`, purpose ``unsubscribe``, event ``*``).

    >>> t = token("s3cret", "c", "A@example.org")
    >>> verify("s3cret", t)
    ('c', 'a@example.org')
    >>> verify("other", t) is None
    True
    """
    return tokens.sign(secret, "unsubscribe", campaign, "*", email)


def verify(secret: str, tok: str) -> tuple[str, str] | None:
    """The ``(campaign, email)`` a token was issued for, or None if it is forged or damaged.

    Accepts a bare token or a whole link: ``https://host/u/<token>`` (mailer web) or one with
    ``?t=<token>`` (``unsubscribe.url``); and the older ``<payload>.<signature>`` tokens.
    """
    if "://" in tok:
        parts = urlsplit(tok)
        values = parse_qs(parts.query).get("t")
        if values:
            tok = values[0]
        else:
            tok = unquote(parts.path.rstrip("/").rpartition("/")[2])
    if "." not in tok:
        found = tokens.verify(secret, "unsubscribe", tok)
        return (found[0], found[2]) if found is not None and found[1] == "*" else None
    return _verify_v0(secret, tok)


def _verify_v0(secret: str, tok: str) -> tuple[str, str] | None:
    """A token signed before :mod:`mailer.tokens` (HMAC over the payload only)."""
    payload, _, sig = tok.partition(".")
    expected = _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16])
    if not sig or not sig.isascii() or not hmac.compare_digest(sig, expected):
        return None
    try:
        campaign, _, email = _unb64(payload).decode().partition("\0")
    except (ValueError, UnicodeDecodeError):
        return None
    return (campaign, email) if email else None


def link(base_url: str, secret: str, campaign: str, email: str) -> str:
    """The recipient's unsubscribe URL: ``base_url`` with ``t=<token>`` added."""
    sep = "&" if urlsplit(base_url).query else "?"
    return f"{base_url}{sep}{urlencode({'t': token(secret, campaign, email)})}"

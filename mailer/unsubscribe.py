"""One-click unsubscribe links (RFC 8058) signed with HMAC, and their verification (pure)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlencode, urlsplit

__all__ = ["link", "token", "verify"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token(secret: str, campaign: str, email: str) -> str:
    """``<payload>.<signature>``: the payload names the campaign and address, the HMAC-SHA256
    signature (truncated to 128 bits) proves we issued it, so nobody can unsubscribe others.

    >>> t = token("s3cret", "c", "a@example.org")
    >>> verify("s3cret", t)
    ('c', 'a@example.org')
    >>> verify("other", t) is None
    True
    """
    payload = _b64(f"{campaign}\0{email.lower()}".encode())
    sig = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16]
    return f"{payload}.{_b64(sig)}"


def verify(secret: str, tok: str) -> tuple[str, str] | None:
    """The ``(campaign, email)`` a token was issued for, or None if it is forged or damaged.

    Accepts a bare token or a whole link containing ``?t=...``.
    """
    if "://" in tok:
        values = parse_qs(urlsplit(tok).query).get("t")
        if not values:
            return None
        tok = values[0]
    payload, _, sig = tok.partition(".")
    expected = _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16])
    if not sig or not hmac.compare_digest(sig, expected):
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

"""Complete RFC 5322 / MIME invitation mails (RFC 2045-2047, RFC 6047 iMIP) as CRLF bytes."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from datetime import datetime
from email.utils import format_datetime
from urllib.parse import quote

from .addresses import spelling
from .config import Campaign

__all__ = ["build", "data_payload", "encoded_words", "message_id"]

# Header injection (checklist 16): every data value loses CR, LF and every other control
# character (C0, DEL, C1, U+2028/U+2029) before it goes near a header; they become spaces.
_CONTROLS = {c: " " for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
_NO_CONTROLS = str.maketrans(_CONTROLS)
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")  # RFC 5322 3.2.3 (+ ".")
_CRLF_RE = re.compile(r"\r\n?|\n")
_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters, MUST be at most 998
_EW_MAX = 75  # RFC 2047 2: an encoded-word is at most 75 characters
_PREFIX = "=?utf-8?b?"


def _clean(value: str) -> str:
    """``value`` on one line: control characters become spaces, outer whitespace goes."""
    return (value if value.isprintable() else value.translate(_NO_CONTROLS)).strip()


def _ascii_domain(domain: str) -> str:
    domain = "".join(_clean(domain).split()).rstrip(".")
    if not domain:
        raise ValueError("empty domain")
    if domain.isascii():
        return domain.lower()
    try:
        return domain.encode("idna").decode("ascii").lower()  # RFC 5890 A-labels
    except UnicodeError as exc:
        raise ValueError(f"{domain!r} is not a valid domain: {exc}") from None


def message_id(campaign_id: str, step_id: str, email: str, domain: str, key: str | None = None) -> str:
    """A deterministic Message-ID for one (campaign, step, recipient).

    A re-send after a crash carries the same id, so receiving systems can drop duplicates.
    The result is ASCII ``msg-id`` syntax (RFC 5322 3.6.4): ``<token.campaign@domain>``,
    the token being 26 base32 characters (130 bits) of SHA-256 over the three values, or of
    HMAC-SHA256 keyed with ``key`` (the campaign's secret, :func:`mailer.tokens.secret_from`)
    when there is one: the inbox believes a DSN or a reply that quotes one of our ids (issue
    15), so an outsider, who knows campaign, step and address, must not be able to compute it.

    >>> message_id("c", "s", "jan@example.be", "example.be")
    '<vc6m4ywjdenp7kwindc4lz2z45.c@example.be>'
    >>> message_id("c", "s", "jan@example.be", "example.be", key="secret")
    '<pceebwxmdnrztyrdel4ejsfruv.c@example.be>'
    """
    values = "\0".join((campaign_id, step_id, email)).encode("utf-8")
    if key:
        digest = hmac.new(key.encode("utf-8"), b"message-id\0" + values, hashlib.sha256).digest()
    else:
        digest = hashlib.sha256(values).digest()
    token = base64.b32encode(digest).decode("ascii")[:26].lower()
    return f"<{token}{_id_right(campaign_id, domain)}>"


@functools.lru_cache(maxsize=64)
def _id_right(campaign_id: str, domain: str) -> str:
    """``.campaign@domain``: the part of a Message-ID that is the same for a whole campaign."""
    label = ".".join(p for p in _NOT_ATEXT.sub("-", campaign_id).split(".") if p)
    return f"{'.' + label if label else ''}@{_ascii_domain(domain)}"


# --------------------------------------------------------------------------------------
# Header fields.
# --------------------------------------------------------------------------------------


def encoded_words(text: str, first_room: int = _EW_MAX, *, at_spaces: bool = False) -> list[str]:
    """``text`` as RFC 2047 ``=?utf-8?b?...?=`` words, none splitting a UTF-8 character.

    The first word is at most ``first_room`` characters (the rest of the current header
    line), the others at most 75 (RFC 2047 2). Readers join adjacent encoded-words without
    the white space between them (RFC 2047 6.2), so the words can sit on separate lines.
    With ``at_spaces`` a word ends after a space of the text when it can: Python's address
    parser wrongly puts a space between encoded-words in a display name, and a break at a
    space at worst doubles one there instead of splitting a word.
    """
    data = text.encode("utf-8")
    words: list[str] = []
    room, i = min(first_room, _EW_MAX), 0
    while i < len(data):
        size = (room - len(_PREFIX) - 2) // 4 * 3
        if size < 4:  # no room left on this line: the word goes on the next one
            room = _EW_MAX
            continue
        j = min(i + size, len(data))
        while j < len(data) and data[j] & 0xC0 == 0x80:
            j -= 1
        if at_spaces and j < len(data) and (k := data.rfind(b" ", i, j)) > i:
            j = k + 1
        words.append(_PREFIX + base64.b64encode(data[i:j]).decode("ascii") + "?=")
        room, i = _EW_MAX, j
    return words


def _field(name: str, words: list[str]) -> str:
    """``Name: w1 w2 ...`` folded with CRLF SP before a word that would pass 78 columns
    (RFC 5322 2.2.3). Empty words keep runs of spaces and are never folded before."""
    parts = [name, ":"]
    col = len(name) + 1
    for k, w in enumerate(words):
        if k and w and col + 1 + len(w) > _LINE:
            parts.append("\r\n ")
            col = 1
        else:
            parts.append(" ")
            col += 1
        parts.append(w)
        col += len(w)
    parts.append("\r\n")
    return "".join(parts)


def _subject(subject: str) -> str:
    subject = _clean(subject)
    words = subject.split(" ")
    # Plain ASCII folds at its spaces. Non-ASCII, a word too long for a 78-column line, or
    # text that would read as an encoded-word ("=?") is encoded instead (RFC 2047 5).
    if (
        subject.isascii()
        and "=?" not in subject
        and len(words[0]) <= _LINE - len("Subject: ")
        and max(map(len, words)) < _LINE - 1
    ):
        return _field("Subject", words)
    return _field("Subject", encoded_words(subject, _LINE - len("Subject: ")))


def _addr_spec(addr: str) -> str:
    """``local@domain`` as :func:`mailer.addresses.spelling` spells it, the spelling of the
    calendar's ATTENDEE and of the SMTP envelope too: an A-label domain, unless the local part
    is not ASCII (it needs SMTPUTF8, RFC 6531, and keeps its Unicode domain). An address with
    spaces or line breaks inside is refused rather than mended, since a mended address would
    reach someone else."""
    spec = addr.strip().strip("<>")
    local, at, domain = spec.rpartition("@")
    if not (local and at and domain and spec.isprintable()) or " " in spec:
        raise ValueError(f"{addr!r} is not an email address")
    spelled = spelling(spec)
    if local.isascii() and not spelled.isascii():
        raise ValueError(f"{domain!r} is not a valid domain")
    return spelled


def _mailbox(header: str, name: str, addr: str) -> str:
    """``"Name" <addr>`` (RFC 5322 3.4): a quoted-string for ASCII names, encoded-words
    (RFC 2047 5(3)) for others and for names too long for one line."""
    spec = f"<{_addr_spec(addr)}>"
    name = " ".join(_clean(name).split())
    if not name:
        return _field(header, [_addr_spec(addr)])
    if name.isascii() and "=?" not in name and len(name) <= 64:
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return _field(header, [quoted, spec])
    words = encoded_words(name, _LINE - len(header) - 2, at_spaces=True)
    return _field(header, [*words, spec])


def _uri(uri: str) -> str:
    # RFC 3986: percent-encode what a URI may not hold (spaces, <, >, ", non-ASCII).
    return quote("".join(_clean(uri).split()), safe=":/?#[]@!$&'()*+,;=%~")


# --------------------------------------------------------------------------------------
# Bodies.
# --------------------------------------------------------------------------------------


def _qp(text: str) -> bytes:
    """Quoted-printable (RFC 2045 6.7) UTF-8 with CRLF hard and soft line breaks."""
    # str.replace when there is no CR to fold: a tenth of the regular expression's cost
    text = text.replace("\n", "\r\n") if "\r" not in text else _CRLF_RE.sub("\r\n", text)
    data = text.encode("utf-8")
    # b2a_qp keeps CRLF input but writes soft breaks as "=\n" when it saw no CRLF first.
    return binascii.b2a_qp(data, istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _b64(data: bytes) -> bytes:
    """Base64 (RFC 2045 6.8) in 76-character CRLF lines; keeps the calendar's own CRLF."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def _multipart(subtype: str, boundary: str, parts: list[bytes]) -> bytes:
    """A multipart entity (RFC 2046 5.1.1); each part is ``headers CRLF CRLF body``."""
    delim = b"--" + boundary.encode("ascii")
    body = b"".join(delim + b"\r\n" + p + b"\r\n" for p in parts) + delim + b"--\r\n"
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'
    return head.encode("ascii") + body


def _part(headers: str, body: bytes) -> bytes:
    return headers.encode("ascii") + b"\r\n" + body


def build(
    *,
    campaign: Campaign,
    to_email: str,
    to_name: str,
    subject: str,
    text: str,
    html: str,
    language: str,
    message_id: str,
    date: datetime,
    ics: bytes | None = None,
    method: str = "REQUEST",
    unsubscribe_url: str | None = None,
    unsubscribe_token: str | None = None,
) -> bytes:
    """The complete message as bytes with CRLF line ends, ready for SMTP DATA.

    With ``ics`` the tree is (RFC 6047 2.4; checklist 12-13)::

        multipart/mixed
          multipart/alternative
            text/plain; charset=utf-8
            text/html; charset=utf-8
            text/calendar; method=REQUEST; charset=UTF-8
          application/ics; name="invite.ics"   (attachment; "cancel.ics" for CANCEL)

    and without it just the ``multipart/alternative`` of text and HTML. The same arguments
    always give the same bytes (boundaries derive from ``message_id``).

    :param ics: a calendar object from :mod:`mailer.ics` whose METHOD is ``method``.
    :param unsubscribe_url: an https one-click link (RFC 8058) for this recipient: the
        ``/u/<token>`` link of `mailer web` (:mod:`mailer.links`) when the campaign has
        ``web.url``, else ``unsubscribe.url`` with a signed ``t=``.
    :param unsubscribe_token: this recipient's signed token for the ``mailto:`` unsubscribe
        (:func:`mailer.bounces.unsubscribe_token`): its subject becomes ``unsubscribe TOKEN``, so
        the inbox acts only on a mail that names a recipient we wrote to (issue 15).
    :raises ValueError: for a bad address, an unknown method or a METHOD mismatch.
    """
    sender = campaign.sender
    # RFC 6047 2.4 / RFC 5546: the MIME method parameter must equal the calendar METHOD.
    method = method.upper()
    if method not in ("REQUEST", "CANCEL"):
        raise ValueError(f"method must be REQUEST or CANCEL, not {method!r}")
    if ics is not None and b"\r\nMETHOD:" + method.encode() + b"\r\n" not in ics:
        raise ValueError(f"the calendar's METHOD is not {method}")
    mid = "".join(_clean(message_id).split())
    lang = "".join(_clean(language).split()).replace("_", "-")
    head = [
        _mailbox("From", sender.name, sender.address),
        _mailbox("To", to_name, to_email),
        _subject(subject),
        f"Date: {format_datetime(date)}\r\n",  # RFC 5322 3.3
        f"Message-ID: {mid}\r\n",
    ]
    if sender.reply_to:
        head.append(_field("Reply-To", [_addr_spec(sender.reply_to)]))
    head += [
        "MIME-Version: 1.0\r\n",
        # RFC 3834 5: keeps out-of-office and other automatic replies away (checklist 18).
        "Auto-Submitted: auto-generated\r\n",
    ]
    if lang:
        head.append(f"Content-Language: {lang}\r\n")  # RFC 3282
    # RFC 2369 List-Unsubscribe; RFC 8058 one-click POST needs an https link.
    # The https link first: a client uses the first method it supports (RFC 2369 3.2), and
    # the big mailbox providers' one-click button needs it (issue 14).
    # RFC 8058 3.1: one-click takes an HTTPS link only; an http:// web.url (a local try, `mailer
    # demo`) keeps its unsubscribe link in the body, not in these headers.
    one_click = unsubscribe_url if unsubscribe_url and unsubscribe_url.startswith("https://") else None
    links = []
    if one_click:
        links.append(f"<{_uri(one_click)}>")
    if campaign.unsubscribe and campaign.unsubscribe.mailto:
        addr = quote(_addr_spec(campaign.unsubscribe.mailto), safe="@!$'*+=-._~")
        # The token is URL-safe base64: nothing to quote but the space (RFC 6068 2).
        word = f"unsubscribe%20{unsubscribe_token}" if unsubscribe_token else "unsubscribe"
        links.append(f"<mailto:{addr}?subject={word}>")
    if links:
        head.append(_field("List-Unsubscribe", [w + "," for w in links[:-1]] + links[-1:]))
    if one_click:
        head.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")

    tag = hashlib.sha256(mid.encode("utf-8")).hexdigest()[:16]  # keeps the line <= 78
    # "=_" never occurs in base64 (no "_") nor in quoted-printable ("=" is always "=XX" or a
    # soft break), so these boundaries cannot collide with body lines (RFC 2046 5.1.1).
    alt_boundary, mix_boundary = f"=_mailer_{tag}_alt", f"=_mailer_{tag}_mix"
    qp = "Content-Transfer-Encoding: quoted-printable\r\n"
    alternatives = [
        _part("Content-Type: text/plain; charset=utf-8\r\n" + qp, _qp(text)),
        _part("Content-Type: text/html; charset=utf-8\r\n" + qp, _qp(html)),
    ]
    if ics is None:
        body = _multipart("alternative", alt_boundary, alternatives)
    else:
        cal = _b64(ics)  # one encoding for both copies: identical once decoded (checklist 13)
        b64 = "Content-Transfer-Encoding: base64\r\n"
        alternatives.append(
            # RFC 6047 2.4: inline, with method=; no Content-Disposition.
            _part(f"Content-Type: text/calendar; method={method}; charset=UTF-8\r\n" + b64, cal)
        )
        filename = "cancel.ics" if method == "CANCEL" else "invite.ics"
        attachment = _part(
            f'Content-Type: application/ics; name="{filename}"\r\n'
            f'Content-Disposition: attachment; filename="{filename}"\r\n' + b64,
            cal,
        )
        # Checklist 12: the body comes before the attachment (Outlook's "ATT00001").
        alt = _multipart("alternative", alt_boundary, alternatives)
        body = _multipart("mixed", mix_boundary, [alt, attachment])
    return "".join(head).encode("utf-8") + body


# --------------------------------------------------------------------------------------
# On the wire.
# --------------------------------------------------------------------------------------

#: _CRLF_RE for bytes: a CRLF, a lone CR or a lone LF (as aiosmtplib normalises line endings).
_LINE_ENDINGS = re.compile(_CRLF_RE.pattern.encode("ascii"))


def data_payload(message: bytes) -> tuple[bytes, int]:
    r"""What goes on the wire after DATA, and the size to announce with ``SIZE=`` (RFC 1870).

    Line endings become CRLF (a lone CR or LF is turned into one, as aiosmtplib does), a
    line starting with "." gets a second one (RFC 5321 4.5.2) and the payload ends with
    CRLF "." CRLF. ``message.build()`` already writes CRLF only, so the regular expression
    runs only for other input: counting is ~20x cheaper than aiosmtplib's two passes of
    regular expressions over every message (mailer.transport sends this payload itself).

    >>> data_payload(b"a\n.b\r\n")
    (b'a\r\n..b\r\n.\r\n', 7)
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _LINE_ENDINGS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    size = len(message)
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n", size

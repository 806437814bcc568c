"""The organiser's inbox: iMIP replies, delivery status notifications and unsubscribe mails.

:func:`classify` is pure: raw message bytes and the campaign in, :class:`Finding` values out.
:func:`apply` ties each finding to a mail we sent (or records it as unmatched, for staff) and
writes it to the ledger. A source (:class:`MaildirSource`, :class:`ImapSource`) lists
unprocessed messages and flags the ones we handled; messages that are not ours, and messages
skipped as unreadable (:func:`read`), are never flagged or marked read. :func:`process` ties the
three together, one message at a time.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser, HeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import icalendar

from . import contacts
from .addresses import address_key
from .config import Campaign, load
from .errors import ContactsError, InboxError
from .ledger import Ledger
from .mailboxes import KEYWORD, MAX_BYTES, InboxMessage, Source, configured_source
from .message import message_id as _message_id
from .tokens import secret_from
from .vocab import InboxKind

__all__ = [
    "KEYWORD",
    "Finding",
    "InboxResult",
    "Unreadable",
    "apply",
    "classify",
    "MAX_DEPTH",
    "MAX_PARTS",
    "inbox_id",
    "normalise_address",
    "process",
    "process_configured",
    "read",
    "run_inbox",
    "skipped_id",
    "worth_fetching",
]

#: What :func:`apply` did with a finding: a :class:`~mailer.vocab.InboxKind`.
Recorded = InboxKind

#: MIME limits (issue 15): a message past them is recorded as skipped, never classified.
MAX_DEPTH = 10
MAX_PARTS = 1000
#: Recipient blocks of one DSN looked at: we send one recipient per mail.
_MAX_RECIPIENTS = 100
#: Headers read from every message; one that makes the header parser raise skips the message.
_HEADERS = (
    "Message-ID",
    "From",
    "To",
    "Cc",
    "Subject",
    "In-Reply-To",
    "References",
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "Auto-Submitted",
    "Content-Type",
)

_PARTSTATS = frozenset({"ACCEPTED", "DECLINED", "TENTATIVE"})
_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_POLICY = email.policy.default


@dataclass(frozen=True)
class Finding:
    """One thing a message tells us.

    ``status``/``diagnostic``/``original_message_id`` are set for ``bounce`` and ``delay``
    (RFC 3464 Status, Diagnostic-Code, and the Message-ID of the mail that failed); ``sender``
    for ``reply``: the From address (the attendee line may name someone else).
    """

    kind: InboxKind  #: REPLY, BOUNCE, DELAY or UNSUBSCRIBE (what the message says)
    email: str
    event_id: str | None = None
    partstat: str | None = None
    sequence: int | None = None  # of a reply: the SEQUENCE (revision) it answers, if given
    status: str = ""
    diagnostic: str = ""
    original_message_id: str | None = None
    sender: str | None = None
    #: of a DSN: the addresses it was delivered to that look like our VERP bounce address
    envelope: tuple[str, ...] = ()
    #: of a reply: the Message-IDs of this campaign it quotes (In-Reply-To, References)
    refs: tuple[str, ...] = ()
    #: of an unsubscribe mail: its Subject, where the signed token rides
    subject: str = ""


class Unreadable(Exception):
    """A message we do not classify (malformed header, over the MIME limits): the reason."""


# --------------------------------------------------------------------------------------
# Classification (pure).
# --------------------------------------------------------------------------------------


def classify(raw: bytes, campaign: Campaign) -> list[Finding]:
    """What ``raw`` tells us about ``campaign``; an empty list means "not ours, leave it".

    Checked in this order: a delivery status notification, an iMIP REPLY, a mail to the
    unsubscribe address. Malformed parts are skipped. What a finding claims is not checked
    here: :func:`apply` ties it to a mail we sent, or records it as unmatched.

    :raises Unreadable: a malformed header, or a message past the size or MIME limits.
    """
    return _classify(read(raw), campaign)


def _classify(msg: Message, campaign: Campaign) -> list[Finding]:
    return _dsn(msg, campaign) or _replies(msg, campaign) or _unsubscribe(msg, campaign)


_BOUNDARY_LINE = re.compile(rb"(?m)^--")
_RECIPIENT_LINE = re.compile(rb"(?im)^final-recipient:")


def read(raw: bytes) -> Message:
    """Parse ``raw`` within bounds: the MIME parts are counted in the raw bytes first (a
    boundary line each), so a message of 200,000 parts costs a regex scan, not a parse.

    :raises Unreadable: the reason, for a person to read.
    """
    if len(raw) > MAX_BYTES:
        raise Unreadable(f"over {MAX_BYTES // 2**20} MB ({len(raw):,} bytes)")
    # A delivery report's recipient blocks are parts of the parsed tree too (RFC 3464 2.1).
    if len(_BOUNDARY_LINE.findall(raw)) + len(_RECIPIENT_LINE.findall(raw)) > 2 * MAX_PARTS + 2:
        raise Unreadable(f"more than {MAX_PARTS:,} MIME parts")
    try:
        msg = BytesParser(policy=_POLICY).parsebytes(raw)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise Unreadable(f"cannot be parsed: {type(exc).__name__}: {exc}") from None
    stack: list[tuple[Message, int]] = [(msg, 1)]
    parts = 0
    while stack:
        part, depth = stack.pop()
        parts += 1
        if parts > MAX_PARTS:
            raise Unreadable(f"more than {MAX_PARTS:,} MIME parts")
        if depth > MAX_DEPTH:
            raise Unreadable(f"MIME parts nested deeper than {MAX_DEPTH}")
        if part.is_multipart():
            payload = part.get_payload()
            stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
    for name in _HEADERS:
        try:
            [str(v) for v in msg.get_all(name, [])]
        except Exception as exc:  # noqa: BLE001 - the header parser raises many types
            raise Unreadable(f"malformed {name} header ({type(exc).__name__}: {exc})") from None
    return msg


def normalise_address(value: str) -> str | None:
    """``MAILTO:Jan@Example.BE`` -> ``Jan@example.be``, as contact lists store addresses
    (email-validator's local part, lower-case domain); None if it is not an address.

    >>> normalise_address("MAILTO:Jan@Example.BE")
    'Jan@example.be'
    """
    text = value.strip().strip("<>").strip()
    if text[:7].lower() == "mailto:":
        text = unquote(text[7:])  # a CAL-ADDRESS is a URI (RFC 5545 3.3.3)
    try:
        return contacts.normalise_address(text)
    except ContactsError:
        return None


def _parts(msg: Message) -> Iterator[Message]:
    """The MIME tree without descending into attached messages: a returned or forwarded
    message (message/rfc822) is someone else's statement, not the sender's."""
    yield msg
    if msg.is_multipart() and msg.get_content_maintype() == "multipart":
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                yield from _parts(sub)


def _replies(msg: Message, campaign: Campaign) -> list[Finding]:
    """iMIP REPLY (RFC 6047 2.1, METHOD:REPLY of RFC 5546 3.2.3) for one of our events."""
    events = {e.uid: e.id for e in campaign.events}
    suffix = _id_suffix(campaign)
    quoted = " ".join(str(v) for name in ("In-Reply-To", "References") for v in msg.get_all(name, []))
    refs = tuple(dict.fromkeys(m for m in _MSG_ID.findall(quoted) if m.endswith(suffix)))[:20]
    out: list[Finding] = []
    for part in _parts(msg):
        ctype = part.get_content_type()
        if ctype not in ("text/calendar", "application/ics"):
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        try:
            calendars = icalendar.Calendar.from_ical(data, multiple=True)
        except Exception:  # noqa: BLE001 - untrusted input; icalendar raises many types
            continue
        for cal in calendars:
            if str(cal.get("METHOD", "")).strip().upper() != "REPLY":
                continue
            for ev in cal.walk("VEVENT"):
                event_id = events.get(str(ev.get("UID", "")).strip())
                if event_id is not None:
                    out.extend(_attendees(ev, event_id, msg, refs))
    return _unique(out)


def _attendees(ev: Any, event_id: str, msg: Message, refs: tuple[str, ...]) -> list[Finding]:
    raw = ev.get("ATTENDEE")
    try:
        sequence: int | None = int(str(ev["SEQUENCE"]).strip())
    except (KeyError, ValueError):
        sequence = None
    attendees = raw if isinstance(raw, list) else [raw] if raw is not None else []
    sender = _from(msg)
    found = []
    for att in attendees:
        params = getattr(att, "params", {})
        partstat = str(params.get("PARTSTAT", "")).strip().upper()
        addr = normalise_address(str(att))
        if addr and partstat in _PARTSTATS:
            found.append(
                Finding(
                    InboxKind.REPLY, addr, event_id, partstat, sequence=sequence, sender=sender, refs=refs
                )
            )
    if len(found) > 1:
        # RFC 5546 3.2.3: a REPLY carries the replying attendee; if a client lists more,
        # trust the one that sent the mail.
        mine = [f for f in found if sender and address_key(f.email) == address_key(sender)]
        found = mine or found
    return found


def _dsn(msg: Message, campaign: Campaign) -> list[Finding]:
    """Failed recipients of a delivery status notification (RFC 3464) about our mail."""
    for part in _parts(msg):
        if part.get_content_type() != "multipart/report":
            continue
        if str(part.get_param("report-type", "")).lower() != "delivery-status":
            continue
        subparts = [p for p in part.get_payload() if isinstance(p, Message)]
        original = _original_id(subparts)
        envelope = _envelope(msg, campaign)
        if not envelope and original is not None and not original.endswith(_id_suffix(campaign)):
            return []  # a bounce of some other mail from this mailbox
        out: list[Finding] = []
        for sub in subparts:
            # RFC 6533 message/global-delivery-status has the same fields in UTF-8.
            if sub.get_content_type() in (
                "message/delivery-status",
                "message/global-delivery-status",
            ):
                out.extend(_recipients(_blocks(sub)[: _MAX_RECIPIENTS + 1], original))
        out = [dataclasses.replace(f, envelope=envelope) for f in out] if envelope else out
        return _unique(out)
    return []


def _envelope(msg: Message, campaign: Campaign) -> tuple[str, ...]:
    """Where a DSN was delivered, when that looks like our VERP address (``bounces+TOKEN@``):
    the DSN's envelope recipient, which Postfix writes as Delivered-To and X-Original-To, Exim
    as Envelope-To, Gmail as Delivered-To; and a bounce's To is the envelope sender it returns
    to. Only the signed token counts (:func:`mailer.bounces.delivery_of` in :func:`apply`)."""
    bounces = campaign.sender.bounces
    if not bounces:
        return ()
    local, _, domain = bounces.rpartition("@")
    prefix, end = f"{local}+".lower(), f"@{domain}".lower()
    fields = [
        str(v)
        for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To")
        for v in msg.get_all(name, [])
    ]
    found = [a for _, a in getaddresses(fields) if a.lower().startswith(prefix) and a.lower().endswith(end)]
    return tuple(dict.fromkeys(found))[:10]


def _id_suffix(campaign: Campaign) -> str:
    """``.label@domain>``: what every Message-ID we send for this campaign ends with."""
    sample = _message_id(campaign.id, "", "", campaign.sender.domain)
    local, _, domain = sample.partition("@")
    dot = local.find(".")
    return (local[dot:] if dot >= 0 else "") + "@" + domain


def _original_id(parts: list[Message]) -> str | None:
    """Message-ID of the returned message (RFC 3464 2: message/rfc822 or text/rfc822-headers)."""
    for p in parts:
        ctype = p.get_content_type()
        headers: Message | None = None
        if ctype in ("message/rfc822", "message/global") and p.is_multipart():
            inner = p.get_payload(0)
            headers = inner if isinstance(inner, Message) else None
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            text = _text(p)
            headers = HeaderParser(policy=_POLICY).parsestr(text) if text else None
        if headers is not None:
            m = _MSG_ID.search(str(headers.get("Message-ID", "")))
            if m:
                return m.group(0)
    return None


def _text(part: Message) -> str:
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data.decode(part.get_content_charset() or "utf-8", errors="replace")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _blocks(part: Message) -> list[Message]:
    """The field groups of a delivery-status body (RFC 3464 2.1)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the email parser splits message/delivery-status itself
        return [b for b in payload if isinstance(b, Message)]
    text = _text(part)
    return [
        HeaderParser(policy=_POLICY).parsestr(b) for b in re.split(r"\r?\n[ \t]*\r?\n", text) if b.strip()
    ]


def _field(block: Message, name: str) -> str:
    return " ".join(str(block.get(name, "")).split())


def _recipients(blocks: Iterable[Message], original: str | None) -> list[Finding]:
    out = []
    for block in blocks:
        recipient = _field(block, "Final-Recipient") or _field(block, "Original-Recipient")
        if not recipient:
            continue  # the per-message block
        action = _field(block, "Action").lower()
        if action in ("delivered", "relayed", "expanded"):
            continue
        # RFC 3464 2.3.2: "address-type; address"; rfc822 is the one we send to.
        addr_type, _, addr = recipient.partition(";")
        address = normalise_address(addr if addr else addr_type)
        if address is None or (addr and addr_type.strip().lower() not in ("rfc822", "utf-8")):
            continue
        m = _STATUS.match(_field(block, "Status"))
        if m:
            status = ".".join(m.groups())
        elif action in ("failed", "delayed"):
            status = "5.0.0" if action == "failed" else "4.0.0"
        else:
            continue
        if status[0] == "2":
            continue
        diag = _field(block, "Diagnostic-Code")
        diag = diag.partition(";")[2].strip() if ";" in diag else diag  # drop "smtp;"
        kind = InboxKind.BOUNCE if status[0] == "5" else InboxKind.DELAY
        out.append(Finding(kind, address, status=status, diagnostic=diag, original_message_id=original))
    return out


def _unsubscribe(msg: Message, campaign: Campaign) -> list[Finding]:
    """A mail to the ``List-Unsubscribe`` mailto address (RFC 2369 3.2)."""
    target = campaign.unsubscribe.mailto if campaign.unsubscribe else None
    if not target:
        return []
    # RFC 3834: an auto-reply to that address is not a person asking to leave.
    if str(msg.get("Auto-Submitted", "no")).strip().lower() not in ("", "no"):
        return []
    fields = [str(v) for name in ("To", "Cc", "Delivered-To", "X-Original-To") for v in msg.get_all(name, [])]
    if not any(a.strip().lower() == target.lower() for _, a in getaddresses(fields)):
        return []
    sender = _from(msg)
    ours = {campaign.sender.address.lower(), campaign.sender.organizer.lower()}
    if sender is None or sender.lower() in ours:
        return []
    return [
        Finding(InboxKind.UNSUBSCRIBE, sender, subject=" ".join(str(msg.get("Subject", "")).split())[:2000])
    ]


def _from(msg: Message) -> str | None:
    found = getaddresses([str(v) for v in msg.get_all("From", [])])
    return normalise_address(found[0][1]) if found and found[0][1] else None


def _unique(findings: list[Finding]) -> list[Finding]:
    """Drop repeats (Outlook sends the same REPLY inline and as an attachment)."""
    return list(dict.fromkeys(findings))


def inbox_id(raw: bytes) -> str:
    """The key of a message in the ledger's inbox table: its Message-ID, or a digest. Never
    raises: the header is read as plain text (a malformed Message-ID is no Message-ID)."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    m = _MSG_ID.search(str(headers.get("Message-ID", "")))
    return m.group(0) if m else f"<{hashlib.sha256(raw).hexdigest()[:32]}@inbox.invalid>"


def skipped_id(ident: str) -> str:
    """The inbox-table key of a skipped message: its identity in the source, not its content,
    so a later poll passes it by without reading it."""
    return f"<skipped.{ident}@inbox.invalid>"


def worth_fetching(header: bytes, campaign: Campaign) -> bool:
    """Could a message with these headers be ours? Lets IMAP skip the bodies of plain mail.

    Replies and DSNs are multipart or a calendar; an unsubscribe is addressed to us. A header
    block that cannot be read is fetched, so that it is recorded as skipped for a person.
    """
    try:
        msg = BytesHeaderParser(policy=_POLICY).parsebytes(header)
        if msg.get_content_maintype() == "multipart" or msg.get_content_type() in (
            "text/calendar",
            "application/ics",
        ):
            return True
        return bool(_unsubscribe(msg, campaign))
    except Exception:  # noqa: BLE001 - untrusted header bytes
        return True


# --------------------------------------------------------------------------------------
# Recording.
# --------------------------------------------------------------------------------------


def apply(
    findings: list[Finding],
    ledger: Ledger,
    campaign: Campaign,
    message_id: str,
    now: datetime,
    *,
    secret: str | None = None,
) -> list[tuple[Recorded, str]]:
    """Record what one message (``message_id``) told us, and remember the message as handled.

    Nothing a message claims is believed unless it is tied to a mail we sent:

    - a reply counts for an ATTENDEE who was sent the event's calendar, answering a SEQUENCE
      no higher than the one that person was sent, in a mail from that address (by
      :func:`~mailer.addresses.address_key`) or quoting one of our Message-IDs to them;
    - a DSN changes the one delivery its signed envelope token (VERP, with ``secret``) or the
      Message-ID of the returned mail names, and only for that delivery's recipient: a hard
      bounce marks it bounced and suppresses the address; a delay changes nothing;
    - an unsubscribe mail suppresses the address its signed token (in the subject) names.

    Anything else is recorded as unmatched, for staff, and changes nothing. Returns what each
    finding became, with a log line.
    """
    done: list[tuple[Recorded, str]] = []
    for f in findings:
        if f.kind is InboxKind.REPLY and f.event_id and f.partstat:
            done.append(_apply_reply(f, ledger, campaign, message_id, now))
        elif f.kind is InboxKind.UNSUBSCRIBE:
            done.append(_apply_unsubscribe(f, ledger, campaign, now, secret))
    dsn = [f for f in findings if f.kind in (InboxKind.BOUNCE, InboxKind.DELAY)]
    if dsn:
        done += _apply_dsn(dsn, ledger, campaign, now, secret)
    kinds = "+".join(dict.fromkeys(k for k, _ in done))
    emails = _some(list(dict.fromkeys(f.email for f in findings)))
    ledger.record_inbox(message_id, kinds, emails, "; ".join(line for _, line in done), now)
    return done


def _some(items: list[str], n: int = 5) -> str:
    """``a, b, c and 99,997 more``: a list staff can read whatever its length."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n:,} more" if len(items) > n else "")


def _apply_reply(
    f: Finding, ledger: Ledger, campaign: Campaign, message_id: str, now: datetime
) -> tuple[Recorded, str]:
    assert f.event_id and f.partstat
    answer = f"{address_key(f.email)} {f.partstat.lower()} {f.event_id}"
    sent = ledger.sent_sequence(campaign.id, f.event_id, f.email)
    if sent is None:
        why = f"no invitation to {f.event_id} with a calendar was sent to {f.email}"
        if f.sender and address_key(f.sender) != address_key(f.email):
            why += f" (the mail came from {f.sender})"
    elif f.sequence is not None and f.sequence > sent:
        why = f"it answers SEQUENCE {f.sequence}, but {f.email} was sent SEQUENCE {sent} at most"
    elif (f.sender is None or address_key(f.sender) != address_key(f.email)) and not ledger.sent_to(
        f.refs, f.email
    ):
        why = (
            f"the mail came from {f.sender or 'no address'}, not {f.email}, and quotes none of the "
            f"mails we sent to {f.email}"
        )
    else:
        if ledger.record_reply(campaign.id, f.event_id, f.email, f.partstat, now, message_id, f.sequence):
            return InboxKind.REPLY, f"reply: {answer}"
        return InboxKind.OUTDATED, f"outdated reply: {answer}: an answer to a newer revision is kept"
    ledger.record_unmatched_reply(
        campaign.id,
        f.event_id,
        campaign.event(f.event_id).uid,
        f.email,
        f.sender,
        f.partstat,
        f.sequence,
        message_id,
        now,
        why,
    )
    return InboxKind.UNMATCHED, f"unmatched reply: {answer}: {why}; not applied to anyone"


def _apply_unsubscribe(
    f: Finding, ledger: Ledger, campaign: Campaign, now: datetime, secret: str | None
) -> tuple[Recorded, str]:
    from .bounces import unsubscribed_address

    address = unsubscribed_address(secret, campaign.id, f.subject) if secret else None
    if address is None:
        return (
            InboxKind.UNMATCHED_UNSUBSCRIBE,
            f"unmatched unsubscribe: from {f.email}, subject {f.subject[:80]!r}: no valid unsubscribe "
            "token in the subject; nobody suppressed",
        )
    ledger.suppress(address, "unsubscribed by mail", now)
    return InboxKind.UNSUBSCRIBE, f"unsubscribe: {address} suppressed"


def _apply_dsn(
    dsn: list[Finding], ledger: Ledger, campaign: Campaign, now: datetime, secret: str | None
) -> list[tuple[Recorded, str]]:
    from .bounces import delivery_of

    first = dsn[0]
    bounces = campaign.sender.bounces
    target = None
    if bounces and secret:
        for address in first.envelope:
            delivery = delivery_of(bounces, secret, address)
            if delivery is not None and (target := ledger.returned_delivery(delivery, None)):
                break
    if target is None and first.original_message_id:
        target = ledger.returned_delivery(None, first.original_message_id)
    done: list[tuple[Recorded, str]] = []
    key = address_key(target["email"]) if target else None
    matched = [f for f in dsn if key is not None and address_key(f.email) == key][:1]
    for f in matched:
        assert target is not None
        if f.kind is InboxKind.BOUNCE:
            n = ledger.record_bounce(int(target["id"]), target["email"], f.status, f.diagnostic, now)
            done.append(
                (
                    InboxKind.BOUNCE,
                    f"bounce: {target['email']} {f.status} {f.diagnostic}".rstrip()
                    + f"; {n} deliver{'y' if n == 1 else 'ies'} marked bounced, address suppressed",
                )
            )
        else:
            done.append(
                (InboxKind.DELAY, f"delay: {target['email']} {f.status} {f.diagnostic} (recorded only)")
            )
    others = list(dict.fromkeys(f.email for f in dsn if f not in matched))
    if others:
        if target is None:
            why = (
                "matches no mail we sent (no valid signed bounce address, and the returned "
                f"Message-ID {first.original_message_id or '(none)'} is not one of our deliveries)"
            )
        else:
            why = f"the returned mail was sent to {target['email']}, not to them"
        done.append(
            (InboxKind.UNMATCHED_BOUNCE, f"unmatched bounce: {_some(others)}: {why}; nothing changed")
        )
    return done


# --------------------------------------------------------------------------------------
# Processing.
# --------------------------------------------------------------------------------------


@dataclass
class InboxResult:
    """What one pass over the inbox did: findings per kind, messages handled, log lines."""

    counts: Counter[str] = field(default_factory=Counter)  #: per :class:`InboxKind`
    handled: int = 0
    ignored: int = 0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``3 replies, 1 unmatched reply, 1 bounce; 5 message(s) handled, 1 left alone.``"""
        parts = [f"{n} {k.labels[n != 1]}" for k in InboxKind if (n := self.counts[k])]
        done = f"{self.handled} message(s) handled, {self.ignored} left alone"
        return f"{', '.join(parts) or 'nothing new'}; {done}."


def process(
    source: Source, ledger: Ledger, campaign: Campaign, now: datetime, *, secret: str | None = None
) -> InboxResult:
    """Handle every unprocessed message of ``source`` once; leave the others alone.

    A message is recorded in the ledger before it is flagged, so one whose flagging failed
    is only flagged the next time, never handled twice. Each message is handled on its own: one
    that cannot be read safely (:class:`Unreadable`, or any error while classifying it) is
    recorded once as skipped, by its identity in the source, left unflagged for a person, and
    not read again. ``secret`` verifies the signed bounce and unsubscribe tokens.

    :raises InboxError: the source cannot be read.
    """
    result = InboxResult()

    def wanted(header: bytes) -> bool:
        ok = worth_fetching(header, campaign)
        result.ignored += not ok
        return ok

    def known(ident: str) -> bool:
        return ledger.inbox_seen(skipped_id(ident))

    with source:
        for item in source.messages(wanted, known):
            try:
                if item.size > MAX_BYTES and not item.raw:
                    raise Unreadable(f"over {MAX_BYTES // 2**20} MB ({item.size:,} bytes)")
                findings = _classify(read(item.raw), campaign)
            except Exception as exc:  # noqa: BLE001 - one odd mail must not block the inbox
                _skip(item, exc, ledger, now, result)
                continue
            if not findings:
                result.ignored += 1
                continue
            mid = inbox_id(item.raw)
            if not ledger.inbox_seen(mid):
                done = apply(findings, ledger, campaign, mid, now, secret=secret)
                result.lines += [line for _, line in done]
                result.counts.update(kind for kind, _ in done)
                result.handled += 1
            try:
                source.mark(item.key)
            except InboxError as exc:
                result.lines.append(f"warning: {exc}")
    return result


def _skip(item: InboxMessage, exc: Exception, ledger: Ledger, now: datetime, result: InboxResult) -> None:
    reason = str(exc) if isinstance(exc, Unreadable) else f"{type(exc).__name__}: {exc}"
    ident = item.ident or f"sha256:{hashlib.sha256(item.raw).hexdigest()[:32]}"
    line = f"skipped: message {item.key}: {reason}; left unflagged for a person to read"
    ledger.record_inbox(skipped_id(ident), InboxKind.SKIPPED, None, line, now)
    result.lines.append(line)
    result.counts[InboxKind.SKIPPED] += 1


def process_configured(
    campaign: Campaign,
    ledger: Ledger,
    environ: Mapping[str, str],
    *,
    now: datetime,
    maildir: Path | None = None,
) -> InboxResult | None:
    """One inbox pass for the daemon; None when no inbox is configured.

    :raises InboxError: the inbox is misconfigured or cannot be read.
    """
    source = configured_source(environ, maildir)
    return None if source is None else process(source, ledger, campaign, now, secret=secret_from(environ))


def run_inbox(
    config_path: Path,
    db_path: Path | None,
    maildir: Path | None,
    environ: Mapping[str, str],
    now: datetime | None = None,
) -> InboxResult:
    """``mailer inbox``: load the campaign, open the ledger, process the inbox once.

    :raises InboxError: neither ``maildir`` nor the IMAP variables are given, or reading fails.
    :raises ConfigError: schedules.yaml is invalid.
    :raises LedgerError: the ledger does not exist or is not a mailer ledger.
    """
    campaign = load(config_path)
    source = configured_source(environ, maildir)
    if source is None:
        raise InboxError(
            "no inbox to read: pass --maildir DIR, or set MAILER_IMAP_HOST, MAILER_IMAP_USER and "
            "MAILER_IMAP_PASSWORD (optional: MAILER_IMAP_PORT, MAILER_IMAP_TLS, "
            "MAILER_IMAP_MAILBOX, MAILER_IMAP_CA_FILE)"
        )
    # An existing ledger only: the inbox records answers and bounces of mail that was sent,
    # so a missing file means a wrong --db / ledger:, never a new ledger (issue 11 item 2).
    with Ledger.open(db_path or campaign.ledger) as ledger:
        return process(source, ledger, campaign, now or datetime.now(UTC), secret=secret_from(environ))

"""The organiser's inbox: iMIP replies, delivery status notifications and unsubscribe mails.

:func:`classify` is pure: raw message bytes and the campaign in, :class:`Finding` values out.
:func:`apply` writes findings to the ledger. A source (:class:`MaildirSource`,
:class:`ImapSource`) lists unprocessed messages and flags the ones we handled; messages that are
not ours are never flagged or marked read. :func:`process` ties the three together.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import icalendar

from . import contacts
from .addresses import address_key
from .config import Campaign, load
from .errors import ContactsError, InboxError
from .ledger import Ledger
from .mailboxes import KEYWORD, Source, configured_source
from .message import message_id as _message_id

__all__ = [
    "KEYWORD",
    "Finding",
    "InboxResult",
    "apply",
    "classify",
    "inbox_id",
    "normalise_address",
    "process",
    "process_configured",
    "run_inbox",
    "worth_fetching",
]

Kind = Literal["reply", "bounce", "delay", "unsubscribe"]
#: What :func:`apply` did with a finding: a reply from no invitee of its event is "unmatched".
Recorded = Literal["reply", "unmatched", "bounce", "delay", "unsubscribe"]

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

    kind: Kind
    email: str
    event_id: str | None = None
    partstat: str | None = None
    sequence: int | None = None  # of a reply: the SEQUENCE (revision) it answers, if given
    status: str = ""
    diagnostic: str = ""
    original_message_id: str | None = None
    sender: str | None = None


# --------------------------------------------------------------------------------------
# Classification (pure).
# --------------------------------------------------------------------------------------


def classify(raw: bytes, campaign: Campaign) -> list[Finding]:
    """What ``raw`` tells us about ``campaign``; an empty list means "not ours, leave it".

    Checked in this order: a delivery status notification, an iMIP REPLY, a mail to the
    unsubscribe address. Malformed parts are skipped, never raised.
    """
    msg = email.message_from_bytes(raw, policy=_POLICY)
    return _dsn(msg, campaign) or _replies(msg, campaign) or _unsubscribe(msg, campaign)


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
                    out.extend(_attendees(ev, event_id, msg))
    return _unique(out)


def _attendees(ev: Any, event_id: str, msg: Message) -> list[Finding]:
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
            found.append(Finding("reply", addr, event_id, partstat, sequence=sequence, sender=sender))
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
        if original is not None and not original.endswith(_id_suffix(campaign)):
            return []  # a bounce of some other mail from this mailbox
        out: list[Finding] = []
        for sub in subparts:
            # RFC 6533 message/global-delivery-status has the same fields in UTF-8.
            if sub.get_content_type() in (
                "message/delivery-status",
                "message/global-delivery-status",
            ):
                out.extend(_recipients(_blocks(sub), original))
        return _unique(out)
    return []


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
        kind: Kind = "bounce" if status[0] == "5" else "delay"
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
    return [Finding("unsubscribe", sender)]


def _from(msg: Message) -> str | None:
    found = getaddresses([str(v) for v in msg.get_all("From", [])])
    return normalise_address(found[0][1]) if found and found[0][1] else None


def _unique(findings: list[Finding]) -> list[Finding]:
    """Drop repeats (Outlook sends the same REPLY inline and as an attachment)."""
    return list(dict.fromkeys(findings))


def inbox_id(raw: bytes) -> str:
    """The key of a message in the ledger's inbox table: its Message-ID, or a digest."""
    headers = BytesHeaderParser(policy=_POLICY).parsebytes(raw)
    m = _MSG_ID.search(str(headers.get("Message-ID", "")))
    return m.group(0) if m else f"<{hashlib.sha256(raw).hexdigest()[:32]}@inbox.invalid>"


def worth_fetching(header: bytes, campaign: Campaign) -> bool:
    """Could a message with these headers be ours? Lets IMAP skip the bodies of plain mail.

    Replies and DSNs are multipart or a calendar; an unsubscribe is addressed to us.
    """
    msg = BytesHeaderParser(policy=_POLICY).parsebytes(header)
    if msg.get_content_maintype() == "multipart" or msg.get_content_type() in (
        "text/calendar",
        "application/ics",
    ):
        return True
    return bool(_unsubscribe(msg, campaign))


# --------------------------------------------------------------------------------------
# Recording.
# --------------------------------------------------------------------------------------


def apply(
    findings: list[Finding], ledger: Ledger, campaign: Campaign, message_id: str, now: datetime
) -> list[tuple[Recorded, str]]:
    """Record what one message (``message_id``) told us, and remember the message as handled.

    A reply is the answer of the invitee its attendee address matches (by
    :func:`~mailer.addresses.address_key`); a reply from an address that was sent no calendar
    for that event (an alias, a forward) is kept as unmatched, for staff, and is nobody's
    answer. A hard bounce marks the delivery bounced and suppresses the address; a delay
    changes nothing; an unsubscribe suppresses the sender. Returns what each finding became,
    with a log line.
    """
    done: list[tuple[Recorded, str]] = []
    for f in findings:
        if f.kind == "reply" and f.event_id and f.partstat:
            answer = f"{address_key(f.email)} {f.partstat.lower()} {f.event_id}"
            if ledger.is_invitee(campaign.id, f.event_id, f.email):
                ledger.record_reply(campaign.id, f.event_id, f.email, f.partstat, now, message_id, f.sequence)
                done.append(("reply", f"reply: {answer}"))
            else:
                why = _unmatched_why(f)
                uid = campaign.event(f.event_id).uid
                ledger.record_unmatched_reply(
                    campaign.id,
                    f.event_id,
                    uid,
                    f.email,
                    f.sender,
                    f.partstat,
                    f.sequence,
                    message_id,
                    now,
                    why,
                )
                done.append(("unmatched", f"unmatched reply: {answer}: {why}; not applied to anyone"))
        elif f.kind == "bounce":
            n = ledger.record_bounce(f.email, f.original_message_id, f.status, f.diagnostic, now)
            done.append(
                (
                    "bounce",
                    f"bounce: {f.email} {f.status} {f.diagnostic}".rstrip()
                    + f"; {n} deliver{'y' if n == 1 else 'ies'} marked bounced, address suppressed",
                )
            )
        elif f.kind == "delay":
            done.append(
                ("delay", f"delay: {f.email} {f.status} {f.diagnostic}".rstrip() + " (recorded only)")
            )
        elif f.kind == "unsubscribe":
            ledger.suppress(f.email, "unsubscribed by mail", now)
            done.append(("unsubscribe", f"unsubscribe: {f.email} suppressed"))
    kinds = "+".join(dict.fromkeys(k for k, _ in done))
    emails = ", ".join(dict.fromkeys(f.email for f in findings))
    ledger.record_inbox(message_id, kinds, emails, "; ".join(line for _, line in done), now)
    return done


def _unmatched_why(f: Finding) -> str:
    why = f"no invitation to {f.event_id} with a calendar was sent to {f.email}"
    if f.sender and address_key(f.sender) != address_key(f.email):
        why += f" (the mail came from {f.sender})"
    return why


# --------------------------------------------------------------------------------------
# Processing.
# --------------------------------------------------------------------------------------


@dataclass
class InboxResult:
    """What one pass over the inbox did: findings per kind, messages handled, log lines."""

    counts: Counter[Recorded] = field(default_factory=Counter)
    handled: int = 0
    ignored: int = 0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``3 replies, 1 unmatched reply, 1 bounce; 5 message(s) handled, 1 left alone.``"""
        parts = [f"{n} {_LABELS[k][n != 1]}" for k in _LABELS if (n := self.counts[k])]
        done = f"{self.handled} message(s) handled, {self.ignored} left alone"
        return f"{', '.join(parts) or 'nothing new'}; {done}."


_LABELS: dict[Recorded, tuple[str, str]] = {
    "reply": ("reply", "replies"),
    "unmatched": ("unmatched reply", "unmatched replies"),
    "bounce": ("bounce", "bounces"),
    "delay": ("delay", "delays"),
    "unsubscribe": ("unsubscribe", "unsubscribes"),
}


def process(source: Source, ledger: Ledger, campaign: Campaign, now: datetime) -> InboxResult:
    """Handle every unprocessed message of ``source`` once; leave the others alone.

    A message is recorded in the ledger before it is flagged, so one whose flagging failed
    is only flagged the next time, never handled twice.

    :raises InboxError: the source cannot be read.
    """
    result = InboxResult()

    def wanted(header: bytes) -> bool:
        ok = worth_fetching(header, campaign)
        result.ignored += not ok
        return ok

    with source:
        for item in source.messages(wanted):
            try:
                findings = classify(item.raw, campaign)
            except Exception as exc:  # noqa: BLE001 - one odd mail must not block the inbox
                result.lines.append(f"warning: message {item.key} left alone: {type(exc).__name__}: {exc}")
                findings = []
            if not findings:
                result.ignored += 1
                continue
            mid = inbox_id(item.raw)
            if not ledger.inbox_seen(mid):
                done = apply(findings, ledger, campaign, mid, now)
                result.lines += [line for _, line in done]
                result.counts.update(kind for kind, _ in done)
                result.handled += 1
            try:
                source.mark(item.key)
            except InboxError as exc:
                result.lines.append(f"warning: {exc}")
    return result


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
    return None if source is None else process(source, ledger, campaign, now)


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
        return process(source, ledger, campaign, now or datetime.now(UTC))

"""The fixed vocabulary: delivery statuses, attempt outcomes, step kinds, answers, event states.

Each word is spelled once, here. The ledger's SQL guards, the planner, the CLI choices and the
dashboard derive from these enums and sets, so no list of statuses can forget one.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "FINAL",
    "MAY_HAVE_ARRIVED",
    "NEEDS_PERSON",
    "OPEN",
    "Answer",
    "Attempt",
    "EventStatus",
    "InboxKind",
    "RevisionKind",
    "Status",
    "StepKind",
    "sql_list",
]


class Status(StrEnum):
    """The status of one delivery (one row of the ledger: campaign, step, contact)."""

    PENDING = "pending"  #: due, not yet claimed
    SENDING = "sending"  #: claimed; its DATA may be on the wire (outcome unknown until recorded)
    DEFERRED = "deferred"  #: a 4xx or a lost connection before DATA; tried again at next_attempt
    SENT = "sent"  #: the server answered 2xx to the final dot
    FAILED = "failed"  #: refused (5xx) or given up; `mailer retry` makes it pending again
    BOUNCED = "bounced"  #: sent, then a DSN said it could not be delivered
    SKIPPED = "skipped"  #: decided without sending (audience, answer, lateness, superseded)
    SUPPRESSED = "suppressed"  #: the address is on the suppression list
    INVALID = "invalid"  #: the contact's row could not be used (a bad address): never invited


#: Statuses no pass changes. The documented exits: `mailer retry` (failed, skipped -> pending)
#: and a DSN (sent -> bounced).
FINAL: frozenset[Status] = frozenset(
    {Status.SENT, Status.FAILED, Status.BOUNCED, Status.SKIPPED, Status.SUPPRESSED, Status.INVALID}
)
#: Statuses a pass may still act on.
OPEN: frozenset[Status] = frozenset(Status) - FINAL
#: Rows whose mail may have reached the recipient (a calendar entry may exist for them).
MAY_HAVE_ARRIVED: frozenset[Status] = frozenset({Status.SENT, Status.SENDING})


class Attempt(StrEnum):
    """What one SMTP attempt came to."""

    SENT = "sent"  #: 2xx to the final dot
    DEFERRED = "deferred"  #: 4xx, or the connection failed before the payload was written
    FAILED = "failed"  #: 5xx: the server refused it
    #: The transaction went out of step (a reply we did not expect, garbage after the final
    #: dot, the connection lost while the payload was on the wire): the server may or may not
    #: have the mail. The row stays ``sending`` and goes again byte-identical (same Message-ID).
    UNKNOWN = "unknown"


class StepKind(StrEnum):
    INVITATION = "invitation"
    REMINDER = "reminder"
    UPDATE = "update"
    CANCEL = "cancel"

    @property
    def revises(self) -> bool:
        """An update or cancellation made by a change of the event (not configured)."""
        return self in (StepKind.UPDATE, StepKind.CANCEL)


class RevisionKind(StrEnum):
    """What a recorded revision of an event is (RFC 5546: SEQUENCE orders them)."""

    INITIAL = "initial"  #: first sight of the event
    AMEND = "amend"  #: changed before anyone got a calendar entry: same SEQUENCE, no mail
    UPDATE = "update"  #: SEQUENCE + 1, an update to everyone who has the entry
    CANCEL = "cancel"  #: SEQUENCE + 1, a cancellation to everyone who has the entry

    @property
    def sends(self) -> bool:
        return self in (RevisionKind.UPDATE, RevisionKind.CANCEL)


class Answer(StrEnum):
    """An invitee's answer as ``audience.rsvp`` spells it (iMIP PARTSTAT, lower-cased)."""

    ACCEPTED = "accepted"
    TENTATIVE = "tentative"
    DECLINED = "declined"
    NO_REPLY = "no-reply"

    @property
    def partstat(self) -> str:
        """The iCalendar PARTSTAT (RFC 5545 3.2.12); NEEDS-ACTION for no reply."""
        return "NEEDS-ACTION" if self is Answer.NO_REPLY else self.value.upper()

    @classmethod
    def from_partstat(cls, partstat: str) -> Answer:
        """``ACCEPTED`` -> accepted; anything unknown (NEEDS-ACTION, DELEGATED) -> no-reply."""
        try:
            return cls(partstat.strip().lower())
        except ValueError:
            return cls.NO_REPLY


class EventStatus(StrEnum):
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"


def sql_list(values: frozenset[Status] | set[Status] | tuple[Status, ...]) -> str:
    """A SQL list literal of statuses, for guards built from the sets above (the values are
    our own constants, never data).

    >>> sql_list(frozenset({Status.SENT, Status.BOUNCED}))
    "('bounced', 'sent')"
    """
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(values)) + ")"


class InboxKind(StrEnum):
    """What the inbox made of one finding of a message (:func:`mailer.inbox.apply`), as the
    ledger's ``inbox`` table records it (the kinds of one message joined with ``+``:
    ``bounce+unmatched-bounce``). Only REPLY, BOUNCE and UNSUBSCRIBE change answers, deliveries
    or suppressions; the unmatched ones and SKIPPED are for a person to read (issue 15)."""

    REPLY = "reply"
    UNMATCHED = "unmatched"  #: a reply tied to no invitation we sent
    OUTDATED = "outdated"  #: a reply that lost to an answer to a newer revision
    BOUNCE = "bounce"
    DELAY = "delay"
    UNSUBSCRIBE = "unsubscribe"
    UNMATCHED_BOUNCE = "unmatched-bounce"  #: a DSN tied to no mail we sent
    UNMATCHED_UNSUBSCRIBE = "unmatched-unsubscribe"  #: an unsubscribe mail without a valid token
    SKIPPED = "skipped"  #: a message that could not be read safely: left unflagged

    @property
    def labels(self) -> tuple[str, str]:
        """How a count of them reads, singular and plural: ``1 unmatched bounce``."""
        return _INBOX_LABELS[self]

    @property
    def needs_person(self) -> bool:
        return self in NEEDS_PERSON


_INBOX_LABELS: dict[InboxKind, tuple[str, str]] = {
    InboxKind.REPLY: ("reply", "replies"),
    InboxKind.UNMATCHED: ("unmatched reply", "unmatched replies"),
    InboxKind.OUTDATED: ("outdated reply", "outdated replies"),
    InboxKind.BOUNCE: ("bounce", "bounces"),
    InboxKind.DELAY: ("delay", "delays"),
    InboxKind.UNSUBSCRIBE: ("unsubscribe", "unsubscribes"),
    InboxKind.UNMATCHED_BOUNCE: ("unmatched bounce", "unmatched bounces"),
    InboxKind.UNMATCHED_UNSUBSCRIBE: ("unmatched unsubscribe", "unmatched unsubscribes"),
    InboxKind.SKIPPED: ("skipped message", "skipped messages"),
}
#: The inbox kinds a person must read, in the order staff pages list them.
NEEDS_PERSON = (
    InboxKind.UNMATCHED_BOUNCE,
    InboxKind.UNMATCHED,
    InboxKind.UNMATCHED_UNSUBSCRIBE,
    InboxKind.SKIPPED,
)

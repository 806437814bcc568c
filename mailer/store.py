"""The ledger's contract: the typed records it stores and the :class:`LedgerStore` protocol that
the planner and the sending pass depend on (SQLite is one implementation: mailer.ledger)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from .vocab import Attempt, Status

__all__ = [
    "Claim",
    "Claimed",
    "Decided",
    "LedgerStore",
    "NewRow",
    "Outcome",
    "RecordedRevision",
    "Row",
]


@dataclass(frozen=True)
class Row:
    """A delivery as the planner sees it."""

    id: int
    step: str
    email: str
    status: Status
    attempts: int
    next_attempt: datetime | None
    claimed_at: datetime | None
    message_id: str | None
    name: str = ""


@dataclass(frozen=True)
class NewRow:
    """A delivery to create as ``pending`` (one per campaign, step and address)."""

    step: str
    event: str
    email: str
    name: str
    due_at: datetime


@dataclass(frozen=True)
class Decided(NewRow):
    """A delivery decided without sending (skipped, suppressed, failed), with why."""

    status: Status = Status.SKIPPED
    reason: str = ""


@dataclass(frozen=True)
class Claim(NewRow):
    """A delivery to mark ``sending`` before its DATA: the Message-ID and SEQUENCE it goes with."""

    message_id: str = ""
    sequence: int = 0
    has_ics: bool = False
    #: The answer the ledger knows (ACCEPTED, TENTATIVE, DECLINED) or None (issue 13).
    partstat: str | None = None


@dataclass(frozen=True)
class Claimed:
    """A claimed row: its id, and the claim time, SEQUENCE and answer the mail must be built
    with (those of the first claim, so that a re-send is byte-identical; the answer is taken
    afresh unless the row was left ``sending``, see :meth:`LedgerStore.claim`)."""

    id: int
    claimed_at: datetime
    sequence: int
    partstat: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One SMTP attempt's result for :meth:`LedgerStore.record_outcomes`.

    ``attempt`` UNKNOWN keeps the row ``sending`` (re-sent identical at ``next_attempt``).
    """

    delivery_id: int
    attempt: Attempt
    code: int | None
    text: str
    at: datetime
    next_attempt: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RecordedRevision:
    """A revision of an event as the ledger keeps it (RFC 5546: SEQUENCE orders them)."""

    event: str
    sequence: int
    kind: str
    fingerprint: str
    snapshot: str
    at: datetime


class LedgerStore(Protocol):
    """What the planner and the pass need from a ledger. A second store (PostgreSQL) must give
    the same guarantees: see README "Another store"."""

    # -- reads ------------------------------------------------------------------------------
    def step_rows(self, campaign: str, step: str) -> Mapping[str, Row]: ...
    def steps_started(self, campaign: str) -> Mapping[str, datetime]: ...
    def suppressed(self) -> Mapping[str, str]: ...
    def answers(self, campaign: str) -> Mapping[tuple[str, str], str]: ...
    def latest_revisions(self, campaign: str) -> Mapping[str, RecordedRevision]: ...
    def revision_snapshots(self, campaign: str) -> Mapping[tuple[str, int], str]: ...
    def revision_steps(self, campaign: str) -> Sequence[RecordedRevision]: ...
    def calendar_holders(self, campaign: str, event: str) -> Sequence[tuple[str, str]]: ...
    def attempt_times(self, since: datetime) -> Sequence[tuple[datetime, str]]: ...
    #: A server's quota pause kept across processes (issue 17): ``record_outcomes`` keeps it
    #: with the quota reply's outcome, every pass reads it, the first pass after it removes it.
    def server_pause(self) -> tuple[datetime, str] | None: ...

    # -- writes (each commits before it returns) --------------------------------------------
    def transaction(self) -> AbstractContextManager[object]: ...
    def record_revision(
        self, campaign: str, revision: RecordedRevision, step: str, holders: Iterable[tuple[str, str]]
    ) -> None: ...
    def mark_steps_started(self, campaign: str, steps: Iterable[str], at: datetime) -> None: ...
    def record_decided(
        self, campaign: str, items: Iterable[Decided], at: datetime
    ) -> Mapping[Status, int]: ...
    def add_pending(self, campaign: str, items: Iterable[NewRow], at: datetime) -> None: ...
    def claim(self, campaign: str, items: Sequence[Claim], at: datetime) -> list[Claimed | None]: ...
    def record_outcomes(self, items: Sequence[Outcome]) -> None: ...
    def clear_server_pause(self, now: datetime) -> bool: ...
    def release(self, ids: Iterable[int], at: datetime) -> None: ...

"""What is due: a pure function of campaign, contacts, ledger rows and ``now`` (no clock, no I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from .config import Campaign, Delivery, Event, Step
from .contacts import Contact
from .ledger import FINAL, Row

__all__ = ["Due", "Plan", "Skip", "plan", "plan_step", "retry_at"]


@dataclass(frozen=True)
class Due:
    """A mail to send now. ``row`` is the existing ledger row (None: never tried)."""

    step: Step
    event: Event
    contact: Contact
    row: Row | None = None

    @property
    def resend(self) -> bool:
        """True when a crash left this mail ``sending``: it goes out again, identical."""
        return self.row is not None and self.row.status == "sending"


@dataclass(frozen=True)
class Skip:
    """A delivery decided without sending, recorded in the ledger with its reason."""

    step: Step
    event: Event
    email: str
    name: str
    status: Literal["skipped", "suppressed", "failed"]
    reason: str


@dataclass
class Plan:
    """The outcome of planning: what to send, what to record, and when to look again."""

    due: list[Due] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    next_wake: datetime | None = None
    steps_due: list[Step] = field(default_factory=list)

    def _wake(self, at: datetime) -> None:
        if self.next_wake is None or at < self.next_wake:
            self.next_wake = at


def retry_at(policy: Delivery, attempts: int, key: str, now: datetime) -> datetime:
    """When to try a deferred mail again: exponential backoff with jitter.

    ``attempts`` counts tries so far (>= 1). The jitter (±20 %) is derived from ``key`` so the
    planner stays pure and reproducible, yet retries of many recipients spread out instead of
    hitting a recovering server at the same instant.

    >>> from datetime import timezone
    >>> t = datetime(2018, 1, 4, 9, tzinfo=timezone.utc)
    >>> d = retry_at(Delivery(), 1, "k", t) - t
    >>> timedelta(seconds=48) <= d <= timedelta(seconds=72)
    True
    """
    base = policy.retry_base * (2 ** max(0, attempts - 1))
    base = min(base, policy.retry_max)
    h = int.from_bytes(hashlib.blake2b(f"{key}\0{attempts}".encode(), digest_size=4).digest(), "big")
    factor = 0.8 + 0.4 * (h / 0xFFFFFFFF)
    return now + timedelta(seconds=base.total_seconds() * factor)


def plan_step(
    campaign: Campaign,
    step: Step,
    contacts: Sequence[Contact],
    rows: Mapping[str, Row],
    suppressed: Mapping[str, str],
    started_at: datetime | None,
    now: datetime,
    plan: Plan | None = None,
) -> Plan:
    """Plan one step whose time has come (``step.at <= now``). See README "Delivery rules".

    :param rows: this step's ledger rows by email.
    :param started_at: when a pass first handled this step (None: this is the first pass).
    """
    out = plan if plan is not None else Plan()
    event = campaign.event(step.event)
    policy = campaign.delivery
    out.steps_due.append(step)
    in_audience: set[str] = set()
    reminder_late = step.kind == "reminder" and now > step.at + policy.late_after
    started = now >= event.start
    first_pass = started_at is None or started_at >= now

    def skip(email: str, name: str, status: Literal["skipped", "suppressed", "failed"], why: str) -> None:
        out.skips.append(Skip(step, event, email, name, status, why))

    for c in contacts:
        if not step.audience.matches(c.lists, c.tags):
            continue
        in_audience.add(c.email)
        row = rows.get(c.email)
        if row is not None and row.status in FINAL:
            continue
        if c.email in suppressed:
            skip(c.email, c.name, "suppressed", f"address suppressed: {suppressed[c.email]}")
        elif event.status == "cancelled":
            skip(c.email, c.name, "skipped", "the event is cancelled")
        elif started:
            if row is not None and row.attempts:
                skip(c.email, c.name, "failed",
                     f"gave up after {row.attempts} attempt(s): the event has started")
            else:
                skip(c.email, c.name, "skipped", "the event had started before this could be sent")
        elif row is not None and row.status == "deferred":
            if row.next_attempt is not None and row.next_attempt > now:
                out._wake(min(row.next_attempt, event.start))
            else:
                out.due.append(Due(step, event, c, row))
        elif row is not None and row.status == "sending":
            out.due.append(Due(step, event, c, row))
        elif reminder_late:
            skip(c.email, c.name, "skipped",
                 f"reminder due {step.at:%Y-%m-%d %H:%M} is more than late_after "
                 f"({_fmt(policy.late_after)}) in the past")
        elif row is None and not first_pass and not policy.late_contacts:
            skip(c.email, c.name, "skipped",
                 "added to the contacts after the step went out (delivery.late_contacts is off)")
        else:
            out.due.append(Due(step, event, c, row))

    for email, row in rows.items():
        if email not in in_audience and row.status not in FINAL:
            why = "no longer in the step's audience (removed from the contacts or lists)"
            if row.status == "sending":
                why += "; the outcome of its last attempt is unknown"
            skip(email, "", "skipped", why)
    return out


def plan(
    campaign: Campaign,
    contacts: Sequence[Contact],
    rows_for: Callable[[str], Mapping[str, Row]],
    suppressed: Mapping[str, str],
    steps_started: Mapping[str, datetime],
    now: datetime,
    *,
    only_steps: Iterable[str] | None = None,
) -> Plan:
    """Plan every step of ``campaign`` at ``now``.

    ``rows_for(step_id)`` returns that step's ledger rows; it is called only for steps whose
    time has come, so memory holds one step's rows at a time.
    """
    wanted = set(only_steps) if only_steps is not None else None
    out = Plan()
    for step in campaign.steps:
        if wanted is not None and step.id not in wanted:
            continue
        if step.at > now:
            if campaign.event(step.event).status != "cancelled":
                out._wake(step.at)
            continue
        plan_step(
            campaign, step, contacts, rows_for(step.id), suppressed,
            steps_started.get(step.id), now, out,
        )
    return out


def _fmt(d: timedelta) -> str:
    secs = int(d.total_seconds())
    if secs % 86400 == 0:
        return f"{secs // 86400}d"
    if secs % 3600 == 0:
        return f"{secs // 3600}h"
    return f"{secs // 60}m"

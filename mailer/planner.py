"""What is due: a pure function of campaign, contacts, ledger rows and ``now`` (no clock, no I/O)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .addresses import address_key
from .config import Audience, Campaign, Delivery, Event, Step
from .contacts import Contact, InvalidContact
from .store import RecordedRevision, Row
from .times import resolve_wall, zone
from .vocab import FINAL, Answer, EventStatus, RevisionKind, Status, StepKind

__all__ = [
    "Due",
    "Plan",
    "Revision",
    "Skip",
    "changes",
    "dynamic_step",
    "plan",
    "plan_step",
    "retry_at",
    "revisions",
    "send_times",
    "snapshot",
]

#: What makes a calendar entry change (RFC 5546 2.1.4: a "significant" change raises SEQUENCE).
SIGNIFICANT = ("title", "start", "end", "all_day", "location", "status")


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
        return self.row is not None and self.row.status is Status.SENDING


@dataclass(frozen=True)
class Skip:
    """A delivery decided without sending, recorded in the ledger with its reason."""

    step: Step
    event: Event
    email: str
    name: str
    status: Status  # skipped, suppressed, failed or invalid: a final status
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


def snapshot(event: Event) -> dict[str, object]:
    """The significant fields of an event, as plain JSON values.

    A text given per language is its ``{language: text}`` mapping, so a change of any language's
    text is a change (issue 13); a plain text stays a string, so the fingerprints recorded before
    per-language texts existed still match (no update goes out for nothing)."""
    return {
        "title": event.per_language("title") or event.title,
        "start": event.start.isoformat(),
        "end": event.end.isoformat(),
        "all_day": event.all_day,
        "location": event.per_language("location") or event.location,
        "status": event.status,
    }


def _fingerprint(snap: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(snap, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Revision:
    """A change of an event to record. ``kind`` is ``initial`` (first sight), ``amend`` (changed
    before anyone got a calendar entry: same SEQUENCE), ``update`` or ``cancel`` (SEQUENCE + 1,
    sent to everyone who has the entry)."""

    event: str
    sequence: int
    kind: RevisionKind
    fingerprint: str
    snapshot: str

    @property
    def step_id(self) -> str:
        # "~" cannot appear in a configured step id, so these never collide.
        return f"{self.event}~{self.kind}{self.sequence}"


def revisions(
    campaign: Campaign,
    recorded: Mapping[str, RecordedRevision],
    has_recipients: Callable[[str], bool],
) -> list[Revision]:
    """Which events changed since their last recorded revision.

    :param recorded: the latest recorded revision per event, from the ledger.
    :param has_recipients: whether anyone was sent a calendar object for the event.
    """
    out: list[Revision] = []
    for ev in campaign.events:
        snap = snapshot(ev)
        fp = _fingerprint(snap)
        text = json.dumps(snap, sort_keys=True, ensure_ascii=False)
        if ev.id not in recorded:
            out.append(Revision(ev.id, 0, RevisionKind.INITIAL, fp, text))
            continue
        seq, old_fp = recorded[ev.id].sequence, recorded[ev.id].fingerprint
        if fp == old_fp:
            continue
        if not has_recipients(ev.id):
            out.append(Revision(ev.id, seq, RevisionKind.AMEND, fp, text))
        else:
            kind = RevisionKind.CANCEL if ev.status is EventStatus.CANCELLED else RevisionKind.UPDATE
            out.append(Revision(ev.id, seq + 1, kind, fp, text))
    return out


def changes(before: Mapping[str, object], after: Mapping[str, object]) -> list[dict[str, object]]:
    """What changed between two snapshots: ``[{"field", "before", "after"}]`` (``start``/``end``
    as aware datetimes; a per-language text as its ``{language: text}`` mapping). Templates get
    them in words, in the reader's language: :func:`mailer.templates.describe_changes`."""

    def value(k: str, v: object) -> object:
        return datetime.fromisoformat(v) if k in ("start", "end") and isinstance(v, str) else v

    return [
        {"field": k, "before": value(k, before.get(k)), "after": value(k, after.get(k))}
        for k in SIGNIFICANT
        if before.get(k) != after.get(k)
    ]


def dynamic_step(campaign: Campaign, event: str, kind: str, sequence: int, at: datetime) -> Step:
    """The Step of an update or cancellation (recorded in the ledger, or about to be)."""
    step_kind = StepKind(kind)
    if not step_kind.revises:
        raise ValueError(f"{kind!r} is not an update or a cancellation")
    return Step(
        id=f"{event}~{kind}{sequence}",
        event=event,
        template=campaign.cancel_template if step_kind is StepKind.CANCEL else campaign.update_template,
        at=at.astimezone(campaign.timezone),
        at_text="on change",
        audience=Audience(),
        attach_ics=True,
        kind=step_kind,
    )


def zone_of(campaign: Campaign, contact: Contact) -> ZoneInfo:
    """The contact's time zone: their ``timezone`` column, else the campaign's."""
    return (zone(contact.timezone) if contact.timezone else None) or campaign.timezone


@dataclass(frozen=True)
class SendTime:
    """When a step goes to the recipients in one zone (one line of ``check``'s schedule)."""

    at: datetime  # aware, in ``zone``
    zone: ZoneInfo
    count: int
    problem: str | None = None  # the wall time does not exist or happens twice there


def send_times(campaign: Campaign, step: Step, contacts: Iterable[Contact]) -> list[SendTime]:
    """When ``step`` goes to ``contacts`` (its audience): one entry per recipients' zone for a
    ``local`` step (earliest first), else one at ``step.at``."""
    contacts = list(contacts)
    if not step.local:
        return [SendTime(step.at, campaign.timezone, len(contacts))]
    counts: dict[str, tuple[ZoneInfo, int]] = {}
    for c in contacts:
        tz = zone_of(campaign, c)
        counts[tz.key] = (tz, counts.get(tz.key, (tz, 0))[1] + 1)
    out = []
    for tz, n in counts.values():
        assert step.wall is not None
        at, problem = resolve_wall(step.wall, tz)
        out.append(SendTime(at, tz, n, problem))
    return sorted(out, key=lambda t: (t.at, t.zone.key))


#: Why the organiser's own address gets no mail with a calendar (issue 13).
ORGANISER_REASON = "the organiser does not get an invitation to its own meeting"


def _answer(replies: Mapping[tuple[str, str], str], event: str, email: str) -> Answer:
    """The contact's answer; ``replies`` is keyed by :func:`~mailer.addresses.address_key`, so
    an answer from ``Celine.Mertens@Example.BE`` is ``celine.mertens@example.be``'s."""
    partstat = replies.get((event, address_key(email)))
    return Answer.NO_REPLY if partstat is None else Answer.from_partstat(partstat)


def plan_step(
    campaign: Campaign,
    step: Step,
    contacts: Sequence[Contact],
    rows: Mapping[str, Row],
    suppressed: Mapping[str, str],
    started_at: datetime | None,
    now: datetime,
    plan: Plan | None = None,
    *,
    replies: Mapping[tuple[str, str], str] | None = None,
    superseded_by: str | None = None,
    by_email: Mapping[str, Contact] | None = None,
    invalid: Sequence[InvalidContact] = (),
) -> Plan:
    """Plan one step whose time has come (``step.at <= now``). See README "Delivery rules".

    :param rows: this step's ledger rows by email.
    :param started_at: when a pass first handled this step (None: this is the first pass).
    :param replies: ``{(event, email): PARTSTAT}`` for ``audience.rsvp``.
    :param superseded_by: for an update/cancel step, the id of a later one for the same event.
    :param invalid: contact rows whose address cannot be used: each one the step's lists/tags
        include is recorded ``invalid`` with its reason (never for updates and cancellations,
        which go only to people who got the calendar entry).
    """
    out = plan if plan is not None else Plan()
    event = campaign.event(step.event)
    policy = campaign.delivery
    replies = replies or {}
    out.steps_due.append(step)
    in_audience: set[str] = set()
    # A local step's copies for each zone carry their own time; step.at is the campaign zone's.
    reminder_late = step.kind is StepKind.REMINDER and not step.local and now > step.at + policy.late_after
    started = now >= event.start
    first_pass = started_at is None or started_at >= now
    dynamic = step.kind.revises
    # Issue 13: the organiser is never an ATTENDEE of its own meeting (`check` warns too).
    calendar = step.attach_ics or dynamic
    organiser = address_key(campaign.sender.organizer)

    def skip(email: str, name: str, status: Status, why: str, st: Step = step) -> None:
        out.skips.append(Skip(st, event, email, name, status, why))

    # A ``local`` step is due per recipient (issue 13): each gets a copy of the step whose ``at``
    # is their own send time, so the ledger's due_at and the template's step.at are theirs.
    per_zone: dict[str, Step] = {}

    def step_for(c: Contact) -> Step:
        if not step.local:
            return step
        tz = zone_of(campaign, c)
        st = per_zone.get(tz.key)
        if st is None:
            st = per_zone[tz.key] = replace(step, at=step.at_in(tz))
        return st

    if dynamic:
        # Updates and cancellations go to the people recorded for them (everyone who has the
        # calendar entry), even if they have since left the contact lists.
        by_email = by_email if by_email is not None else {c.email: c for c in contacts}
        audience: Iterable[Contact] = [
            by_email.get(email) or Contact(email, row.name) for email, row in rows.items()
        ]
    else:
        audience = (c for c in contacts if step.audience.matches(c.lists, c.tags))

    latest = step.at
    for c in audience:
        in_audience.add(c.email)
        row = rows.get(c.email)
        if row is not None and row.status in FINAL:
            continue
        st = step_for(c)
        if st is not step:
            latest = max(latest, st.at)
            if row is None and st.at > now:  # not yet their hour: look again then
                if event.status is not EventStatus.CANCELLED:
                    out._wake(st.at)
                continue
        if c.email.lower() in suppressed:
            skip(c.email, c.name, Status.SUPPRESSED, f"address suppressed: {suppressed[c.email.lower()]}", st)
        elif calendar and address_key(c.email) == organiser:
            skip(c.email, c.name, Status.SKIPPED, ORGANISER_REASON, st)
        elif superseded_by is not None:
            skip(c.email, c.name, Status.SKIPPED, f"superseded by {superseded_by}", st)
        elif event.status is EventStatus.CANCELLED and step.kind is not StepKind.CANCEL:
            skip(c.email, c.name, Status.SKIPPED, "the event is cancelled", st)
        elif started:
            if row is not None and row.attempts:
                skip(
                    c.email,
                    c.name,
                    Status.FAILED,
                    f"gave up after {row.attempts} attempt(s): the event has started",
                    st,
                )
            else:
                skip(c.email, c.name, Status.SKIPPED, "the event had started before this could be sent", st)
        elif row is not None and row.status in (Status.DEFERRED, Status.SENDING):
            # deferred: a 4xx; sending: left by a crash (no next_attempt: due now) or an
            # attempt whose outcome is unknown (due again, identical, at next_attempt).
            if row.next_attempt is not None and row.next_attempt > now:
                out._wake(min(row.next_attempt, event.start))
            else:
                out.due.append(Due(st, event, c, row))
        elif step.audience.rsvp and _answer(replies, event.id, c.email) not in step.audience.rsvp:
            skip(
                c.email,
                c.name,
                Status.SKIPPED,
                f"answered {_answer(replies, event.id, c.email)}; this step is for "
                f"{', '.join(sorted(step.audience.rsvp))}",
                st,
            )
        elif reminder_late or (
            st is not step and step.kind is StepKind.REMINDER and now > st.at + policy.late_after
        ):
            skip(
                c.email,
                c.name,
                Status.SKIPPED,
                f"reminder due {st.at:%Y-%m-%d %H:%M} is more than late_after "
                f"({_fmt(policy.late_after)}) in the past",
                st,
            )
        elif row is None and not first_pass and not policy.late_contacts and not _later_zone(st, started_at):
            skip(
                c.email,
                c.name,
                Status.SKIPPED,
                "added to the contacts after the step went out (delivery.late_contacts is off)",
                st,
            )
        else:
            out.due.append(Due(st, event, c, row))

    for bad in () if dynamic else invalid:
        if not step.audience.matches(bad.lists, bad.tags) or bad.email in in_audience:
            continue
        in_audience.add(bad.email)
        row = rows.get(bad.email)
        if row is None or row.status not in FINAL:
            skip(bad.email, bad.name, Status.INVALID, bad.reason)

    # Someone who left the audience with a mail still open is decided only once the step's
    # window closes: a contact dropped by a bad edit and back before then is mailed after all
    # (issue 12: a half-saved file made ten deferred recipients "no longer in the audience" for
    # good). Until then the row keeps its open status; the planner looks again at the close.
    closes = event.start
    if step.kind is StepKind.REMINDER:
        closes = min(closes, latest + policy.late_after)
    window_open = now < closes and superseded_by is None and event.status is not EventStatus.CANCELLED
    for email, row in rows.items():
        if email not in in_audience and row.status not in FINAL:
            if window_open:
                out._wake(closes)
                continue
            why = "no longer in the step's audience (removed from the contacts or lists)"
            if row.status is Status.SENDING:
                why += "; the outcome of its last attempt is unknown"
            skip(email, row.name, Status.SKIPPED, why)
    return out


def _later_zone(st: Step, started_at: datetime | None) -> bool:
    """A local step's recipient whose own time came after the step's first pass: not "added
    after the step went out", their mail had not gone yet (delivery.late_contacts)."""
    return st.local and started_at is not None and started_at < st.at


def plan(
    campaign: Campaign,
    contacts: Sequence[Contact],
    rows_for: Callable[[str], Mapping[str, Row]],
    suppressed: Mapping[str, str],
    steps_started: Mapping[str, datetime],
    now: datetime,
    *,
    only_steps: Iterable[str] | None = None,
    replies: Mapping[tuple[str, str], str] | None = None,
    dynamic: Sequence[Step] = (),
    invalid: Sequence[InvalidContact] = (),
) -> Plan:
    """Plan every step of ``campaign`` at ``now``, then the update/cancel steps ``dynamic``.

    ``rows_for(step_id)`` returns that step's ledger rows; it is called only for steps whose
    time has come, so memory holds one step's rows at a time. ``invalid``: contact rows whose
    address cannot be used, recorded ``invalid`` in each due step that would include them.
    """
    wanted = set(only_steps) if only_steps is not None else None
    out = Plan()
    for step in campaign.steps:
        if wanted is not None and step.id not in wanted:
            continue
        first = step.at
        if step.local:  # due once its earliest recipient's hour has come
            audience = [c for c in contacts if step.audience.matches(c.lists, c.tags)]
            zones = {zone_of(campaign, c) for c in audience}
            first = min((step.at_in(tz) for tz in zones), default=step.at)
        if first > now:
            if campaign.event(step.event).status is not EventStatus.CANCELLED:
                out._wake(first)
            continue
        plan_step(
            campaign,
            step,
            contacts,
            rows_for(step.id),
            suppressed,
            steps_started.get(step.id),
            now,
            out,
            replies=replies,
            invalid=invalid,
        )
    latest: dict[str, Step] = {}
    for step in dynamic:  # ordered oldest first
        latest[step.event] = step
    by_email = {c.email: c for c in contacts} if dynamic else None
    for step in dynamic:
        if wanted is not None and step.id not in wanted:
            continue
        newer = latest[step.event]
        plan_step(
            campaign,
            step,
            contacts,
            rows_for(step.id),
            suppressed,
            None,
            now,
            out,
            replies=replies,
            superseded_by=newer.id if newer is not step else None,
            by_email=by_email,
        )
    return out


def _fmt(d: timedelta) -> str:
    secs = int(d.total_seconds())
    if secs % 86400 == 0:
        return f"{secs // 86400}d"
    if secs % 3600 == 0:
        return f"{secs // 3600}h"
    return f"{secs // 60}m"

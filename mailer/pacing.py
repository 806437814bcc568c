"""Pacing: send windows, quotas and deadline order, as pure functions (issue 17).

Nothing here reads a clock or does I/O: ``now``, the zone and the times of earlier attempts
are arguments, so a forecast can run the same rules on a virtual clock. The pass
(:class:`mailer.runner.SendPass`) calls :func:`pace` on what the planner found due; the
daemon wakes at :attr:`Paced.wake`.

The building blocks, each usable alone:

- :class:`Window` (``delivery.window`` / ``delivery.days``), :func:`window_open`,
  :func:`next_opening`, :func:`window_closes`: wall-clock hours in a zone, DST-proof.
- :class:`Quota` (``smtp.per_hour`` / ``smtp.per_day``), :func:`quotas`, :func:`allowance`,
  :func:`allowance_all`, :func:`quota_pause`: rolling windows over the times of earlier
  attempts (the ledger's ``attempts``, see :data:`COUNTED`).
- :func:`deadline`, :func:`order_by_deadline`: the order mails go in when not all can go.
- :class:`Hold`: one mail that waits, why (:class:`Wait`) and until when.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar
from zoneinfo import ZoneInfo

from .times import resolve_wall, zone
from .vocab import Attempt, StepKind

if TYPE_CHECKING:  # config imports the schema, which checks windows with Window.parse
    from .config import Campaign, Event, SmtpSettings, Step
    from .contacts import Contact

__all__ = [
    "COUNTED",
    "DAYS",
    "Hold",
    "Paced",
    "Quota",
    "Wait",
    "Window",
    "allowance",
    "allowance_all",
    "campaign_window",
    "counted_since",
    "deadline",
    "is_quota_reply",
    "next_opening",
    "order_by_deadline",
    "pace",
    "quota_pause",
    "quotas",
    "tightest",
    "window_closes",
    "window_open",
]

#: ``delivery.days`` names, Monday first (``datetime.weekday()`` is the index).
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: The attempt outcomes a quota counts: a mail the server took, or may have taken. A deferral
#: (a 4xx such as a quota reply) or a refusal does not count.
COUNTED = frozenset({Attempt.SENT, Attempt.UNKNOWN})
#: Reply codes that can be a quota reply (with "rate" or "quota" in their text).
QUOTA_CODES = frozenset({421, 451, 452, 454})
_QUOTA_WORDS = re.compile(r"\b(rate|quota)", re.IGNORECASE)


class Wait(StrEnum):
    """Why a due mail waits."""

    #: Outside ``delivery.window`` / ``delivery.days`` in the recipient's zone.
    WINDOW = "window"
    #: ``smtp.per_hour`` / ``smtp.per_day`` used up (counted from the ledger).
    QUOTA = "quota"
    #: The server answered a quota reply (421/451/452/454 with "rate" or "quota").
    SERVER = "server"


@dataclass(frozen=True)
class Window:
    """Send hours: ``opens``-``closes`` wall time, on ``days`` (weekday numbers, Monday 0).

    ``closes`` <= ``opens`` crosses midnight (``"20:00-06:00"``): the night belongs to the day
    it opened on, so ``days: [fri]`` sends from Friday 20:00 to Saturday 06:00. ``"24:00"`` as
    the close is midnight. Wall times: at a DST change the window still opens at 08:00 on the
    clock (an opening the clock skips, 02:30 on the spring-forward night, is the moment after
    the jump plus the same distance, as :func:`mailer.times.resolve_wall`).
    """

    opens: time
    closes: time
    days: frozenset[int] = frozenset(range(7))
    text: str = ""

    @classmethod
    def parse(cls, text: str, days: Iterable[str] | None = None) -> Window:
        """``"08:00-20:00"`` and optional day names (:data:`DAYS`).

        >>> w = Window.parse("20:00-06:00", ["fri"])
        >>> w.opens, w.closes, sorted(w.days), w.crosses_midnight
        (datetime.time(20, 0), datetime.time(6, 0), [4], True)

        :raises ValueError: not ``HH:MM-HH:MM``, an empty window, or an unknown day.
        """
        m = re.fullmatch(r"\s*(\d{1,2}):(\d\d)\s*-\s*(\d{1,2}):(\d\d)\s*", text)
        if not m:
            raise ValueError(f"{text!r} is not a window; write e.g. 08:00-20:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        label = f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"
        if h2 == 24 and m2 == 0:
            h2 = 0
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"{text!r}: hours are 00-23 (24:00 as the close), minutes 00-59")
        if (h1, m1) == (h2, m2):
            raise ValueError(f"{text!r} opens and closes at the same time; leave window out to send any time")
        nums = frozenset(range(7))
        if days is not None:
            names = [d.strip().lower()[:3] for d in days]
            bad = [d for d in names if d not in DAYS]
            if bad:
                raise ValueError(f"unknown day {bad[0]!r}; write mon, tue, wed, thu, fri, sat or sun")
            if not names:
                raise ValueError("days is empty; leave it out to send on every day")
            nums = frozenset(DAYS.index(d) for d in names)
        if len(nums) < 7:
            label += " " + ",".join(DAYS[i] for i in sorted(nums))
        return cls(time(h1, m1), time(h2, m2), nums, label)

    @property
    def crosses_midnight(self) -> bool:
        return self.closes <= self.opens

    def __str__(self) -> str:
        return self.text or f"{self.opens:%H:%M}-{self.closes:%H:%M}"


# Everything is compared in UTC: two datetimes with the same tzinfo compare (and subtract)
# as wall times, which is wrong in the hour a DST change repeats.


def _opening(day: date, window: Window, tz: ZoneInfo) -> datetime:
    return resolve_wall(datetime.combine(day, window.opens), tz)[0].astimezone(UTC)


def _closing(day: date, window: Window, tz: ZoneInfo) -> datetime:
    """When the opening of ``day`` closes."""
    end_day = day + timedelta(days=1) if window.crosses_midnight else day
    return resolve_wall(datetime.combine(end_day, window.closes), tz)[0].astimezone(UTC)


def _periods(
    at: datetime, window: Window, tz: ZoneInfo, ahead: int = 9
) -> Iterable[tuple[datetime, datetime]]:
    """The window's open periods ``[opens, closes)`` from the day before ``at`` on, in order."""
    first = at.astimezone(tz).date() - timedelta(days=1)
    for k in range(ahead + 1):
        day = first + timedelta(days=k)
        if day.weekday() in window.days:
            yield _opening(day, window, tz), _closing(day, window, tz)


def window_open(at: datetime, window: Window | None, tz: ZoneInfo) -> bool:
    """True when ``at`` (aware) is inside ``window`` in zone ``tz``; no window: always.

    >>> bru = ZoneInfo("Europe/Brussels")
    >>> w = Window.parse("22:00-06:00")
    >>> window_open(datetime(2024, 3, 31, 1, 30, tzinfo=bru), w, bru)
    True
    >>> window_open(datetime(2024, 3, 31, 12, 0, tzinfo=bru), w, bru)
    False
    """
    if window is None:
        return True
    u = at.astimezone(UTC)
    return any(o <= u < c for o, c in _periods(at, window, tz, ahead=1))


def next_opening(at: datetime, window: Window | None, tz: ZoneInfo) -> datetime:
    """The first moment at or after ``at`` when ``window`` is open in ``tz``: ``at`` itself
    when it is open (or there is no window), else the next opening (aware, in ``tz``).

    >>> bru = ZoneInfo("Europe/Brussels")
    >>> w = Window.parse("08:00-20:00", ["mon", "tue", "wed", "thu", "fri"])
    >>> next_opening(datetime(2024, 3, 29, 21, 0, tzinfo=bru), w, bru).isoformat()  # a Friday
    '2024-04-01T08:00:00+02:00'
    """
    if window is None:
        return at
    u = at.astimezone(UTC)
    for o, c in _periods(at, window, tz):
        if u < c and o < c:
            return o.astimezone(tz) if o > u else at
    raise AssertionError("a window with at least one day opens within 9 days")  # pragma: no cover


def window_closes(at: datetime, window: Window | None, tz: ZoneInfo) -> datetime | None:
    """When the open period that contains ``at`` closes (aware, in ``tz``); None when ``at``
    is outside the window, or there is no window (it never closes)."""
    if window is None:
        return None
    u = at.astimezone(UTC)
    for o, c in _periods(at, window, tz, ahead=1):
        if o <= u < c:
            return c.astimezone(tz)
    return None


# -- quotas ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """At most ``limit`` counted attempts in any ``period`` (a rolling window): an attempt at
    ``t`` counts while ``now < t + period``. ``name`` is its key (``per_day``)."""

    limit: int
    period: timedelta
    name: str

    def __str__(self) -> str:
        return f"{self.name}: {self.limit}"


def quotas(smtp: SmtpSettings) -> list[Quota]:
    """The quotas ``smtp:`` configures: ``per_hour`` and ``per_day``, in that order."""
    out = []
    if smtp.per_hour is not None:
        out.append(Quota(smtp.per_hour, timedelta(hours=1), "per_hour"))
    if smtp.per_day is not None:
        out.append(Quota(smtp.per_day, timedelta(days=1), "per_day"))
    return out


def allowance(now: datetime, quota: Quota, sent_times: Sequence[datetime]) -> tuple[int, datetime]:
    """How many attempts may go at ``now``, and when one more than that may go.

    :param sent_times: the times of earlier counted attempts (:data:`COUNTED`), any order;
        those before ``now - period`` are ignored, so the whole window's list can be passed.
    :returns: ``(n, next_free_at)``: ``n`` may go now; if those ``n`` go at ``now``, the
        next one may go at ``next_free_at`` (when the oldest attempt in the window leaves it).

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, 12, tzinfo=UTC)
    >>> q = Quota(3, timedelta(days=1), "per_day")
    >>> n, free = allowance(t, q, [t - timedelta(hours=20), t - timedelta(hours=2)])
    >>> n, free.isoformat()
    (1, '2024-01-01T16:00:00+00:00')
    """
    since = now - quota.period
    counted = sorted(t for t in sent_times if t > since)
    n = max(0, quota.limit - len(counted))
    after = counted + [now] * n
    return n, after[len(after) - quota.limit] + quota.period


def allowance_all(
    now: datetime, qs: Sequence[Quota], sent_times: Sequence[datetime]
) -> tuple[int | None, datetime | None]:
    """:func:`allowance` under every quota at once: the smallest ``n`` (None: no quota) and,
    when that is below what is due, the time the limiting quota lets one more go."""
    return tightest(allowance(now, q, sent_times) for q in qs)


def tightest(allowances: Iterable[tuple[int, datetime]]) -> tuple[int | None, datetime | None]:
    """The binding one of several quotas' ``(n, next_free_at)``: the smallest ``n`` (None: no
    quota), on a tie the latest ``next_free_at``. Shared by :func:`allowance_all` and the
    forecast, which computes each quota's allowance over its own history."""
    n: int | None = None
    free: datetime | None = None
    for k, at in allowances:
        if n is None or k < n or (k == n and free is not None and at > free):
            n, free = k, at
    return n, free


def quota_pause(
    now: datetime, qs: Sequence[Quota], sent_times: Sequence[datetime], fallback: timedelta
) -> datetime:
    """Until when to pause after the server answered a quota reply: when the rolling window of
    the longest configured quota next frees a place (its oldest counted attempt leaves it);
    ``now + fallback`` when no quota is configured or nothing was counted in it.

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, 12, tzinfo=UTC)
    >>> q = [Quota(2000, timedelta(days=1), "per_day")]
    >>> quota_pause(t, q, [t - timedelta(hours=3), t - timedelta(hours=1)], timedelta(hours=1)).hour
    9
    """
    if qs:
        longest = max(qs, key=lambda q: q.period)
        counted = [t for t in sent_times if t > now - longest.period]
        if counted:
            return max(min(counted) + longest.period, now + timedelta(minutes=1))
    return now + fallback


def is_quota_reply(code: int | None, text: str) -> bool:
    """A 4xx reply that says a rate or quota is exceeded: sending pauses, not just this mail.

    >>> is_quota_reply(452, "4.5.3 Daily sending quota exceeded"), is_quota_reply(452, "4.3.1 disk full")
    (True, False)
    """
    return code in QUOTA_CODES and bool(_QUOTA_WORDS.search(text or ""))


# -- deadline order and the decision ----------------------------------------------------------


class Pending(Protocol):
    """What :func:`pace` needs of a due mail (a :class:`mailer.planner.Due` is one)."""

    @property
    def step(self) -> Step: ...
    @property
    def event(self) -> Event: ...
    @property
    def contact(self) -> Contact: ...


D = TypeVar("D", bound=Pending)


def _late_limit(step: Step, event: Event, campaign: Campaign) -> datetime:
    if step.kind is StepKind.REMINDER:
        return min(event.start, step.at + campaign.delivery.late_after)
    return event.start


def deadline(d: Pending, campaign: Campaign) -> tuple[datetime, datetime]:
    """The sort key of :func:`order_by_deadline`: the event's start, then the step's lateness
    limit (a reminder: ``at + delivery.late_after``; anything else: the event's start)."""
    return d.event.start, _late_limit(d.step, d.event, campaign)


def order_by_deadline(due: Sequence[D], campaign: Campaign) -> list[D]:
    """``due`` ordered by :func:`deadline`, soonest first; within one deadline the original
    order (a stable sort), so a reminder for tomorrow's event goes before next month's
    invitations."""
    return sorted(due, key=lambda d: deadline(d, campaign))


@dataclass(frozen=True)
class Hold:
    """A due mail that waits: ``step``, ``event`` and ``email`` say which, ``why`` what for,
    ``until`` when it may go (the window's next opening, the quota's next free place, the end
    of a server's quota pause), ``detail`` says it in words."""

    step: str
    event: str
    email: str
    why: Wait
    until: datetime
    detail: str


@dataclass
class Paced(Generic[D]):
    """What :func:`pace` decided.

    ``go``: what may be handed to SMTP now, in the order to send it. ``holds``: what waits.
    ``outside``: ``{(step id, email): reason}`` for mails that go although their window is
    closed (their deadline comes before it opens again); the pass records the reason.
    ``wake``: the earliest ``Hold.until`` (None: nothing waits).
    """

    go: list[D] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    outside: dict[tuple[str, str], str] = field(default_factory=dict)
    wake: datetime | None = None

    def waiting(self) -> dict[tuple[str, Wait], tuple[int, datetime]]:
        """``{(step id, why): (how many, earliest until)}``: a per-step summary for displays."""
        out: dict[tuple[str, Wait], tuple[int, datetime]] = {}
        for h in self.holds:
            n, until = out.get((h.step, h.why), (0, h.until))
            out[(h.step, h.why)] = (n + 1, min(until, h.until))
        return out

    def reasons(self) -> dict[Wait, tuple[int, datetime, str]]:
        """``{why: (how many, earliest until, one detail)}``: what the daemon logs."""
        out: dict[Wait, tuple[int, datetime, str]] = {}
        for h in self.holds:
            n, until, detail = out.get(h.why, (0, h.until, h.detail))
            out[h.why] = (n + 1, min(until, h.until), detail if until <= h.until else h.detail)
        return out


def campaign_window(campaign: Campaign) -> Window | None:
    """The campaign's ``delivery.window`` and ``delivery.days`` (None: send at any hour)."""
    d = campaign.delivery
    return None if d.window is None else Window.parse(d.window, d.days)


def zone_of(campaign: Campaign, contact: Contact) -> ZoneInfo:
    """The zone a recipient's window is read in: their ``timezone`` column, else the campaign's."""
    return (zone(contact.timezone) if contact.timezone else None) or campaign.timezone


def pace(
    due: Sequence[D],
    campaign: Campaign,
    now: datetime,
    sent_times: Sequence[datetime] = (),
    *,
    paused_until: datetime | None = None,
    window: Window | None = None,
) -> Paced[D]:
    """Decide which of ``due`` go at ``now``. Pure: the same arguments, the same answer.

    1. Window (``window``, else the campaign's ``delivery.window``, read in each recipient's
       zone): a mail outside it waits for its :func:`next_opening` (:attr:`Wait.WINDOW`),
       unless its deadline (the event's start; a reminder's lateness limit) comes before that
       opening: then it goes now, its reason in :attr:`Paced.outside`.
    2. Server pause: while ``paused_until > now`` nothing goes (:attr:`Wait.SERVER`).
    3. Quotas (``smtp.per_hour``/``per_day`` over ``sent_times``, :func:`allowance_all`): when
       fewer may go than remain, the remaining are ordered by :func:`deadline` and the first
       ``n`` go; the rest wait (:attr:`Wait.QUOTA`) until the next free place.

    What goes is in deadline order whenever anything waits or ``smtp.rate``/``per_hour``
    throttles the pass, else in the planner's order.

    :param sent_times: times of the counted attempts (:data:`COUNTED`) in the last day at least.
    """
    out: Paced[D] = Paced()
    win = window if window is not None else campaign_window(campaign)
    candidates: list[D] = []
    openings: dict[str, datetime] = {}
    details: dict[str, str] = {}
    for d in due:
        if win is None:
            candidates.append(d)
            continue
        tz = zone_of(campaign, d.contact)
        opening = openings.get(tz.key)
        if opening is None:  # one look per zone, not per mail
            opening = openings[tz.key] = next_opening(now, win, tz)
        if opening == now:
            candidates.append(d)
            continue
        limit = min(deadline(d, campaign))
        if limit <= opening:
            why = "the event starts" if limit == d.event.start else "the reminder would be late"
            out.outside[(d.step.id, d.contact.email)] = (
                f"sent outside the delivery window ({win}): {why} {limit.astimezone(tz):%Y-%m-%d %H:%M}, "
                f"before it opens again at {opening:%Y-%m-%d %H:%M} ({tz.key})"
            )
            candidates.append(d)
        else:
            detail = details.get(tz.key)
            if detail is None:
                detail = details[tz.key] = (
                    f"outside the delivery window {win} ({tz.key}); opens {opening:%a %Y-%m-%d %H:%M}"
                )
            out.holds.append(Hold(d.step.id, d.event.id, d.contact.email, Wait.WINDOW, opening, detail))
    n: int | None
    free: datetime | None
    if paused_until is not None and paused_until > now:
        n, free = 0, paused_until
        why, detail = (
            Wait.SERVER,
            f"the server answered a quota reply; paused until {paused_until:%Y-%m-%d %H:%M} UTC",
        )
    else:
        n, free = allowance_all(now, quotas(campaign.smtp), sent_times)
        why, detail = Wait.QUOTA, ""
    throttled = campaign.smtp.rate is not None or campaign.smtp.per_hour is not None
    if out.holds or throttled or (n is not None and n < len(candidates)):
        candidates = order_by_deadline(candidates, campaign)
    if n is not None and n < len(candidates):
        assert free is not None
        if why is Wait.QUOTA:
            names = ", ".join(str(q) for q in quotas(campaign.smtp))
            detail = f"quota used up ({names}); the next place frees at {free:%Y-%m-%d %H:%M} UTC"
        for d in candidates[n:]:
            out.outside.pop((d.step.id, d.contact.email), None)
            out.holds.append(Hold(d.step.id, d.event.id, d.contact.email, why, free, detail))
        candidates = candidates[:n]
    out.go = candidates
    out.wake = min((h.until for h in out.holds), default=None)
    return out


def counted_since(times: Iterable[tuple[datetime, str]], since: datetime) -> list[datetime]:
    """The counted attempt times (:data:`COUNTED`) after ``since`` from ``(at, outcome)`` pairs."""
    return [at for at, outcome in times if at > since and outcome in COUNTED]

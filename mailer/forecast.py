"""Foresight (issue 17): when each step's mails are expected to go, under the quotas, the send
window and ``rate:``, and which steps cannot finish before their event (or ``late_after``).

Pure: the campaign, the contacts, what the ledger already holds and ``now`` are arguments.
:func:`forecast` runs the same rules as a real run (the planner's due times, then
:func:`mailer.pacing.pace`: the window in each recipient's zone, the "goes outside the window
when its event comes first" rule, the rolling quotas, deadline order) on a virtual clock that
jumps from one wake-up to the next, like the daemon. It moves whole groups at a time (a step's
recipients in one zone), not mail by mail, so 100,000 contacts x 6 steps take milliseconds;
tests/test_forecast.py holds it equal to the mail-by-mail simulation and to a real run against
an SMTP server.

Assumptions (what a forecast cannot know): every mail is accepted at the first try (no
deferrals), nobody unsubscribes or answers before their mail (a step for ``audience.rsvp``
counts its whole audience). Mails whose turn comes after their event starts (or a reminder's
``late_after``) are skipped, as a real run does; the step's problem then says when it would
have finished (a second simulation in which nothing is skipped).

:func:`waiting` is the same decision at one moment for ``mailer status``: per step, what the
window or the quota holds back and until when.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from . import pacing
from .pacing import Quota, Wait, Window
from .vocab import EventStatus, StepKind

if TYPE_CHECKING:
    from .config import Campaign, Step
    from .contacts import Contact
    from .errors import Problem
    from .workspace import Workspace

__all__ = [
    "LedgerState",
    "StepForecast",
    "check_section",
    "forecast",
    "ledger_state",
    "paced",
    "render_lines",
    "waiting",
]


@dataclass(frozen=True)
class StepForecast:
    """One step's forecast. ``recipients``: mails still to go; ``first``/``last``: when the
    first and the last of them are expected to go (None: nothing to send); ``starts``: the
    event's start; ``limit``: the latest a mail may go (the event's start; a reminder's
    ``at + late_after`` when sooner); ``missed``: how many of ``recipients`` a run would skip
    because their turn comes too late; ``problem``: then why, and when the step would finish."""

    step: str
    event: str
    recipients: int
    first: datetime | None
    last: datetime | None
    starts: datetime
    limit: datetime
    missed: int = 0
    problem: str | None = None


@dataclass(frozen=True)
class LedgerState:
    """What the ledger already holds: ``done`` per step the addresses whose mail needs nothing
    more (a final status), ``sent_times`` the counted attempts (:data:`mailer.pacing.COUNTED`)
    of the last day, ``paused_until`` a server's quota pause still running."""

    done: Mapping[str, Collection[str]] = field(default_factory=dict)
    sent_times: Sequence[datetime] = ()
    paused_until: datetime | None = None


def paced(campaign: Campaign) -> bool:
    """True when anything spreads mails over time: a quota, a send window, or ``rate:``."""
    return (
        bool(pacing.quotas(campaign.smtp)) or campaign.delivery.window is not None or bool(campaign.smtp.rate)
    )


# -- the sent history as ramps -----------------------------------------------------------------


@dataclass
class _Ramp:
    """``n`` attempts at ``t0``, ``t0 + dt``, ... (one pass at ``rate:``; dt 0 without)."""

    t0: datetime
    n: int
    dt: timedelta

    def after(self, since: datetime) -> int:
        """The index of the first attempt later than ``since``."""
        if self.t0 > since:
            return 0
        if not self.dt:
            return self.n
        return min(self.n, (since - self.t0) // self.dt + 1)


def _allowance(now: datetime, q: Quota, hist: Sequence[_Ramp]) -> tuple[int, datetime]:
    """:func:`mailer.pacing.allowance` over ramps instead of a list of times."""
    since = now - q.period
    live = [(r, r.after(since)) for r in hist]
    counted = sum(r.n - i for r, i in live)
    n = max(0, q.limit - counted)
    k = max(0, counted - q.limit) if n == 0 else 0  # which counted attempt (oldest 0) frees a place
    if counted == 0:
        return n, now + q.period
    for r, i in live:
        if r.n - i > k:
            return n, r.t0 + (i + k) * r.dt + q.period
        k -= r.n - i
    raise AssertionError("unreachable")  # pragma: no cover


def _allowance_all(
    now: datetime, qs: Sequence[Quota], hist: Sequence[_Ramp]
) -> tuple[int | None, datetime | None]:
    return pacing.tightest(_allowance(now, q, hist) for q in qs)


# -- groups: a step's recipients in one zone ------------------------------------------------------


@dataclass
class _Group:
    step: Step  # for a local step, the copy with this zone's time (as the planner makes it)
    index: int  # the step's place in the campaign
    order: int  # the zone's first appearance in the step's audience
    tz: ZoneInfo
    left: int
    key: tuple[datetime, datetime]  # pacing.deadline
    first: datetime | None = None
    last: datetime | None = None
    missed: int = 0
    #: The places of this group's mails in the step's audience, kept when the step has several
    #: zones: a quota that lets only some of a step go takes them in the audience's order
    #: (the planner's), whichever zone they are in; ``head``: how many of them went.
    pos: list[int] = field(default_factory=list)
    head: int = 0


def _late_limit(step: Step, start: datetime, late_after: timedelta) -> datetime:
    return min(start, step.at + late_after) if step.kind is StepKind.REMINDER else start


def _groups(
    campaign: Campaign,
    audience: Callable[[Step], Iterable[Contact]],
    done: Mapping[str, Collection[str]],
) -> list[_Group]:
    out: list[_Group] = []
    zones: dict[str | None, ZoneInfo] = {}
    for index, step in enumerate(campaign.steps):
        event = campaign.event(step.event)
        if event.status is EventStatus.CANCELLED and step.kind is not StepKind.CANCEL:
            continue
        skip = done.get(step.id, ())
        by_zone: dict[str, _Group] = {}
        for c in audience(step):
            if skip and c.email in skip:
                continue
            tz = zones.get(c.timezone)
            if tz is None:
                tz = zones[c.timezone] = pacing.zone_of(campaign, c)
            g = by_zone.get(tz.key)
            if g is None:
                st = step
                if step.local:
                    from dataclasses import replace

                    st = replace(step, at=step.at_in(tz))
                limit = _late_limit(st, event.start, campaign.delivery.late_after)
                g = by_zone[tz.key] = _Group(st, index, len(by_zone), tz, 0, (event.start, limit))
            g.left += 1
        if len(by_zone) > 1:  # again, for the places (most steps have one zone: no list)
            for i, c in enumerate(audience(step)):
                if not (skip and c.email in skip):
                    by_zone[zones[c.timezone].key].pos.append(i)
        out += by_zone.values()
    return out


@dataclass
class _Decision:
    go: list[tuple[_Group, int]]
    holds: list[tuple[_Group, int, Wait, datetime]]


def _decide(
    due: Sequence[_Group],
    campaign: Campaign,
    now: datetime,
    hist: Sequence[_Ramp],
    window: Window | None,
    paused_until: datetime | None,
) -> _Decision:
    """:func:`mailer.pacing.pace` for whole groups (each group's mails share zone and deadline)."""
    out = _Decision([], [])
    candidates: list[_Group] = []
    openings: dict[str, datetime] = {}
    for g in due:
        if window is None:
            candidates.append(g)
            continue
        opening = openings.get(g.tz.key)
        if opening is None:
            opening = openings[g.tz.key] = pacing.next_opening(now, window, g.tz)
        if opening == now or min(g.key) <= opening:
            candidates.append(g)
        else:
            out.holds.append((g, g.left, Wait.WINDOW, opening))
    n: int | None
    free: datetime | None
    if paused_until is not None and paused_until > now:
        n, free, why = 0, paused_until, Wait.SERVER
    else:
        n, free = _allowance_all(now, pacing.quotas(campaign.smtp), hist)
        why = Wait.QUOTA
    candidates.sort(key=lambda g: (g.key, g.index, g.order))
    for _, same in itertools.groupby(candidates, key=lambda g: (g.key, g.index)):
        block = list(same)  # one step's groups with one deadline: in the planner's order
        total = sum(g.left for g in block)
        budget = total if n is None else min(n, total)
        if n is not None:
            n -= budget
        for g, k in zip(block, _share(block, budget, total), strict=True):
            if k:
                out.go.append((g, k))
                g.head += k if g.pos else 0
            if k < g.left:
                assert free is not None
                out.holds.append((g, g.left - k, why, free))
    return out


def _share(block: Sequence[_Group], budget: int, total: int) -> list[int]:
    """How many of each group's mails go when ``budget`` of the block's may: the first
    ``budget`` in the audience's order (:attr:`_Group.pos`), as the planner lists them."""
    if budget == total or len(block) == 1 or not all(g.pos for g in block):
        out = []
        for g in block:
            out.append(min(budget, g.left))
            budget -= out[-1]
        return out
    taken = [0] * len(block)
    merged = heapq.merge(*(_left(g, i) for i, g in enumerate(block)))
    for _, i in itertools.islice(merged, budget):
        taken[i] += 1
    return taken


def _left(g: _Group, i: int) -> Iterator[tuple[int, int]]:
    """The places of ``g``'s mails still to go, tagged ``i``."""
    for j in range(g.head, len(g.pos)):
        yield g.pos[j], i


def _simulate(
    campaign: Campaign,
    groups: list[_Group],
    now: datetime,
    state: LedgerState,
    *,
    skip_late: bool = True,
    max_passes: int = 200_000,
) -> None:
    """Run the groups through passes on a virtual clock; fills each group's first and last.
    With ``skip_late`` (a real run) the planner's lateness rules skip what is still waiting
    once the event starts or a reminder is more than ``late_after`` late (``missed``);
    without, everything goes (when a step would finish)."""
    late_after = campaign.delivery.late_after
    window = pacing.campaign_window(campaign)
    qs = pacing.quotas(campaign.smtp)
    longest = max((q.period for q in qs), default=timedelta(0))
    rate = campaign.smtp.rate
    dt = timedelta(seconds=1 / rate) if rate else timedelta(0)
    hist = [_Ramp(t.astimezone(UTC), 1, timedelta(0)) for t in sorted(state.sent_times)]
    now = now.astimezone(UTC)
    waiting = sorted((g for g in groups if g.left), key=lambda g: g.step.at)
    for _ in range(max_passes):
        due = [g for g in waiting if g.step.at <= now]
        if skip_late:
            for g in due:
                if now >= g.key[0] or (g.step.kind is StepKind.REMINDER and now > g.step.at + late_after):
                    g.missed, g.left = g.left, 0
            due = [g for g in due if g.left]
            waiting = [g for g in waiting if g.left]
        later = min((g.step.at for g in waiting if g.step.at > now), default=None)
        if not due:
            if later is None:
                return
            now = later.astimezone(UTC)
            continue
        d = _decide(due, campaign, now, hist, window, state.paused_until)
        sent = 0
        for g, k in d.go:
            if g.first is None:
                g.first = now + sent * dt
            g.last = now + (sent + k - 1) * dt
            g.left -= k
            sent += k
        if sent:
            # Counted at the pass's start: with ``rate:`` a real pass spreads its attempts, and
            # the rolling window frees them one by one as fast as the rate sends again, so the
            # next pass starts at the same moment either way (and a pass per freed place, one
            # mail each, would cost 100,000 passes).
            hist.append(_Ramp(now, sent, timedelta(0)))
            if qs:
                cut = now - longest
                while hist and hist[0].t0 + (hist[0].n - 1) * hist[0].dt <= cut:
                    hist.pop(0)
        waiting = [g for g in waiting if g.left]
        wake = min(filter(None, (later, *(until for _, _, _, until in d.holds))), default=None)
        if wake is None:
            return
        end = now + (sent - 1) * dt if sent else now
        now = max(wake.astimezone(UTC), end)
    raise AssertionError("the forecast did not end")  # pragma: no cover


# -- the public API ------------------------------------------------------------------------------


def forecast(
    campaign: Campaign,
    contacts: Sequence[Contact],
    state: LedgerState | None,
    now: datetime,
    *,
    audience: Callable[[Step], Iterable[Contact]] | None = None,
) -> list[StepForecast]:
    """Per step of the campaign (in its order): how many mails are left, when the first and
    the last of them are expected to go (of those a real run sends), ``missed``: how many a
    real run would skip because they wait past the event's start or the reminder's
    ``late_after``; a problem when the pacing is why (not when the event has started already
    or the reminder's time is long past: the planner skips those however fast mails go),
    saying when the step would finish.

    :param state: what the ledger holds (None: nothing sent yet).
    :param audience: the step's contacts (default: those of ``contacts`` its audience matches);
        :meth:`mailer.workspace.Workspace.audience` caches them.
    """
    state = state or LedgerState()

    def matches(step: Step) -> Iterable[Contact]:
        return (c for c in contacts if step.audience.matches(c.lists, c.tags))

    late_after = campaign.delivery.late_after

    def too_late(g: _Group) -> bool:
        """Late at its own time, however fast mails go (an event that has started, a reminder
        long past): the planner skips it; not a pacing problem."""
        t = max(g.step.at, now)
        return t >= g.key[0] or (g.step.kind is StepKind.REMINDER and t > g.step.at + late_after)

    groups = _groups(campaign, audience or matches, state.done)
    total = [g.left for g in groups]
    _simulate(campaign, groups, now, state)
    unskipped: list[_Group] = []
    if any(g.missed and not too_late(g) for g in groups):  # when would they finish, nothing skipped
        unskipped = _groups(campaign, audience or matches, state.done)
        for g in unskipped:
            if too_late(g):
                g.left = 0
        _simulate(campaign, unskipped, now, state, skip_late=False)
    out = []
    for index, step in enumerate(campaign.steps):
        event = campaign.event(step.event)
        mine = [(g, n) for g, n in zip(groups, total, strict=True) if g.index == index]
        limit = min(
            (g.key[1] for g, _ in mine), default=_late_limit(step, event.start, campaign.delivery.late_after)
        )
        missed = sum(g.missed for g, _ in mine)
        n = sum(k for _, k in mine)
        problem = None
        # Skipped at a later pass, or sent after the limit by a long pass (rate:, the pass sends
        # what it started with)
        if any(not too_late(g) and (g.missed or (g.last and g.last > g.key[1])) for g, _ in mine):
            ran = [g for g in unskipped or groups if g.index == index and not too_late(g)]
            lasts = [(g.last, g.key[1]) for g in ran if g.last is not None]
            last, lim = max(lasts, key=lambda x: x[0] - x[1])
            paced_out = sum(g.missed for g, _ in mine if not too_late(g))
            problem = _problem(campaign, step, n, paced_out, last, lim, lim == event.start)
        out.append(
            StepForecast(
                step.id,
                step.event,
                n,
                min((g.first for g, _ in mine if g.first is not None), default=None),
                max((g.last for g, _ in mine if g.last is not None), default=None),
                event.start,
                limit,
                missed,
                problem,
            )
        )
    return out


def _pace_text(campaign: Campaign) -> str:
    """How fast the campaign may send: "2,000/day", "500/hour", "10/s", and the window."""
    s = campaign.smtp
    parts = []
    if s.per_day is not None:
        parts.append(f"{s.per_day:,}/day")
    if s.per_hour is not None:
        parts.append(f"{s.per_hour:,}/hour")
    if s.rate:
        parts.append(f"{s.rate:g}/s")
    w = pacing.campaign_window(campaign)
    if w is not None:
        parts.append(f"in {w}")
    return " ".join(parts) if parts else "without limits"


def _problem(
    campaign: Campaign, step: Step, n: int, missed: int, last: datetime, limit: datetime, starts: bool
) -> str:
    tz = campaign.timezone
    last_l, limit_l = last.astimezone(tz), limit.astimezone(tz)
    same_day = last_l.date() == limit_l.date()
    lim = f"{limit_l:%H:%M}" if same_day else f"{limit_l:%a %d %b %H:%M}"
    what = f"after the event starts at {lim}" if starts else f"after its late_after limit {lim}"
    knobs = [q for q in ("per_day", "per_hour", "rate") if getattr(campaign.smtp, q)]
    if campaign.delivery.window is not None:
        knobs.append("widen delivery.window")
    raise_ = "raise " + " or ".join(knobs) if knobs else ""
    # Move the step so that the same spread ends before the limit: earlier by the overshoot.
    event = campaign.event(step.event)
    days = (event.start - step.at + (last - limit)) // timedelta(days=1) + 1
    advice = ", ".join(filter(None, (raise_, f"move the step to -{days}d")))
    advice = advice.replace(", move", " or move", 1)
    return (
        f"{step.id}: {n:,} recipients at {_pace_text(campaign)} finishes {last_l:%a %d %b %H:%M}, "
        f"{what}; {advice}" + (f" ({missed:,} would not be sent)" if missed else "")
    )


def render_lines(rows: Sequence[StepForecast], tz: ZoneInfo) -> list[tuple[str, ...]]:
    """The rows of check's Forecast table: step, recipients, first, last, deadline, note."""

    def t(x: datetime | None) -> str:
        return f"{x.astimezone(tz):%a %Y-%m-%d %H:%M}" if x is not None else "-"

    return [
        (
            r.step,
            f"{r.recipients:,}",
            t(r.first),
            t(r.last),
            t(r.limit),
            "LATE"
            if r.problem
            else f"{r.missed:,} too late (skipped)"
            if r.missed
            else "in time"
            if r.recipients
            else "nothing to send",
        )
        for r in rows
    ]


def waiting(
    campaign: Campaign,
    pending: Mapping[str, int],
    sent_times: Sequence[datetime],
    now: datetime,
    *,
    paused_until: datetime | None = None,
    zones: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, list[tuple[Wait, int, datetime]]]:
    """For ``mailer status``: per step, how many of its ``pending`` mails (counted from the
    ledger's rows) wait for the window, the quota or a server's pause at ``now``, and until
    when (one entry per reason and time, the soonest first). Pure. ``zones``: per step, how
    many of its pending mails are for recipients of each zone (their ``timezone`` column, as
    :func:`mailer.pacing.zone_of`): the window is read in each one's zone, as the daemon does;
    the rest in the campaign's. Steps whose time has not come (in that zone, for a ``local``
    step) are left out."""
    from dataclasses import replace

    groups = []
    for index, step in enumerate(campaign.steps):
        n = pending.get(step.id, 0)
        if not n:
            continue
        event = campaign.event(step.event)
        split = dict((zones or {}).get(step.id, {}))
        rest = n - sum(split.values())
        if rest > 0 or not split:
            split[campaign.timezone.key] = split.get(campaign.timezone.key, 0) + max(rest, 0)
        for order, (key, k) in enumerate(split.items()):
            tz = campaign.timezone if key == campaign.timezone.key else ZoneInfo(key)
            st = replace(step, at=step.at_in(tz)) if step.local else step
            if k and st.at <= now:
                limit = _late_limit(st, event.start, campaign.delivery.late_after)
                groups.append(_Group(st, index, order, tz, k, (event.start, limit)))
    hist = [_Ramp(t.astimezone(UTC), 1, timedelta(0)) for t in sorted(sent_times)]
    d = _decide(groups, campaign, now, hist, pacing.campaign_window(campaign), paused_until)
    per: dict[str, dict[tuple[Wait, datetime], int]] = {}
    for g, k, why, until in d.holds:
        at = per.setdefault(g.step.id, {})
        at[(why, until)] = at.get((why, until), 0) + k
    return {
        step: [(why, k, until) for (why, until), k in sorted(at.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
        for step, at in per.items()
    }


def ledger_state(path: Path, campaign: Campaign, now: datetime) -> LedgerState:
    """What the campaign's ledger at ``path`` already holds (nothing when there is none yet, or
    it cannot be read: ``check`` then forecasts from scratch)."""
    from .errors import MailerError
    from .ledger import Ledger
    from .vocab import FINAL

    if not path.exists():
        return LedgerState()
    try:
        with Ledger.read(path) as ledger:
            done = {
                s.id: {e for e, r in ledger.step_rows(campaign.id, s.id).items() if r.status in FINAL}
                for s in campaign.steps
            }
            day = now - timedelta(days=1)
            times = pacing.counted_since(ledger.attempt_times(day), day)
    except MailerError:
        return LedgerState()
    return LedgerState(done, times)


def check_section(ws: Workspace, now: datetime) -> list[Problem]:
    """``mailer check``'s Forecast section: per step the mails left, when the first and last are
    expected to go, and the step's deadline; printed when the campaign sets a quota or a send
    window (with ``rate:`` alone, only when a step cannot finish in time). A step that cannot
    finish in time is a warning."""
    from .clikit import out, table
    from .errors import Problem, display_path

    c = ws.campaign
    if not paced(c):
        return []
    rows = forecast(c, ws.contacts, ledger_state(c.ledger, c, now), now, audience=ws.audience)
    limited = bool(pacing.quotas(c.smtp)) or c.delivery.window is not None
    if not limited and not any(r.problem for r in rows):
        return []  # rate: alone, every step in time: the schedule above says it all
    t = table(
        f"Forecast at {_pace_text(c)} (from {now.astimezone(c.timezone):%a %Y-%m-%d %H:%M})",
        ("step", "recipients", "first goes", "last goes", "deadline", ""),
    )
    for line in render_lines(rows, c.timezone):
        t.add_row(*line)
    out.print(t)
    return [
        Problem(display_path(c.config_path), r.problem, "steps", "warning", step=r.step)
        for r in rows
        if r.problem is not None
    ]

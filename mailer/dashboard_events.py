"""The staff's event pages (issue 12): for an event picked from a list, who is coming, who has not
answered, who was not reached and why, and what is still to be sent and when, with bar charts
drawn on the server as inline SVG (no JavaScript, no chart library).

Everything here reads the ledger through a connection Datasette opened read-only; the campaign's
configured steps (from schedules.yaml, which ``mailer dashboard`` loads) come in as a
:class:`Plan`. Each query keeps to the ledger's existing indexes: ``deliveries_by_event_email``
(event, campaign, email, status) for the per-person sections, ``delivery_counts`` for the step
counts, the ``replies`` primary key (campaign, event, email) for the answers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from markupsafe import Markup

from .ledger import CURRENT_REPLY
from .vocab import FINAL, OPEN, Status, StepKind, sql_list

if TYPE_CHECKING:
    from .config import Campaign

__all__ = [
    "ANSWER_COLOURS",
    "LIST_LIMIT",
    "STATUS_COLOURS",
    "EventReport",
    "Overview",
    "Plan",
    "PlannedEvent",
    "PlannedStep",
    "bar",
    "event_report",
    "overview",
]

#: Rows a section lists on the page (its heading gives the full count): enough to read through
#: on a laptop; the page stays well under 0.5 s (rendering is most of its time).
LIST_LIMIT = 200

#: Bar colours per delivery status, in the order the segments are drawn.
STATUS_COLOURS: dict[Status, str] = {
    Status.SENT: "#2e7d32",
    Status.SENDING: "#64b5f6",
    Status.PENDING: "#90a4ae",
    Status.DEFERRED: "#ffb300",
    Status.FAILED: "#c62828",
    Status.BOUNCED: "#8e24aa",
    Status.INVALID: "#ef6c00",
    Status.SUPPRESSED: "#6d4c41",
    Status.SKIPPED: "#bdbdbd",
}
#: The answers, as staff say them, with their colours (``None``: no answer yet).
ANSWER_COLOURS: dict[str, str] = {
    "coming": "#2e7d32",
    "maybe": "#f9a825",
    "not coming": "#c62828",
    "no answer yet": "#cfd8dc",
}
_ANSWER_WORD = {"ACCEPTED": "coming", "TENTATIVE": "maybe", "DECLINED": "not coming"}
_NOT_SENT_FINAL = sql_list(frozenset(FINAL - {Status.SENT}))
_OPEN = sql_list(OPEN)


# -- the campaign's plan, from schedules.yaml ---------------------------------------------------


@dataclass(frozen=True)
class PlannedEvent:
    campaign: str
    event: str
    title: str
    start: datetime
    all_day: bool = False


@dataclass(frozen=True)
class PlannedStep:
    campaign: str
    event: str
    step: str
    kind: StepKind
    at: datetime  #: aware


@dataclass(frozen=True)
class Plan:
    """What schedules.yaml says: the events and the steps with their times. Empty when the
    dashboard runs on a ledger alone (``--db`` without a valid schedules.yaml)."""

    events: tuple[PlannedEvent, ...] = ()
    steps: tuple[PlannedStep, ...] = ()

    @classmethod
    def of(cls, campaign: Campaign) -> Plan:
        return cls(
            tuple(PlannedEvent(campaign.id, e.id, e.title, e.start, e.all_day) for e in campaign.events),
            tuple(PlannedStep(campaign.id, s.event, s.id, s.kind, s.at) for s in campaign.steps),
        )

    def to_json(self) -> dict[str, Any]:
        """For Datasette's plugin configuration (plain JSON values)."""
        return {
            "events": [
                {"campaign": e.campaign, "event": e.event, "title": e.title, "start": e.start.isoformat()}
                | ({"all_day": True} if e.all_day else {})
                for e in self.events
            ],
            "steps": [
                {"campaign": s.campaign, "event": s.event, "step": s.step, "kind": str(s.kind)}
                | {"at": s.at.isoformat()}
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            tuple(
                PlannedEvent(
                    e["campaign"],
                    e["event"],
                    e["title"],
                    datetime.fromisoformat(e["start"]),
                    bool(e.get("all_day")),
                )
                for e in data.get("events", ())
            ),
            tuple(
                PlannedStep(
                    s["campaign"], s["event"], s["step"], StepKind(s["kind"]), datetime.fromisoformat(s["at"])
                )
                for s in data.get("steps", ())
            ),
        )


# -- what the pages show ------------------------------------------------------------------------


@dataclass
class StepProgress:
    campaign: str
    event: str
    step: str
    kind: str  #: "" when the step is not in schedules.yaml (an older campaign in the ledger)
    at: str | None  #: configured time, local text
    started: str | None  #: when the first pass of the step ran, local text
    counts: dict[Status, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def chart(self) -> Markup:
        return bar(
            [(s.value, self.counts.get(s, 0), c) for s, c in STATUS_COLOURS.items()],
            label=f"{self.step}: ",
            empty=f"not started: due {self.at}" if self.at else "no mail yet",
        )


@dataclass
class EventSummary:
    campaign: str
    event: str
    title: str
    start: str | None
    answers: dict[str, int] = field(default_factory=dict)  #: coming, maybe, not coming

    @property
    def key(self) -> str:
        return f"{self.campaign}/{self.event}"

    @property
    def label(self) -> str:
        shown = f"{self.event}: {self.title}" if self.title else self.event
        return f"{shown} ({self.campaign})"


@dataclass
class Overview:
    events: list[EventSummary]
    steps: list[StepProgress]
    answer_scale: int


@dataclass
class Person:
    email: str
    name: str
    answer: str = ""  #: coming / maybe / not coming
    answered: str | None = None  #: local time of the answer
    earlier: str = ""  #: an answer to an earlier version of the event (it no longer counts)
    lines: list[Happened] = field(default_factory=list)  #: not reached: what happened to each mail
    last_change: str | None = None


@dataclass
class Happened:
    step: str
    status: Status
    why: str


@dataclass
class Waiting:
    step: str
    email: str
    name: str
    status: Status
    when: str | None  #: next attempt (deferred) or the time it became due (pending)
    attempts: int
    reply: str


@dataclass
class Upcoming:
    step: str
    kind: str
    at: str
    due: bool  #: its time has come: the next pass (`mailer send` or the daemon) sends it


@dataclass
class EventReport:
    summary: EventSummary
    steps: list[StepProgress]
    coming: list[Person]
    coming_count: int
    declined: list[Person]
    declined_count: int
    silent: list[Person]
    silent_count: int
    reached_count: int
    missed: list[Person]
    missed_count: int
    waiting: list[Waiting]
    waiting_count: int
    upcoming: list[Upcoming]

    @property
    def answers_chart(self) -> Markup:
        counts = dict(self.summary.answers)
        counts["no answer yet"] = self.silent_count
        return bar(
            [(word, counts.get(word, 0), colour) for word, colour in ANSWER_COLOURS.items()],
            label="answers: ",
            empty="nobody reached yet",
        )


# -- SVG bars -----------------------------------------------------------------------------------

_BAR_WIDTH = 320
_BAR_HEIGHT = 18


def bar(
    segments: Sequence[tuple[str, int, str]],
    *,
    label: str = "",
    scale: int | None = None,
    empty: str = "none",
    width: int = _BAR_WIDTH,
) -> Markup:
    """A horizontal stacked bar as inline SVG: one segment per ``(word, count, colour)`` with a
    nonzero count, as long as its share of ``scale`` (default: the sum, a full bar). The
    ``aria-label`` and each segment's ``<title>`` (shown on hover) say the numbers in words.

    >>> print(bar([("sent", 3, "green"), ("failed", 1, "red")], label="invite: "))  # doctest: +ELLIPSIS
    <svg class="mailer-bar" ... aria-label="invite: 3 sent, 1 failed"><rect ... width="240.0" ...
    """
    shown = [(w, n, c) for w, n, c in segments if n > 0]
    total = sum(n for _, n, _ in shown)
    words = ", ".join(f"{n:,} {w}" for w, n, _ in shown) or empty
    svg = Markup(
        '<svg class="mailer-bar" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{a}">'
    ).format(w=width, h=_BAR_HEIGHT, a=label + words)
    denominator = max(scale or total, 1)
    x = 0.0
    for word, n, colour in shown:
        w = round(width * n / denominator, 1)
        svg += Markup(
            '<rect x="{x}" y="0" width="{w}" height="{h}" fill="{c}" data-status="{s}">'
            "<title>{n} {s}</title></rect>"
        ).format(x=round(x, 1), w=w, h=_BAR_HEIGHT, c=colour, s=word, n=f"{n:,}")
        x += w
    if not shown:
        svg += Markup('<rect x="0" y="0" width="{w}" height="{h}" fill="#f3f3f3"/>').format(
            w=width, h=_BAR_HEIGHT
        )
    return svg + Markup("</svg>")


# -- the queries --------------------------------------------------------------------------------


def _local(ts: str | datetime | None, tz: ZoneInfo) -> str | None:
    """A stored UTC time (or an aware datetime) as staff read it: ``Sat 02 Feb 2030 11:00 CET``."""
    if ts is None:
        return None
    if isinstance(ts, str):
        return _local_text(ts, tz)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(tz).strftime("%a %d %b %Y %H:%M %Z")


@lru_cache(maxsize=4096)  # mails of one batch share their second
def _local_text(ts: str, tz: ZoneInfo) -> str:
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(tz).strftime("%a %d %b %Y %H:%M %Z")


def _steps(conn: sqlite3.Connection, plan: Plan, tz: ZoneInfo) -> list[StepProgress]:
    """Every step in the ledger (counts from ``delivery_counts``, a few dozen rows whatever the
    ledger's size) and every configured step, in the campaign's order."""
    counts: dict[tuple[str, str], dict[Status, int]] = {}
    for campaign, step, status, n in conn.execute(
        "SELECT campaign, step, status, n FROM delivery_counts WHERE n > 0"
    ):
        counts.setdefault((campaign, step), {})[Status(status)] = n
    started = {(c, s): at for c, s, at in conn.execute("SELECT campaign, step, at FROM steps_started")}
    planned = {(s.campaign, s.step): s for s in plan.steps}
    out: list[StepProgress] = []
    for key in [*planned, *sorted(k for k in counts if k not in planned)]:
        p = planned.get(key)
        if p is not None:
            event = p.event
        else:  # the UNIQUE (campaign, step, email) index finds one of its rows at once
            found = conn.execute(
                "SELECT event FROM deliveries WHERE campaign = ? AND step = ? LIMIT 1", key
            ).fetchone()
            event = found[0] if found else ""
        out.append(
            StepProgress(
                key[0],
                event,
                key[1],
                str(p.kind) if p else "",
                _local(p.at, tz) if p else None,
                _local(started.get(key), tz),
                counts.get(key, {}),
            )
        )
    return out


def _answer_counts(
    conn: sqlite3.Connection, where: str = "", args: Sequence[str] = ()
) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for campaign, event, partstat, n in conn.execute(
        f"SELECT campaign, event, partstat, count(*) FROM replies AS r WHERE {CURRENT_REPLY} {where}"
        " GROUP BY campaign, event, partstat",
        args,
    ):
        word = _ANSWER_WORD.get(str(partstat).upper())
        if word:
            out.setdefault((campaign, event), {})[word] = n
    return out


def _events(steps: Iterable[StepProgress], plan: Plan, tz: ZoneInfo) -> list[EventSummary]:
    planned = {(e.campaign, e.event): e for e in plan.events}
    keys = list(planned)
    keys += [k for k in dict.fromkeys((s.campaign, s.event) for s in steps) if k not in planned and k[1]]
    out = []
    for key in keys:
        e = planned.get(key)
        start = None
        if e is not None:
            start = e.start.astimezone(tz).strftime("%a %d %b %Y") if e.all_day else _local(e.start, tz)
        out.append(EventSummary(key[0], key[1], e.title if e else "", start))
    return out


def overview(conn: sqlite3.Connection, plan: Plan, tz: ZoneInfo) -> Overview:
    """The events to choose from, each with its answers, and the progress of every step."""
    steps = _steps(conn, plan, tz)
    events = _events(steps, plan, tz)
    answers = _answer_counts(conn)
    for e in events:
        e.answers = answers.get((e.campaign, e.event), {})
    scale = max((sum(e.answers.values()) for e in events), default=0)
    return Overview(events, steps, scale)


def event_choices(conn: sqlite3.Connection, plan: Plan, tz: ZoneInfo) -> list[EventSummary]:
    return _events(_steps(conn, plan, tz), plan, tz)


def _why(status: Status, code: int | None, text: str | None, reason: str | None, next_at: str | None) -> str:
    """What staff need to know about a mail that did not arrive, in the ledger's own words. A
    bounce's reply from our server (250) is not the story: its reason holds the DSN's status and
    text."""
    server = " ".join(str(x) for x in (code, text) if x)
    if status is Status.BOUNCED:
        return (reason or "returned as undeliverable").removeprefix("bounced: ").strip() or "returned"
    if status is Status.FAILED:
        return server or reason or "refused"
    if status is Status.DEFERRED:
        return server + (f"; next try {next_at}" if next_at else "")
    return reason or server or ""


def event_report(
    conn: sqlite3.Connection, plan: Plan, tz: ZoneInfo, campaign: str, event: str, now: datetime
) -> EventReport | None:
    """The four answers for one event, or None when neither the ledger nor the plan knows it."""
    steps = [s for s in _steps(conn, plan, tz) if s.campaign == campaign and s.event == event]
    summary = next((e for e in _events(steps, plan, tz) if e.campaign == campaign and e.event == event), None)
    if summary is None:
        return None
    summary.answers = _answer_counts(conn, "AND campaign = ? AND event = ?", (campaign, event)).get(
        (campaign, event), {}
    )
    args = {"c": campaign, "e": event, "limit": LIST_LIMIT}

    # Replies are stored under the address key (mailer.addresses.address_key); deliveries keep
    # the address as the contact list spells it. For an ASCII address the key is lower() (fast,
    # in SQLite); only a non-ASCII one calls the Python function.
    def key(col: str) -> str:
        return f"(CASE WHEN {col} GLOB '*[^ -~]*' THEN address_key({col}) ELSE lower({col}) END)"

    # Names come from the deliveries (replies carry none): one seek on deliveries_by_event_email
    # per person shown, after the LIMIT.
    name_of = (
        "(SELECT max(d.name) FROM deliveries AS d"
        " WHERE d.event = :e AND d.campaign = :c AND d.email = p.email)"
    )

    # 1. who is coming (and, folded away, who is not): the replies' primary key
    def answers(partstats: tuple[str, ...]) -> tuple[list[Person], int]:
        sql = (
            f"SELECT p.email, p.partstat, p.at, {name_of} FROM (SELECT email, partstat, at FROM replies AS r"
            f" WHERE campaign = :c AND event = :e AND partstat IN ({', '.join(repr(p) for p in partstats)})"
            f" AND {CURRENT_REPLY} ORDER BY partstat, email LIMIT :limit) AS p"
        )
        people = [
            Person(email, name or "", _ANSWER_WORD.get(partstat, partstat.lower()), _local(at, tz))
            for email, partstat, at, name in conn.execute(sql, args)
        ]
        return people, sum(summary.answers.get(_ANSWER_WORD[p], 0) for p in partstats)

    coming, coming_count = answers(("ACCEPTED", "TENTATIVE"))
    declined, declined_count = answers(("DECLINED",))

    # 2. reached (a mail of the event was accepted by the server) and no answer that counts.
    # Who was reached and who was missed (section 3) come from one pass over the event's part of
    # the index deliveries_by_event_email (covering: email and status are in it); who of the
    # reached answered, from the event's answers (a seek each). The lists stream out of the
    # index in address order and stop at the LIMIT.
    no_answer = (
        "NOT EXISTS (SELECT 1 FROM replies AS r WHERE r.campaign = :c AND r.event = :e"
        f" AND r.email = {key('p.email')} AND {CURRENT_REPLY})"
    )
    sent = f"max(status = '{Status.SENT}')"
    # One pass over the event's index entries counts all three (issue 16: on a 300,000-row
    # event the page took 0.4-0.6 s). A person is missed when not reached and some mail of theirs
    # is final: "not sent, then not open" skips the second test for the sent rows (9 in 10).
    # Who of the reached answered: a reached address that is its own key (ASCII, lower case:
    # nearly all) is found from the answers' side, a seek per answer on the deliveries' index;
    # only the others are looked up one by one under their key.
    missed_flag = f"max(status <> '{Status.SENT}' AND status NOT IN {_OPEN})"
    own_key = "(p.email = lower(p.email) AND length(CAST(p.email AS BLOB)) = length(p.email))"
    reached_count, missed_count, answered_other, answered_own = conn.execute(
        "SELECT count(*) FILTER (WHERE reached), count(*) FILTER (WHERE NOT reached AND missed),"
        f" count(*) FILTER (WHERE reached AND NOT {own_key} AND NOT {no_answer}),"
        " (SELECT count(*) FROM replies AS r WHERE r.campaign = :c AND r.event = :e"
        f" AND length(CAST(r.email AS BLOB)) = length(r.email) AND {CURRENT_REPLY}"
        " AND EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event = :e AND d.campaign = :c"
        f" AND d.email = r.email AND d.status = '{Status.SENT}'))"
        f" FROM (SELECT email, {sent} AS reached, {missed_flag} AS missed"
        " FROM deliveries WHERE event = :e AND campaign = :c GROUP BY email) AS p",
        args,
    ).fetchone()
    silent_count = reached_count - answered_other - answered_own
    silent = [
        Person(email, name or "", earlier=_ANSWER_WORD.get(earlier or "", ""))
        for email, name, earlier in conn.execute(
            f"SELECT p.email, {name_of}, (SELECT partstat FROM replies AS r WHERE r.campaign = :c"
            f" AND r.event = :e AND r.email = {key('p.email')})"
            f" FROM (SELECT email FROM deliveries WHERE event = :e AND campaign = :c GROUP BY email"
            f" HAVING {sent} = 1 ORDER BY email) AS p WHERE {no_answer} LIMIT :limit",
            args,
        )
    ]

    # 3. not reached: no mail of the event was accepted, and at least one will not be sent
    missed_sql = (
        "SELECT email FROM deliveries WHERE event = :e AND campaign = :c GROUP BY email"
        f" HAVING max(status = '{Status.SENT}') = 0 AND max(status IN {_NOT_SENT_FINAL}) = 1"
    )
    missed: dict[str, Person] = {}
    last: dict[str, str] = {}  # the latest change per person, as stored (UTC text sorts)
    order = {s.step: i for i, s in enumerate(steps)}
    for email, name, step, status, code, text, reason, next_at, updated in conn.execute(
        "SELECT d.email, d.name, d.step, d.status, d.smtp_code, d.smtp_text, d.reason, d.next_attempt,"
        f" d.updated FROM ({missed_sql} ORDER BY email LIMIT :limit) AS m"
        " JOIN deliveries AS d ON d.event = :e AND d.campaign = :c AND d.email = m.email"
        " ORDER BY d.email",
        args,
    ):
        p = missed.setdefault(email, Person(email, name))
        p.name = p.name or name
        st = Status(status)
        p.lines.append(Happened(step, st, _why(st, code, text, reason, _local(next_at, tz))))
        if updated and updated > last.get(email, ""):
            last[email] = updated
            p.last_change = _local(updated, tz)
    for p in missed.values():
        p.lines.sort(key=lambda h: order.get(h.step, len(order)))

    # 4. still to be sent: open rows with their time, then configured steps not started yet
    waiting_count = sum(s.counts.get(st, 0) for s in steps for st in OPEN)
    waiting = [
        Waiting(
            step,
            email,
            name,
            Status(status),
            _local(next_at or due, tz),
            attempts,
            _why(Status(status), code, text, None, None) if status == Status.DEFERRED else "",
        )
        for step, email, name, status, next_at, due, attempts, code, text in conn.execute(
            "SELECT step, email, name, status, next_attempt, due_at, attempts, smtp_code, smtp_text"
            # the index's status column filters; only the rows still open are read
            " FROM deliveries INDEXED BY deliveries_by_event_email"
            f" WHERE event = :e AND campaign = :c AND status IN {_OPEN}"
            " ORDER BY coalesce(next_attempt, due_at), email LIMIT :limit",
            args,
        )
    ]
    upcoming = [
        Upcoming(s.step, str(s.kind), _local(s.at, tz) or "", s.at <= now)
        for s in plan.steps
        if s.campaign == campaign and s.event == event and not _started(steps, s.step)
    ]
    return EventReport(
        summary,
        steps,
        coming,
        coming_count,
        declined,
        declined_count,
        silent,
        silent_count,
        reached_count,
        list(missed.values()),
        missed_count,
        waiting,
        waiting_count,
        upcoming,
    )


def _started(steps: Iterable[StepProgress], step: str) -> bool:
    return any(s.step == step and (s.total or s.started) for s in steps)

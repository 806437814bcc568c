"""The planner as tables of (ledger state, now) -> what is due and what is recorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mailer import config, planner
from mailer.config import Delivery
from mailer.contacts import Contact
from mailer.store import Row
from mailer.vocab import Status

YAML = """\
campaign: t
timezone: Europe/Brussels
sender: {from: org@example.org}
contacts: [c.csv]
delivery: {late_after: 1d, late_contacts: LATE}
events:
  - {id: ev, title: Event, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
steps:
  - {id: invite, event: ev, template: t, at: 2018-01-04 10:00}
  - {id: remind, event: ev, template: t, at: -7d 09:00}
"""

A = Contact("a@example.org", "A", lists=frozenset({"x"}))
B = Contact("b@example.org", "B", lists=frozenset({"y"}))


def camp(tmp_path: Path, late: bool = True) -> config.Campaign:
    return config.loads(YAML.replace("LATE", str(late).lower()), tmp_path / "s.yaml")


def T(day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2018, 1, day, hour, minute, tzinfo=ZoneInfo("Europe/Brussels"))


def row(step: str, email: str, status: str, attempts: int = 0, nxt: datetime | None = None) -> Row:
    return Row(1, step, email, Status(status), attempts, nxt, None, None)


def run(
    c: config.Campaign,
    rows: list[Row],
    now: datetime,
    suppressed: dict[str, str] | None = None,
    started: dict[str, datetime] | None = None,
) -> planner.Plan:
    by_step: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_step.setdefault(r.step, {})[r.email] = r
    return planner.plan(c, [A, B], lambda s: by_step.get(s, {}), suppressed or {}, started or {}, now)


def due(p: planner.Plan) -> set[tuple[str, str]]:
    return {(d.step.id, d.contact.email) for d in p.due}


def skips(p: planner.Plan) -> set[tuple[str, str, str]]:
    return {(s.step.id, s.email, s.status) for s in p.skips}


CASES = [
    # (name, rows, now, expected due, expected skips)
    ("before anything", [], T(3), set(), set()),
    (
        "invitation time",
        [],
        T(4, 10),
        {("invite", "a@example.org"), ("invite", "b@example.org")},
        set(),
    ),
    (
        "already sent",
        [row("invite", "a@example.org", "sent")],
        T(4, 10, 5),
        {("invite", "b@example.org")},
        set(),
    ),
    (
        "both steps due",
        [],
        T(15, 9, 0),
        {("invite", A.email), ("invite", B.email), ("remind", A.email), ("remind", B.email)},
        set(),
    ),
    (
        "reminder late",
        [row("invite", A.email, "sent"), row("invite", B.email, "sent")],
        T(16, 9, 1),
        set(),
        {("remind", A.email, "skipped"), ("remind", B.email, "skipped")},
    ),
    (
        "invitation late but event ahead",
        [],
        T(21),
        {("invite", A.email), ("invite", B.email)},
        {("remind", A.email, "skipped"), ("remind", B.email, "skipped")},
    ),
    (
        "event started",
        [row("invite", A.email, "deferred", 3, T(22, 9))],
        T(22, 10),
        set(),
        {
            ("invite", A.email, "failed"),
            ("invite", B.email, "skipped"),
            ("remind", A.email, "skipped"),
            ("remind", B.email, "skipped"),
        },
    ),
    (
        "deferred not yet",
        [row("invite", A.email, "deferred", 1, T(4, 11)), row("invite", B.email, "sent")],
        T(4, 10, 30),
        set(),
        set(),
    ),
    (
        "deferred ready",
        [row("invite", A.email, "deferred", 1, T(4, 11)), row("invite", B.email, "sent")],
        T(4, 11),
        {("invite", A.email)},
        set(),
    ),
    (
        "sending after crash is re-sent",
        [row("invite", A.email, "sending"), row("invite", B.email, "sent")],
        T(4, 11),
        {("invite", A.email)},
        set(),
    ),
    (  # not decided while the step's window is open: a contact who comes back is mailed (issue 12)
        "removed contact, window open",
        [
            row("invite", "gone@example.org", "pending"),
            row("invite", A.email, "sent"),
            row("invite", B.email, "sent"),
        ],
        T(4, 11),
        set(),
        set(),
    ),
    (
        "removed contact, the event started",
        [
            row("invite", "gone@example.org", "pending"),
            row("invite", A.email, "sent"),
            row("invite", B.email, "sent"),
        ],
        T(22, 10),
        set(),
        {
            ("invite", "gone@example.org", "skipped"),
            ("remind", A.email, "skipped"),  # the event had started
            ("remind", B.email, "skipped"),
        },
    ),
]


@pytest.mark.parametrize(
    ("rows", "now", "exp_due", "exp_skips"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan_table(
    rows: list[Row],
    now: datetime,
    exp_due: set[tuple[str, str]],
    exp_skips: set[tuple[str, str, str]],
    tmp_path: Path,
) -> None:
    p = run(camp(tmp_path), rows, now)
    assert due(p) == exp_due
    assert skips(p) == exp_skips


def test_suppressed_recorded_not_dropped(tmp_path: Path) -> None:
    p = run(camp(tmp_path), [], T(4, 10), suppressed={A.email: "hard bounce"})
    assert due(p) == {("invite", B.email)}
    (s,) = p.skips
    assert s.status == "suppressed" and "hard bounce" in s.reason


def test_suppression_ignores_case(tmp_path: Path) -> None:
    c = Contact("A@example.org", "A", lists=frozenset({"x"}))
    p = planner.plan(camp(tmp_path), [c], lambda s: {}, {"a@example.org": "unsubscribed"}, {}, T(4, 10))
    assert [(s.email, s.status) for s in p.skips] == [("A@example.org", "suppressed")] and not p.due


def test_late_contacts_off(tmp_path: Path) -> None:
    c = camp(tmp_path, late=False)
    rows = [row("invite", A.email, "sent")]
    p = run(c, rows, T(5), started={"invite": T(4, 10)})
    assert due(p) == set()
    assert skips(p) == {("invite", B.email, "skipped")}
    assert "late_contacts" in p.skips[0].reason
    # with the default (on) the newcomer still gets the invitation
    assert due(run(camp(tmp_path), rows, T(5), started={"invite": T(4, 10)})) == {("invite", B.email)}


def test_next_wake(tmp_path: Path) -> None:
    c = camp(tmp_path)
    assert run(c, [], T(3)).next_wake == T(4, 10)
    p = run(
        c,
        [row("invite", A.email, "deferred", 1, T(4, 11)), row("invite", B.email, "sent")],
        T(4, 10, 30),
    )
    assert p.next_wake == T(4, 11)


def test_cancelled_event(tmp_path: Path) -> None:
    text = YAML.replace("LATE", "true").replace(
        "end: 2018-01-22 16:30}", "end: 2018-01-22 16:30, status: cancelled}"
    )
    c = config.loads(text, tmp_path / "s.yaml")
    p = run(c, [], T(4, 10))
    assert due(p) == set() and {s.reason for s in p.skips} == {"the event is cancelled"}
    assert p.next_wake is None


def test_retry_backoff_grows_and_is_capped() -> None:
    now = datetime(2018, 1, 4, tzinfo=UTC)
    pol = Delivery(retry_base=timedelta(minutes=1), retry_max=timedelta(hours=1))
    waits = [(planner.retry_at(pol, n, "k", now) - now).total_seconds() for n in range(1, 12)]
    assert 48 <= waits[0] <= 72
    assert waits[3] > waits[0] * 4
    assert max(waits) <= 3600 * 1.2
    # jitter differs per recipient, stays the same for one recipient
    assert planner.retry_at(pol, 2, "a", now) != planner.retry_at(pol, 2, "b", now)
    assert planner.retry_at(pol, 2, "a", now) == planner.retry_at(pol, 2, "a", now)


# --------------------------------------------------------------------------------------
# A step sent at a local hour in each recipient's zone (issue 13 item 11): no clock, a table.
# --------------------------------------------------------------------------------------

ZONED = """\
campaign: t
timezone: Europe/Brussels
sender: {from: org@example.org}
contacts: [c.csv]
events:
  - {id: ev, title: Event, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
  - {id: spring, title: Spring, start: 2018-03-20 10:00, end: 2018-03-20 12:00}
steps:
  - {id: remind, event: ev, template: t, at: -1d 09:00 local}
  - {id: march, event: spring, template: t, at: -1d 09:00 local}
"""
BXL = Contact("bxl@example.org", "Brussels (no zone column)")
NYC = Contact("nyc@example.org", "New York", timezone="America/New_York")
TYO = Contact("tyo@example.org", "Tokyo", timezone="Asia/Tokyo")


def U(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2018, month, day, hour, minute, tzinfo=UTC)


def zoned(
    tmp_path: Path, now: datetime, rows: Sequence[Row] = (), started: dict[str, datetime] | None = None
) -> planner.Plan:
    c = config.loads(ZONED, tmp_path / "s.yaml")
    by_step: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_step.setdefault(r.step, {})[r.email] = r
    return planner.plan(
        c, [BXL, NYC, TYO], lambda s: by_step.get(s, {}), {}, started or {}, now, only_steps=["remind"]
    )


# 09:00 on Sunday 21 January: Tokyo 00:00 UTC, Brussels 08:00 UTC, New York 14:00 UTC.
LOCAL_TABLE = [
    ("before anyone", U(1, 20, 23, 59), [], set(), U(1, 21, 0)),
    ("Tokyo's hour", U(1, 21, 0), [], {"tyo"}, U(1, 21, 8)),
    ("Tokyo sent, Brussels' hour", U(1, 21, 8), [row("remind", TYO.email, "sent")], {"bxl"}, U(1, 21, 14)),
    ("all three unsent at New York's", U(1, 21, 14), [], {"tyo", "bxl", "nyc"}, None),
    ("one minute before New York's", U(1, 21, 13, 59), [], {"tyo", "bxl"}, U(1, 21, 14)),
]


@pytest.mark.parametrize(
    ("label", "now", "rows", "expect", "wake"), LOCAL_TABLE, ids=[t[0] for t in LOCAL_TABLE]
)
def test_local_step_is_due_per_recipient(
    tmp_path: Path, label: str, now: datetime, rows: list[Row], expect: set[str], wake: datetime | None
) -> None:
    p = zoned(tmp_path, now, rows, {"remind": U(1, 21, 0)} if now >= U(1, 21, 0) else None)
    assert {d.contact.email.split("@")[0] for d in p.due} == expect
    assert p.next_wake == wake
    assert not p.skips
    # The ledger's due_at (Due.step.at) is the recipient's own 09:00.
    for d in p.due:
        tz = ZoneInfo(d.contact.timezone or "Europe/Brussels")
        assert d.step.at.astimezone(tz).replace(tzinfo=None) == datetime(2018, 1, 21, 9)
        assert d.step.id == "remind"


def test_local_step_late_contacts_off_keeps_later_zones(tmp_path: Path) -> None:
    """The step started at Tokyo's hour; Brussels' and New York's recipients, whose own hours
    came later, were not added after it went out."""
    c = config.loads(ZONED + "delivery: {late_contacts: false}\n", tmp_path / "s.yaml")
    p = planner.plan(
        c, [BXL, NYC, TYO], lambda s: {}, {}, {"remind": U(1, 21, 0)}, U(1, 21, 15), only_steps=["remind"]
    )
    assert {d.contact.email for d in p.due} == {BXL.email, NYC.email}
    # Tokyo's hour is when the step started: no row for them means they were added since.
    assert [(sk.email, sk.status) for sk in p.skips] == [(TYO.email, Status.SKIPPED)]


def test_local_step_times_across_dst(tmp_path: Path) -> None:
    """20 March 2018: New York is on summer time (since 11 March), Brussels not yet (25 March):
    the two are 5 hours apart, not 6; each still gets the mail at 09:00 on their own clock."""
    c = config.loads(ZONED, tmp_path / "s.yaml")
    times = planner.send_times(c, c.step("march"), [BXL, NYC, TYO, NYC])
    assert [(t.zone.key, t.at.astimezone(UTC), t.count) for t in times] == [
        ("Asia/Tokyo", U(3, 19, 0), 1),
        ("Europe/Brussels", U(3, 19, 8), 1),
        ("America/New_York", U(3, 19, 13), 2),
    ]
    p = planner.plan(c, [BXL, NYC, TYO], lambda s: {}, {}, {}, U(3, 19, 12), only_steps=["march"])
    assert {d.contact.email for d in p.due} == {BXL.email, TYO.email}
    assert p.next_wake == U(3, 19, 13)


@pytest.mark.parametrize(
    ("at", "zone", "utc", "problem"),
    [
        # 02:30 on 11 March does not exist in New York (02:00 -> 03:00): at 03:30 EDT.
        ("-1d 02:30 local", "America/New_York", U(3, 11, 7, 30), "does not exist in America/New_York"),
        # 01:30 on 4 November happens twice in New York: the first time (EDT).
        ("-1d 01:30 local", "America/New_York", U(11, 4, 5, 30), "happens twice in America/New_York"),
        ("-1d 02:30 local", "Europe/Brussels", None, None),
    ],
)
def test_local_step_in_a_dst_gap_or_overlap(
    tmp_path: Path, at: str, zone: str, utc: datetime | None, problem: str | None
) -> None:
    day = "2018-03-12" if "02:30" in at else "2018-11-05"
    c = config.loads(
        ZONED.replace("2018-01-22 09:30, end: 2018-01-22 16:30", f"{day} 10:00, end: {day} 12:00").replace(
            "-1d 09:00 local}\n  - {id: march", f"{at}}}\n  - {{id: march"
        ),
        tmp_path / "s.yaml",
    )
    who = NYC if zone == "America/New_York" else BXL
    (t,) = planner.send_times(c, c.step("remind"), [who])
    if utc is not None:
        assert t.at.astimezone(UTC) == utc
    assert (problem in t.problem) if problem else t.problem is None  # type: ignore[operator]
    p = planner.plan(c, [who], lambda s: {}, {}, {}, t.at, only_steps=["remind"])
    assert [d.step.at for d in p.due] == [t.at]

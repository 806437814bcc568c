"""The planner as tables of (ledger state, now) -> what is due and what is recorded."""

from __future__ import annotations

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

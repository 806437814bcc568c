"""Pacing (issue 17): send windows, quotas and deadline order.

Pure tests on a virtual clock (the planner and :func:`mailer.pacing.pace` called at chosen
times, nothing sleeps), then ``mailer send`` against aiosmtpd with a real SQLite ledger.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from conftest import FaultyHandler, write_campaign

from mailer import config, pacing, planner
from mailer.cli import cli
from mailer.contacts import Contact
from mailer.errors import ConfigError
from mailer.pacing import Quota, Wait, Window
from mailer.smtpd import SmtpServer
from mailer.store import Row
from mailer.transport import classify
from mailer.vocab import Status

BRU = ZoneInfo("Europe/Brussels")

# -- deadline order under a per-day quota ---------------------------------------------------------

RACE = """\
campaign: t
timezone: Europe/Brussels
sender: {from: org@example.org}
contacts: [c.csv]
smtp: {per_day: 3}
delivery: {late_after: 3d}
events:
  - {id: soon, title: Soon, start: 2018-01-10 09:00, end: 2018-01-10 12:00}
  - {id: later, title: Later, start: 2018-02-20 09:00, end: 2018-02-20 12:00}
steps:
  - {id: invite-later, event: later, template: t, at: 2018-01-04 10:00, kind: invitation}
  - {id: remind-later, event: later, template: t, at: 2018-01-05 10:00, kind: reminder}
  - {id: invite-soon, event: soon, template: t, at: 2018-01-05 11:00, kind: invitation}
  - {id: remind-soon, event: soon, template: t, at: 2018-01-06 09:00, kind: reminder}
"""

A = Contact("a@example.org", "A")
B = Contact("b@example.org", "B")


def T(month: int, day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2018, month, day, hour, minute, tzinfo=BRU)


def simulate(c: config.Campaign, contacts: list[Contact], now: datetime) -> list[tuple[datetime, str, str]]:
    """Plan, pace and "send" on a virtual clock that jumps to each wake-up."""
    rows: dict[str, dict[str, Row]] = {}
    sent: list[tuple[datetime, str, str]] = []
    times: list[datetime] = []
    for _ in range(50):
        p = planner.plan(c, contacts, lambda s: rows.get(s, {}), {}, {}, now)
        assert p.skips == [], "nothing is late: the quota leaves time for every step"
        paced = pacing.pace(p.due, c, now, times)
        for d in paced.go:
            sent.append((now, d.step.id, d.contact.email))
            times.append(now)
            rows.setdefault(d.step.id, {})[d.contact.email] = Row(
                1, d.step.id, d.contact.email, Status.SENT, 1, None, None, None
            )
        assert all(h.why is Wait.QUOTA for h in paced.holds)
        wake = min(filter(None, (paced.wake, p.next_wake)), default=None)
        if wake is None:
            return sent
        now = wake
    raise AssertionError("the simulation did not end")


def test_two_events_four_steps_share_a_daily_quota_in_deadline_order(tmp_path: Path) -> None:
    c = config.loads(RACE, tmp_path / "s.yaml")
    sent = simulate(c, [A, B], T(1, 6))
    assert [(t, s, e[0]) for t, s, e in sent] == [
        # the sooner event first; within it the reminder, whose lateness limit (at + 3d) comes first
        (T(1, 6), "remind-soon", "a"),
        (T(1, 6), "remind-soon", "b"),
        (T(1, 6), "invite-soon", "a"),
        # the next day, when the first of the three leaves the rolling 24 hours
        (T(1, 7), "invite-soon", "b"),
        (T(1, 7), "remind-later", "a"),
        (T(1, 7), "remind-later", "b"),
        (T(1, 8), "invite-later", "a"),
        (T(1, 8), "invite-later", "b"),
    ]


def test_within_one_deadline_the_original_order() -> None:
    class D:
        def __init__(self, step: config.Step, event: config.Event, contact: Contact) -> None:
            self.step, self.event, self.contact = step, event, contact

    c = config.loads(RACE, "/tmp/s.yaml")
    inv = next(s for s in c.steps if s.id == "invite-later")
    people = [Contact(f"p{i}@example.org", "") for i in (3, 1, 2)]
    due = [D(inv, c.event("later"), p) for p in people]
    assert [d.contact.email for d in pacing.order_by_deadline(due, c)] == [p.email for p in people]


def test_allowance_counts_a_rolling_window() -> None:
    t = datetime(2024, 1, 1, 12, tzinfo=UTC)
    q = Quota(2, timedelta(days=1), "per_day")
    assert pacing.allowance(t, q, []) == (2, t + timedelta(days=1))
    old = t - timedelta(days=1)  # exactly a day ago: out of the window
    assert pacing.allowance(t, q, [old, t - timedelta(hours=1)]) == (1, t + timedelta(hours=23))
    assert pacing.allowance(t, q, [t - timedelta(hours=5), t - timedelta(hours=1)]) == (
        0,
        t + timedelta(hours=19),
    )


# -- windows across midnight and DST --------------------------------------------------------------


def at(y: int, mo: int, d: int, h: int, mi: int = 0, tz: ZoneInfo = BRU) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=tz)


def test_a_window_across_midnight() -> None:
    w = Window.parse("22:00-06:00", ["fri"])
    # Friday night is open until Saturday 06:00; Saturday night is not (days: fri).
    assert pacing.window_open(at(2024, 3, 1, 23), w, BRU)  # Fri 23:00
    assert pacing.window_open(at(2024, 3, 2, 5, 59), w, BRU)  # Sat 05:59
    assert not pacing.window_open(at(2024, 3, 2, 6), w, BRU)
    assert not pacing.window_open(at(2024, 3, 2, 23), w, BRU)  # Sat night
    assert not pacing.window_open(at(2024, 3, 1, 21, 59), w, BRU)
    assert pacing.next_opening(at(2024, 3, 2, 7), w, BRU) == at(2024, 3, 8, 22)
    assert pacing.window_closes(at(2024, 3, 1, 23), w, BRU) == at(2024, 3, 2, 6)


def test_a_window_across_the_dst_changes_keeps_wall_hours() -> None:
    w = Window.parse("08:00-20:00")
    # Saturday 30 March 2024 21:00 CET -> Sunday 08:00 CEST (the clocks went forward at 02:00)
    nxt = pacing.next_opening(at(2024, 3, 30, 21), w, BRU)
    assert nxt.astimezone(UTC) == datetime(2024, 3, 31, 6, tzinfo=UTC)
    assert pacing.window_closes(nxt, w, BRU).astimezone(UTC) == datetime(2024, 3, 31, 18, tzinfo=UTC)  # type: ignore[union-attr]
    # Saturday 26 October 2024 21:00 CEST -> Sunday 08:00 CET (the clocks went back at 03:00)
    nxt = pacing.next_opening(at(2024, 10, 26, 21), w, BRU)
    assert nxt.astimezone(UTC) == datetime(2024, 10, 27, 7, tzinfo=UTC)
    # A night window over the spring-forward night is open 7 real hours, over autumn's 9.
    night = Window.parse("22:00-06:00")
    for day, hours in ((at(2024, 3, 30, 12), 7), (at(2024, 10, 26, 12), 9)):
        opens = pacing.next_opening(day, night, BRU)
        closes = pacing.window_closes(opens, night, BRU)
        assert closes is not None
        assert closes.astimezone(UTC) - opens.astimezone(UTC) == timedelta(hours=hours)
    # An opening the clock skips (02:30 on 31 March) opens just after the jump, plus 30 minutes.
    odd = Window.parse("02:30-04:00")
    assert pacing.next_opening(at(2024, 3, 31, 1), odd, BRU) == at(2024, 3, 31, 3, 30)
    # Inside the repeated hour of 27 October: both 02:30s are inside a 02:00-04:00 window.
    late = Window.parse("02:00-04:00")
    first = datetime(2024, 10, 27, 0, 30, tzinfo=UTC)  # 02:30 CEST
    second = datetime(2024, 10, 27, 1, 30, tzinfo=UTC)  # 02:30 CET
    assert pacing.window_open(first, late, BRU) and pacing.window_open(second, late, BRU)


WINDOWED = """\
campaign: t
timezone: Europe/Brussels
sender: {from: org@example.org}
contacts: [c.csv]
delivery: {window: "08:00-20:00"}
events:
  - {id: early, title: Early, start: 2018-01-11 07:00, end: 2018-01-11 09:00}
  - {id: week, title: Week, start: 2018-01-17 10:00, end: 2018-01-17 12:00}
steps:
  - {id: remind-early, event: early, template: t, at: 2018-01-10 21:00, kind: reminder}
  - {id: invite-week, event: week, template: t, at: 2018-01-10 21:00}
"""


def test_outside_the_window_waits_unless_the_event_comes_first_per_recipient_zone(tmp_path: Path) -> None:
    c = config.loads(WINDOWED, tmp_path / "s.yaml")
    ny = Contact("ny@example.org", "NY", timezone="America/New_York")  # 15:00 there: open
    now = T(1, 10, 21)
    p = planner.plan(c, [A, ny], lambda s: {}, {}, {}, now)
    paced = pacing.pace(p.due, c, now)
    assert sorted((d.step.id, d.contact.email) for d in paced.go) == [
        ("invite-week", "ny@example.org"),
        ("remind-early", "a@example.org"),
        ("remind-early", "ny@example.org"),
    ]
    assert [(h.step, h.email, h.why, h.until) for h in paced.holds] == [
        ("invite-week", "a@example.org", Wait.WINDOW, T(1, 11, 8))
    ]
    assert paced.wake == T(1, 11, 8)
    why = paced.outside[("remind-early", "a@example.org")]
    assert why.startswith("sent outside the delivery window (08:00-20:00): the event starts 2018-01-11 07:00")
    assert ("remind-early", "ny@example.org") not in paced.outside, "its window is open"


@pytest.mark.parametrize(
    ("delivery", "message"),
    [
        ('{window: "8-20"}', "is not a window"),
        ('{window: "08:00-08:00"}', "same time"),
        ('{window: "08:00-20:00", days: [mon, funday]}', "unknown day 'fun'"),
        ("{days: [mon]}", "days needs a window"),
    ],
)
def test_a_bad_window_is_a_clear_config_error(tmp_path: Path, delivery: str, message: str) -> None:
    text = WINDOWED.replace('delivery: {window: "08:00-20:00"}', f"delivery: {delivery}")
    with pytest.raises(ConfigError) as exc:
        config.loads(text, tmp_path / "s.yaml")
    assert message in str(exc.value)
    assert "delivery" in str(exc.value)


def test_a_quota_reply_is_recognised() -> None:
    assert classify(452, "4.5.3 Daily sending quota exceeded").quota
    assert classify(421, "4.7.0 Rate limited, try later").quota
    assert not classify(452, "4.3.1 Insufficient system storage").quota
    assert not classify(550, "5.7.1 quota exceeded").quota  # a refusal, not a pause


# -- against aiosmtpd with a real ledger ----------------------------------------------------------

EV = '- {id: ev, title: Soon, start: "2030-03-08 09:00", end: "2030-03-08 11:00"}\n'
ST = '- {id: invite, event: ev, template: invite, at: "2030-03-04 10:00"}\n'
THREE = "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\ncid@example.org,Cid,a\n"


def send(cfg: Path, now: str, env: dict[str, str]) -> str:
    r = CliRunner().invoke(
        cli, ["send", "--config", str(cfg), "--now", now, "--force"], env=env, catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    return r.output


def ledger_rows(cfg: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(cfg.parent / "ledger.db") as db:
        return {e: (s, r) for e, s, r in db.execute("SELECT email, status, reason FROM deliveries")}


def test_a_restart_keeps_the_days_count(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EV, steps=ST, contacts=THREE, extra="", templates=None)
    cfg.write_text(cfg.read_text().replace("smtp: {connections: 2}", "smtp: {connections: 1, per_day: 2}"))
    out = send(cfg, "2030-03-04 10:00", smtp_env)
    assert len(smtp_server.handler.received) == 2
    assert "waiting (quota): 1 mail(s) until 2030-03-05 10:00" in out
    assert sorted(s for s, _ in ledger_rows(cfg).values()) == ["pending", "sent", "sent"]
    # Each `mailer send` opens the ledger afresh (a restart): the day's two still count.
    send(cfg, "2030-03-04 16:00", smtp_env)
    send(cfg, "2030-03-05 09:59", smtp_env)
    assert len(smtp_server.handler.received) == 2
    send(cfg, "2030-03-05 10:00", smtp_env)
    assert len(smtp_server.handler.received) == 3
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == [
        "ann@example.org",
        "bob@example.org",
        "cid@example.org",
    ]


def test_a_mail_that_would_miss_its_event_goes_outside_the_window_with_the_reason(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    events = EV + '- {id: dawn, title: Dawn, start: "2030-03-05 07:00", end: "2030-03-05 08:00"}\n'
    steps = (
        ST.replace("10:00", "21:00")
        + '- {id: dawn-invite, event: dawn, template: invite, at: "2030-03-04 21:00"}\n'
    )
    extra = 'delivery: {window: "08:00-20:00", days: [mon, tue, wed, thu, fri]}\n'
    cfg = write_campaign(tmp_path, events=events, steps=steps, extra=extra)
    send(cfg, "2030-03-04 21:00", smtp_env)
    with sqlite3.connect(cfg.parent / "ledger.db") as db:
        got = {
            (s, e): (st, r)
            for s, e, st, r in db.execute("SELECT step, email, status, reason FROM deliveries")
        }
    assert {k: v[0] for k, v in got.items()} == {
        ("dawn-invite", "ann@example.org"): "sent",
        ("dawn-invite", "bob@example.org"): "sent",
        ("invite", "ann@example.org"): "pending",
        ("invite", "bob@example.org"): "pending",
    }
    reason = got[("dawn-invite", "ann@example.org")][1]
    assert (
        reason is not None and "sent outside the delivery window (08:00-20:00 mon,tue,wed,thu,fri)" in reason
    )
    assert "the event starts 2030-03-05 07:00, before it opens again at 2030-03-05 08:00" in reason
    send(cfg, "2030-03-05 08:00", smtp_env)
    assert len(smtp_server.handler.received) == 4


def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return r.exit_code, " ".join(r.output.split())


def test_a_servers_quota_pause_holds_the_next_mailer_send_and_shows_in_status(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """Issue 17: the pause a 452 quota reply causes is kept in the ledger, in the commit of that
    reply's outcome: a second `mailer send` (a new process, a new ledger connection) sends
    nothing before it ends, says until when and exits 1; `mailer status` shows it; once it has
    ended every mail goes, once."""
    handler = smtp_server.handler
    assert isinstance(handler, FaultyHandler)
    handler.rcpt_replies["bob@example.org"] = "452 4.5.3 Daily user sending quota exceeded"
    cfg = write_campaign(tmp_path, events=EV, steps=ST, contacts=THREE)
    cfg.write_text(cfg.read_text().replace("smtp: {connections: 2}", "smtp: {connections: 1, per_day: 100}"))
    args = ("--config", str(cfg))
    code, out = run_cli("send", *args, "--now", "2030-03-04 10:00", "--force", env=smtp_env)
    assert code == 1, out  # the reply stopped the pass (ann went before it)
    assert [r.rcpt_tos[0] for r in handler.received] == ["ann@example.org"]
    until = "Tue 2030-03-05 10:00 CET"  # when ann's attempt leaves the rolling day
    said = f"paused by the server's quota until {until}: 452 4.5.3 Daily user sending quota exceeded"
    assert said in out
    handler.rcpt_replies.clear()  # the provider would take mail again: only the pause holds it

    code, out = run_cli("send", *args, "--now", "2030-03-04 10:01", "--force", env=smtp_env)
    assert code == 1, out
    assert said in out
    assert len(handler.received) == 1, "nothing goes during the pause"
    code, out = run_cli("status", *args, env=smtp_env)
    assert code == 0 and said in out, out

    code, out = run_cli("send", *args, "--now", "2030-03-05 09:59", "--force", env=smtp_env)
    assert (code, len(handler.received)) == (1, 1), out
    code, out = run_cli("send", *args, "--now", "2030-03-05 10:01", "--force", env=smtp_env)
    assert code == 0 and "paused" not in out, out
    assert sorted(r.rcpt_tos[0] for r in handler.received) == [
        "ann@example.org",
        "bob@example.org",
        "cid@example.org",
    ]
    assert {s for s, _ in ledger_rows(cfg).values()} == {"sent"}
    with sqlite3.connect(cfg.parent / "ledger.db") as db:
        assert db.execute("SELECT key FROM meta WHERE key LIKE 'paused%'").fetchall() == []
    code, out = run_cli("status", *args, env=smtp_env)
    assert code == 0 and "paused" not in out, out

"""The daemon on a ManualClock against a real SMTP server and a real ledger: steps on time and
not before, retries, reload, an invalid edit, restart, and a failed pass that stops it.

The scheduler is started paused (``run_jobs=False``): the test moves the clock and awaits
``tick()`` / ``watch()`` itself, so nothing here sleeps. One smoke test runs ``mailer run`` in a
subprocess on the real clock (tests/test_daemon_smoke.py).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import FaultyHandler, write_campaign

from mailer.clock import ManualClock
from mailer.daemon import Daemon
from mailer.errors import LockedError
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer
from mailer.transport import TransportSettings
from mailer.workspace import load_workspace

TZ = ZoneInfo("Europe/Brussels")
T0 = datetime(2030, 3, 4, 9, 0, tzinfo=TZ)  # the clock when the daemon starts
INVITE = T0 + timedelta(hours=1)
REMIND = T0 + timedelta(days=1)
EVENT = T0 + timedelta(days=3)


def local(dt: datetime) -> str:
    return dt.astimezone(TZ).strftime("%Y-%m-%d %H:%M:%S")


EVENTS = f'- {{id: ev, title: Soon, start: "{local(EVENT)}", end: "{local(EVENT + timedelta(hours=2))}"}}\n'
INVITE_STEP = f'- {{id: invite, event: ev, template: invite, at: "{local(INVITE)}"}}\n'
REMIND_STEP = f'  - {{id: remind, event: ev, template: remind, at: "{local(REMIND)}"}}\n'


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_campaign(tmp_path, events=EVENTS, steps=INVITE_STEP)


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """What the daemon logs (the "mailer" logger may not propagate once `mailer run` ran)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("mailer")
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def lines(records: list[logging.LogRecord], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


def make_daemon(cfg: Path, clock: ManualClock, env: dict[str, str], ledger: Ledger | None = None) -> Daemon:
    ws = load_workspace(cfg)
    if ledger is None:
        ledger = Ledger(ws.campaign.ledger)
        ledger.lock()
    settings = TransportSettings.from_config(ws.campaign.smtp, env)
    return Daemon(cfg, ws, ledger, settings, env, clock=clock)


def edit(path: Path, text: str) -> None:
    """Write ``text`` with a modification time the daemon's watcher cannot miss (a rewrite
    within one tick of the file system's coarse clock keeps the old mtime)."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def subjects(server: SmtpServer) -> list[str]:
    out = []
    for r in server.handler.received:
        msg = email.message_from_bytes(r.data, policy=email.policy.default)
        out.append(f"{msg['Subject']} -> {r.rcpt_tos[0]}")
    return sorted(out)


def message_ids(server: SmtpServer) -> list[str]:
    return [
        str(email.message_from_bytes(r.data, policy=email.policy.default)["Message-ID"])
        for r in server.handler.received
    ]


async def test_a_step_is_sent_at_its_time_and_not_before(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    edit(cfg, cfg.read_text() + REMIND_STEP)
    clock = ManualClock(T0)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        assert smtp_server.handler.received == []
        assert d.wake_at == INVITE, "the daemon wakes at the first step's time"

        clock.set(INVITE - timedelta(seconds=1))
        await d.tick()  # e.g. the one-minute sweep, a second early
        assert smtp_server.handler.received == []
        assert d.wake_at == INVITE

        clock.set(INVITE)
        await d.tick()
        assert subjects(smtp_server) == [
            "Invitation: Soon -> ann@example.org",
            "Invitation: Soon -> bob@example.org",
        ]
        assert d.wake_at == REMIND
        date = email.message_from_bytes(smtp_server.handler.received[0].data, policy=email.policy.default)
        assert date["Date"].datetime == INVITE, "the mail is dated by the daemon's clock"

        clock.set(REMIND + timedelta(minutes=5))  # late (the machine slept): sent at once
        await d.tick()
        assert len(smtp_server.handler.received) == 4
        assert d.wake_at is None, "nothing left to wake for"
        assert "step due: invite (2030-03-04T10:00+01:00)" in lines(logs)
    finally:
        assert await d.close() == 0


async def test_a_deferred_mail_is_retried_at_its_retry_time(
    cfg: Path, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    handler = FaultyHandler(data_replies=["451 4.3.0 try again later"])
    with SmtpServer(handler) as server:
        env = {**smtp_env, "MAILER_SMTP_PORT": str(server.port)}
        clock = ManualClock(INVITE)
        d = make_daemon(cfg, clock, env)
        await d.start(run_jobs=False)  # catches up: one mail sent, one deferred
        try:
            assert len(handler.received) == 1
            retry = d.wake_at
            assert retry is not None and INVITE < retry < INVITE + timedelta(minutes=5)

            clock.set(retry - timedelta(seconds=1))
            await d.tick()
            assert len(handler.received) == 1, "not retried before its time"

            clock.set(retry)
            await d.tick()
            assert sorted(r.rcpt_tos[0] for r in handler.received) == ["ann@example.org", "bob@example.org"]
        finally:
            assert await d.close() == 0


async def test_an_added_step_is_picked_up_on_reload(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        assert len(smtp_server.handler.received) == 2
        assert d.wake_at is None

        await d.watch()  # nothing changed: no reload
        assert not any(m.startswith("reload") for m in lines(logs))

        edit(cfg, cfg.read_text() + REMIND_STEP)
        clock.advance(timedelta(minutes=1))
        await d.watch()
        assert "reload: 2 steps, 2 contacts" in lines(logs)
        assert d.wake_at == REMIND
        assert len(smtp_server.handler.received) == 2

        clock.set(REMIND)
        await d.tick()
        assert subjects(smtp_server)[-2:] == [
            "Reminder: Soon -> ann@example.org",
            "Reminder: Soon -> bob@example.org",
        ]
    finally:
        assert await d.close() == 0


async def test_an_invalid_edit_is_logged_and_the_campaign_goes_on(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    edit(cfg, cfg.read_text() + REMIND_STEP)
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        good = cfg.read_text()
        edit(cfg, good.replace("timezone: Europe/Brussels", "timezone: Mars/Olympus"))
        await d.watch()
        errors = lines(logs, logging.ERROR)
        assert errors[0].startswith("reload refused"), errors
        assert any("Mars/Olympus" in m for m in errors), errors
        assert not d.stop.is_set()
        assert d.wake_at == REMIND, "the previous version's wake-up stands"

        clock.set(REMIND)
        await d.tick()
        assert len(smtp_server.handler.received) == 4, "the previous version keeps sending"
    finally:
        assert await d.close() == 0


async def test_a_restart_sends_nothing_twice(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    edit(cfg, cfg.read_text() + REMIND_STEP)
    clock = ManualClock(INVITE)
    first = make_daemon(cfg, clock, smtp_env)
    await first.start(run_jobs=False)
    assert await first.close() == 0
    assert len(smtp_server.handler.received) == 2

    clock.advance(timedelta(minutes=30))
    second = make_daemon(cfg, clock, smtp_env)  # the lock was released by close()
    await second.start(run_jobs=False)
    try:
        assert len(smtp_server.handler.received) == 2, "the catch-up pass sends nothing again"
        assert second.wake_at == REMIND
        clock.set(REMIND)
        await second.tick()
        await second.tick()
    finally:
        assert await second.close() == 0
    ids = message_ids(smtp_server)
    assert len(ids) == len(set(ids)) == 4


async def test_the_inbox_is_first_read_at_the_clocks_time(
    cfg: Path, tmp_path: Path, smtp_env: dict[str, str]
) -> None:
    env = {**smtp_env, "MAILER_INBOX_MAILDIR": str(tmp_path / "inbox")}
    clock = ManualClock(T0)
    d = make_daemon(cfg, clock, env)
    await d.start(run_jobs=False)
    try:
        job = d.scheduler.get_job("inbox")
        assert job is not None and job.next_run_time == T0
    finally:
        await d.close()


# -- a pass that cannot go on stops the daemon (issue 11, item 9) ----------------------------


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another process's transaction holding the ledger's write lock (e.g. a `sqlite3` shell)."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def impatient_ledger(db: Path) -> Ledger:
    """The daemon's ledger, waiting 0.2 s instead of 30 s for a lock (so the test is quick)."""
    ledger = Ledger(db)
    ledger.conn.execute("PRAGMA busy_timeout=200")
    ledger.lock()
    return ledger


def assert_lock_free(db: Path) -> None:
    with Ledger(db) as other:
        other.lock()  # raises LockedError while the daemon holds it


async def test_a_locked_ledger_stops_the_daemon_with_status_1(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    db = load_workspace(cfg).campaign.ledger
    d = make_daemon(cfg, ManualClock(INVITE), smtp_env, impatient_ledger(db))
    with pytest.raises(LockedError):
        assert_lock_free(db)
    blocker = hold_write_lock(db)
    try:
        t0 = time.monotonic()
        code = await asyncio.wait_for(d.main(), timeout=20)
        took = time.monotonic() - t0
    finally:
        blocker.rollback()
        blocker.close()
    assert code == 1
    assert took < 5, f"stopped after {took:.1f} s"
    errors = lines(logs, logging.ERROR)
    assert len(errors) == 1 and errors[0].startswith("stopping: the pass failed: "), errors
    assert "locked" in errors[0]
    assert lines(logs)[-1] == "stop"
    assert_lock_free(db)
    assert smtp_server.handler.received == []


async def test_a_failing_later_pass_stops_a_running_daemon(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    db = load_workspace(cfg).campaign.ledger
    clock = ManualClock(T0)
    d = make_daemon(cfg, clock, smtp_env, impatient_ledger(db))
    running = asyncio.create_task(d.main())
    for _ in range(100):  # until the catch-up pass has run
        await asyncio.sleep(0.01)
        if d.wake_at is not None:
            break
    assert d.wake_at == INVITE and not running.done()

    blocker = hold_write_lock(db)
    try:
        clock.set(INVITE)
        await d.tick()  # what the wake-up job runs at INVITE
        code = await asyncio.wait_for(running, timeout=5)
    finally:
        blocker.rollback()
        blocker.close()
    assert code == 1
    assert [m for m in lines(logs, logging.ERROR) if "stopping" in m], lines(logs)
    assert_lock_free(db)

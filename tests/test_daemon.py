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
import mailbox
import os
import sqlite3
import subprocess
import sys
import time
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
        assert not any(m.startswith("reload") for m in lines(logs)), "not before the file is still"
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
        await settle(d)
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


async def test_a_poll_that_only_skips_a_message_says_so(
    cfg: Path, tmp_path: Path, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """A mail the inbox cannot read (a broken Message-ID header) is recorded as skipped and left
    for a person: the daemon's log must tell them, even when nothing else was handled."""
    inbox = tmp_path / "inbox"
    mailbox.Maildir(inbox, create=True).add(
        b"From: someone@example.org\r\nTo: integratiepact@example.be\r\nMessage-ID: <<x@y>\r\n"
        b"Subject: hallo\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhallo\r\n--B--\r\n"
    )
    d = make_daemon(cfg, ManualClock(T0), {**smtp_env, "MAILER_INBOX_MAILDIR": str(inbox)})
    await d.start(run_jobs=False)
    try:
        await d.poll_inbox()
    finally:
        await d.close()
    said = [r.getMessage() for r in logs if r.getMessage().startswith("inbox:")]
    assert any("skipped" in line for line in said), said


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


# -- reloads that cannot hurt anyone (issue 12) ------------------------------------------------


def people(n: int, start: int = 0) -> str:
    return "email,name,lists\n" + "".join(f"p{i:02d}@example.org,P{i},a\n" for i in range(start, start + n))


async def settle(d: Daemon) -> None:
    """Two looks a watch period apart that agree: what the watch job does when a file is still."""
    await d.watch()
    await d.watch()


async def test_a_file_still_being_written_is_not_reloaded(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """An editor's non-atomic save was read half-written: the reload must wait until the file
    has stopped changing (two successive looks with the same mtime and size)."""
    contacts = cfg.parent / "contacts" / "list.csv"
    clock = ManualClock(T0)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        edit(contacts, "email,name,lists\nann@example.org,Ann,a\n")  # the first half of the save
        await d.watch()
        assert not any(m.startswith("reload") for m in lines(logs)), "read while still changing"
        assert len(d.ws.contacts) == 2

        edit(
            contacts, "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\ncees@example.org,C,a\n"
        )
        await d.watch()  # changed again since the last look: still waiting
        assert len(d.ws.contacts) == 2
        await d.watch()  # the same as a watch period ago: read now
        assert "reload: 1 steps, 3 contacts" in lines(logs)
        assert [m for m in lines(logs) if m.startswith("reload")] == ["reload: 1 steps, 3 contacts"]
    finally:
        assert await d.close() == 0


async def test_a_reload_that_drops_many_contacts_at_once_is_refused(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=INVITE_STEP, contacts=people(20))
    contacts = tmp_path / "contacts" / "list.csv"
    clock = ManualClock(T0)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        edit(contacts, people(14))  # 6 of 20 gone: more than 5 and more than 20 %
        await settle(d)
        [error] = lines(logs, logging.ERROR)
        assert error.startswith("reload refused: the edit would drop 6 of the 20 contacts at once"), error
        assert len(d.ws.contacts) == 20, "the running campaign stays"

        edit(contacts, people(16))  # 4 gone: taken
        await settle(d)
        assert "reload: 1 steps, 16 contacts" in lines(logs)
        edit(contacts, people(12))  # 4 more (25 % but only 4): taken
        await settle(d)
        assert "reload: 1 steps, 12 contacts" in lines(logs)

        clock.set(INVITE)
        await d.tick()
        assert len(smtp_server.handler.received) == 12
    finally:
        assert await d.close() == 0


async def test_a_contact_who_comes_back_before_the_window_closes_is_mailed_after_all(
    cfg: Path, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """bob's invitation is deferred, a bad edit drops him from the file, the edit is undone: he
    was "no longer in the step's audience" for good; now his row waits and he is mailed."""
    contacts = cfg.parent / "contacts" / "list.csv"
    good = contacts.read_text()
    handler = FaultyHandler(rcpt_replies={"bob@example.org": "451 4.2.0 mailbox busy, try later"})
    with SmtpServer(handler) as server:
        env = {**smtp_env, "MAILER_SMTP_PORT": str(server.port)}
        clock = ManualClock(INVITE)
        d = make_daemon(cfg, clock, env)
        await d.start(run_jobs=False)  # ann sent, bob deferred
        try:
            assert [r.rcpt_tos[0] for r in handler.received] == ["ann@example.org"]
            edit(contacts, "email,name,lists\nann@example.org,Ann,a\n")
            await settle(d)  # reloads and runs a pass: bob is not in the audience any more
            assert "reload: 1 steps, 1 contacts" in lines(logs)
            clock.advance(timedelta(hours=1))
            await d.tick()
            assert len(handler.received) == 1

            edit(contacts, good)  # undone
            handler.rcpt_replies.clear()  # and the server is well again
            await settle(d)
            assert "reload: 1 steps, 2 contacts" in lines(logs)
            clock.advance(timedelta(hours=1))
            await d.tick()
            assert sorted(r.rcpt_tos[0] for r in handler.received) == ["ann@example.org", "bob@example.org"]
        finally:
            assert await d.close() == 0


async def test_a_contact_removed_for_good_is_skipped_once_the_window_closes(
    cfg: Path, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    contacts = cfg.parent / "contacts" / "list.csv"
    handler = FaultyHandler(rcpt_replies={"bob@example.org": "451 4.2.0 mailbox busy, try later"})
    with SmtpServer(handler) as server:
        env = {**smtp_env, "MAILER_SMTP_PORT": str(server.port)}
        clock = ManualClock(INVITE)
        d = make_daemon(cfg, clock, env)
        await d.start(run_jobs=False)
        try:
            edit(contacts, "email,name,lists\nann@example.org,Ann,a\n")
            await settle(d)
            handler.rcpt_replies.clear()
            assert d.wake_at == EVENT, "the planner looks again when the step's window closes"
            clock.set(EVENT)
            await d.tick()
            rows = d.ledger.step_rows(d.ws.campaign.id, "invite")
            assert rows["bob@example.org"].status == "skipped"
            assert len(handler.received) == 1, "never mailed"
        finally:
            assert await d.close() == 0


async def test_a_reload_whose_mails_do_not_render_is_refused(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """The render gate (mailer.gate.check_workspace) runs on every reload: today the daemon
    logged "reload: 2 steps" and then failed every reminder with no error line."""
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        body = cfg.parent / "templates" / "remind" / "en" / "body.txt"
        edit(body, "Reminder for {{ contact.email }} about {{ event.titel }}\n")
        edit(cfg, cfg.read_text() + REMIND_STEP)
        await settle(d)
        errors = lines(logs, logging.ERROR)
        assert errors and errors[0].startswith("reload refused"), errors
        assert any("titel" in m and "remind/en/body.txt" in m for m in errors), errors
        assert [s.id for s in d.ws.campaign.steps] == ["invite"], "the running campaign stays"
        assert d.wake_at is None
    finally:
        assert await d.close() == 0


def assert_each_once_and_resumed(
    handler: FaultyHandler, smtp_server: SmtpServer, logs: list[logging.LogRecord]
) -> None:
    """After the pause: Ann, Bob and Cid each got their mail once, and the daemon said so."""
    assert sorted(r.rcpt_tos[0] for r in handler.received) == [
        "ann@example.org",
        "bob@example.org",
        "cid@example.org",
    ]
    assert len(set(message_ids(smtp_server))) == 3
    assert "resume (server): sending again" in lines(logs)


def quota_campaign(tmp_path: Path, smtp_server: SmtpServer) -> tuple[Path, FaultyHandler]:
    """Ann, Bob and Cid invited over one connection with a per_day quota; the server answers
    Bob's RCPT with a quota reply (issue 17)."""
    three = "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\ncid@example.org,Cid,a\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=INVITE_STEP, contacts=three)
    cfg.write_text(cfg.read_text().replace("smtp: {connections: 2}", "smtp: {connections: 1, per_day: 100}"))
    handler = smtp_server.handler
    assert isinstance(handler, FaultyHandler)
    handler.rcpt_replies["bob@example.org"] = "452 4.5.3 Daily user sending quota exceeded"
    return cfg, handler


async def test_a_quota_reply_pauses_sending_until_the_quota_frees_and_nothing_is_lost_or_doubled(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """Issue 17: a 452 "quota" reply stops the pass and pauses the daemon; the sweeps in the
    pause send nothing; at its end the rest goes, each mail once."""
    cfg, handler = quota_campaign(tmp_path, smtp_server)
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        assert [r.rcpt_tos[0] for r in handler.received] == ["ann@example.org"]
        resume = INVITE + timedelta(days=1)  # when ann's attempt leaves the rolling day
        assert d.wake_at == resume
        said = lines(logs)
        assert any(
            m.startswith("pause (server) until 2030-03-05T10:00+01:00: the server answered 452") for m in said
        ), said
        handler.rcpt_replies.clear()  # the provider would take mail again: only the pause holds it

        clock.set(INVITE + timedelta(hours=2))
        await d.tick()  # the one-minute sweep during the pause
        assert len(handler.received) == 1, "nothing goes during the pause"
        assert d.wake_at == resume

        clock.set(resume)
        await d.tick()
        assert_each_once_and_resumed(handler, smtp_server, logs)
        with sqlite3.connect(cfg.parent / "ledger.db") as db:
            got = dict(db.execute("SELECT email, status FROM deliveries"))
            tries = dict(
                db.execute(
                    "SELECT d.email, count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id GROUP BY 1"
                )
            )
        assert got == {"ann@example.org": "sent", "bob@example.org": "sent", "cid@example.org": "sent"}
        assert tries == {"ann@example.org": 1, "bob@example.org": 2, "cid@example.org": 1}
    finally:
        await d.close()


async def test_a_quota_pause_outlives_a_restart_of_the_daemon(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """Issue 17: the pause is kept in the ledger; a daemon started during it (a restart, a
    crash) sends nothing before it ends, says so, and then sends the rest, each mail once."""
    cfg, handler = quota_campaign(tmp_path, smtp_server)
    clock = ManualClock(INVITE)
    first = make_daemon(cfg, clock, smtp_env)
    await first.start(run_jobs=False)
    assert await first.close() == 0
    assert [r.rcpt_tos[0] for r in handler.received] == ["ann@example.org"]
    handler.rcpt_replies.clear()  # the provider would take mail again: only the pause holds it
    resume = INVITE + timedelta(days=1)

    clock.set(INVITE + timedelta(hours=2))
    logs.clear()
    second = make_daemon(cfg, clock, smtp_env)
    await second.start(run_jobs=False)  # its first pass, at once
    try:
        assert len(handler.received) == 1, "the restarted daemon waits for the pause"
        assert second.wake_at == resume
        said = lines(logs)
        assert any(
            m.startswith("pause (server) until 2030-03-05T10:00+01:00: the server answered 452 4.5.3")
            for m in said
        ), said
        clock.set(resume)
        await second.tick()
        assert_each_once_and_resumed(handler, smtp_server, logs)
    finally:
        assert await second.close() == 0
    with sqlite3.connect(cfg.parent / "ledger.db") as db:
        assert db.execute("SELECT count(*) FROM meta WHERE key LIKE 'paused%'").fetchone() == (0,)


# -- an idle daemon does nothing, yet misses nothing (issue 16, target 3) ----------------------


def traced_ledger(db: Path, sql: list[str]) -> Ledger:
    """The daemon's ledger with every SQL statement it runs appended to ``sql``."""
    ledger = Ledger(db, tracer=sql.append)
    ledger.lock()
    return ledger


def rows_read(sql: list[str]) -> list[str]:
    """The statements that read or write the campaign's tables (not the data_version probe)."""
    return [s for s in sql if "data_version" not in s]


async def test_idle_sweeps_read_nothing_until_the_next_steps_time(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """Before: every one-minute sweep planned the whole campaign again (4.4 s of CPU a minute at
    100,000 contacts). Now a sweep with nothing changed runs one PRAGMA and returns."""
    edit(cfg, cfg.read_text() + REMIND_STEP)
    sql: list[str] = []
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env, traced_ledger(load_workspace(cfg).campaign.ledger, sql))
    await d.start(run_jobs=False)
    try:
        assert len(smtp_server.handler.received) == 2
        clock.advance(timedelta(minutes=1))
        await d.tick()  # plans once more after sending: nothing due, so the next sweeps are idle
        sql.clear()
        for _ in range(5):
            clock.advance(timedelta(minutes=1))
            await d.tick()
        assert rows_read(sql) == [], "an idle sweep touched the ledger"
        assert len(sql) == 5
        assert d.wake_at == REMIND

        clock.set(REMIND)  # the clock edge: planned and sent at once
        await d.tick()
        assert len(smtp_server.handler.received) == 4
    finally:
        assert await d.close() == 0


async def test_mailer_retry_from_another_process_is_sent_at_the_next_sweep(
    cfg: Path, smtp_env: dict[str, str]
) -> None:
    handler = FaultyHandler()
    handler.rcpt_replies["bob@example.org"] = "550 5.1.1 no such user"
    with SmtpServer(handler) as server:
        env = {**smtp_env, "MAILER_SMTP_PORT": str(server.port)}
        sql: list[str] = []
        clock = ManualClock(INVITE)
        d = make_daemon(cfg, clock, env, traced_ledger(load_workspace(cfg).campaign.ledger, sql))
        await d.start(run_jobs=False)
        try:
            assert [r.rcpt_tos[0] for r in handler.received] == ["ann@example.org"]
            clock.advance(timedelta(minutes=1))
            await d.tick()
            sql.clear()
            clock.advance(timedelta(minutes=1))
            await d.tick()
            assert rows_read(sql) == [], "idle before the retry"

            handler.rcpt_replies.clear()  # staff fixed the address on the server's side
            done = subprocess.run(
                [sys.executable, "-m", "mailer", "retry", "--config", str(cfg)],
                capture_output=True,
                text=True,
                check=False,
                cwd=cfg.parent,
                env={**os.environ, **env},
            )
            assert done.returncode == 0, done.stderr
            clock.advance(timedelta(minutes=1))
            await d.tick()  # the one-minute sweep
            assert sorted(r.rcpt_tos[0] for r in handler.received) == ["ann@example.org", "bob@example.org"]
        finally:
            assert await d.close() == 0


async def test_a_contact_added_while_idle_is_mailed_after_the_reload(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        for _ in range(3):
            clock.advance(timedelta(minutes=1))
            await d.tick()
        assert d.quiet is not None and len(smtp_server.handler.received) == 2
        csv = cfg.parent / "contacts" / "list.csv"
        edit(csv, csv.read_text() + "cid@example.org,Cid,a\n")
        await settle(d)
        assert subjects(smtp_server)[-1] == "Invitation: Soon -> cid@example.org"
    finally:
        assert await d.close() == 0


async def test_mail_held_for_the_window_costs_no_sweep_and_goes_when_it_opens(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], logs: list[logging.LogRecord]
) -> None:
    """Issue 17's pacing ran on every sweep (2.0 s at 100,000 due mails); while mail waits for
    the window, a sweep does nothing until the window opens."""
    cfg = write_campaign(
        tmp_path, events=EVENTS, steps=INVITE_STEP, extra='delivery: {window: "08:00-09:00"}\n'
    )
    sql: list[str] = []
    clock = ManualClock(INVITE)  # 10:00: the window is closed until tomorrow 08:00
    d = make_daemon(cfg, clock, smtp_env, traced_ledger(load_workspace(cfg).campaign.ledger, sql))
    await d.start(run_jobs=False)
    try:
        opens = (INVITE + timedelta(days=1)).replace(hour=8)
        assert smtp_server.handler.received == [] and d.wake_at == opens
        clock.advance(timedelta(minutes=1))
        await d.tick()  # the first pass recorded the pending rows; this one writes nothing
        sql.clear()
        for _ in range(5):
            clock.advance(timedelta(minutes=1))
            await d.tick()
        assert rows_read(sql) == [], "a sweep re-planned and re-paced mail waiting for the window"

        clock.set(opens)
        await d.tick()
        assert len(smtp_server.handler.received) == 2
    finally:
        assert await d.close() == 0


async def test_an_answer_written_by_another_process_is_seen_at_the_next_sweep(
    cfg: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """Any commit by another connection (``mailer web`` answers, unsubscribes, the inbox) moves
    SQLite's data_version: the next sweep plans again instead of trusting the quiet."""
    clock = ManualClock(INVITE)
    d = make_daemon(cfg, clock, smtp_env)
    await d.start(run_jobs=False)
    try:
        clock.advance(timedelta(minutes=1))
        await d.tick()
        assert d.quiet is not None
        passes = d.passes
        with sqlite3.connect(cfg.parent / "ledger.db") as other:
            other.execute(
                "INSERT INTO replies (campaign, event, email, partstat, at) VALUES "
                "('test', 'ev', 'ann@example.org', 'ACCEPTED', '2030-03-04T09:30:00Z')"
            )
        clock.advance(timedelta(minutes=1))
        await d.tick()
        assert d.passes == passes + 1, "the sweep after another process's write planned again"
        clock.advance(timedelta(minutes=1))
        await d.tick()
        assert d.passes == passes + 1, "and the one after that is idle again"
    finally:
        assert await d.close() == 0

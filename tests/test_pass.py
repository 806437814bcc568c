"""The sending pass as stages, against real parts: dry run = real plan, time going backwards, a
pass that cannot go on (a dead composing worker), a fatal error on one connection while another
finishes its mail, and the composing worker never outliving `mailer send`."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import FaultyHandler, write_campaign

from mailer import runner
from mailer.cli import cli
from mailer.errors import MailerError, TransportFatalError
from mailer.ledger import Ledger
from mailer.runner import run_pass
from mailer.smtpd import SmtpServer
from mailer.transport import TransportSettings
from mailer.workspace import load_workspace

NOW = "2018-01-05T09:00"


def send(*args: str, env: dict[str, str]) -> str:
    r = CliRunner().invoke(cli, ["send", *args], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def dump(db: Path) -> list[Any]:
    """Everything the ledger holds, to show that nothing wrote to it."""
    conn = sqlite3.connect(db)
    try:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("deliveries", "attempts", "revisions", "steps_started", "suppressions", "replies")
        ]
    finally:
        conn.close()


def move_meeting(cfg: Path) -> None:
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace("start: 2018-01-22 09:30", "start: 2018-01-22 10:30").replace(
            "end: 2018-01-22 16:30", "end: 2018-01-22 17:30"
        ),
        encoding="utf-8",
    )


@pytest.mark.slow
def test_dry_run_reports_exactly_what_the_pass_sends_after_a_move(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """Item 4: `send --dry-run` after an event moved said "0 due" while the real pass then sent
    14 updates. Now the dry run plans with the revision it would record, and writes nothing."""
    send("--now", "2018-01-04T10:00", env=smtp_env)
    move_meeting(shipped / "schedules.yaml")
    db = shipped / "mailer.db"
    before = dump(db)
    dry = send("--now", NOW, "--dry-run", env=smtp_env)
    assert dump(db) == before
    assert "14 due" in dry
    ws = load_workspace(shipped / "schedules.yaml")
    when = datetime.fromisoformat(NOW).replace(tzinfo=ws.campaign.timezone)
    with Ledger.read(db) as led:
        planned = asyncio.run(run_pass(ws, led, when, settings=None, dry_run=True)).plan
    assert dump(db) == before
    assert planned is not None
    expected = {(d.step.id, d.contact.email) for d in planned.due}
    assert len(expected) == 14 and {s for s, _ in expected} == {"aan-de-slag~update1"}

    received = smtp_server.handler.received
    first = len(received)
    send("--now", NOW, env=smtp_env)
    with Ledger.read(db) as led:
        sent = {(r["step"], r["email"]) for r in led.log(status="sent") if r["step"].endswith("~update1")}
    assert sent == expected
    assert len(received) - first == 14


@pytest.mark.slow
def test_a_cancellation_recorded_at_an_earlier_now_is_still_sent(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """Item 12: revisions were ordered by recording time, so a cancellation recorded at an
    earlier --now than the update before it was "superseded" and never sent."""
    cfg = shipped / "schedules.yaml"
    send("--now", "2018-01-04T10:00", env=smtp_env)
    move_meeting(cfg)
    assert "update (SEQUENCE 1) for 14" in send("--now", "2018-01-10T09:00", env=smtp_env)
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(
        text.replace("id: aan-de-slag\n", "id: aan-de-slag\n    status: cancelled\n", 1), encoding="utf-8"
    )
    assert "status: cancelled" in cfg.read_text(encoding="utf-8")
    received = smtp_server.handler.received
    first = len(received)
    out = send("--now", "2018-01-06T09:00", env=smtp_env)  # the clock went back four days
    assert "cancel (SEQUENCE 2) for 14" in out
    cancels = [r for r in received[first:] if b"method=CANCEL" in r.data]
    assert len(cancels) == 14
    with Ledger.read(shipped / "mailer.db") as led:
        assert not [r for r in led.log() if "superseded" in (r["reason"] or "")]


# -- a pass that cannot go on --------------------------------------------------------------------

EVENTS = """\
- id: launch
  title: Launch
  start: 2018-01-22 09:30
  end: 2018-01-22 16:30
"""
STEPS = """\
- id: invite
  event: launch
  template: invite
  at: 2018-01-04 10:00
"""


def _contacts(n: int) -> str:
    return "email,name,lists\n" + "".join(f"p{i:04d}@example.org,P {i},a\n" for i in range(n))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _kill_workers() -> int:
    """SIGKILL the composing worker(s): children of this process's forkserver child."""
    killed = 0
    for child in _children(os.getpid()):
        for grandchild in _children(child):
            os.kill(grandchild, signal.SIGKILL)
            killed += 1
    return killed


@pytest.mark.slow
async def test_a_dead_composing_worker_stops_the_pass(
    tmp_path: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9: the worker killed (OOM killer, kill -9) made `mailer send` and the daemon sit
    idle for ever, rows stuck in `sending`. Now the pass stops within seconds with a clear
    error, every outcome received is recorded and nothing is left `sending`."""
    monkeypatch.setattr(runner, "WORKER_MIN", 1)
    monkeypatch.setattr(runner, "CLAIM_BATCH", 5)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=_contacts(60))
    ws = load_workspace(cfg)
    settings = TransportSettings(host=smtp_server.host, port=smtp_server.port, tls="none", connections=2)
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if done == 3 and not killed:
            killed.append(_kill_workers())

    t0 = time.monotonic()
    with Ledger.create(tmp_path / "ledger.db") as led:
        with pytest.raises(MailerError, match="composing worker"):
            await asyncio.wait_for(
                run_pass(ws, led, datetime(2018, 1, 4, 10, tzinfo=UTC), settings=settings, progress=progress),
                timeout=60,
            )
        assert killed and killed[0] >= 1
        assert time.monotonic() - t0 < 30
        rows = list(led.log(columns=("email", "status")))
    status = {r["email"]: r["status"] for r in rows}
    assert "sending" not in status.values()
    got = {rcpt for r in smtp_server.handler.received for rcpt in r.rcpt_tos}
    assert {e for e, s in status.items() if s == "sent"} == got
    assert len(status) == 60 and set(status.values()) <= {"sent", "pending"}


async def test_a_login_failure_on_one_connection_lets_the_other_finish_its_mail(tmp_path: Path) -> None:
    """Item 11: a login failure on one connection reset a mail another connection had just
    delivered (250 to its DATA) to `pending` with 0 tries: it would be delivered twice."""
    from aiosmtpd.smtp import AuthResult, LoginPassword

    logins: list[bool] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and not logins  # the first login only
        logins.append(ok)
        return AuthResult(success=ok, handled=False, message=None if ok else "535 5.7.8 go away")

    handler = FaultyHandler(data_delay=1.0)
    with SmtpServer(handler, authenticator=authenticator, auth_require_tls=False) as server:
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=_contacts(6))
        ws = load_workspace(cfg)
        settings = TransportSettings(
            host=server.host, port=server.port, tls="none", connections=2, username="u", password="p"
        )
        with Ledger.create(tmp_path / "ledger.db") as led:
            with pytest.raises(TransportFatalError, match="login refused"):
                await run_pass(ws, led, datetime(2018, 1, 4, 10, tzinfo=UTC), settings=settings)
            rows = {r["email"]: r for r in led.log(columns=("email", "status", "attempts"))}
    delivered = {rcpt for r in handler.received for rcpt in r.rcpt_tos}
    assert len(delivered) == 1
    for email, r in rows.items():
        if email in delivered:
            assert (r["status"], r["attempts"]) == ("sent", 1)
        else:
            assert (r["status"], r["attempts"]) == ("pending", 0)


@pytest.mark.slow
def test_killing_mailer_send_leaves_no_worker_behind(tmp_path: Path) -> None:
    """Item 9: 25 `kill -9` of `mailer send` left 54 orphan composing workers holding its
    stdout, so `$(mailer send)` never returned. The worker now dies with the sender."""
    handler = FaultyHandler(data_delay=0.01)
    with SmtpServer(handler) as server:
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=_contacts(1500))
        mark = uuid.uuid4().hex
        env = os.environ | {
            "MAILER_SMTP_HOST": server.host,
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "none",
            "MAILER_TEST_MARK": mark,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "send", "--config", str(cfg), "--now", "2018-01-04T10:00"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(handler.received) < 30 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(handler.received) >= 30, "the send did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = threading.Event()
        stdout = proc.stdout

        def drain() -> None:
            stdout.read()  # returns at EOF: once no process holds the pipe any more
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        assert done.wait(10), "something still holds the killed sender's stdout"
        deadline = time.monotonic() + 10
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _marked(mark) == []


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (the sender's children inherit it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MAILER_TEST_MARK={mark}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_ctrl_c_stops_mailer_send_in_order(tmp_path: Path) -> None:
    """Item 11: Ctrl-C cancelled the pass mid-mail. Now the first SIGINT lets each connection
    finish and record its mail; the rest go back to pending; exit 1, no traceback."""
    handler = FaultyHandler(data_delay=0.05)
    with SmtpServer(handler) as server:
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=_contacts(200))
        env = os.environ | {
            "MAILER_SMTP_HOST": server.host,
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "none",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "send", "--config", str(cfg), "--now", "2018-01-04T10:00"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            text=True,
        )
        deadline = time.monotonic() + 60
        while len(handler.received) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, output
        assert "Traceback" not in output and "finishing the mails in flight" in output
        with Ledger.read(tmp_path / "ledger.db") as led:
            status = {r["email"]: r["status"] for r in led.log(columns=("email", "status"))}
        delivered = {rcpt for r in handler.received for rcpt in r.rcpt_tos}
        assert {e for e, s in status.items() if s == "sent"} == delivered
        assert set(status.values()) == {"sent", "pending"}

"""`mailer run` in a subprocess on the real clock: a mail arrives on time, a second daemon is
refused, SIGTERM stops it with 0; a ledger write that fails stops it with 1 (no traceback)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import write_campaign

from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer
from mailer.vocab import Status

pytestmark = pytest.mark.slow
TZ = ZoneInfo("Europe/Brussels")


def local(dt: datetime) -> str:
    return dt.astimezone(TZ).strftime("%Y-%m-%d %H:%M:%S")


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def campaign_due_in(folder: Path, seconds: float) -> tuple[Path, datetime]:
    at = datetime.now(TZ).replace(microsecond=0) + timedelta(seconds=seconds)
    event = at + timedelta(days=1)
    events = (
        f'- {{id: ev, title: Soon, start: "{local(event)}", end: "{local(event + timedelta(hours=2))}"}}\n'
    )
    steps = f'- {{id: invite, event: ev, template: invite, at: "{local(at)}"}}\n'
    return write_campaign(folder, events=events, steps=steps), at


class Run:
    """``mailer run`` with its stderr in a file."""

    def __init__(self, cfg: Path, env: dict[str, str]) -> None:
        self.log = cfg.parent / f"daemon-{time.monotonic_ns()}.log"
        self.fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "run", "--config", str(cfg)],
            env={**os.environ, **env},
            stdout=self.fh,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.fh.close()


def test_mailer_run_sends_on_time_and_stops_on_sigterm(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    # far enough ahead that the daemon is usually up and waiting when the step falls due
    cfg, at = campaign_due_in(tmp_path, 3)
    received = smtp_server.handler.received
    d = Run(cfg, smtp_env)
    try:
        assert wait_for(lambda: "start:" in d.text(), 15), d.text()
        other = subprocess.run(
            [sys.executable, "-m", "mailer", "run", "--config", str(cfg)],
            env={**os.environ, **smtp_env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert other.returncode == 1 and "in use by another mailer process" in other.stderr
        assert wait_for(lambda: len(received) >= 2, 15), d.text()
        arrived = time.time()
        assert arrived >= at.timestamp() - 0.05, "not early"
        assert arrived - at.timestamp() < 3.0, "on time (when the daemon was up before the step)"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.wait(10)
        assert code == 0 and time.monotonic() - t0 < 5, d.text()
        assert d.text().rstrip().endswith("stop")
    finally:
        d.kill()
    assert len(received) == 2


#: Where SQLite refuses a write of the pass: (table, condition). Marking the step started is
#: the pass's first write; the claim (rows to 'sending', committed before any DATA) comes later.
FAULTS = {
    "step": ("steps_started", "1"),
    "claim": ("deliveries", f"NEW.status = '{Status.SENDING}'"),
}


@pytest.mark.parametrize("where", ["step", "claim"])
def test_a_write_that_fails_stops_mailer_run_with_status_1(
    where: str, tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg, at = campaign_due_in(tmp_path, 2)
    db = tmp_path / "ledger.db"
    Ledger(db).close()
    # A real fault in the real file: SQLite itself refuses the write (as a full disk would).
    table, condition = FAULTS[where]
    c = sqlite3.connect(db, isolation_level=None)
    for when in ("INSERT", "UPDATE"):
        c.execute(
            f"CREATE TRIGGER fault_{when.lower()} BEFORE {when} ON {table} WHEN {condition}"
            " BEGIN SELECT RAISE(ABORT, 'injected fault: the write fails'); END"
        )
    c.close()
    d = Run(cfg, smtp_env)
    try:
        code = d.wait(at.timestamp() - time.time() + 6)
        assert code == 1, d.text()
        text = d.text()
        assert "Traceback" not in text, text
        errors = [line for line in text.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "stopping: the pass failed: " in errors[0], text
        assert "injected fault: the write fails" in errors[0]
    finally:
        d.kill()
    with Ledger(db) as ledger:
        ledger.lock()  # released
        statuses = {r[0] for r in ledger.conn.execute("SELECT status FROM deliveries")}
    assert Status.SENDING not in statuses, "nothing left in 'sending'"
    assert smtp_server.handler.received == []


def test_mailer_run_refuses_to_start_on_templates_that_do_not_render(tmp_path: Path) -> None:
    """The reload's render gate also guards the start: a template that fails for some
    recipient stops `mailer run` at once (exit 1, each problem at ERROR, no ledger written)."""
    cfg, _ = campaign_due_in(tmp_path, 3600)
    (tmp_path / "templates" / "invite" / "en" / "subject.txt").write_text("{{ event.titel }}")
    run = Run(cfg, {"MAILER_SMTP_HOST": "127.0.0.1", "MAILER_SMTP_PORT": "9", "MAILER_SMTP_TLS": "none"})
    try:
        assert run.wait(30) == 1, run.text()
        text = run.text()
        assert "ERROR" in text and "subject.txt" in text and "titel" in text and "Traceback" not in text
        assert not (tmp_path / "ledger.db").exists()
    finally:
        run.kill()

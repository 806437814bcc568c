"""The daemon in a subprocess against a real SMTP server: on time, reload, stop, restart, lock."""

from __future__ import annotations

import email
import email.policy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import write_campaign

from mailer.smtpd import SmtpServer

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


class Daemon:
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

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.fh.close()


def test_daemon_sends_on_time_reloads_and_stops(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    start = datetime.now(TZ).replace(microsecond=0)
    # far enough ahead that the daemon is up and waiting (not catching up) when it falls due
    first_at = start + timedelta(seconds=8)
    event = start + timedelta(days=1)
    events = (
        f'- {{id: ev, title: Soon, start: "{local(event)}", end: "{local(event + timedelta(hours=2))}"}}\n'
    )
    steps = f'- {{id: invite, event: ev, template: invite, at: "{local(first_at)}"}}\n'
    cfg = write_campaign(tmp_path, events=events, steps=steps)
    received = smtp_server.handler.received
    arrival: dict[str, float] = {}

    d = Daemon(cfg, smtp_env)
    try:
        assert wait_for(lambda: "start:" in d.text(), 15), d.text()
        assert time.time() < first_at.timestamp() - 0.5, "the daemon took too long to start"
        # a second daemon on the same ledger is refused
        other = subprocess.run(
            [sys.executable, "-m", "mailer", "run", "--config", str(cfg)],
            env={**os.environ, **smtp_env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert other.returncode == 1 and "in use by another mailer process" in other.stderr
        assert wait_for(lambda: len(received) >= 2, 20), d.text()
        arrival["invite"] = time.time()
        assert arrival["invite"] - first_at.timestamp() < 2.0, "mails arrive within 2 s of their time"
        assert arrival["invite"] >= first_at.timestamp() - 0.05, "not early"

        # an edit that adds a step is picked up
        second_at = datetime.now(TZ).replace(microsecond=0) + timedelta(seconds=5)
        text = cfg.read_text()
        cfg.write_text(text + f'  - {{id: remind, event: ev, template: remind, at: "{local(second_at)}"}}\n')
        assert wait_for(lambda: "reload" in d.text(), 10), d.text()
        assert wait_for(lambda: len(received) >= 4, 15), d.text()
        assert time.time() - second_at.timestamp() < 2.5

        # an invalid edit is logged and the daemon keeps running
        good = cfg.read_text()
        cfg.write_text(good.replace("timezone: Europe/Brussels", "timezone: Mars/Olympus"))
        assert wait_for(lambda: "reload refused" in d.text(), 10), d.text()
        assert "Mars/Olympus" in d.text()
        assert d.proc.poll() is None
        cfg.write_text(good)
    finally:
        t0 = time.monotonic()
        code = d.stop()
    assert code == 0 and time.monotonic() - t0 < 5
    assert "stop" in d.text()
    assert len(received) == 4

    # a restart sends nothing twice
    d2 = Daemon(cfg, smtp_env)
    try:
        assert wait_for(lambda: "start:" in d2.text(), 15)
        time.sleep(1.5)
    finally:
        assert d2.stop() == 0
    ids = [email.message_from_bytes(r.data, policy=email.policy.default)["Message-ID"] for r in received]
    assert len(ids) == len(set(ids)) == 4

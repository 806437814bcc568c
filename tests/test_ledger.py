"""The SQLite ledger on real files: transitions, crash leftovers, the lock."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailer.errors import LedgerError, LockedError
from mailer.ledger import Ledger

T0 = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)


def item(email: str, step: str = "invite") -> tuple[str, str, str, str, datetime, str, int, bool]:
    return (step, "ev", email, email.split("@")[0], T0, f"<{email}.{step}@example.org>", 0, True)


def test_file_is_wal_with_schema_version(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == 1
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # reopening keeps the data and the version
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == 1


def test_claim_then_sent_records_attempt(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [(rid, claimed, _)] = led.claim("c", [item("a@example.org")], T0)
        assert claimed == T0
        assert led.get("c", "invite", "a@example.org").status == "sending"  # type: ignore[union-attr]
        led.sent(rid, 250, "250 OK", T0 + timedelta(seconds=1))
    # another connection (another process) sees the commit
    with Ledger(tmp_path / "l.db") as other:
        r = other.get("c", "invite", "a@example.org")
        assert r is not None and r.status == "sent" and r.attempts == 1
        assert [a["outcome"] for a in other.attempts(r.id)] == ["sent"]


def test_reclaim_of_sending_keeps_claim_time(tmp_path: Path) -> None:
    """A crash leaves 'sending'; the re-send must be byte-identical, so Date/DTSTAMP stay."""
    with Ledger(tmp_path / "l.db") as led:
        led.claim("c", [item("a@example.org")], T0)
        [(rid, claimed, _)] = led.claim("c", [item("a@example.org")], T0 + timedelta(hours=1))
        assert claimed == T0


def test_unique_per_campaign_step_contact(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.claim("c", [item("a@example.org"), item("a@example.org", "remind")], T0)
        led.claim("c", [item("a@example.org")], T0)
        assert len(list(led.log(campaign="c"))) == 2


def test_record_never_overwrites_final(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [(rid, _, _)] = led.claim("c", [item("a@example.org")], T0)
        led.sent(rid, 250, "OK", T0)
        n = led.record(
            "c",
            [("invite", "ev", "a@example.org", "", T0), ("invite", "ev", "b@example.org", "", T0)],
            status="skipped",
            reason="late",
            now=T0,
        )
        assert n == 1
        assert led.get("c", "invite", "a@example.org").status == "sent"  # type: ignore[union-attr]
        assert led.get("c", "invite", "b@example.org").status == "skipped"  # type: ignore[union-attr]


def test_defer_fail_retry(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [(ra, _, _), (rb, _, _)] = led.claim(
            "c", [item("a@example.org"), item("b@example.org")], T0
        )
        led.deferred(ra, 451, "try later", T0, T0 + timedelta(minutes=1))
        led.failed(rb, 550, "no such user", T0)
        summary = {(r["step"], r["status"]): r["n"] for r in led.summary("c")}
        assert summary == {("invite", "deferred"): 1, ("invite", "failed"): 1}
        assert [r["smtp_text"] for r in led.log(status="failed")] == ["no such user"]
        assert led.retry("c", None, T0) == 1
        assert led.get("c", "invite", "b@example.org").status == "pending"  # type: ignore[union-attr]


def test_release_returns_unsent_claims(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [(ra, _, _)] = led.claim("c", [item("a@example.org")], T0)
        led.release([ra], T0)
        assert led.get("c", "invite", "a@example.org").status == "pending"  # type: ignore[union-attr]


def test_lock_refuses_second_process(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mailer.ledger import Ledger\nl=Ledger({str(db)!r}); l.lock(); print('locked', flush=True)\n"
            "import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with Ledger(db) as led, pytest.raises(LockedError) as info:
            led.lock()
        assert f"pid {holder.pid}" in str(info.value)
        # SIGKILL: the kernel drops the lock, no stale lock file blocks the next start
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with Ledger(db) as led:
            led.lock()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "nope" / "l.db")


def test_not_a_ledger(tmp_path: Path) -> None:
    bad = tmp_path / "x.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a mailer ledger"):
        Ledger(bad)


def test_status_queries_use_indexes(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        plan = " ".join(
            str(r)
            for r in led.conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM deliveries WHERE status='failed'"
            )
        )
        assert "USING INDEX" in plan
        plan = " ".join(
            str(r)
            for r in led.conn.execute(
                "EXPLAIN QUERY PLAN SELECT campaign, step, status, count(*) FROM deliveries GROUP BY campaign, step, status"
            )
        )
        assert "COVERING INDEX" in plan or "USING INDEX" in plan

"""The SQLite ledger on real files: transitions, crash leftovers, the lock, the schema."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailer.errors import LedgerError, LockedError
from mailer.ledger import SCHEMA_VERSION, STATUSES, Ledger, Outcome

T0 = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)


def item(email: str, step: str = "invite") -> tuple[str, str, str, str, datetime, str, int, bool]:
    return (step, "ev", email, email.split("@")[0], T0, f"<{email}.{step}@example.org>", 0, True)


def test_file_is_wal_with_schema_version(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == 3
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # reopening keeps the data and the version
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == 3


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
        [(ra, _, _), (rb, _, _)] = led.claim("c", [item("a@example.org"), item("b@example.org")], T0)
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
            for r in led.conn.execute("EXPLAIN QUERY PLAN SELECT * FROM deliveries WHERE status='failed'")
        )
        assert "USING INDEX" in plan


def test_summary_reads_no_index_entry_per_delivery(tmp_path: Path) -> None:
    """`mailer status` on a big ledger: summary() scans no table or index of deliveries
    (the counts come from delivery_counts, the earliest retry from a SEARCH of one status)."""
    with Ledger(tmp_path / "l.db") as led:
        [(ra, _, _), _] = led.claim("c", [item("a@example.org"), item("b@example.org")], T0)
        led.deferred(ra, 451, "later", T0, T0 + timedelta(minutes=5))
        for campaign in (None, "c"):
            sql: list[str] = []
            led.conn.set_trace_callback(sql.append)
            assert {(r["status"], r["n"]) for r in led.summary(campaign)} == {("deferred", 1), ("sending", 1)}
            led.conn.set_trace_callback(None)
            assert len(sql) == 2
            for q in sql:
                plan = [r[3] for r in led.conn.execute("EXPLAIN QUERY PLAN " + q)]
                assert not [p for p in plan if p.startswith("SCAN deliveries")], (q, plan)
            assert any("delivery_counts" in q for q in sql)


# -- delivery_counts: kept by triggers, filled by the version-2 migration ----------------------

CAMPAIGNS = ("c1", "c2")
STEPS = ("invite", "remind")
EMAILS = [f"user{i}@example.org" for i in range(14)]


def group_by(conn: sqlite3.Connection) -> dict[tuple[str, str, str], int]:
    """The truth: deliveries counted row by row."""
    cur = conn.execute("SELECT campaign, step, status, count(*) FROM deliveries GROUP BY 1, 2, 3")
    return {(c, s, st): n for c, s, st, n in cur}


def counts(conn: sqlite3.Connection) -> dict[tuple[str, str, str], int]:
    """What the triggers kept (zero rows may stay; a negative count never)."""
    rows = conn.execute("SELECT campaign, step, status, n FROM delivery_counts").fetchall()
    assert all(n >= 0 for *_, n in rows), rows
    return {(c, s, st): n for c, s, st, n in rows if n}


def expected_summary(conn: sqlite3.Connection, campaign: str | None = None) -> list[dict[str, Any]]:
    """summary() as the old GROUP BY over deliveries computed it, row by row in Python."""
    n: Counter[tuple[str, str, str]] = Counter()
    retry: dict[tuple[str, str], str] = {}
    for c, s, st, nxt in conn.execute("SELECT campaign, step, status, next_attempt FROM deliveries"):
        if campaign in (None, c):
            n[c, s, st] += 1
            if st == "deferred" and nxt is not None:
                retry[c, s] = min(retry.get((c, s), nxt), nxt)
    return [
        {
            "campaign": c,
            "step": s,
            "status": st,
            "n": k,
            "next_attempt": retry.get((c, s)) if st == "deferred" else None,
        }
        for (c, s, st), k in sorted(n.items())
    ]


def random_operations(led: Ledger, rnd: random.Random, n: int, check: Any) -> Counter[str]:
    """``n`` random ledger operations as runner.py, inbox.py and the CLI make them, with
    ``check()`` after each one. Returns how often each kind ran."""
    done: Counter[str] = Counter()
    now = T0

    def some(seq: list[Any] | tuple[Any, ...], k: int) -> list[Any]:
        return rnd.sample(list(seq), min(len(seq), rnd.randint(1, k)))

    def ids(status: str) -> list[int]:
        return [i for (i,) in led.conn.execute("SELECT id FROM deliveries WHERE status=?", (status,))]

    for _ in range(n):
        now += timedelta(seconds=rnd.randint(1, 90))
        campaign, step = rnd.choice(CAMPAIGNS), rnd.choice(STEPS)
        op = rnd.choice(
            [
                "add_pending",
                "claim",
                "claim",
                "outcomes",
                "outcomes",
                "release",
                "retry",
                "record",
                "bounced",
                "revision",
                "delete",
                "move",
                "replace",
            ]
        )
        if op == "add_pending":
            led.add_pending(campaign, [(step, "ev", e, "", T0) for e in some(EMAILS, 6)], now)
        elif op == "claim":
            # CLAIM_BATCH-sized batches in runner.py; a few here, some rows already claimed
            led.claim(campaign, [item(e, step) for e in some(EMAILS, 5)], now)
        elif op == "outcomes":  # one group commit, as runner.flush() makes it
            batch = []
            for rid in some(ids("sending"), 4):
                kind = rnd.choice(["sent", "sent", "deferred", "failed"])
                nxt = now + timedelta(minutes=rnd.randint(1, 60)) if kind == "deferred" else None
                batch.append(Outcome(rid, kind, 250 if kind == "sent" else 451, "reply", now, nxt))
            led.outcomes(batch)
        elif op == "release":
            led.release(some(ids("sending"), 3), now)
        elif op == "retry":
            led.retry(rnd.choice([campaign, None]), rnd.choice([step, None]), now)
        elif op == "record":
            status = rnd.choice(["skipped", "suppressed", "failed"])
            items = [(step, "ev", e, "", T0) for e in some(EMAILS, 4)]
            led.record(campaign, items, status=status, reason="planner", now=now)
        elif op == "bounced":
            e = rnd.choice(EMAILS)
            mid = rnd.choice([f"<{e}.{step}@example.org>", None])  # the claim's Message-ID, or none
            led.bounced(e, mid, "5.1.1", "user unknown", now)
        elif op == "revision":  # an event update: pending update rows in the same commit
            seq = done["revision"] + 1
            people = [(f"update-{seq}", e, "") for e in some(EMAILS, 5)]
            led.add_revision(campaign, "ev", seq, "update", f"fp{seq}", "{}", now, people)
        elif op == "delete":  # by hand (sqlite3 shell); attempts reference the row
            for rid in some([i for (i,) in led.conn.execute("SELECT id FROM deliveries")], 2):
                led.conn.execute("DELETE FROM attempts WHERE delivery_id=?", (rid,))
                led.conn.execute("DELETE FROM deliveries WHERE id=?", (rid,))
        elif op == "move":  # by hand: a row moved to another step (the UPDATE trigger's old/new)
            led.conn.execute(
                "UPDATE OR IGNORE deliveries SET step=?, campaign=? WHERE id IN"
                " (SELECT id FROM deliveries ORDER BY random() LIMIT 1)",
                (rnd.choice(STEPS), rnd.choice(CAMPAIGNS)),
            )
        elif op == "replace":  # REPLACE deletes the conflicting row: the DELETE trigger must fire
            e = rnd.choice(EMAILS)
            led.conn.execute(
                "DELETE FROM attempts WHERE delivery_id IN"
                " (SELECT id FROM deliveries WHERE campaign=? AND step=? AND email=?)",
                (campaign, step, e),
            )
            led.conn.execute(
                "INSERT OR REPLACE INTO deliveries (campaign, step, event, email, status, due_at,"
                " created, updated) VALUES (?, ?, 'ev', ?, 'skipped', 'x', 'x', 'x')",
                (campaign, step, e),
            )
        done[op] += 1
        check()
    return done


def test_counts_follow_every_ledger_operation(tmp_path: Path) -> None:
    rnd = random.Random(20180104)
    seen: set[str] = set()
    with Ledger(tmp_path / "l.db") as led:

        def check() -> None:
            truth = group_by(led.conn)
            assert counts(led.conn) == truth
            assert led.summary() == expected_summary(led.conn)
            assert led.summary("c2") == expected_summary(led.conn, "c2")
            seen.update(st for _, _, st in truth)

        done = random_operations(led, rnd, 400, check)
    # the sequence really went through every operation and every status
    assert set(done) >= {
        "add_pending",
        "claim",
        "outcomes",
        "release",
        "retry",
        "record",
        "bounced",
        "revision",
        "delete",
        "move",
        "replace",
    }
    assert seen == set(STATUSES)
    # and another connection (another process) reads the same counts
    with Ledger(tmp_path / "l.db") as other:
        assert counts(other.conn) == group_by(other.conn) != {}


def make_v1(path: Path, seed: int = 6, n: int = 150) -> dict[tuple[str, str, str], int]:
    """A real version-1 ledger: filled through the ledger, then the version-2 and -3 objects dropped,
    as early version-1 files are: without an index added later, with one removed later.
    Returns its GROUP BY counts."""
    with Ledger(path) as led:
        random_operations(led, random.Random(seed), n, lambda: None)
        truth = group_by(led.conn)
        c = led.conn
        for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            c.execute(f"DROP TRIGGER {name}")
        c.execute("DROP TABLE delivery_counts")
        c.execute("ALTER TABLE replies DROP COLUMN sequence")  # version 3
        c.execute("DROP INDEX deliveries_by_message_id")
        c.execute("CREATE INDEX deliveries_status_only ON deliveries (status, campaign)")
        c.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'delivery_counts%'").fetchall() == []
    conn.close()
    return truth


def test_version_2_ledger_gets_reply_sequences(tmp_path: Path) -> None:
    """A version-2 file (counts, no replies.sequence, the old status index) runs step 3 only:
    its answers stay, with no SEQUENCE (they count for every revision), and its counts stay."""
    db = tmp_path / "l.db"
    when = datetime(2018, 1, 5, 9, 0, tzinfo=UTC)
    with Ledger(db) as led:
        random_operations(led, random.Random(3), 80, lambda: None)
        led.record_reply("c", "ev", "ann@example.org", "ACCEPTED", when, "<a@x>", 4)
        c = led.conn
        c.execute("ALTER TABLE replies DROP COLUMN sequence")
        c.execute("CREATE INDEX deliveries_by_status ON deliveries (campaign, step, status)")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        before = counts(c)
    with Ledger(db) as led:
        assert led.schema_version == 3
        names = {r[0] for r in led.conn.execute("SELECT name FROM sqlite_master")}
        assert "deliveries_by_status" not in names and "delivery_counts_insert" in names
        assert counts(led.conn) == before == group_by(led.conn)
        assert led.replies("c") == {("ev", "ann@example.org"): "ACCEPTED"}
        assert led.conn.execute("SELECT sequence FROM replies").fetchall() == [(None,)]


def test_version_1_ledger_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    truth = make_v1(db)
    assert truth and sum(truth.values()) > 30
    with Ledger(db) as led:
        assert led.schema_version == 3
        assert counts(led.conn) == truth == group_by(led.conn)
        assert led.summary() == expected_summary(led.conn)
        names = {r[0] for r in led.conn.execute("SELECT name FROM sqlite_master")}
        assert {"delivery_counts_insert", "delivery_counts_update", "delivery_counts_delete"} <= names
        assert "deliveries_by_message_id" in names  # version 1's script ran again
        assert "deliveries_status_only" not in names and "attempts_by_time" not in names
        # the triggers are live on the migrated file
        random_operations(led, random.Random(7), 60, lambda: None)
        assert counts(led.conn) == group_by(led.conn) != truth
    with Ledger(db) as led:  # reopening does not migrate (or count) again
        assert counts(led.conn) == group_by(led.conn)


_OPEN_ON_GO = """
import json, sqlite3, sys
from mailer.ledger import Ledger
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
sql = []
conn.set_trace_callback(sql.append)
print("ready", flush=True)
sys.stdin.readline()
with Ledger(conn) as led:
    print(json.dumps({"version": led.schema_version, "sql": sql}), flush=True)
"""


def test_concurrent_opens_migrate_once(tmp_path: Path) -> None:
    """Three processes open the same version-1 file at once: each reads version 1, the first
    to take the write lock migrates, the others then find it current and count nothing."""
    db = tmp_path / "l.db"
    truth = make_v1(db, n=400)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_ON_GO, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        # Hold the write lock while they start, so all of them read version 1 before any
        # migrates (reads go on under WAL); they queue on BEGIN IMMEDIATE behind it.
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        time.sleep(1.0)
        holder.execute("COMMIT")
        holder.close()
        reports = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
            reports.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [r["version"] for r in reports] == [SCHEMA_VERSION] * 3
    tried = [r for r in reports if "BEGIN IMMEDIATE" in r["sql"]]
    migrated = [r for r in reports if any(q.startswith("CREATE TABLE delivery_counts") for q in r["sql"])]
    assert len(tried) >= 2  # they saw version 1 at once: the race really happened
    assert len(migrated) == 1
    with Ledger(db) as led:
        assert counts(led.conn) == truth == group_by(led.conn)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with Ledger(db) as led:
        led.conn.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    with pytest.raises(
        LedgerError, match=r"ledger schema 4 is newer than this mailer understands \(3\); upgrade"
    ):
        Ledger(db)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("4",)
    conn.close()

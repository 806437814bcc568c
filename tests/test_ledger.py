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
from mailer.ledger import SCHEMA_VERSION, Ledger
from mailer.store import Claim, Decided, NewRow, Outcome, RecordedRevision
from mailer.vocab import FINAL, Attempt, Status

T0 = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)


def item(email: str, step: str = "invite") -> Claim:
    return Claim(step, "ev", email, email.split("@")[0], T0, f"<{email}.{step}@example.org>", 0, True)


def claim(led: Ledger, *items: Claim, at: datetime = T0) -> list[int]:
    """Claim and return the row ids (every item must be claimable)."""
    out = led.claim("c", list(items), at)
    assert all(c is not None for c in out), out
    return [c.id for c in out if c is not None]


def outcome(
    led: Ledger,
    rid: int,
    attempt: Attempt,
    code: int | None,
    text: str,
    at: datetime = T0,
    nxt: datetime | None = None,
) -> None:
    led.record_outcomes([Outcome(rid, attempt, code, text, at, nxt)])


def test_file_is_wal_with_schema_version(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == SCHEMA_VERSION
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # reopening keeps the data and the version
    with Ledger(tmp_path / "l.db") as led:
        assert led.schema_version == SCHEMA_VERSION


def test_claim_then_sent_records_attempt(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [claimed] = led.claim("c", [item("a@example.org")], T0)
        assert claimed is not None and claimed.claimed_at == T0
        assert led.row("c", "invite", "a@example.org").status == "sending"  # type: ignore[union-attr]
        outcome(led, claimed.id, Attempt.SENT, 250, "250 OK", T0 + timedelta(seconds=1))
    # another connection (another process) sees the commit
    with Ledger(tmp_path / "l.db") as other:
        r = other.row("c", "invite", "a@example.org")
        assert r is not None and r.status == "sent" and r.attempts == 1
        assert [a["outcome"] for a in other.attempts(r.id)] == ["sent"]


def test_reclaim_of_sending_keeps_claim_time(tmp_path: Path) -> None:
    """A crash leaves 'sending'; the re-send must be byte-identical, so Date/DTSTAMP stay."""
    with Ledger(tmp_path / "l.db") as led:
        led.claim("c", [item("a@example.org")], T0)
        [again] = led.claim("c", [item("a@example.org")], T0 + timedelta(hours=1))
        assert again is not None and again.claimed_at == T0


def test_unique_per_campaign_step_contact(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.claim("c", [item("a@example.org"), item("a@example.org", "remind")], T0)
        led.claim("c", [item("a@example.org")], T0)
        assert len(list(led.log(campaign="c"))) == 2


def test_record_never_overwrites_final(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [rid] = claim(led, item("a@example.org"))
        outcome(led, rid, Attempt.SENT, 250, "OK")
        n = led.record_decided(
            "c",
            [
                Decided("invite", "ev", e, "", T0, Status.SKIPPED, "late")
                for e in ("a@example.org", "b@example.org")
            ],
            T0,
        )
        assert n[Status.SKIPPED] == 1
        assert led.row("c", "invite", "a@example.org").status == "sent"  # type: ignore[union-attr]
        assert led.row("c", "invite", "b@example.org").status == "skipped"  # type: ignore[union-attr]


def test_defer_fail_retry(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        ra, rb = claim(led, item("a@example.org"), item("b@example.org"))
        outcome(led, ra, Attempt.DEFERRED, 451, "try later", T0, T0 + timedelta(minutes=1))
        outcome(led, rb, Attempt.FAILED, 550, "no such user")
        summary = {(r["step"], r["status"]): r["n"] for r in led.summary("c")}
        assert summary == {("invite", "deferred"): 1, ("invite", "failed"): 1}
        assert [r["smtp_text"] for r in led.log(status="failed")] == ["no such user"]
        assert led.retry("c", None, T0) == 1
        assert led.row("c", "invite", "b@example.org").status == "pending"  # type: ignore[union-attr]


def test_release_returns_unsent_claims(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [ra] = claim(led, item("a@example.org"))
        led.release([ra], T0)
        assert led.row("c", "invite", "a@example.org").status == "pending"  # type: ignore[union-attr]


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
        ra, _ = claim(led, item("a@example.org"), item("b@example.org"))
        outcome(led, ra, Attempt.DEFERRED, 451, "later", T0, T0 + timedelta(minutes=5))
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
            led.add_pending(campaign, [NewRow(step, "ev", e, "", T0) for e in some(EMAILS, 6)], now)
        elif op == "claim":
            # CLAIM_BATCH-sized batches in runner.py; a few here, some rows already claimed
            led.claim(campaign, [item(e, step) for e in some(EMAILS, 5)], now)
        elif op == "outcomes":  # one group commit, as runner.flush() makes it
            batch = []
            for rid in some(ids("sending"), 4):
                kind = rnd.choice(
                    [Attempt.SENT, Attempt.SENT, Attempt.DEFERRED, Attempt.FAILED, Attempt.UNKNOWN]
                )
                nxt = now + timedelta(minutes=rnd.randint(1, 60)) if kind != Attempt.SENT else None
                batch.append(Outcome(rid, kind, 250 if kind == "sent" else 451, "reply", now, nxt))
            led.record_outcomes(batch)
        elif op == "release":
            led.release(some(ids("sending"), 3), now)
        elif op == "retry":
            led.retry(
                rnd.choice([campaign, None]),
                rnd.choice([step, None]),
                now,
                status=rnd.choice([Status.FAILED, Status.SKIPPED]),
            )
        elif op == "record":
            status = rnd.choice([Status.SKIPPED, Status.SUPPRESSED, Status.FAILED, Status.INVALID])
            led.record_decided(
                campaign, [Decided(step, "ev", e, "", T0, status, "planner") for e in some(EMAILS, 4)], now
            )
        elif op == "bounced":
            e = rnd.choice(EMAILS)  # a DSN tied to one of e's deliveries (VERP token or Message-ID):
            # mostly one that was sent (it becomes bounced), else any (a final row stays as it is)
            rows = [
                (i, st) for i, st in led.conn.execute("SELECT id, status FROM deliveries WHERE email=?", (e,))
            ]
            sent = [i for i, st in rows if st == Status.SENT]
            if rows:
                pick = rnd.choice(sent) if sent and rnd.random() < 0.8 else rnd.choice(rows)[0]
                led.record_bounce(pick, e, "5.1.1", "user unknown", now)
        elif op == "revision":  # an event update: pending update rows in the same commit
            seq = done["revision"] + 1
            people = [(e, "") for e in some(EMAILS, 5)]
            rev = RecordedRevision("ev", seq, "update", f"fp{seq}", "{}", now)
            led.record_revision(campaign, rev, f"update-{seq}", people)
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
    assert seen == set(Status)
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
        c.execute("ALTER TABLE deliveries DROP COLUMN partstat")  # version 5
        c.execute("DROP TABLE unmatched_replies")  # version 4
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
        c.execute("ALTER TABLE deliveries DROP COLUMN partstat")  # version 5
        c.execute("DROP TABLE unmatched_replies")  # version 4
        c.execute("ALTER TABLE replies DROP COLUMN sequence")
        c.execute("CREATE INDEX deliveries_by_status ON deliveries (campaign, step, status)")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        before = counts(c)
    with Ledger(db) as led:
        assert led.schema_version == SCHEMA_VERSION
        names = {r[0] for r in led.conn.execute("SELECT name FROM sqlite_master")}
        assert "deliveries_by_status" not in names and "delivery_counts_insert" in names
        assert counts(led.conn) == before == group_by(led.conn)
        assert led.answers("c") == {("ev", "ann@example.org"): "ACCEPTED"}
        assert led.conn.execute("SELECT sequence FROM replies").fetchall() == [(None,)]


def test_version_1_ledger_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    truth = make_v1(db)
    assert truth and sum(truth.values()) > 30
    with Ledger(db) as led:
        assert led.schema_version == SCHEMA_VERSION
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


@pytest.mark.slow  # three Python processes
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
        led.conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(
        LedgerError,
        match=rf"ledger is schema {SCHEMA_VERSION + 1}, newer than this mailer reads \({SCHEMA_VERSION}\); upgrade",
    ):
        Ledger(db)
    conn = sqlite3.connect(db)
    newer = (str(SCHEMA_VERSION + 1),)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == newer
    conn.close()


# -- the promise made structural (issue 11) ----------------------------------------------------


def _row_in(led: Ledger, email: str, status: Status) -> int:
    """A row of step ``invite`` for ``email`` brought to ``status`` the way mailer gets there."""
    [rid] = claim(led, item(email))
    if status is Status.SENT:
        outcome(led, rid, Attempt.SENT, 250, "OK")
    elif status is Status.FAILED:
        outcome(led, rid, Attempt.FAILED, 550, "no")
    elif status is Status.BOUNCED:
        outcome(led, rid, Attempt.SENT, 250, "OK")
        assert led.record_bounce(rid, email, "5.1.1", "gone", T0) == 1
    else:
        led.release([rid], T0)
        led.record_decided("c", [Decided("invite", "ev", email, "", T0, status, "planner")], T0)
    assert led.row("c", "invite", email).status is status  # type: ignore[union-attr]
    return rid


@pytest.mark.parametrize("final", sorted(FINAL))
def test_no_pass_write_changes_a_final_row(tmp_path: Path, final: Status) -> None:
    """Final = sent, failed, bounced, skipped, suppressed: record_decided, claim, outcomes and
    release leave them alone (record() used to overwrite a bounced row)."""
    with Ledger(tmp_path / "l.db") as led:
        rid = _row_in(led, "a@example.org", final)
        before = led.conn.execute("SELECT * FROM deliveries WHERE id=?", (rid,)).fetchone()
        for other in (Status.SKIPPED, Status.SUPPRESSED, Status.FAILED):
            led.record_decided("c", [Decided("invite", "ev", "a@example.org", "", T0, other, "x")], T0)
        assert led.claim("c", [item("a@example.org")], T0 + timedelta(hours=1)) == [None]
        outcome(led, rid, Attempt.SENT, 250, "again", T0 + timedelta(hours=2))
        outcome(led, rid, Attempt.UNKNOWN, None, "?", T0 + timedelta(hours=2))
        led.release([rid], T0 + timedelta(hours=3))
        led.add_pending("c", [NewRow("invite", "ev", "a@example.org", "", T0)], T0)
        assert led.conn.execute("SELECT * FROM deliveries WHERE id=?", (rid,)).fetchone() == before


def test_only_retry_and_a_dsn_leave_a_final_state(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        _row_in(led, "f@example.org", Status.FAILED)
        _row_in(led, "s@example.org", Status.SKIPPED)
        _row_in(led, "b@example.org", Status.BOUNCED)
        assert led.retry("c", None, T0) == 1  # failed only, by default
        assert led.retry("c", None, T0, status=Status.SKIPPED) == 1
        assert led.row("c", "invite", "s@example.org").status is Status.PENDING  # type: ignore[union-attr]
        with pytest.raises(ValueError):
            led.retry("c", None, T0, status=Status.BOUNCED)
        assert led.row("c", "invite", "b@example.org").status is Status.BOUNCED  # type: ignore[union-attr]


def test_unknown_outcome_keeps_the_row_sending_with_its_claim(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        [rid] = claim(led, item("a@example.org"))
        outcome(led, rid, Attempt.UNKNOWN, 999, "garbage", T0, T0 + timedelta(minutes=2))
        r = led.row("c", "invite", "a@example.org")
        assert r is not None and r.status is Status.SENDING and r.attempts == 1
        assert r.next_attempt == T0 + timedelta(minutes=2)
        [again] = led.claim("c", [item("a@example.org")], T0 + timedelta(minutes=3))
        assert again is not None and again.claimed_at == T0  # re-sent byte-identical
        assert [a["outcome"] for a in led.attempts(rid)] == ["unknown"]


def test_revisions_are_ordered_by_sequence_not_by_recording_time(tmp_path: Path) -> None:
    """A cancellation recorded at an earlier --now than the update before it is still the
    latest version (RFC 5546: SEQUENCE orders versions)."""
    with Ledger(tmp_path / "l.db") as led:
        led.record_revision(
            "c", RecordedRevision("ev", 1, "update", "f1", "{}", T0 + timedelta(days=2)), "ev~update1"
        )
        led.record_revision("c", RecordedRevision("ev", 2, "cancel", "f2", "{}", T0), "ev~cancel2")
        assert [r.sequence for r in led.revision_steps("c")] == [1, 2]
        assert led.latest_revisions("c")["ev"].kind == "cancel"


# -- opening: create, open, read --------------------------------------------------------------


def test_create_refuses_an_empty_or_foreign_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(LedgerError, match="empty file, not a mailer ledger"):
        Ledger.create(empty)
    assert empty.stat().st_size == 0
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE photos (id INTEGER)").connection.commit()
    before = foreign.read_bytes()
    for opener in (Ledger.create, Ledger.open, Ledger.read):
        with pytest.raises(LedgerError, match=r"not a mailer ledger \(tables: photos\)"):
            opener(foreign)
    assert foreign.read_bytes() == before


def test_only_create_makes_a_file(tmp_path: Path) -> None:
    for opener in (Ledger.open, Ledger.read):
        with pytest.raises(LedgerError, match="no ledger here yet"):
            opener(tmp_path / "l.db")
        assert not (tmp_path / "l.db").exists()
    Ledger.create(tmp_path / "l.db").close()
    Ledger.open(tmp_path / "l.db").close()


def _v2_file(path: Path) -> None:
    """A ledger as schema 2 left it (the version-3 step not applied)."""
    with Ledger.create(path) as led:
        led.conn.execute("ALTER TABLE deliveries DROP COLUMN partstat")  # version 5
        led.conn.execute("DROP TABLE unmatched_replies")  # version 4
        led.conn.execute("ALTER TABLE replies DROP COLUMN sequence")
        led.conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_read_never_migrates_and_never_writes(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    _v2_file(db)
    before = db.read_bytes()
    with pytest.raises(
        LedgerError,
        match=rf"ledger is schema 2, this mailer reads {SCHEMA_VERSION}; upgrade it with `mailer send`",
    ):
        Ledger.read(db)
    assert db.read_bytes() == before
    with Ledger.open(db) as led:  # a writer brings it up to date
        assert led.schema_version == SCHEMA_VERSION
    with Ledger.read(db) as led:
        assert led.summary() == []
        with pytest.raises(LedgerError, match="read-only"):
            led.suppress("x@example.org", "test", T0)


def test_locked_by_another_program_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mailer.ledger.BUSY_TIMEOUT", 0.2)
    db = tmp_path / "l.db"
    Ledger.create(db).close()
    shell = sqlite3.connect(db, isolation_level=None)  # e.g. an open sqlite3 shell mid-transaction
    shell.execute("BEGIN EXCLUSIVE")
    try:
        with Ledger.open(db) as led, pytest.raises(LedgerError, match="locked by another program") as info:
            led.suppress("x@example.org", "test", T0)
        assert "\n" not in str(info.value)
    finally:
        shell.execute("ROLLBACK")


def test_disk_full_rolls_back_the_batch(tmp_path: Path) -> None:
    with Ledger.create(tmp_path / "l.db") as led:
        pages = led.conn.execute("PRAGMA page_count").fetchone()[0]
        led.conn.execute(f"PRAGMA max_page_count={pages + 2}")  # SQLITE_FULL, as on a full disk
        items = [NewRow("invite", "ev", f"p{i}@example.org", "x" * 200, T0) for i in range(2000)]
        with pytest.raises(LedgerError, match="the disk is full"):
            led.add_pending("c", items, T0)
        assert not led.conn.in_transaction
        assert led.conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0


def test_corrupt_file_is_one_clear_line(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with Ledger.create(db) as led:
        led.add_pending("c", [NewRow("invite", "ev", f"p{i}@example.org", "", T0) for i in range(500)], T0)
        led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    data[4096 * 2 : 4096 * 4] = b"\xff" * 8192  # scribble over pages of the table and indexes
    db.write_bytes(bytes(data))
    with pytest.raises(LedgerError) as info:
        with Ledger.open(db) as led:
            list(led.log())
            led.summary()
    assert "damaged" in str(info.value) or "not a mailer ledger" in str(info.value)


def test_failed_commit_rolls_back(tmp_path: Path) -> None:
    with Ledger.create(tmp_path / "l.db") as led:
        with pytest.raises(LedgerError, match="FOREIGN KEY"):
            with led.transaction() as c:
                c.execute("PRAGMA defer_foreign_keys=ON")  # the check moves to COMMIT
                c.execute("INSERT INTO attempts (delivery_id, at, outcome) VALUES (999, 'x', 'sent')")
        assert not led.conn.in_transaction
        assert led.conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0


def test_transactions_refuse_to_nest(tmp_path: Path) -> None:
    with Ledger.create(tmp_path / "l.db") as led:
        with pytest.raises(RuntimeError, match="does not nest"):
            with led.transaction():
                led.add_pending("c", [NewRow("invite", "ev", "a@example.org", "", T0)], T0)
        assert not led.conn.in_transaction
        assert led.row("c", "invite", "a@example.org") is None

"""`mailer status` and `mailer log --status failed` on a 1,000,000-row ledger (issue 6).

Usage::

    .venv/bin/python bench/big_ledger.py                  # build (cached) and time
    .venv/bin/python bench/big_ledger.py --rows 200000 --repeat 5 --json
    .venv/bin/python bench/big_ledger.py --db /tmp/big.db --rebuild

Builds a ledger with ``--rows`` deliveries over 10 (campaign, step) pairs with a realistic
status mix (mostly sent; some failed, deferred, skipped, suppressed, bounced, pending) and
one attempts row per delivery that reached the server. The schema comes from
``mailer.ledger.Ledger(path)``; the rows go in with plain sqlite3 ``executemany`` in one
transaction, without the secondary indexes (dropped for the load, created again after it)
and without the schema-2 objects (the ``delivery_counts`` table and its triggers): the file
is left a schema-1 ledger, and the next ``Ledger(path)`` migrates it as it would a ledger
written by an older mailer, filling the counts from the 1M rows. That open is timed
("migration"); a reused file that is still schema 1 is migrated (and timed) the same way.

Then it times, R times each (median shown, wall and CPU seconds), against issue 16's targets
(status 0.3 s, log 0.4 s, Python start-up included; 0.5 s for the rest):

* ``mailer status --db PATH`` and ``mailer log --db PATH --status failed`` as subprocesses
  (output to a pipe, as when redirected; includes Python start-up and imports, shown
  separately as ``mailer --version``); then both in a campaign folder without ``--db`` (a copy
  of the shipped schedules.yaml naming the big ledger), status with its remembered campaign
  (mailer/statusview.py) and "just edited" (an empty cache: schedules.yaml validated);
* the underlying ``Ledger.summary()`` and ``list(Ledger.log(status="failed"))`` in-process;

and prints SQLite's EXPLAIN QUERY PLAN of both queries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, ROOT, first_row, median  # noqa: E402

TARGET = 0.5
#: Issue 16, target 4: in a campaign folder, Python start-up included.
TARGETS = {
    "mailer status": 0.3,
    "mailer status (in the shipped campaign)": 0.3,
    "mailer log --status failed": 0.4,
    "mailer log --status failed (in the shipped campaign)": 0.4,
}
CAMPAIGNS = [
    (
        "integratiepact-2018",
        ["uitnodiging-infosessie", "herinnering-infosessie-week", "uitnodiging-aan-de-slag"],
    ),
    ("jaarcongres-2019", ["uitnodiging", "herinnering-week", "herinnering-dag"]),
    ("opendeur-2019", ["uitnodiging", "herinnering"]),
    ("netwerkdag-2020", ["uitnodiging", "herinnering"]),
]
PAIRS = [(c, s) for c, steps in CAMPAIGNS for s in steps]  # 10 (campaign, step) pairs
#: (status, weight): mostly sent, as a finished campaign looks.
MIX = [
    ("sent", 900),
    ("failed", 25),
    ("deferred", 15),
    ("skipped", 30),
    ("suppressed", 10),
    ("bounced", 10),
    ("pending", 7),
    ("sending", 3),
]
DOMAINS = [
    "example.be",
    "example.org",
    "example.com",
    "voorbeeld.be",
    "exemple.be",
    "telenet.example",
    "skynet.example",
    "gmail.example",
    "outlook.example",
    "proximus.example",
]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _rows(n: int, seed: int = 6) -> Iterator[tuple[dict[str, Any], tuple[Any, ...] | None]]:
    """(delivery columns, attempt row or None) for ``n`` deliveries."""
    rnd = random.Random(seed)
    statuses = [s for s, w in MIX for _ in range(w)]
    per_pair = -(-n // len(PAIRS))
    base = 1514764800.0  # 2018-01-01
    i = 0
    for p, (campaign, step) in enumerate(PAIRS):
        due = base + 86400 * 30 * p
        for k in range(per_pair):
            if i >= n:
                return
            i += 1
            status = rnd.choice(statuses)
            email = f"contact.{k}@{DOMAINS[k % len(DOMAINS)]}"
            t = due + rnd.random() * 3600
            ts = _iso(t)
            row: dict[str, Any] = {
                "id": i,
                "campaign": campaign,
                "step": step,
                "event": step.split("-")[-1],
                "email": email,
                "name": f"Contact {k}",
                "status": status,
                "attempts": 0,
                "next_attempt": None,
                "due_at": _iso(due),
                "message_id": None,
                "sequence": 0,
                "ics": 1 if step.startswith("uitnodiging") else 0,
                "smtp_code": None,
                "smtp_text": None,
                "reason": None,
                "claimed_at": None,
                "sent_at": None,
                "created": _iso(due),
                "updated": ts,
            }
            attempt = None
            if status in ("sent", "failed", "deferred", "bounced", "sending"):
                row["message_id"] = f"<{i:026x}.{campaign}@example.be>"
                row["claimed_at"] = ts
            if status in ("sent", "bounced"):
                row.update(attempts=1, smtp_code=250, smtp_text="2.0.0 Ok: queued as 4F2A1B3C9D", sent_at=ts)
                attempt = (i, ts, "sent", 250, "2.0.0 Ok: queued as 4F2A1B3C9D")
                if status == "bounced":
                    row["reason"] = "bounced: 5.1.1 user unknown"
            elif status == "failed":
                row.update(
                    attempts=1,
                    smtp_code=550,
                    smtp_text=f"5.1.1 <{email}>: Recipient address rejected",
                    reason="refused by the server",
                )
                attempt = (i, ts, "failed", 550, row["smtp_text"])
            elif status == "deferred":
                row.update(
                    attempts=2, smtp_code=451, smtp_text="4.7.1 Try again later", next_attempt=_iso(t + 600)
                )
                attempt = (i, ts, "deferred", 451, "4.7.1 Try again later")
            elif status == "skipped":
                row["reason"] = "the event had started before this could be sent"
            elif status == "suppressed":
                row["reason"] = "address suppressed: unsubscribed"
            yield row, attempt


def build(path: Path, n: int) -> float:
    """Create a schema-1 ledger at ``path`` with ``n`` deliveries; returns the seconds it took."""
    from mailer.ledger import Ledger

    t0 = time.perf_counter()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    Ledger(path).close()  # the schema, exactly as mailer creates it
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")  # 256 MiB
    cols = [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
        " AND tbl_name IN ('deliveries', 'attempts')"
    ).fetchall()
    triggers = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    conn.execute("BEGIN")
    for name, _ in indexes:  # bulk load without them; created again below
        conn.execute(f"DROP INDEX {name}")
    # Schema 1 (schema 2 adds delivery_counts and the triggers that keep it, 3 a column, 4 a table): no
    # trigger per row during the load; the first Ledger(path), migrate(), counts in one GROUP BY.
    for name in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE delivery_counts")
    conn.execute("ALTER TABLE replies DROP COLUMN sequence")  # schema 3 adds it back
    conn.execute("DROP TABLE unmatched_replies")  # schema 4 adds it
    conn.execute("ALTER TABLE deliveries DROP COLUMN partstat")  # schema 5 adds it back
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    first = next(_rows(1))[0]
    use = [c for c in cols if c in first]
    ins = f"INSERT INTO deliveries ({', '.join(use)}) VALUES ({', '.join('?' * len(use))})"
    attempts: list[tuple[Any, ...]] = []

    def deliveries() -> Iterator[tuple[Any, ...]]:
        for row, att in _rows(n):
            if att is not None:
                attempts.append(att)
            yield tuple(row[c] for c in use)

    conn.executemany(ins, deliveries())
    conn.executemany(
        "INSERT INTO attempts (delivery_id, at, outcome, code, text) VALUES (?,?,?,?,?)", attempts
    )
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - t0


def migrate(path: Path) -> tuple[int, int, float]:
    """Open the ledger once, as any mailer command does: an older file is migrated then.
    Returns (schema version before, after, seconds the open took)."""
    from mailer.ledger import Ledger

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    before = int(conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
    conn.close()
    t0 = time.perf_counter()
    with Ledger(path) as ledger:
        seconds = time.perf_counter() - t0
        return before, ledger.schema_version, seconds


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time_cmd(cmd: list[str], cwd: Path, cache: Path | None = None) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds of the process): on a busy machine the CPU time is
    the steadier figure (the wall clock includes waiting for a core)."""
    env = {**os.environ, "MAILER_CACHE_DIR": str(cache)} if cache else None
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    t, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return t, proc.stdout, cpu


def measure(path: Path, repeat: int) -> dict[str, Any]:
    from mailer.ledger import Ledger

    cwd = Path(tempfile.mkdtemp(prefix="big-ledger-cwd-"))  # no schedules.yaml here
    mailer = [PYTHON, "-m", "mailer"]
    out: dict[str, Any] = {}
    cmds = {
        "mailer --version (start-up only)": [*mailer, "--version"],
        "mailer status": [*mailer, "status", "--db", str(path)],
        "mailer log --status failed": [*mailer, "log", "--db", str(path), "--status", "failed"],
    }
    cwds = {label: cwd for label in cmds}
    # mailer status remembers what it read of schedules.yaml (mailer/statusview.py) in a cache
    # folder: one of its own, warmed by a first run that is not timed; the "just edited" line
    # gets an empty one each time (a miss: schedules.yaml is validated, pydantic imported).
    cache = Path(tempfile.mkdtemp(prefix="big-ledger-cache-"))
    fresh: set[str] = set()
    if (ROOT / "schedules.yaml").is_file():
        # As run in a campaign folder, without --db: the shipped schedules.yaml, copied to a
        # folder of its own with its ledger: naming the big ledger (status reads the steps and
        # the time zone from it; nothing here reads the contacts or templates it names).
        campaign = Path(tempfile.mkdtemp(prefix="big-ledger-campaign-"))
        text = (ROOT / "schedules.yaml").read_text("utf-8")
        moved = re.sub(r"(?m)^ledger:.*$", f"ledger: {path}", text)
        assert moved != text, "the shipped schedules.yaml has no ledger: line"
        (campaign / "schedules.yaml").write_text(moved, "utf-8")
        for label, cmd in (
            ("mailer status (in the shipped campaign)", [*mailer, "status"]),
            ("mailer status (shipped campaign, just edited)", [*mailer, "status"]),
            ("mailer log --status failed (in the shipped campaign)", [*mailer, "log", "--status", "failed"]),
        ):
            cmds[label], cwds[label] = cmd, campaign
        fresh.add("mailer status (shipped campaign, just edited)")
        _time_cmd(cmds["mailer status (in the shipped campaign)"], campaign, cache)  # warms the cache
    for label, cmd in cmds.items():
        times, cpus = [], []
        for _ in range(repeat):
            where = Path(tempfile.mkdtemp(prefix="big-ledger-cache-")) if label in fresh else cache
            t, stdout, cpu = _time_cmd(cmd, cwds[label], where)
            times.append(t)
            cpus.append(cpu)
        out[label] = {
            "seconds": times,
            "median": median(times),
            "cpu": median(cpus),
            "output_lines": stdout.count("\n"),
        }

    def inproc(label: str, fn: Any) -> None:
        times, n = [], 0
        for _ in range(repeat):
            with Ledger(path) as ledger:
                t0 = time.perf_counter()
                n = len(fn(ledger))
                times.append(time.perf_counter() - t0)
        out[label] = {"seconds": times, "median": median(times), "rows": n}

    inproc("Ledger.summary()", lambda L: L.summary())
    inproc('list(Ledger.log(status="failed"))', lambda L: list(L.log(status="failed")))
    with Ledger(path) as ledger:
        plans = {}
        summary_sql: list[str] = []  # the statements summary() runs (with their arguments)
        ledger.conn.set_trace_callback(summary_sql.append)
        ledger.summary()
        ledger.conn.set_trace_callback(None)
        for label, sql in (
            *((f"summary {i + 1}", q) for i, q in enumerate(summary_sql)),
            ("log --status failed", "SELECT * FROM deliveries WHERE status=? ORDER BY id"),
        ):
            plans[label] = [
                r[3]
                for r in ledger.conn.execute("EXPLAIN QUERY PLAN " + sql, ("failed",) if "?" in sql else ())
            ]
        counts = dict(ledger.conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
        # the trigger-kept counts must be the GROUP BY's, group for group
        kept = set(ledger.conn.execute("SELECT campaign, step, status, n FROM delivery_counts WHERE n > 0"))
        truth = set(
            ledger.conn.execute("SELECT campaign, step, status, count(*) FROM deliveries GROUP BY 1, 2, 3")
        )
        n_att = ledger.conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    out["_plans"] = plans
    out["_counts"] = counts
    out["_counts_match"] = kept == truth
    out["_attempts"] = n_att
    return out


def what_if(path: Path, repeat: int) -> list[tuple[str, float, str]]:
    """Time candidate fixes on this ledger (an index is created and dropped again)."""
    conn = sqlite3.connect(str(path))

    def t(sql: str, args: tuple[Any, ...] = ()) -> tuple[float, str]:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            conn.execute(sql, args).fetchall()
            times.append(time.perf_counter() - t0)
        plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        return median(times), plan

    out = []
    summary = (
        "SELECT campaign, step, status, count(*) AS n, min(next_attempt) AS next_attempt"
        " FROM deliveries GROUP BY campaign, step, status"
    )
    out.append(("summary, one GROUP BY", *t(summary)))
    a, pa = t("SELECT campaign, step, status, count(*) FROM deliveries GROUP BY campaign, step, status")
    b, pb = t(
        "SELECT campaign, step, min(next_attempt) FROM deliveries WHERE status='deferred'"
        " GROUP BY campaign, step"
    )
    out.append(("summary split: counts + deferred min() (schema 1)", a + b, f"{pa} ; {pb}"))
    c, pc = t(
        "SELECT campaign, step, status, n FROM delivery_counts WHERE n > 0 ORDER BY campaign, step, status"
    )
    out.append(("summary: delivery_counts + deferred min() (schema 2)", c + b, f"{pc} ; {pb}"))
    conn.execute(
        "CREATE INDEX IF NOT EXISTS whatif_cover ON deliveries (campaign, step, status, next_attempt)"
    )
    out.append(("summary, index (campaign,step,status,next_attempt)", *t(summary)))
    conn.execute("DROP INDEX whatif_cover")
    out.append(
        (
            "log failed: SELECT * + ORDER BY id",
            *t("SELECT * FROM deliveries WHERE status=? ORDER BY id", ("failed",)),
        )
    )
    out.append(
        (
            "log failed: only the 8 shown columns",
            *t(
                "SELECT id, step, email, status, attempts, updated, smtp_code, smtp_text, reason"
                " FROM deliveries WHERE status=? ORDER BY id",
                ("failed",),
            ),
        )
    )
    conn.close()
    for mod in ("click", "rich.console", "rich.table", "mailer.ledger", "mailer.config", "mailer.cli"):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run([PYTHON, "-c", f"import {mod}"], check=True)
            times.append(time.perf_counter() - t0)
        out.append((f"python -c 'import {mod}'", median(times), "start-up + import"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--db",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mailer-big-ledger.db",
        help="where the ledger is built (kept between runs; default in the temp dir)",
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if the file has --rows rows")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument(
        "--what-if",
        action="store_true",
        help="also time candidate fixes (other queries, an extra index, imports)",
    )
    args = ap.parse_args(argv)

    built = None
    if args.rebuild or not _has_rows(args.db, args.rows):
        built = build(args.db, args.rows)
    before, after, opened = migrate(args.db)
    res = measure(args.db, args.repeat)
    size = sum(os.path.getsize(p) for p in (str(args.db), str(args.db) + "-wal") if os.path.exists(p))
    whatif = what_if(args.db, args.repeat) if args.what_if else None
    if args.json:
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "db": str(args.db),
                    "bytes": size,
                    "build_seconds": built,
                    "open": {"schema_before": before, "schema_after": after, "seconds": opened},
                    "results": res,
                    "what_if": whatif,
                },
                indent=2,
            )
        )
        return 0 if res["_counts_match"] else 1
    print(
        f"ledger {args.db}: {args.rows:,} deliveries, {res['_attempts']:,} attempts, "
        f"{size / 1e6:.0f} MB" + (f", built in {built:.1f} s" if built is not None else " (reused)")
    )
    if before != after:
        print(f"first open: schema {before} -> {after} (migration) in {opened:.2f} s")
    else:
        print(f"first open: schema {after}, no migration, {opened:.3f} s")
    print("delivery_counts = GROUP BY over deliveries: " + ("yes" if res["_counts_match"] else "NO (wrong!)"))
    counts = sorted(res["_counts"].items(), key=lambda kv: -kv[1])
    print("statuses: " + ", ".join(f"{k} {v:,}" for k, v in counts))
    print()
    print(f"{'what':<52} {'median s':>9} {'CPU s':>6}  {'runs':<34} target")
    missed = 0
    for label, r in res.items():
        if label.startswith("_"):
            continue
        target = TARGETS.get(label, TARGET)
        ok = r["median"] < target
        missed += not ok and "version" not in label and "edited" not in label
        verdict = "" if "version" in label else f"< {target} s: {'OK' if ok else 'MISSED'}"
        runs = " ".join(f"{t:.3f}" for t in r["seconds"])
        if "rows" in r:
            extra = f"({r['rows']:,} rows)"
        else:
            extra = f"({r['output_lines']:,} lines out)" if r["output_lines"] > 2 else ""
        cpu = f"{r['cpu']:.3f}" if "cpu" in r else ""
        print(f"{label:<52} {r['median']:>9.3f} {cpu:>6}  {runs:<34} {verdict} {extra}")
    print()
    for label, plan in res["_plans"].items():
        print(f"EXPLAIN QUERY PLAN ({label}): " + " | ".join(plan))
    if whatif:
        print()
        print("what if (candidate fixes, median seconds):")
        for label, secs, plan in whatif:
            print(f"  {label:<52} {secs:7.3f}  {plan}")
    return 0 if res["_counts_match"] and not (args.strict and missed) else 1


def _has_rows(path: Path, n: int) -> bool:
    row = first_row(path, "SELECT max(id) FROM deliveries")
    return row is not None and row[0] == n


if __name__ == "__main__":
    raise SystemExit(main())

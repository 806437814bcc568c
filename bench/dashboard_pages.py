"""The dashboard's event pages on a 1,000,000-row ledger (issue 12): each page, and each query
behind it, timed against the 0.5 s target.

Usage::

    .venv/bin/python bench/dashboard_pages.py               # build (cached) and time
    .venv/bin/python bench/dashboard_pages.py --rows 200000 --repeat 7
    .venv/bin/python bench/dashboard_pages.py --db /tmp/x.db --rebuild

The ledger is bench/big_ledger.py's (4 campaigns, 10 steps, a realistic status mix), migrated
to the current schema, then shaped like real events: the three steps of jaarcongres-2019 become
one event ``congres`` (300,000 rows, 100,000 people: the worst case), 1 invitee in 7 answered
(a third each coming, maybe, not coming; a quarter of them to the event's earlier version),
1,000 contacts were invalid. It lives in its own file (default in the temp folder), not
big_ledger.py's.

Each page is fetched as a browser would (Datasette's in-process client: routing, the queries,
the template, the HTML), R times; the median is shown next to the target. Then each SQL
statement a page runs is timed on its own (summed per statement when it runs once per row
shown, as the name look-ups do), with SQLite's EXPLAIN QUERY PLAN of the slowest.

Then (issue 16, target 5) the dashboard is served for real (``serve()`` in a subprocess,
uvicorn on a loopback port) and every kind of staff URL is fetched over HTTP: table pages,
facets (by step and status, filtered and not), the canned queries and the CSV downloads. For
each: the time to the first byte of the body (target < 0.5 s: "starts answering") and the time
to the last, medians of R runs. ``--served-only`` skips the in-process part.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

import big_ledger  # noqa: E402
from common import PYTHON, first_row, free_port, median  # noqa: E402

from mailer import dashboard_events as events  # noqa: E402
from mailer.addresses import address_key  # noqa: E402
from mailer.dashboard import create  # noqa: E402
from mailer.vocab import StepKind  # noqa: E402

TARGET = 0.5
TZ = "Europe/Brussels"
#: The big event: every step of this campaign is about it.
BIG = ("jaarcongres-2019", "congres")


def _event(campaign: str, step: str) -> str:
    """One event per campaign, two for integratiepact-2018 (as in the shipped schedules.yaml)."""
    if campaign == BIG[0]:
        return BIG[1]
    if campaign.startswith("integratiepact"):
        return "aan-de-slag" if step.endswith("aan-de-slag") else "infosessie"
    return campaign.rsplit("-", 1)[0]


def plan() -> events.Plan:
    """The campaigns as schedules.yaml would give them: the steps at their ledger times, and a
    last reminder for the big event that has not gone out yet."""
    base = datetime(2018, 1, 1, tzinfo=UTC)
    steps = []
    seen: dict[tuple[str, str], datetime] = {}
    for p, (campaign, step) in enumerate(big_ledger.PAIRS):
        at = base + timedelta(days=30 * p)
        kind = StepKind.INVITATION if step.startswith("uitnodiging") else StepKind.REMINDER
        steps.append(events.PlannedStep(campaign, _event(campaign, step), step, kind, at))
        seen.setdefault((campaign, _event(campaign, step)), at + timedelta(days=60))
    steps.append(
        events.PlannedStep(*BIG, "laatste-oproep", StepKind.REMINDER, datetime(2031, 1, 1, tzinfo=UTC))
    )
    evs = tuple(events.PlannedEvent(c, e, f"{e.title()} {c[-4:]}", start) for (c, e), start in seen.items())
    return events.Plan(evs, tuple(steps))


def build(path: Path, n: int) -> float:
    """big_ledger.py's rows in a ledger of the current schema (indexes and the count triggers
    dropped for the load and made again after it, the counts filled by one GROUP BY)."""
    from mailer.ledger import Ledger

    t0 = time.perf_counter()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    Ledger(path).close()
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    saved = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND tbl_name = 'deliveries'"
        " AND type IN ('index', 'trigger')"
    ).fetchall()
    conn.execute("BEGIN")
    for kind, name, _ in saved:
        conn.execute(f"DROP {kind.upper()} {name}")
    first = next(big_ledger._rows(1))[0]
    use = [c for c in cols if c in first]
    conn.executemany(
        f"INSERT INTO deliveries ({', '.join(use)}) VALUES ({', '.join('?' * len(use))})",
        (tuple(row[c] for c in use) for row, _ in big_ledger._rows(n)),
    )
    for campaign, step in big_ledger.PAIRS:
        conn.execute(
            "UPDATE deliveries SET event=? WHERE campaign=? AND step=?",
            (_event(campaign, step), campaign, step),
        )
    # 1 in 7 of each event's first step answered; a quarter of those to revision 0 of an event
    # that is now at revision 1 (their answer no longer counts).
    conn.execute(
        """INSERT OR IGNORE INTO replies (campaign, event, email, partstat, at, message_id, sequence)
           SELECT campaign, event, email,
             CASE id % 3 WHEN 0 THEN 'ACCEPTED' WHEN 1 THEN 'TENTATIVE' ELSE 'DECLINED' END,
             updated, '<r' || id || '@example.org>', CASE WHEN id % 4 = 0 THEN 0 END
           FROM deliveries WHERE id % 7 = 0 AND step LIKE 'uitnodiging%' AND status = 'sent'"""
    )
    for campaign, event in {(c, _event(c, s)) for c, s in big_ledger.PAIRS}:
        for seq, kind in ((0, "initial"), (1, "update")):
            conn.execute(
                "INSERT OR IGNORE INTO revisions VALUES (?, ?, ?, ?, 'f', '{}', '2018-01-02T00:00:00Z')",
                (campaign, event, seq, kind),
            )
    _insert_invalid(conn)
    conn.execute("DELETE FROM delivery_counts")
    conn.execute(
        "INSERT INTO delivery_counts SELECT campaign, step, status, count(*) FROM deliveries GROUP BY 1, 2, 3"
    )
    conn.execute(
        "INSERT OR IGNORE INTO steps_started"
        " SELECT campaign, step, min(created) FROM deliveries GROUP BY 1, 2"
    )
    for _, _, sql in saved:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - t0


def _insert_invalid(conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT INTO deliveries (campaign, step, event, email, name, status, reason, due_at, created,"
        " updated) VALUES (?, 'uitnodiging', ?, ?, ?, 'invalid', 'not a valid address',"
        " '2018-01-01T00:00:00Z',"
        " '2018-01-01T00:00:00Z', '2018-01-01T00:00:00Z')",
        [(*BIG, f"bad{i}@@example", f"Bad {i}") for i in range(1000)],
    )


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class TimedConn:
    """A connection whose statements are timed (run and fetched whole), per statement text."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.args: dict[str, Any] = {}

    def execute(self, sql: str, args: Any = ()) -> _Rows:
        t0 = time.perf_counter()
        rows = self.conn.execute(sql, args).fetchall()
        self.seconds[sql] += time.perf_counter() - t0
        self.calls[sql] += 1
        self.args[sql] = args
        return _Rows(rows)


def pages(db: Path, the_plan: events.Plan) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    by_size = conn.execute(
        "SELECT campaign, step FROM delivery_counts GROUP BY campaign, step ORDER BY sum(n) LIMIT 1"
    ).fetchone()
    small = (by_size[0], _event(*by_size))
    rows, people = conn.execute(
        "SELECT count(*), count(DISTINCT email) FROM deliveries WHERE event = ? AND campaign = ?",
        (BIG[1], BIG[0]),
    ).fetchone()
    conn.close()
    return {
        "events list (/-/events)": "/-/events",
        f"event {BIG[1]} ({rows:,} rows, {people:,} people)": f"/-/events/{BIG[0]}/{BIG[1]}",
        f"event {small[1]} ({small[0]})": f"/-/events/{small[0]}/{small[1]}",
        "the picker's redirect": f"/-/events?event={BIG[0]}/{BIG[1]}",
    }


async def time_pages(db: Path, the_plan: events.Plan, repeat: int) -> list[tuple[str, list[float], int]]:
    ds = create(db, timezone=TZ, plan=the_plan)
    await ds.invoke_startup()
    out = []
    for label, path in pages(db, the_plan).items():
        times, size = [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = await ds.client.get(path)
            times.append(time.perf_counter() - t0)
            assert r.status_code in (200, 302), (path, r.status_code, r.text[:500])
            size = len(r.content)
        out.append((label, times, size))
    return out


def time_queries(db: Path, the_plan: events.Plan, repeat: int) -> list[tuple[str, float, int, str]]:
    """Each statement of the big event's page and of the list: (SQL, median s, calls, plan)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = 1")
    conn.create_function("address_key", 1, address_key, deterministic=True)  # as the dashboard does
    tz = ZoneInfo(TZ)
    runs: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = {}
    args: dict[str, Any] = {}
    for _ in range(repeat):
        timed = TimedConn(conn)
        events.overview(timed, the_plan, tz)  # type: ignore[arg-type]
        events.event_report(timed, the_plan, tz, *BIG, datetime.now(UTC))  # type: ignore[arg-type]
        for sql, s in timed.seconds.items():
            runs[sql].append(s)
            calls[sql] = timed.calls[sql]
            args[sql] = timed.args[sql]
    out = []
    for sql, times in runs.items():
        plan_ = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args[sql]))
        out.append((sql, median(times), calls[sql], plan_))
    conn.close()
    return sorted(out, key=lambda x: -x[1])


#: (label, URL) of the served dashboard's staff pages and downloads on the 1,000,000-row ledger.
SERVED = [
    ("deliveries table (sorted by id, status facet)", "/ledger/deliveries"),
    ("deliveries faceted by step", "/ledger/deliveries?_facet=step"),
    ("deliveries of one step, faceted by status", "/ledger/deliveries?step=uitnodiging"),
    ("failed deliveries faceted by step", "/ledger/deliveries?status=failed&_facet=step"),
    ("deliveries faceted by campaign and event", "/ledger/deliveries?_facet=campaign&_facet=event"),
    ("attempts table", "/ledger/attempts"),
    ("inbox: what needs a person (issue 15)", "/-/inbox"),
    ("canned query: summary", "/ledger/summary"),
    ("canned query: failed", "/ledger/failed"),
    ("canned query: not_reached (congres)", "/ledger/not_reached?event=congres"),
    ("canned query CSV: failed", "/ledger/failed.csv"),
    (
        "CSV: all failed, deferred, bounced (Datasette)",
        "/ledger/deliveries.csv?status__in=failed,deferred,bounced&_stream=on&_size=max",
    ),
    (
        "CSV: all failed, deferred, bounced (streamed)",
        "/-/deliveries.csv?status=failed&status=deferred&status=bounced",
    ),
    ("CSV: one step, all rows (streamed)", "/-/deliveries.csv?step=herinnering"),
    ("CSV: every delivery (streamed, 1 run)", "/-/deliveries.csv"),
]
#: Fetched once whatever --repeat says (about 290 MB).
ONCE = frozenset({"/-/deliveries.csv"})


def _fetch(port: int, path: str) -> tuple[int, float, float, int, str]:
    """(status, seconds to the first body byte, seconds to the last, body bytes, a note: what
    an HTML page says timed out, or the start of an error)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    head = resp.read1(65536)
    first = time.perf_counter() - t0
    size = len(head)
    while chunk := resp.read1(1 << 20):
        if len(head) < 1 << 21:
            head += chunk
        size += len(chunk)
    total = time.perf_counter() - t0
    conn.close()
    note = ""
    if resp.status != 200:
        note = f"HTTP {resp.status}: {head[:80].decode('utf-8', 'replace')}"
    elif b"timed out" in head:
        note = "a facet or the count timed out"
    return resp.status, first, total, size, note


def time_served(
    db: Path, the_plan: events.Plan, repeat: int
) -> list[tuple[str, list[float], list[float], int, str]]:
    """Each of :data:`SERVED` over HTTP from a real ``serve()`` process: first byte, last byte."""
    port = free_port()
    code = (
        "import sys; from mailer.dashboard import serve, Plan; import json;"
        " serve(sys.argv[1], port=int(sys.argv[2]), timezone=sys.argv[3],"
        " plan=Plan.from_json(json.loads(sys.argv[4])))"
    )
    import json

    plan_json = json.dumps(the_plan.to_json())
    proc = subprocess.Popen(
        [PYTHON, "-c", code, str(db), str(port), TZ, plan_json],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _fetch(port, "/-/versions.json")  # answers once the server listens
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(
                        f"the dashboard did not start: {proc.communicate()[1][-2000:]}"
                    ) from None
                time.sleep(0.1)
        out = []
        for label, path in SERVED:
            firsts: list[float] = []
            totals: list[float] = []
            size, notes = 0, set()
            for _ in range(1 if path in ONCE else repeat):
                status, first, total, size, note = _fetch(port, path)
                firsts.append(first)
                totals.append(total)
                notes.add(note)
                if status != 200:
                    break
            out.append((label, firsts, totals, size, "; ".join(sorted(filter(None, notes)))))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "mailer-dashboard-bench.db")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--served-only", action="store_true", help="only the served pages (issue 16)")
    args = ap.parse_args(argv)
    built = None
    # + the 1,000 invalid rows build() adds
    if args.rebuild or not big_ledger._has_rows(args.db, args.rows + 1000) or not _shaped(args.db):
        built = build(args.db, args.rows)
    from mailer.ledger import Ledger

    Ledger(args.db).close()  # a reused file of an older schema is migrated, as a writer would
    the_plan = plan()
    print(
        f"ledger {args.db}: {args.rows:,} deliveries"
        + (f", built in {built:.0f} s" if built is not None else " (reused)")
    )
    missed = 0
    if not args.served_only:
        missed += in_process(args.db, the_plan, args.repeat)
    print(
        f"\nserved over HTTP (median of {args.repeat}): seconds to the first byte, target < {TARGET} s;"
        " to the last byte"
    )
    print(f"{'page or download':<50} {'first s':>8} {'last s':>8} {'size':>9}  first-byte runs")
    for label, firsts, totals, size, note in time_served(args.db, the_plan, args.repeat):
        ok = median(firsts) < TARGET and not note
        missed += not ok
        runs = " ".join(f"{t:.3f}" for t in firsts)
        print(
            f"{label:<50} {median(firsts):>8.3f} {median(totals):>8.3f} {size / 1024:>7.0f}Ki  {runs}"
            f"  {'OK' if ok else 'MISSED'}{f' ({note})' if note else ''}"
        )
    return 1 if missed else 0


def in_process(db: Path, the_plan: events.Plan, repeat: int) -> int:
    """The event pages through Datasette's in-process client, and their queries; the misses."""
    print(f"\n{'page':<48} {'median s':>9}  {'runs':<34} target < {TARGET} s")
    missed = 0
    for label, times, size in asyncio.run(time_pages(db, the_plan, repeat)):
        ok = median(times) < TARGET
        missed += not ok
        runs = " ".join(f"{t:.3f}" for t in times)
        print(
            f"{label:<48} {median(times):>9.3f}  {runs:<34} {'OK' if ok else 'MISSED'}"
            f" ({size / 1024:.0f} KiB)"
        )
    print(
        f"\nqueries of the events list and the {BIG[1]} page (median s over {repeat} runs; calls per page):"
    )
    for sql, secs, n, plan_ in time_queries(db, the_plan, repeat):
        one = " ".join(sql.split())
        print(f"  {secs:7.3f}  x{n:<5} {one[:150]}{'...' if len(one) > 150 else ''}")
        print(f"{'':18}plan: {plan_}")
    return 1 if missed else 0


def _shaped(path: Path) -> bool:
    return first_row(path, "SELECT 1 FROM deliveries WHERE event = ? LIMIT 1", (BIG[1],)) is not None


if __name__ == "__main__":
    raise SystemExit(main())

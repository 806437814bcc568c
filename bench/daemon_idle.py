"""The daemon with nothing due: CPU per minute (issue 16, target 3: under 50 ms at 100,000
contacts).

The shipped campaign (six steps) with its two lists grown to N/2 contacts each (as
bench/check_speed.py), and a ledger in which every step has gone out: for each step, at its
time, the pass's own stages (revise, plan, record) write its rows, then each pending row
becomes ``sent`` with one attempt, as the runner records a 250 reply (no SMTP: 450,000 mails
would take 7 minutes). Then :class:`mailer.daemon.Daemon` runs with its real scheduler (the
one-minute sweep, the two-second file watch) for --minutes minutes of real time, on a clock
that starts at 2018-01-19 12:00 Brussels (after the last step) and moves with real time. The
process's CPU time (user + system) is read at each minute; the catch-up pass at start, a full
plan, is reported on its own line (what each sweep cost before).

``--paced`` runs a second case (issue 17): the campaign with ``delivery.window: 08:00-09:00``,
started at 2018-01-04 10:30 with an empty ledger, so both invitations (N + N/2 mails) are due
and all wait for the window: the sweeps must not plan and pace them again every minute.

    .venv/bin/python bench/daemon_idle.py                     # N = 100,000, 3 minutes
    .venv/bin/python bench/daemon_idle.py --n 20000 --minutes 1 --paced
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_speed import write_shipped  # noqa: E402
from common import median  # noqa: E402

TARGET_MS = 50.0
TZ = ZoneInfo("Europe/Brussels")
IDLE_AT = datetime(2018, 1, 19, 12, 0, tzinfo=TZ)
PACED_AT = datetime(2018, 1, 4, 10, 30, tzinfo=TZ)


def build_ledger(config: Path) -> tuple[int, float]:
    """Every step of the campaign sent, as the runner records it. Returns (rows, seconds)."""
    from mailer.ledger import Ledger
    from mailer.runner import SendPass
    from mailer.times import iso
    from mailer.workspace import load_workspace

    t = time.perf_counter()
    ws = load_workspace(config)
    with Ledger.create(ws.campaign.ledger) as ledger:
        for step in sorted(ws.campaign.steps, key=lambda s: s.at):
            sp = SendPass(ws, ledger, step.at)
            changes = sp.revise()
            sp.record_changes(changes)
            sp.record_plan(sp.plan(changes))
            at = iso(step.at)
            with ledger.transaction() as c:
                c.execute(
                    "INSERT INTO attempts (delivery_id, at, outcome, code, text) "
                    "SELECT id, ?, 'sent', 250, '2.0.0 Ok' FROM deliveries WHERE status = 'pending'",
                    (at,),
                )
                c.execute(
                    "UPDATE deliveries SET status = 'sent', attempts = 1, smtp_code = 250, "
                    "smtp_text = '2.0.0 Ok', message_id = '<' || id || '.bench@example.be>', "
                    "claimed_at = ?, sent_at = ?, updated = ? WHERE status = 'pending'",
                    (at, at, at),
                )
        (rows,) = ledger.conn.execute("SELECT count(*) FROM deliveries").fetchone()
    return int(rows), time.perf_counter() - t


async def run_daemon(config: Path, start: datetime, minutes: int) -> tuple[float, list[float], int, int]:
    """Run the daemon on the real scheduler; returns (catch-up pass CPU s, CPU ms per minute,
    passes, idle sweeps)."""
    from mailer.daemon import Daemon
    from mailer.ledger import Ledger
    from mailer.transport import TransportSettings
    from mailer.workspace import load_workspace

    ws = load_workspace(config)
    ledger = Ledger.create(ws.campaign.ledger)
    ledger.lock()
    t0 = time.monotonic()

    def clock() -> datetime:
        return start + timedelta(seconds=time.monotonic() - t0)

    env: dict[str, str] = {}
    d = Daemon(config, ws, ledger, TransportSettings.from_config(ws.campaign.smtp, env), env, clock=clock)
    cpu = time.process_time()
    await d.start()
    catch_up = time.process_time() - cpu
    per_minute = []
    try:
        for _ in range(minutes):
            cpu = time.process_time()
            await asyncio.sleep(60)
            per_minute.append((time.process_time() - cpu) * 1000)
            print(f"  minute {len(per_minute)}: {per_minute[-1]:.1f} ms CPU", file=sys.stderr)
    finally:
        await d.close()
    return catch_up, per_minute, d.passes, d.idle_sweeps


def case(label: str, config: Path, start: datetime, minutes: int) -> bool:
    catch_up, per_minute, passes, idle = asyncio.run(run_daemon(config, start, minutes))
    m = median(per_minute)
    ok = m < TARGET_MS
    shown = " ".join(f"{x:.1f}" for x in per_minute)
    print(f"{label}: catch-up pass (a full plan)   {catch_up:7.2f} s CPU")
    print(
        f"{label}: idle, CPU per minute          {m:7.1f} ms   ({shown})   target < {TARGET_MS:.0f} ms: "
        f"{'OK' if ok else 'MISSED'}   [{passes} pass(es), {idle} idle sweep(s)]"
    )
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="contacts (two lists of n/2)")
    ap.add_argument("--minutes", type=int, default=3, help="real minutes measured (the median is shown)")
    ap.add_argument("--paced", action="store_true", help="also: everything due waits for the window")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    args = ap.parse_args()
    logging.getLogger("mailer").addHandler(logging.NullHandler())
    logging.getLogger("mailer").propagate = False
    ok = True
    with tempfile.TemporaryDirectory(prefix="mailer-daemon-bench-") as tmp:
        config = write_shipped(Path(tmp), args.n)
        rows, took = build_ledger(config)
        print(f"ledger: {rows:,} rows, every step sent (built in {took:.0f} s)", file=sys.stderr)
        ok &= case(f"daemon, {args.n:,} contacts, {rows:,} rows, nothing due", config, IDLE_AT, args.minutes)
    if args.paced:
        with tempfile.TemporaryDirectory(prefix="mailer-daemon-bench-") as tmp:
            config = write_shipped(Path(tmp), args.n)
            text = config.read_text(encoding="utf-8")
            config.write_text(text.replace("delivery:\n", 'delivery:\n  window: "08:00-09:00"\n'), "utf-8")
            ok &= case(
                f"daemon, {args.n * 3 // 2:,} mails waiting for the window", config, PACED_AT, args.minutes
            )
    if args.strict and not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Answers recorded by `mailer web` while `mailer send` delivers N mails on the same ledger (issue 14).

Usage::

    .venv/bin/python bench/web_answers.py                  # N = 10,000, 3 runs of each, medians
    .venv/bin/python bench/web_answers.py --n 2000 --repeat 5 --json
    .venv/bin/python bench/web_answers.py --profile /tmp/web.prof   # cProfile the server (one run)

Everything is a real process, as deployed, talking over 127.0.0.1:

* the SMTP sink (Postfix smtp-sink when installed, else aiosmtpd in its own process);
* `mailer web --config ... --port P` under uvicorn;
* `mailer send --config ... --now <the step's time>` sending the shipped Dutch invitation
  (text + HTML + ICS, with the RSVP and calendar links) to N generated contacts;
* a load generator (this script, ``--child load``): plain HTTP/1.1 keep-alive POSTs of
  ``answer=accepted`` to ``/r/<token>`` of distinct recipients, each from its own client
  address in ``X-Forwarded-For`` (as the reverse proxy passes it; the per-address POST limit
  is untouched). It is a small asyncio client rather than httpx: on a 2-core machine every
  millisecond the client spends is taken from the server and the sender.

Each run is three passes on a fresh ledger, interleaved so that the machine's load drifts
alike over all of them:

send alone          `mailer send` with nothing else running: mails/s (the reference)
send + 200/s        the same send while the client offers answers at ``--rate`` (open loop)
send + max          the same send while ``--concurrency`` clients answer as fast as they can

Figures (medians of ``--repeat`` runs, each next to its target): answers recorded per second
(rows with ``source='web'`` in the ledger at the end, over the time the client ran; every 200
the client got must be such a row), the p50/p95 latency of an answer, the send's mails/s and
its ratio to the send alone (target >= 0.9), the server's CPU per answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST, NOW, PYTHON, STEP_ID, Sink, free_port, median, write_campaign  # noqa: E402

SECRET = "bench-web-secret-0123456789abcdef"
WEB_URL = "https://rsvp.example.be/"
EVENT = "aan-de-slag"
CAMPAIGN = "bench-integratiepact"
TARGET_RATE = 200.0  # answers recorded per second
TARGET_RATIO = 0.9  # send mails/s with answers / alone
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# The load generator (a child process).
# --------------------------------------------------------------------------------------


def _client_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, ip: str, port: int
) -> int:
    body = b"answer=accepted"
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-Forwarded-For: {ip}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, paths: list[str], rate: float, concurrency: int) -> dict[str, Any]:
    """Answer until "stop" on stdin: open loop at ``rate``/s, or closed loop (``rate`` 0) with
    ``concurrency`` connections each posting its next answer as soon as one is back."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    conns = [await asyncio.open_connection(HOST, port) for _ in range(concurrency)]
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    print("ready", flush=True)
    await stdin.readline()  # "go"
    stopped = asyncio.Event()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    nxt = 0
    last = 0.0  # when the latest answer came back

    async def one(i: int) -> None:
        nonlocal last
        r, w = await free.get()
        t0 = time.perf_counter()
        try:
            status = await _post(r, w, paths[i], _client_ip(i), port)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            r, w = await asyncio.open_connection(HOST, port)
        else:
            last = time.perf_counter()
            latencies.append(last - t0)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        free.put_nowait((r, w))

    async def closed_loop() -> None:
        nonlocal nxt
        while not stopped.is_set() and nxt < len(paths):
            i, nxt = nxt, nxt + 1
            await one(i)

    async def open_loop(tasks: set[asyncio.Task[None]]) -> None:
        nonlocal nxt
        start = time.perf_counter()
        while not stopped.is_set() and nxt < len(paths):
            due = start + nxt / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.ensure_future(one(nxt))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            nxt += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    runner: asyncio.Future[Any]
    if rate > 0:
        runner = asyncio.ensure_future(open_loop(tasks))
    else:
        runner = asyncio.ensure_future(asyncio.gather(*(closed_loop() for _ in range(concurrency))))
    await stdin.readline()  # "stop"
    stopped.set()
    elapsed = time.perf_counter() - t0
    await runner
    if tasks:
        await asyncio.gather(*tasks)
    if nxt >= len(paths):  # every recipient answered before the send ended: the rate is over
        elapsed = min(elapsed, last - t0)  # the time they took, not the idle rest
    cpu = time.process_time() - cpu0
    for _, w in conns:
        w.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "offered": nxt,
        "statuses": statuses,
        "ok": statuses.get("200", 0),
        "seconds": elapsed,
        "p50_ms": pct(0.50) * 1000,
        "p95_ms": pct(0.95) * 1000,
        "client_cpu_s": cpu,
        "exhausted": nxt >= len(paths),
    }


# --------------------------------------------------------------------------------------
# One pass.
# --------------------------------------------------------------------------------------


def _env(sink_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MAILER_WEB_SECRET=SECRET, MAILER_SMTP_PORT=str(sink_port), MAILER_SMTP_HOST=HOST)
    env.pop("FORWARDED_ALLOW_IPS", None)  # uvicorn's default: trust X-Forwarded-For from 127.0.0.1
    env.pop("MAILER_DB", None)
    env.pop("MAILER_CONFIG", None)
    return env


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (and its waited-for children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def _fresh_ledger(folder: Path) -> Path:
    from mailer.ledger import Ledger

    db = folder / "ledger.db"
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    Ledger.create(db).close()
    return db


def _send(cfg: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    now = NOW.isoformat()
    return subprocess.Popen(
        [PYTHON, "-m", "mailer", "send", "--config", str(cfg), "--now", now],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cfg.parent,
    )


def _wait_send(proc: subprocess.Popen[bytes], db: Path, n: int) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"mailer send exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    with sqlite3.connect(db) as c:
        sent = c.execute("SELECT count(*) FROM deliveries WHERE status='sent'").fetchone()[0]
    if sent != n:
        raise RuntimeError(f"mailer send sent {sent} of {n} mails")


def send_alone(cfg: Path, n: int, env: dict[str, str]) -> dict[str, Any]:
    db = _fresh_ledger(cfg.parent)
    t0 = time.perf_counter()
    proc = _send(cfg, env)
    _wait_send(proc, db, n)
    secs = time.perf_counter() - t0
    return {"send_seconds": secs, "mails_per_s": n / secs}


def _start_web(cfg: Path, env: dict[str, str], profile: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [PYTHON]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "mailer", "web", "--config", str(cfg), "--host", HOST, "--port", str(port)]
    # Its log goes to a file: a pipe nobody reads fills up and blocks the server's event loop.
    errlog = cfg.parent / "web.log"
    with errlog.open("wb") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=cfg.parent, start_new_session=True
        )
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mailer web exited: {errlog.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send_with_answers(
    cfg: Path,
    n: int,
    env: dict[str, str],
    paths_file: Path,
    rate: float,
    concurrency: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    db = _fresh_ledger(cfg.parent)
    web, port = _start_web(cfg, env, profile)
    load = None
    try:
        load = subprocess.Popen(
            [PYTHON, __file__, "--child", "load", str(port), str(paths_file), str(rate), str(concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert load.stdin is not None and load.stdout is not None
        if load.stdout.readline().strip() != b"ready":
            raise RuntimeError("the load generator did not start")
        web_cpu0 = _cpu_seconds(web.pid)
        load.stdin.write(b"go\n")
        load.stdin.flush()
        t0 = time.perf_counter()
        proc = _send(cfg, env)
        _wait_send(proc, db, n)
        secs = time.perf_counter() - t0
        load.stdin.write(b"stop\n")
        load.stdin.flush()
        out: dict[str, Any] = json.loads(load.stdout.read())
        load.wait()
        web_cpu = _cpu_seconds(web.pid) - web_cpu0
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        # uvicorn raises SIGTERM again after its shutdown, which ends the process before
        # cProfile writes its file; Ctrl-C ends it through Python's own exit.
        _stop(web, signal.SIGINT if profile is not None else signal.SIGTERM)
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT count(*) FROM replies WHERE source='web'").fetchone()[0]
    if rows < out["ok"]:
        raise RuntimeError(f"{out['ok']} answers got a 200 but only {rows} are in the ledger")
    out.update(
        send_seconds=secs,
        mails_per_s=n / secs,
        rows=rows,
        answers_per_s=rows / out["seconds"],
        server_cpu_ms=web_cpu / max(rows, 1) * 1000,
    )
    return out


# --------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------


def _fmt(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    alone = median([r["mails_per_s"] for r in results["alone"]])
    lines = [
        f"N = {meta['n']:,} mails, {meta['repeat']} runs (medians), sink: {meta['sink']}, "
        f"{meta['cpus']} CPUs, load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after",
        "",
        f"{'pass':<24}{'mails/s':>9}{'ratio':>7}{'answers/s':>11}{'p50 ms':>8}{'p95 ms':>8}"
        f"{'srv CPU ms':>11}{'client CPU':>11}  target",
        f"{'send alone':<24}{alone:>9.0f}{'':>7}{'':>11}{'':>8}{'':>8}{'':>11}{'':>11}",
    ]
    for key, label in (("rate", f"send + {meta['rate']:.0f}/s offered"), ("max", "send + max answers")):
        runs = results.get(key)
        if not runs:
            continue
        mps = median([r["mails_per_s"] for r in runs])
        ratio = median(
            [r["mails_per_s"] / a["mails_per_s"] for r, a in zip(runs, results["alone"], strict=False)]
        )
        aps = median([r["answers_per_s"] for r in runs])
        p50 = median([r["p50_ms"] for r in runs])
        p95 = median([r["p95_ms"] for r in runs])
        srv = median([r["server_cpu_ms"] for r in runs])
        cli = median([r["client_cpu_s"] / max(r["offered"], 1) * 1000 for r in runs])
        if key == "rate":  # the target: 200 answers/s and the send at >= 90 % of its speed
            verdicts = [
                f"answers/s >= {TARGET_RATE * 0.98:.0f}: {'OK' if aps >= TARGET_RATE * 0.98 else 'MISSED'}",
                f"ratio >= {TARGET_RATIO}: {'OK' if ratio >= TARGET_RATIO else 'MISSED'}",
            ]
        else:  # the capacity: how many answers/s the server records at most during the send
            verdicts = [f"answers/s >= {TARGET_RATE:.0f}: {'OK' if aps >= TARGET_RATE else 'MISSED'}"]
            if any(r["exhausted"] for r in runs):
                verdicts.append("(every recipient answered before the send ended in some runs)")
        lines.append(
            f"{label:<24}{mps:>9.0f}{ratio:>7.2f}{aps:>11.0f}{p50:>8.1f}{p95:>8.1f}{srv:>11.2f}{cli:>9.2f}ms"
            f"  {'; '.join(verdicts)}"
        )
    lines.append("")
    for key in ("alone", "rate", "max"):
        for r in results.get(key, []):
            extra = ""
            if "answers_per_s" in r:
                extra = (
                    f", {r['answers_per_s']:.0f} answers/s ({r['rows']} rows, statuses {r['statuses']}), "
                    f"p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} ms"
                )
            lines.append(f"  {key:<6} {r['mails_per_s']:.0f} mails/s ({r['send_seconds']:.1f} s){extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000, help="mails the send delivers (default 10,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pass; medians shown (default 3)")
    ap.add_argument("--rate", type=float, default=TARGET_RATE, help="answers/s offered (default 200)")
    ap.add_argument("--concurrency", type=int, default=16, help="clients of the max pass (default 16)")
    ap.add_argument("--passes", default="alone,rate,max", help="which passes (default alone,rate,max)")
    ap.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--profile", type=Path, help="cProfile the server through one max pass into FILE")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        _, port, paths_file, rate, conc = args.child
        paths = Path(paths_file).read_text().split()
        print(json.dumps(asyncio.run(_load(int(port), paths, float(rate), int(conc)))), flush=True)
        return 0

    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    passes = args.passes.split(",")
    from mailer import tokens

    work = Path(tempfile.mkdtemp(prefix="mailer-bench-web-"))
    try:
        cfg = write_campaign(work / "campaign", args.n)
        text = cfg.read_text(encoding="utf-8")
        cfg.write_text(text + f"\nweb: {{url: '{WEB_URL}'}}\n", encoding="utf-8")
        emails = [
            line.split(",", 1)[0]
            for line in (cfg.parent / "contacts" / "list.csv").read_text().splitlines()[1:]
        ]
        paths_file = work / "paths.txt"
        paths_file.write_text(
            "\n".join(f"/r/{tokens.sign(SECRET, 'rsvp', CAMPAIGN, EVENT, e)}" for e in emails) + "\n"
        )
        meta: dict[str, Any] = {
            "n": args.n,
            "repeat": args.repeat,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "step": STEP_ID,
        }
        results: dict[str, list[dict[str, Any]]] = {p: [] for p in passes}
        with Sink(args.sink) as sink:
            meta["sink"] = sink.describe
            env = _env(sink.port)
            if args.profile:
                r = send_with_answers(cfg, args.n, env, paths_file, 0, args.concurrency, args.profile)
                log(f"profile in {args.profile}: {r['answers_per_s']:.0f} answers/s")
                import pstats

                pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(45)
                return 0
            for run in range(1, args.repeat + 1):
                for p in passes:
                    if p == "alone":
                        r = send_alone(cfg, args.n, env)
                    elif p == "rate":
                        r = send_with_answers(cfg, args.n, env, paths_file, args.rate, args.concurrency)
                    elif p == "max":
                        r = send_with_answers(cfg, args.n, env, paths_file, 0, args.concurrency)
                    else:
                        ap.error(f"unknown pass {p}")
                    results[p].append(r)
                    log(
                        f"run {run} {p}: {r['mails_per_s']:.0f} mails/s"
                        + (
                            f", {r['answers_per_s']:.0f} answers/s, p95 {r['p95_ms']:.0f} ms"
                            if "rows" in r
                            else ""
                        )
                    )
        meta["load_after"] = os.getloadavg()[0]
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
    elif "alone" in results:
        print(_fmt(results, meta))
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

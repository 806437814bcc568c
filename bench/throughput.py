"""Throughput and memory of `mailer send` against the transport's ceiling (issue 6).

Usage::

    .venv/bin/python bench/throughput.py                 # N = 1,000 and 10,000, 3 runs each
    .venv/bin/python bench/throughput.py --large         # and N = 100,000
    .venv/bin/python bench/throughput.py --n 5000 --connections 8 --repeat 5 --json
    .venv/bin/python bench/throughput.py --n 10000 --profile   # cProfile of the pipeline

For each N it generates a campaign (the shipped Dutch invitation: text + HTML + ICS) with N
contacts and runs, in turn and against one local SMTP sink (Postfix's smtp-sink when
installed, else aiosmtpd in a separate process):

pipeline   `mailer send`'s pass: load_workspace, Ledger, run_pass (plan, render, ICS, MIME,
           claim, SMTP over C kept-open connections, record each outcome). The rate counts
           run_pass only; "e2e" adds loading the workspace (CSV, templates).
ceiling    aiosmtplib alone sending the N real messages, composed before the clock starts,
           over the same C kept-open connections, with SMTP.sendmail (the issue's ceiling).
transport  the same pre-built messages through mailer.transport.Transport (which writes the
           prepared bytes itself instead of calling sendmail): what is left of the pipeline
           when planning, composing and the ledger cost nothing.
naive      EmailMessage (policy.default) with set_content/add_alternative/add_attachment,
           an icalendar.Calendar per mail, one new SMTP connection per mail (aiosmtplib.send),
           C workers at once, on min(N, --naive-max) mails.
smtp-src   Postfix's smtp-source, C sessions kept open, messages of the same size: what
           this machine's loopback and the sink can take.

Every measurement runs in its own child process (peak RSS is the child's own ru_maxrss),
R times; the table shows medians. All traffic stays on 127.0.0.1; the script stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HOST,
    NOW,
    PYTHON,
    STEP_ID,
    Sink,
    median,
    postfix_tool,
    write_campaign,
)

HERE = Path(__file__).resolve()
TARGET_CEILING = 0.9
TARGET_DKIM = 0.8
TARGET_RSS_MB = 200.0
TARGET_RSS_MB_1M = 400.0


# ======================================================================================
# Children: each prints one JSON line (its last line on stdout).
# ======================================================================================


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu() -> float:
    """CPU seconds of this process so far (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_pipeline(
    folder: Path, port: int, connections: int, profile_out: str | None, stages: bool = False
) -> dict[str, Any]:
    acc = _install_stage_timers() if stages else None
    from mailer.clock import virtual_clock
    from mailer.ledger import Ledger
    from mailer.runner import run_pass
    from mailer.transport import TransportSettings
    from mailer.workspace import load_workspace

    os.chdir(folder)
    for f in folder.glob("ledger.db*"):
        f.unlink()
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    ws = load_workspace(folder / "schedules.yaml")
    if ws.blocking:
        raise SystemExit(f"workspace problems: {ws.blocking}")
    settings = TransportSettings(host=HOST, port=port, tls="none", connections=connections, timeout=60)
    ledger = Ledger(folder / "ledger.db")
    ledger.lock()
    done = [0]

    def progress(d: int, total: int) -> None:  # what `mailer send` passes (its bar is off-tty)
        done[0] = d

    t1, c1 = time.perf_counter(), _cpu()
    from mailer.dkim import load_signer  # signs only with --dkim (a dkim: key in the campaign)

    signer = load_signer(ws.campaign, os.environ)
    coro = run_pass(
        ws, ledger, NOW, settings=settings, clock=virtual_clock(NOW), progress=progress, signer=signer
    )
    if profile_out:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(asyncio.run, coro)
        prof.dump_stats(profile_out)
    else:
        result = asyncio.run(coro)
    t2, c2 = time.perf_counter(), _cpu()
    sent = ledger.conn.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'").fetchone()[0]
    ledger.close()
    size = sum(f.stat().st_size for f in folder.glob("ledger.db*") if not f.name.endswith(".lock"))
    return {
        "seconds": t2 - t1,
        "cpu_seconds": c2 - c1,
        "load_seconds": t1 - t0,
        "due": result.due,
        "sent": result["sent"],
        "sent_in_ledger": sent,
        "deferred": result["deferred"],
        "failed": result["failed"],
        "peak_rss_mb": _rss_mb(),
        "rss_at_start_mb": rss_before,
        "ledger_bytes": size,
        **({"stages": acc} if acc is not None else {}),
    }


#: (module, attribute path) of the synchronous steps timed by --stages; missing ones are skipped.
STAGES = [
    ("mailer.planner", "plan"),
    ("mailer.ledger", "Ledger.add_pending"),
    ("mailer.ledger", "Ledger.record"),
    ("mailer.ledger", "Ledger.claim"),
    ("mailer.ledger", "Ledger.sent"),
    ("mailer.compose", "Composer.compose_due"),
    ("mailer.compose", "Composer.compose"),
    ("mailer.compose", "Composer.message_id"),
    ("mailer.templates", "Templates.render"),
    ("mailer.ics", "Prototype.for_attendee"),
    ("mailer.message", "build"),
]


def _install_stage_timers() -> dict[str, list[float]]:
    """Wrap each STAGES function to add up its CPU time (inclusive) and calls."""
    import functools
    import importlib

    acc: dict[str, list[float]] = {}
    for mod_name, path in STAGES:
        mod = importlib.import_module(mod_name)
        owner: Any = mod
        *parents, attr = path.split(".")
        try:
            for p in parents:
                owner = getattr(owner, p)
            fn = getattr(owner, attr)
        except AttributeError:
            continue
        slot = acc.setdefault(path, [0.0, 0])

        def make(fn: Any, slot: list[float]) -> Any:
            clock = time.process_time

            @functools.wraps(fn)
            def timed(*a: Any, **k: Any) -> Any:
                t = clock()
                try:
                    return fn(*a, **k)
                finally:
                    slot[0] += clock() - t
                    slot[1] += 1

            return timed

        setattr(owner, attr, make(fn, slot))
    return acc


def _compose_all(folder: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """Every recipient's real message (as the pipeline would send it), built up front."""
    from mailer.compose import Composer
    from mailer.workspace import load_workspace

    os.chdir(folder)
    ws = load_workspace(folder / "schedules.yaml")
    c = ws.campaign
    step = c.step(STEP_ID)
    event = c.event(step.event)
    from mailer.dkim import load_signer

    composer = Composer(c, ws.templates, signer=load_signer(c, os.environ))  # --dkim: the same bytes
    return c.sender.address, [
        (ct.email, composer.compose(step, event, ct, when=NOW).data) for ct in ws.audience(step)
    ]


def child_ceiling(folder: Path, port: int, connections: int) -> dict[str, Any]:
    import aiosmtplib

    t0 = time.perf_counter()
    sender, msgs = _compose_all(folder)
    t1 = time.perf_counter()
    avg = sum(len(d) for _, d in msgs) / max(1, len(msgs))
    it = iter(msgs)
    sent = [0]

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, use_tls=False, start_tls=False, timeout=60)
        await client.connect()
        try:
            for rcpt, data in it:
                await client.sendmail(sender, [rcpt], data)
                sent[0] += 1
        finally:
            await client.quit()

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(connections)))

    t2, c2 = time.perf_counter(), _cpu()
    asyncio.run(run())
    t3, c3 = time.perf_counter(), _cpu()
    return {
        "seconds": t3 - t2,
        "cpu_seconds": c3 - c2,
        "prebuild_seconds": t1 - t0,
        "sent": sent[0],
        "avg_bytes": avg,
        "peak_rss_mb": _rss_mb(),
    }


def child_ceiling_one(folder: Path, port: int, connections: int, n: int) -> dict[str, Any]:
    """The issue's ceiling: aiosmtplib ``SMTP.sendmail(sender, [rcpt], data)`` with ONE
    pre-built message's bytes; ``connections`` tasks, each on its own connection, each
    sending its share of the N in turn. Timed from the first connect to the last QUIT."""
    import aiosmtplib

    from mailer.compose import Composer
    from mailer.dkim import load_signer
    from mailer.workspace import load_workspace

    os.chdir(folder)
    ws = load_workspace(folder / "schedules.yaml")
    c = ws.campaign
    step = c.step(STEP_ID)
    contact = ws.audience(step)[0]
    composer = Composer(c, ws.templates, signer=load_signer(c, os.environ))
    data = composer.compose(step, c.event(step.event), contact, when=NOW).data
    sender, rcpt = c.sender.address, contact.email
    shares = [n // connections + (1 if k < n % connections else 0) for k in range(connections)]
    sent = [0]

    async def worker(count: int) -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, use_tls=False, start_tls=False, timeout=60)
        await client.connect()
        try:
            for _ in range(count):
                await client.sendmail(sender, [rcpt], data)
                sent[0] += 1
        finally:
            await client.quit()

    async def run() -> None:
        await asyncio.gather(*(worker(k) for k in shares))

    t0, c0 = time.perf_counter(), _cpu()
    asyncio.run(run())
    t1, c1 = time.perf_counter(), _cpu()
    return {
        "seconds": t1 - t0,
        "cpu_seconds": c1 - c0,
        "sent": sent[0],
        "avg_bytes": len(data),
        "peak_rss_mb": _rss_mb(),
    }


MAILER = str(Path(PYTHON).with_name("mailer"))
#: `mailer send --now` for the generated campaign's step (its time, in the campaign's zone).
SEND_NOW = NOW.strftime("%Y-%m-%dT%H:%M")


def run_send(folder: Path, port: int, connections: int, profile_out: str | None = None) -> dict[str, Any]:
    """The whole ``mailer send`` process, start-up included, on a fresh ledger: wall time from
    the spawn to its exit, its CPU and peak RSS (``wait4``: the largest of the process and
    the children it waited for, i.e. its composing worker)."""
    import sqlite3

    for f in folder.glob("ledger.db*"):
        f.unlink()
    env = dict(os.environ, MAILER_SMTP_PORT=str(port), MAILER_SMTP_HOST=HOST, MAILER_SMTP_TLS="none")
    cmd = [MAILER, "send", "--config", str(folder / "schedules.yaml"), "--now", SEND_NOW]
    if profile_out:
        cmd = [PYTHON, "-m", "cProfile", "-o", profile_out, *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    # Read both pipes to the end (they are small: the summary and a few log lines).
    import threading

    errs: list[bytes] = []
    reader = threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if proc.returncode != 0:
        err = b"".join(errs).decode()[-4000:]
        raise RuntimeError(f"mailer send exited {proc.returncode}:\n{out.decode()[-2000:]}\n{err}")
    with sqlite3.connect(folder / "ledger.db") as db:
        sent = db.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'").fetchone()[0]
    size = sum(f.stat().st_size for f in folder.glob("ledger.db*") if not f.name.endswith(".lock"))
    return {
        "seconds": t1 - t0,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "sent_in_ledger": sent,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "ledger_bytes": size,
    }


def child_transport(folder: Path, port: int, connections: int) -> dict[str, Any]:
    from mailer.transport import Outgoing, Result, Transport, TransportSettings

    t0 = time.perf_counter()
    sender, msgs = _compose_all(folder)
    t1 = time.perf_counter()
    settings = TransportSettings(host=HOST, port=port, tls="none", connections=connections, timeout=60)
    outcomes: dict[str, int] = {}

    def on_result(job: Outgoing, result: Result) -> None:
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1

    async def run() -> None:
        queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        for i, (rcpt, data) in enumerate(msgs):
            queue.put_nowait(Outgoing(i, sender, rcpt, data))
        for _ in range(connections):
            queue.put_nowait(None)
        await Transport(settings).run(queue, on_result)

    t2, c2 = time.perf_counter(), _cpu()
    asyncio.run(run())
    t3, c3 = time.perf_counter(), _cpu()
    return {
        "seconds": t3 - t2,
        "cpu_seconds": c3 - c2,
        "prebuild_seconds": t1 - t0,
        "sent": outcomes.get("sent", 0),
        "outcomes": outcomes,
        "peak_rss_mb": _rss_mb(),
    }


def child_naive(folder: Path, port: int, connections: int, n: int) -> dict[str, Any]:
    """The baseline of the issue: the stdlib email package and icalendar per mail, and one
    SMTP connection per mail. Templates are rendered by mailer's own renderer (same work as
    the pipeline), so the difference is MIME, calendar, connections and the ledger."""
    from datetime import UTC
    from email import policy
    from email.headerregistry import Address
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid

    import aiosmtplib
    import icalendar

    from mailer.templates import context
    from mailer.workspace import load_workspace

    os.chdir(folder)
    ws = load_workspace(folder / "schedules.yaml")
    c = ws.campaign
    step = c.step(STEP_ID)
    event = c.event(step.event)
    contacts = ws.audience(step)[:n]
    sender = c.sender
    domain = sender.address.rpartition("@")[2]

    def build(contact: Any) -> EmailMessage:
        r = ws.templates.render(step.template, contact.language, context(c, event, step, contact))
        msg = EmailMessage(policy=policy.default)
        msg["From"] = Address(sender.name, addr_spec=sender.address)
        msg["To"] = Address(contact.name, addr_spec=contact.email)
        msg["Subject"] = r.subject
        msg["Date"] = format_datetime(NOW)
        msg["Message-ID"] = make_msgid(domain=domain)
        msg.set_content(r.text)
        msg.add_alternative(r.html, subtype="html")
        cal = icalendar.Calendar()
        cal.add("prodid", "-//naive//bench//EN")
        cal.add("version", "2.0")
        cal.add("method", "REQUEST")
        ev = icalendar.Event()
        ev.add("uid", event.uid)
        ev.add("dtstamp", NOW)
        ev.add("sequence", 0)
        # UTC times: valid without a VTIMEZONE (icalendar's add_missing_timezones() would
        # cost ~16 ms a mail and write every transition since 1892: not the baseline's fault).
        ev.add("dtstart", event.start.astimezone(UTC))
        ev.add("dtend", event.end.astimezone(UTC))
        ev.add("summary", event.title)
        if event.description:
            ev.add("description", event.description)
        if event.location:
            ev.add("location", event.location)
        org = icalendar.vCalAddress(f"mailto:{sender.organizer}")
        org.params["cn"] = icalendar.vText(sender.organizer_name)
        ev["organizer"] = org
        att = icalendar.vCalAddress(f"mailto:{contact.email}")
        att.params["cn"] = icalendar.vText(contact.name)
        att.params["role"] = icalendar.vText("REQ-PARTICIPANT")
        att.params["partstat"] = icalendar.vText("NEEDS-ACTION")
        att.params["rsvp"] = icalendar.vText("TRUE")
        ev.add("attendee", att, encode=False)
        cal.add_component(ev)
        ics = cal.to_ical()
        msg.add_alternative(ics, maintype="text", subtype="calendar", params={"method": "REQUEST"})
        msg.add_attachment(ics, maintype="application", subtype="ics", filename="invite.ics")
        return msg

    it = iter(contacts)
    sent = [0]

    async def worker() -> None:
        for contact in it:
            msg = build(contact)
            await aiosmtplib.send(msg, hostname=HOST, port=port, use_tls=False, start_tls=False, timeout=60)
            sent[0] += 1

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(connections)))

    t0, c0 = time.perf_counter(), _cpu()
    asyncio.run(run())
    t1, c1 = time.perf_counter(), _cpu()
    return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "sent": sent[0], "peak_rss_mb": _rss_mb()}


def _child(role: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    proc = subprocess.run(
        [PYTHON, str(HERE), "--child", role, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{role} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def smtp_source(port: int, connections: int, n: int, size: int) -> dict[str, Any] | None:
    tool = postfix_tool("smtp-source")
    if tool is None:
        return None
    cmd = [
        tool,
        "-s",
        str(connections),
        "-m",
        str(n),
        "-l",
        str(size),
        "-d",
        "-f",
        "integratiepact@example.be",
        "-t",
        "bench@example.org",
        f"{HOST}:{port}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    t1 = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {proc.stderr.strip()}")
    return {"seconds": t1 - t0, "sent": n}


# ======================================================================================
# The driver.
# ======================================================================================


LOADS: list[float] = []


def _note_load() -> None:
    LOADS.append(os.getloadavg()[0])


def add_dkim(folder: Path) -> None:
    """``--dkim``: a new RSA 2048 key and ``dkim:`` in the campaign, so every mail is signed."""
    from mailer.dkim import keygen

    keygen("bench", "example.be", folder / "dkim.key", force=True)
    with (folder / "schedules.yaml").open("a", encoding="utf-8") as f:
        f.write("\ndkim: {selector: bench, key_file: dkim.key}\n")


def measure(n: int, args: argparse.Namespace, sink: Sink, work: Path, log: Any) -> dict[str, Any]:
    """Rounds of (send, ceiling[, the --more lines]) interleaved, so load from other work
    hits both alike; medians of the rounds."""
    folder = work / f"n{n}"
    write_campaign(folder, n)
    if args.dkim:
        add_dkim(folder)
    c = str(args.connections)
    port = str(sink.port)
    naive_n = min(n, args.naive_max)
    runs: dict[str, list[dict[str, Any]]] = {
        "send": [],
        "ceiling": [],
        "pipeline": [],
        "transport": [],
        "naive": [],
        "smtp_source": [],
    }
    for r in range(args.repeat):
        _note_load()
        log(f"N={n} round {r + 1}/{args.repeat}: mailer send (load {os.getloadavg()[0]:.2f})")
        p = run_send(folder, sink.port, args.connections)
        if p["sent_in_ledger"] != n:
            raise RuntimeError(f"mailer send recorded {p['sent_in_ledger']} of {n} as sent: {p}")
        runs["send"].append(p)
        log(f"N={n} round {r + 1}/{args.repeat}: ceiling")
        ce = _child("ceiling1", str(folder), port, c, str(n))
        if ce["sent"] != n:
            raise RuntimeError(f"ceiling sent {ce['sent']} of {n}")
        runs["ceiling"].append(ce)
        if not args.more:
            continue
        log(f"N={n} round {r + 1}/{args.repeat}: run_pass in-process")
        runs["pipeline"].append(_child("pipeline", str(folder), port, c))
        log(f"N={n} round {r + 1}/{args.repeat}: transport")
        tr = _child("transport", str(folder), port, c)
        if tr["sent"] != n:
            raise RuntimeError(f"transport sent {tr['sent']} of {n}: {tr['outcomes']}")
        runs["transport"].append(tr)
        if not args.no_naive:
            log(f"N={n} round {r + 1}/{args.repeat}: naive ({naive_n} mails)")
            runs["naive"].append(_child("naive", str(folder), port, c, str(naive_n)))
        s = smtp_source(sink.port, args.connections, n, int(ce["avg_bytes"]))
        if s is not None:
            runs["smtp_source"].append(s)

    def summary(key: str, count: int) -> dict[str, Any] | None:
        rs = runs[key]
        if not rs:
            return None
        secs = [x["seconds"] for x in rs]
        out: dict[str, Any] = {
            "n": count,
            "seconds": secs,
            "seconds_median": median(secs),
            "rate": count / median(secs),
            "rates": [count / s for s in secs],
        }
        if "cpu_seconds" in rs[0]:
            out["cpu_ms_per_mail"] = median([x["cpu_seconds"] for x in rs]) * 1000 / count
        for extra in ("peak_rss_mb", "ledger_bytes", "load_seconds", "avg_bytes"):
            if extra in rs[0]:
                out[extra] = median([x[extra] for x in rs])
        if "peak_rss_mb" in rs[0]:
            out["rss_max_mb"] = max(x["peak_rss_mb"] for x in rs)
        return out

    res: dict[str, Any] = {
        "n": n,
        "send": summary("send", n),
        "ceiling": summary("ceiling", n),
        "pipeline": summary("pipeline", n),
        "transport": summary("transport", n),
        "naive": summary("naive", naive_n),
        "smtp_source": summary("smtp_source", n),
    }
    sd, ce = res["send"], res["ceiling"]
    res["send_over_ceiling"] = sd["rate"] / ce["rate"]
    # Per round too (each send next to the ceiling measured right after it).
    res["round_ratios"] = [a / b for a, b in zip(ce["seconds"], sd["seconds"], strict=True)]
    return res


def _target(args_dkim: bool) -> float:
    return TARGET_DKIM if args_dkim else TARGET_CEILING


def _fmt_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    load = meta["loadavg"]
    target = _target(meta["dkim"])
    lines = [
        f"mailer send throughput: sink {meta['sink']} on {HOST}, {meta['connections']} connection(s), "
        f"median of {meta['repeat']} interleaved round(s){', DKIM signing on' if meta['dkim'] else ''}; "
        f"{meta['cpus']} CPU(s), Python {meta['python']}",
        f"mailer code: {meta.get('git') or meta['mailer']}; "
        f"load average before {load['before']:.2f}, highest seen between rounds {load['max']:.2f}"
        + (
            "  (other work was running: compare the per-round ratios and CPU ms/mail)"
            if load["max"] > 0.5 * (meta["cpus"] or 1)
            else ""
        ),
        "",
        f"{'N':>9}  {'line':<38} {'mails/s':>8} {'seconds':>8} {'CPU ms':>7}  notes",
    ]

    def row(n: str, label: str, x: dict[str, Any], notes: str) -> str:
        cpu = f"{x['cpu_ms_per_mail']:.2f}" if "cpu_ms_per_mail" in x else "-"
        return f"{n:>9}  {label:<38} {x['rate']:>8.0f} {x['seconds_median']:>8.2f} {cpu:>7}  {notes}"

    def ok(b: bool) -> str:
        return "OK" if b else "MISSED"

    for r in results:
        n = r["n"]
        sd, ce = r["send"], r["ceiling"]
        lines.append(
            row(
                f"{n:,}",
                "mailer send (whole process)",
                sd,
                f"peak RSS {sd['rss_max_mb']:.0f} MB, ledger {sd['ledger_bytes'] / 1e6:.1f} MB; "
                "CPU: the process, not its composing workers",
            )
        )
        lines.append(
            row("", "ceiling (aiosmtplib sendmail, 1 msg)", ce, f"message {ce['avg_bytes'] / 1024:.1f} KiB")
        )
        for key, label, note in (
            ("pipeline", "run_pass in-process (no start-up)", "after load_workspace"),
            ("transport", "mailer's Transport, pre-built", "N real messages, prepared bytes"),
            ("naive", "naive (EmailMessage)", "one SMTP connection per mail"),
            ("smtp_source", "smtp-source (machine ceiling)", "Postfix, same size, same sink"),
        ):
            if r[key]:
                lines.append(row("", label if key != "naive" else f"{label}, n={r[key]['n']}", r[key], note))
        ratio = r["send_over_ceiling"]
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(
            f"{'':>9}  mailer send / ceiling {ratio:.2f} (target >= {target:.1f}: {ok(ratio >= target)}); "
            f"per round {rounds}"
        )
        if n >= 100_000:
            limit = TARGET_RSS_MB if n <= 100_000 else TARGET_RSS_MB_1M
            lines.append(
                f"{'':>9}  peak RSS {sd['rss_max_mb']:.0f} MB (target < {limit:.0f} MB at {n:,}: "
                f"{ok(sd['rss_max_mb'] < limit)})"
            )
        lines.append("")
    lines.append(
        "Targets (issue 16): mailer send >= 0.9 x the ceiling at 10,000 and 20,000 (>= 0.8 x with "
        "--dkim, issue 15); peak RSS < 200 MB at 100,000 and < 400 MB at 1,000,000. CPU ms = "
        "CPU of the sending process per mail (the sink's not included)."
    )
    return "\n".join(lines)


def profile(n: int, args: argparse.Namespace, sink: Sink, work: Path) -> str:
    import pstats

    folder = work / f"n{n}"
    write_campaign(folder, n)
    if args.dkim:
        add_dkim(folder)
    out = work / f"send-{n}.pstats"
    p = run_send(folder, sink.port, args.connections, str(out))
    import io

    buf = io.StringIO()
    buf.write(
        f"cProfile of the whole `mailer send` process (its composing worker not included), N={n}: "
        f"{p['seconds']:.2f} s under the profiler ({n / p['seconds']:.0f} mails/s), stats in {out}\n"
    )
    st = pstats.Stats(str(out), stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(args.profile_top)
    st.sort_stats("cumulative").print_stats(args.profile_top)
    return buf.getvalue()


def stages(n: int, args: argparse.Namespace, sink: Sink, work: Path) -> str:
    folder = work / f"n{n}"
    write_campaign(folder, n)
    rows: dict[str, list[tuple[float, float]]] = {}
    totals, ceil = [], []
    for _ in range(args.repeat):
        p = _child("stages", str(folder), str(sink.port), str(args.connections))
        totals.append(p["cpu_seconds"])
        for name, (secs, calls) in p["stages"].items():
            rows.setdefault(name, []).append((secs, calls))
        ceil.append(_child("ceiling", str(folder), str(sink.port), str(args.connections))["cpu_seconds"])
    total = median(totals)
    out = [
        f"CPU time per mail of the pipeline's steps, N={n}, median of {args.repeat} run(s) "
        "(inclusive: compose_due contains compose, which contains render/ICS/build)",
        "",
        f"{'step':<28} {'us/mail':>8} {'calls/mail':>10} {'share':>6}",
    ]
    top = (
        "plan",
        "Ledger.add_pending",
        "Ledger.record",
        "Ledger.claim",
        "Ledger.sent",
        "Composer.compose_due",
        "Composer.message_id",
    )
    accounted = 0.0
    for name, vals in rows.items():
        secs, calls = median([v[0] for v in vals]), median([v[1] for v in vals])
        if not calls:
            continue
        if name in top and not (name == "Composer.message_id" and "Composer.compose_due" in rows):
            accounted += secs
        elif name == "Composer.compose" and "Composer.compose_due" not in rows:
            accounted += secs
        out.append(f"{name:<28} {secs / n * 1e6:>8.0f} {calls / n:>10.2f} {secs / total:>6.0%}")
    rest = total - accounted
    out.append(f"{'SMTP, event loop, glue':<28} {rest / n * 1e6:>8.0f} {'':>10} {rest / total:>6.0%}")
    out.append(f"{'total (run_pass)':<28} {total / n * 1e6:>8.0f}")
    out.append(f"{'ceiling (aiosmtplib only)':<28} {median(ceil) / n * 1e6:>8.0f}")
    return "\n".join(out)


def _git_state() -> str | None:
    """HEAD and whether mailer/ has uncommitted changes (the code measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE.parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "mailer"],
            cwd=HERE.parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' + uncommitted changes in mailer/' if dirty else ''}" if head else None


def _mailer_path() -> str:
    import mailer

    return str(Path(mailer.__file__).resolve().parent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--n",
        type=lambda s: [int(x.replace("_", "")) for x in s.split(",")],
        action="extend",
        help="recipient counts, comma separated (default: 1000,10000; repeatable)",
    )
    ap.add_argument("--large", action="store_true", help="also N=100,000")
    ap.add_argument("--connections", type=int, default=4, help="SMTP connections (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians shown (default 3)")
    ap.add_argument("--naive-max", type=int, default=2000, help="naive baseline on min(N, this) mails")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", type=Path, help="also write the JSON to this file")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: cProfile one pipeline run at the largest N",
    )
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument(
        "--stages",
        action="store_true",
        help="instead of the table: CPU time per mail of each pipeline step at the largest N",
    )
    ap.add_argument("--dkim", action="store_true", help="sign every mail (RSA 2048, as with dkim:)")
    ap.add_argument(
        "--more",
        action="store_true",
        help="also run_pass in-process, mailer's Transport, the naive baseline and smtp-source",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated campaigns and ledgers")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        # As in a terminal: a child started from a background job inherits SIGINT ignored, and
        # then asyncio.run() skips its SIGINT handling (which has costs of its own, see README).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        role, *rest = args.child
        if role == "pipeline":
            prof = rest[3] if len(rest) > 3 else None
            out = child_pipeline(Path(rest[0]), int(rest[1]), int(rest[2]), prof)
        elif role == "stages":
            out = child_pipeline(Path(rest[0]), int(rest[1]), int(rest[2]), None, stages=True)
        elif role == "ceiling1":
            out = child_ceiling_one(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        elif role == "ceiling":
            out = child_ceiling(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif role == "transport":
            out = child_transport(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif role == "naive":
            out = child_naive(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            raise SystemExit(f"unknown child {role}")
        print(json.dumps(out))
        return 0

    # Stopped with SIGTERM: unwind, so the sink and the campaign folder go too.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    ns = sorted(set(args.n or [10_000, 20_000]) | ({100_000} if args.large else set()))

    def log(msg: str) -> None:  # progress on stderr; the table goes to stdout
        print(msg, file=sys.stderr, flush=True)

    meta = {
        "dkim": args.dkim,
        "connections": args.connections,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "mailer": _mailer_path(),
        "git": _git_state(),
    }
    before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    try:
        with Sink(args.sink) as sink:
            meta["sink"] = sink.describe
            if args.profile:
                print(profile(max(ns), args, sink, work))
                return 0
            if args.stages:
                print(stages(max(ns), args, sink, work))
                return 0
            results = [measure(n, args, sink, work, log) for n in ns]
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    _note_load()
    meta["loadavg"] = {"before": before, "max": max(LOADS), "seen": LOADS}
    doc = {"meta": meta, "results": results}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_fmt_table(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

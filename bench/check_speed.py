"""`mailer check` on the shipped campaign grown to N contacts, and the cost of the render gate
(issue 16, targets 1 and 2).

The shipped campaign (schedules.yaml, every template: six steps, update and cancel) with its
two lists grown to N/2 contacts each (`indieners`, `lerend-netwerk`; unique names and
addresses, one contact in ten French, every organisation of bench/common.py), in a temporary
folder. Prints:

* `mailer check`: wall seconds of the whole command (a subprocess, start-up included), median
  of --repeat runs, against 10 s at 100,000, with its CPU seconds (user + system: steadier
  than wall on a shared machine) and the load average;
* the render gate: `gate_due()` on the due mails of the invitation step (--gate-n mails, as a
  pass of `mailer send` gates them) against the time that many mails take to send at the rate
  `bench/throughput.py` measured (--send-rate, mails/s): the share must stay under 15 %.

    .venv/bin/python bench/check_speed.py                  # N = 100,000, 3 runs
    .venv/bin/python bench/check_speed.py --n 20000 --repeat 1
    .venv/bin/python bench/check_speed.py --web            # with web.url and MAILER_WEB_SECRET

``--web`` adds ``web: {url: https://rsvp.example.be/mailer}`` to the campaign and runs check
with MAILER_WEB_SECRET set, as a real campaign does: every mail then carries links (RSVP,
calendars, unsubscribe) signed for its recipient (mailer/links.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import _FIRST, _LAST, _ORGS, PYTHON, ROOT, _ascii, median  # noqa: E402

CHECK_TARGET_S = 10.0
GATE_TARGET = 0.15


#: What --web adds to schedules.yaml, and the secret its links are signed with.
WEB = "\nweb:\n  url: https://rsvp.example.be/mailer\n"
WEB_SECRET = "bench-check-web-secret"


def write_shipped(folder: Path, n: int, *, web: bool = False) -> Path:
    """The shipped campaign with its two lists grown to n/2 contacts each (and ``web.url``)."""
    shutil.copy(ROOT / "schedules.yaml", folder / "schedules.yaml")
    if web:
        with (folder / "schedules.yaml").open("a", encoding="utf-8") as f:
            f.write(WEB)
    shutil.copytree(ROOT / "templates", folder / "templates")
    (folder / "contacts").mkdir()
    for half, name in enumerate(("indieners", "lerend-netwerk")):
        lines = ["email,name,language,lists,organisation"]
        for j in range(n // 2):
            i = half * (n // 2) + j
            first, last = _FIRST[i % len(_FIRST)], _LAST[(i // len(_FIRST)) % len(_LAST)]
            email = f"{_ascii(first)}.{_ascii(last).replace(' ', '')}.{i}@example.be"
            lang = "fr" if i % 10 == 3 else "nl"
            lines.append(f"{email},{first} {last} {i},{lang},{name},{_ORGS[i % len(_ORGS)]}")
        (folder / "contacts" / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "schedules.yaml"


def time_check(folder: Path, *, web: bool = False) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) of the `mailer check` subprocess, its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAILER_WEB_SECRET", "MAILER_UNSUBSCRIBE_SECRET")}
    if web:
        env["MAILER_WEB_SECRET"] = WEB_SECRET
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(
        [PYTHON, "-m", "mailer", "check"], cwd=folder, env=env, capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # The deliverability section (issue 16's neighbour) may call a big campaign without a
    # one-click unsubscribe an error: only a template problem makes this run meaningless.
    if r.returncode not in (0, 1) or "templates/" in r.stdout or "Traceback" in r.stderr:
        raise SystemExit(f"mailer check failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return took, cpu, r.stdout


def time_gate(config: Path, n: int, *, web: bool = False) -> tuple[float, int]:
    """Seconds gate_due() takes on the invitation step's first n due mails."""
    from mailer.compose import Composer
    from mailer.gate import gate_due
    from mailer.planner import Due
    from mailer.workspace import load_workspace

    ws = load_workspace(config)
    step = next(s for s in ws.campaign.steps if s.id == "uitnodiging-aan-de-slag")
    event = ws.campaign.event(step.event)
    due = [Due(step, event, c) for c in ws.audience(step)[:n]]
    composer = Composer(ws.campaign, ws.templates, unsubscribe_secret=WEB_SECRET if web else None)
    t = time.perf_counter()
    kept, problems = gate_due(composer, due)
    took = time.perf_counter() - t
    assert not problems and len(kept) == len(due)
    return took, len(due)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="contacts (two lists of n/2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gate-n", type=int, default=10_000)
    ap.add_argument(
        "--send-rate", type=float, default=1200.0, help="mails/s of mailer send (bench/throughput.py)"
    )
    ap.add_argument("--web", action="store_true", help="web.url and MAILER_WEB_SECRET: links signed per mail")
    ap.add_argument("--no-gate", action="store_true", help="only mailer check")
    args = ap.parse_args()
    what = " with web.url" if args.web else ""
    with tempfile.TemporaryDirectory(prefix="mailer-check-bench-") as tmp:
        config = write_shipped(Path(tmp), args.n, web=args.web)
        timed = [time_check(Path(tmp), web=args.web) for _ in range(args.repeat)]
        runs = [wall for wall, _, _ in timed]
        m, cpu = median(runs), median([c for _, c, _ in timed])
        verdict = "OK" if args.n < 100_000 or m < CHECK_TARGET_S else "MISSED"
        shown = " ".join(f"{r:.2f}" for r in runs)
        print(
            f"mailer check{what}, {args.n:,} contacts x 6 steps   {m:7.2f} s   ({shown}; CPU {cpu:.2f} s, "
            f"load {os.getloadavg()[0]:.1f})   target < 10 s: {verdict}"
        )
        if args.no_gate:
            return
        gates = [time_gate(config, args.gate_n, web=args.web) for _ in range(args.repeat)]
        g = median([t for t, _ in gates])
        count = gates[0][1]
        send = count / args.send_rate
        share = g / send
        print(
            f"render gate{what}, {count:,} mails               {g:7.3f} s   = {share:.1%} of sending them at "
            f"{args.send_rate:.0f}/s ({send:.1f} s)   target < 15 %: "
            f"{'OK' if share < GATE_TARGET else 'MISSED'}"
        )


if __name__ == "__main__":
    main()

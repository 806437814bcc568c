"""Micro-benchmarks of the pure core, each figure printed next to its target (issue 11).

Usage::

    .venv/bin/python bench/micro.py              # 5 runs of each, medians
    .venv/bin/python bench/micro.py --repeat 9 --json
    .venv/bin/python bench/micro.py --strict     # exit 1 when a median misses its target

These limits used to be asserts inside the correctness tests (test_ics, test_message,
test_contacts), where a busy machine made them fail for reasons unrelated to the code. Here
each one is measured R times in this process and the median is compared with the target:

ics.for_attendee       one attendee's calendar object from a prototype     target 50 µs
message pipeline       for_attendee + message_id + message.build per mail  target 2 ms
contacts 20,000 rows   load_contacts of a 20,000-row CSV                    target 2.0 s
dkim sign              one mail signed (RSA 2048 + relaxed/relaxed, dkim:)  target 1.5 ms
compose one mail       Composer.compose_due of the shipped invitation       target 2 ms
                       (full render, then with stencils: issue 16 target 6)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, median  # noqa: E402

from mailer import config  # noqa: E402
from mailer.config import Campaign  # noqa: E402
from mailer.contacts import load_contacts  # noqa: E402
from mailer.ics import prototype  # noqa: E402
from mailer.message import build, message_id  # noqa: E402

DTSTAMP = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Figure:
    """One measurement: the median of ``runs`` (seconds per unit) against ``target``."""

    name: str
    unit: str
    target: float  # in unit
    runs: list[float]  # in unit

    @property
    def median(self) -> float:
        return median(self.runs)

    @property
    def ok(self) -> bool:
        return self.median <= self.target


def per_call(fn: Callable[[int], None], n: int) -> float:
    """Seconds per call of ``fn(i)`` over ``n`` calls."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def bench_for_attendee(campaign: Campaign, repeat: int) -> Figure:
    proto = prototype(campaign, campaign.event("aan-de-slag"), dtstamp=DTSTAMP)

    def one(i: int) -> None:
        proto.for_attendee(f"user{i}@example.be", "Peeters, Jan-Éloïse")

    runs = [per_call(one, 5000) * 1e6 for _ in range(repeat)]
    return Figure("ics.for_attendee", "µs", 50.0, runs)


def bench_message(campaign: Campaign, repeat: int) -> Figure:
    proto = prototype(campaign, campaign.event("aan-de-slag"), dtstamp=DTSTAMP)
    text = "Beste Éloïse,\n\n" + "U bent van harte uitgenodigd op onze bijeenkomst. " * 30
    html = "<html><body><p>" + "U bent van harte uitgenodigd op onze bijeenkomst. " * 40 + "</p>"

    def one(i: int) -> None:
        to = f"user{i}@example.be"
        build(
            campaign=campaign,
            to_email=to,
            to_name="Éloïse Dupont",
            subject="Uitnodiging: Aan de slag",
            text=text,
            html=html,
            language="nl",
            message_id=message_id(campaign.id, "s", to, "example.be"),
            date=DTSTAMP,
            ics=proto.for_attendee(to, "Éloïse Dupont"),
            unsubscribe_url=f"https://example.be/u/{i}",
        )

    runs = [per_call(one, 500) * 1e3 for _ in range(repeat)]
    return Figure("message pipeline (ics + id + build)", "ms", 2.0, runs)


def bench_dkim(campaign: Campaign, repeat: int) -> Figure:
    """Signing one invitation (the bytes of :func:`bench_message`) with a new RSA 2048 key."""
    from mailer.dkim import Signer, keygen

    proto = prototype(campaign, campaign.event("aan-de-slag"), dtstamp=DTSTAMP)
    data = build(
        campaign=campaign,
        to_email="user@example.be",
        to_name="Éloïse Dupont",
        subject="Uitnodiging: Aan de slag",
        text="Beste Éloïse,\n\n" + "U bent van harte uitgenodigd op onze bijeenkomst. " * 30,
        html="<html><body><p>" + "U bent van harte uitgenodigd op onze bijeenkomst. " * 40 + "</p>",
        language="nl",
        message_id=message_id(campaign.id, "s", "user@example.be", "example.be"),
        date=DTSTAMP,
        ics=proto.for_attendee("user@example.be", "Éloïse Dupont"),
        unsubscribe_url="https://example.be/u/1",
    )
    with tempfile.TemporaryDirectory(prefix="mailer-micro-") as tmp:
        signer = Signer((keygen("bench", "example.be", Path(tmp) / "k.pem"),))

    def one(i: int) -> None:
        signer.sign(data, DTSTAMP)

    runs = [per_call(one, 300) * 1e3 for _ in range(repeat)]
    return Figure("dkim: sign one mail (RSA 2048)", "ms", 1.5, runs)


def bench_compose(campaign: Campaign, repeat: int, *, stencil: bool) -> Figure:
    """``Composer.compose_due`` of the shipped invitation (render, ICS, MIME) per recipient,
    each with their own name and organisation, with or without stencils (issue 16 target 6:
    render once per shape, fill per recipient; :mod:`mailer.stencil`)."""
    from mailer.compose import Composer
    from mailer.contacts import Contact
    from mailer.templates import Templates

    composer = Composer(campaign, Templates(campaign.templates_dir, campaign.language), stencil=stencil)
    step, event = campaign.step("uitnodiging-aan-de-slag"), campaign.event("aan-de-slag")
    people = [
        Contact(
            f"user{i}@example{i % 7}.be",
            f"Éloïse Dupont {i}",
            ("nl", "fr", "en")[i % 3],
            frozenset({"indieners"}),
            fields={"organisation": f"Vzw <{i}> & co" if i % 2 else ""},
        )
        for i in range(2000)
    ]

    def one(i: int) -> None:
        composer.compose_due(step, event, people[i % len(people)], when=DTSTAMP, sequence=0)

    runs = [per_call(one, 1000) * 1e3 for _ in range(repeat)]
    return Figure(f"compose one mail ({'stencil' if stencil else 'full render'})", "ms", 2.0, runs)


def bench_contacts(repeat: int) -> Figure:
    rows = "".join(
        f"user.{i}@example{i % 97}.be;Naam {i};nl-BE;indieners;a|b;Org {i}\n" for i in range(20_000)
    )
    runs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mailer-micro-") as tmp:
        path = Path(tmp) / "big.csv"
        path.write_text("email;name;language;lists;tags;organisation\n" + rows, encoding="utf-8")
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = load_contacts([path], display_root=Path(tmp))
            runs.append(time.perf_counter() - t0)
            if result.problems or len(result.contacts) != 20_000:
                raise SystemExit(f"contacts benchmark: unexpected result {result.problems[:3]}")
    return Figure("contacts: load 20,000 rows", "s", 2.0, runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a median misses its target")
    args = ap.parse_args(argv)
    repeat = max(3, args.repeat)
    campaign = config.load(ROOT / "schedules.yaml")
    figures = [
        bench_for_attendee(campaign, repeat),
        bench_message(campaign, repeat),
        bench_dkim(campaign, repeat),
        bench_compose(campaign, repeat, stencil=False),
        bench_compose(campaign, repeat, stencil=True),
        bench_contacts(repeat),
    ]
    if args.json:
        out = [{**asdict(f), "median": f.median, "ok": f.ok} for f in figures]
        print(json.dumps({"repeat": repeat, "figures": out}, indent=2))
    else:
        print(f"{'figure':38} {'median':>10} {'target':>10}  runs ({repeat})")
        for f in figures:
            runs = ", ".join(f"{r:.3g}" for r in f.runs)
            verdict = "ok" if f.ok else "OVER TARGET"
            print(f"{f.name:38} {f.median:>7.3g} {f.unit:2} {f.target:>7.3g} {f.unit:2}  {verdict}  [{runs}]")
    return 1 if args.strict and not all(f.ok for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())

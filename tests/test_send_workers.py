"""Large passes compose on every core (issue 16, target 6): one composing worker was the
bottleneck of `mailer send` (composing a mail costs more CPU than sending it), so a machine
with two cores now runs two, each a batch ahead, and the mails stay exactly those of the claims."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import write_campaign

from mailer import runner
from mailer.compose import Composer
from mailer.ledger import Ledger
from mailer.runner import run_pass
from mailer.smtpd import SmtpServer
from mailer.transport import TransportSettings
from mailer.workspace import load_workspace

EVENTS = """\
- id: launch
  title: Launch
  start: 2018-01-22 09:30
  end: 2018-01-22 16:30
"""
STEPS = """\
- id: invite
  event: launch
  template: invite
  at: 2018-01-04 10:00
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _workers() -> set[int]:
    """The composing workers alive now: children of this process's forkserver."""
    return {w for child in _children(os.getpid()) for w in _children(child)}


def test_one_worker_per_core_up_to_four() -> None:
    from mailer.runner import composing_workers

    assert [composing_workers(n) for n in (None, 1, 2, 3, 4, 8)] == [0, 0, 2, 3, 4, 4]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
async def test_a_large_pass_composes_in_two_workers_on_two_cores(
    tmp_path: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "WORKER_MIN", 1)
    monkeypatch.setattr(runner, "CLAIM_BATCH", 5)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    n = 80
    people = "email,name,lists\n" + "".join(f"p{i:03d}@example.org,P {i},a\n" for i in range(n))
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=people)
    ws = load_workspace(cfg)
    settings = TransportSettings(host=smtp_server.host, port=smtp_server.port, tls="none", connections=2)
    before = _workers()
    seen: set[int] = set()

    def progress(done: int, total: int) -> None:
        seen.update(_workers() - before)

    when = datetime(2018, 1, 4, 10, tzinfo=UTC)
    with Ledger.create(tmp_path / "ledger.db") as led:
        result = await run_pass(ws, led, when, settings=settings, progress=progress)
        rows = {r["email"]: r for r in led.log(columns=("email", "status", "claimed_at"))}
    assert result["sent"] == n
    assert len(seen) == 2, seen
    # Every mail once, and each the bytes its claim fixes (whichever worker composed it).
    received = smtp_server.handler.received
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(rows)
    inline = Composer(ws.campaign, ws.templates)
    step, event = ws.campaign.step("invite"), ws.campaign.event("launch")
    by_rcpt = {r.rcpt_tos[0]: r.data for r in received}
    from mailer.times import parse_iso

    for c in ws.contacts[::7]:
        expected = inline.compose_due(step, event, c, when=parse_iso(rows[c.email]["claimed_at"]), sequence=0)
        assert by_rcpt[c.email] == expected.data

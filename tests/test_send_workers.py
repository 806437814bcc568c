"""Large passes compose on every core (issue 16, target 6): one composing worker was the
bottleneck of `mailer send` (composing a mail costs more CPU than sending it), so a machine
with two cores now runs two, each a batch ahead, and the mails stay exactly those of the claims."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import FaultyHandler, write_campaign
from test_pass import EVENTS, STEPS, _children

from mailer import runner
from mailer.compose import Composer
from mailer.ledger import Ledger
from mailer.runner import run_pass
from mailer.smtpd import SmtpServer
from mailer.transport import TransportSettings
from mailer.workspace import load_workspace


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


class _Staggered(FaultyHandler):
    """Answers the end of each mail 20 ms later than the previous connection's: the replies
    of the connections arrive apart, never in one turn of the sender's event loop."""

    _slot = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        type(self)._slot = (type(self)._slot + 1) % 4
        await asyncio.sleep(0.02 * self._slot)
        return await super().handle_DATA(server, session, envelope)


async def test_outcomes_of_connections_finishing_together_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's promise (each outcome committed before its connection sends its next
    mail) with fewer commits: outcomes that arrive within FLUSH_WAIT of each other, from
    connections that all finished their mail, are one COMMIT (it was one a turn of the event
    loop: replies arriving a few milliseconds apart were a commit each)."""
    # A wait long enough that a loaded test machine cannot spread the replies beyond it.
    monkeypatch.setattr(runner, "FLUSH_WAIT", 0.5, raising=False)
    n, conns = 40, 4
    people = "email,name,lists\n" + "".join(f"p{i:03d}@example.org,P {i},a\n" for i in range(n))
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=people)
    ws = load_workspace(cfg)
    handler = _Staggered()
    commits: list[int] = []  # outcomes per COMMIT that recorded attempts
    rows = [0]

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO attempts"):
            rows[0] += 1
        elif sql == "COMMIT" and rows[0]:
            commits.append(rows[0])
            rows[0] = 0

    with SmtpServer(handler) as server:
        settings = TransportSettings(host=server.host, port=server.port, tls="none", connections=conns)
        with Ledger.create(tmp_path / "ledger.db") as led:
            led.conn.set_trace_callback(trace)
            result = await run_pass(ws, led, datetime(2018, 1, 4, 10, tzinfo=UTC), settings=settings)
            led.conn.set_trace_callback(None)
            status = {r["email"]: r["status"] for r in led.log(columns=("email", "status"))}
    assert result["sent"] == n and set(status.values()) == {"sent"}
    assert sum(commits) == n and max(commits) <= conns
    assert len(commits) <= n // 2, commits


_FORKSERVER_PROBE = """
import asyncio, os, sys
from datetime import UTC, datetime
from pathlib import Path
from mailer import runner
from mailer.ledger import Ledger
from mailer.transport import TransportSettings
from mailer.workspace import load_workspace
runner.WORKER_MIN = 1
os.cpu_count = lambda: 2
cfg, port = Path(sys.argv[1]), int(sys.argv[2])
ws = load_workspace(cfg)
settings = TransportSettings(host="127.0.0.1", port=port, tls="none", connections=2)
with Ledger.create(cfg.parent / "ledger.db") as led:
    r = asyncio.run(runner.run_pass(ws, led, datetime(2018, 1, 4, 10, tzinfo=UTC), settings=settings))
for pid in os.listdir("/proc"):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        continue
    if int(stat[1]) == os.getpid() and b"forkserver" in cmd:
        print(cmd.decode(errors="replace"))
print("sent", r["sent"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the forkserver's command line")
def test_the_workers_fork_from_a_server_that_imported_the_composer(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Each composing worker imported Jinja2, the config and the MIME code itself (~0.5 s of
    CPU each, while the connections waited for the first batch). The forkserver now starts
    as the pass begins, with the composer imported once, and the workers are its forks.
    (In a fresh process: a forkserver, once running, keeps its imports.)"""
    import subprocess
    import sys

    people = "email,name,lists\n" + "".join(f"p{i:03d}@example.org,P {i},a\n" for i in range(12))
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=people)
    out = subprocess.run(
        [sys.executable, "-c", _FORKSERVER_PROBE, str(cfg), str(smtp_server.port)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "sent 12" in out, out
    servers = [line for line in out.splitlines() if "forkserver" in line]
    assert servers and all("mailer.compose" in line for line in servers), out

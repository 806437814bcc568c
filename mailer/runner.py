"""One sending pass: plan, record skips, claim, compose, send and record each outcome."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from . import planner
from .compose import Composer, compose_batch, init_worker
from .errors import MailerError, TransportFatalError
from .ledger import Ledger, Outcome
from .planner import Due, Plan
from .transport import Outgoing, Result, Transport, TransportSettings
from .workspace import Workspace

__all__ = ["PassResult", "Clock", "run_pass", "virtual_clock"]

Clock = Callable[[], datetime]
CLAIM_BATCH = 200
#: Passes with at least this many mails compose them in a worker process (on another core).
WORKER_MIN = 1000


async def _zip(
    ids: list[int], batch: list[Due], fut: asyncio.Future[list[tuple[bytes, int] | str]]
) -> list[tuple[int, Due, tuple[bytes, int] | str]]:
    return list(zip(ids, batch, await fut, strict=True))


def virtual_clock(now: datetime) -> Clock:
    """A clock that starts at ``now`` and advances with real time (for ``--now`` and the demo)."""
    t0 = time.monotonic()
    return lambda: now + timedelta(seconds=time.monotonic() - t0)


@dataclass
class PassResult:
    """What one pass did. ``counts`` has sent/deferred/failed/skipped/suppressed/resent."""

    now: datetime
    due: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    next_wake: datetime | None = None
    # Not in the repr: at 100,000 recipients the repr of the plan costs 250 MB, and asyncio
    # formats it when it restores the SIGINT handler (bench/README.md, finding 3).
    plan: Plan | None = field(default=None, repr=False)
    stopped: bool = False
    revisions: list[tuple[planner.Revision, int]] = field(default_factory=list)

    def __getitem__(self, key: str) -> int:
        return self.counts[key]


async def run_pass(
    ws: Workspace,
    ledger: Ledger,
    now: datetime,
    *,
    settings: TransportSettings | None,
    clock: Clock | None = None,
    limit: int | None = None,
    steps: Iterable[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    unsubscribe_secret: str | None = None,
) -> PassResult:
    """Send everything due at ``now``. The caller holds the ledger lock.

    Order of commits (the ledger's promise): skips are recorded first; each batch of mails is
    claimed (``sending``, with its Message-ID) before any of its DATA is sent; each outcome is
    committed before that connection sends its next mail.

    :raises TransportFatalError: login or TLS failure; claimed mails go back to pending.
    """
    clock = clock or virtual_clock(now)
    say = log or (lambda msg: None)
    campaign = ws.campaign
    cid = campaign.id
    result = PassResult(now=now)
    known = {e.id for e in campaign.events}
    for rev in planner.revisions(
        campaign, ledger.revisions(cid), lambda ev: bool(ledger.ics_recipients(cid, ev))
    ):
        if rev.kind in ("update", "cancel"):
            people = ledger.ics_recipients(cid, rev.event)
            result.revisions.append((rev, len(people)))
            say(
                f"event {rev.event} changed: {rev.kind} (SEQUENCE {rev.sequence}) for "
                f"{len(people)} recipient(s) who have it in their calendar"
            )
        else:
            people = []
        if not dry_run:
            ledger.add_revision(
                cid,
                rev.event,
                rev.sequence,
                rev.kind,
                rev.fingerprint,
                rev.snapshot,
                now,
                [(rev.step_id, e, n) for e, n in people],
            )
    dynamic = [
        planner.dynamic_step(campaign, ev, kind, seq, at)
        for ev, kind, seq, at in ledger.revision_steps(cid)
        if ev in known
    ]
    plan = planner.plan(
        campaign,
        ws.contacts,
        lambda step_id: ledger.rows(cid, step_id),
        ledger.suppressed(),
        ledger.steps_started(cid),
        now,
        only_steps=steps,
        replies=ledger.replies(cid),
        dynamic=dynamic,
    )
    result.due, result.plan, result.next_wake = len(plan.due), plan, plan.next_wake
    if dry_run:
        return result

    for st in plan.steps_due:
        if st.kind not in ("update", "cancel"):
            ledger.mark_step_started(cid, st.id, now)
    by_outcome: dict[tuple[str, str], list[tuple[str, str, str, str, datetime]]] = {}
    for sk in plan.skips:
        by_outcome.setdefault((sk.status, sk.reason), []).append(
            (sk.step.id, sk.event.id, sk.email, sk.name, sk.step.at)
        )
    for (status, reason), items in by_outcome.items():
        n = ledger.record(cid, items, status=status, reason=reason, now=now)
        result.counts[status] += n
        say(f"{status}: {n} ({reason})")

    fresh = [d for d in plan.due if d.row is None]
    if fresh:
        # Every due mail gets its row now, so `mailer status` shows it as pending even when
        # --limit or a stop leaves it for a later pass.
        ledger.add_pending(
            cid,
            [(d.step.id, d.event.id, d.contact.email, d.contact.name, d.step.at) for d in fresh],
            now,
        )
    due = plan.due[:limit] if limit is not None else plan.due
    if not due:
        return result
    if settings is None:
        raise MailerError("no SMTP settings given")

    for d in due:
        if d.resend:
            result.counts["resent"] += 1
    if result.counts["resent"]:
        say(
            f"re-sending {result.counts['resent']} mail(s) left 'sending' by an interrupted run "
            "(same Message-ID, so mailboxes and calendars collapse any duplicate)"
        )

    composer = Composer(
        campaign,
        ws.templates,
        ledger.revisions(cid),
        ledger.snapshots(cid),
        unsubscribe_secret=unsubscribe_secret,
    )
    transport = Transport(settings, log=say)
    queue: asyncio.Queue[Outgoing | None] = asyncio.Queue(maxsize=settings.connections * 4)
    in_flight: dict[int, Due] = {}  # claimed, no outcome yet
    done = 0
    sender = campaign.sender.address
    policy = campaign.delivery

    loop = asyncio.get_running_loop()
    to_commit: list[Outcome] = []
    flushed: asyncio.Future[None] | None = None

    def flush() -> None:
        # One commit for every outcome that arrived in this turn of the event loop (up to
        # one per connection): a group commit, far cheaper than a commit per mail.
        nonlocal flushed
        batch, fut = list(to_commit), flushed
        to_commit.clear()
        flushed = None
        assert fut is not None
        try:
            ledger.outcomes(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting connection
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    async def on_result(job: Outgoing, res: Result) -> None:
        """Record a mail's outcome; the connection sends its next mail only once the outcome
        is committed (the ledger's promise: at most one mail in doubt per connection)."""
        nonlocal done, flushed
        d = in_flight.pop(job.key)
        t = clock()
        attempts = (d.row.attempts if d.row else 0) + 1
        outcome = res.outcome
        if outcome == "sent":
            to_commit.append(Outcome(job.key, "sent", res.code or 250, res.text, t))
        elif outcome == "deferred" and attempts < policy.max_attempts:
            mid = composer.message_id(d.step, d.contact.email)
            nxt = planner.retry_at(policy, attempts, mid, t)
            to_commit.append(Outcome(job.key, "deferred", res.code, res.text, t, nxt))
            result.next_wake = min(filter(None, (result.next_wake, nxt)))
        elif outcome == "deferred":
            outcome = "failed"
            reason = f"gave up after {attempts} attempts"
            to_commit.append(Outcome(job.key, "failed", res.code, res.text, t, None, reason))
        else:
            to_commit.append(Outcome(job.key, "failed", res.code, res.text, t, None, "refused by the server"))
        if flushed is None:
            flushed = loop.create_future()
            loop.call_soon(flush)
        waiting = flushed
        await waiting
        result.counts[outcome] += 1
        done += 1
        if progress:
            progress(done, len(due))

    pool: ProcessPoolExecutor | None = None
    if len(due) >= WORKER_MIN and (os.cpu_count() or 1) > 1:
        # forkserver, not fork: this process may run threads (an embedded server, the
        # inbox poller), and a forked copy of a thread's lock can deadlock.
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=init_worker,
            initargs=(campaign, ledger.revisions(cid), ledger.snapshots(cid), unsubscribe_secret),
        )

    def start(batch: list[Due]) -> asyncio.Future[list[tuple[int, Due, tuple[bytes, int] | str]]]:
        """Claim a batch (committed before any of its DATA), then compose it: in the worker
        process while earlier mails are being sent, or inline for small passes."""
        claims = ledger.claim(
            cid,
            [
                (
                    d.step.id,
                    d.event.id,
                    d.contact.email,
                    d.contact.name,
                    d.step.at,
                    composer.message_id(d.step, d.contact.email),
                    composer.sequence(d.event.id),
                    composer.has_ics(d.step),
                )
                for d in batch
            ],
            clock(),
        )
        for d, (rid, _, _) in zip(batch, claims, strict=True):
            in_flight[rid] = d
        jobs = [(d.step, d.event, d.contact, at, seq) for d, (_, at, seq) in zip(batch, claims, strict=True)]
        ids = [rid for rid, _, _ in claims]
        if pool is not None:
            fut = loop.run_in_executor(pool, compose_batch, jobs)
        else:
            fut = loop.create_future()
            fut.set_result(compose_batch(jobs, composer))
        return asyncio.ensure_future(_zip(ids, batch, fut))

    async def produce() -> None:
        batches = [due[i : i + CLAIM_BATCH] for i in range(0, len(due), CLAIM_BATCH)]
        ahead = start(batches[0]) if batches else None
        for k in range(len(batches)):
            if ahead is None or (stop is not None and stop.is_set()):
                break
            current = ahead
            # Keep one batch composing ahead so the connections never wait for the composer.
            stopping = stop is not None and stop.is_set()
            ahead = start(batches[k + 1]) if k + 1 < len(batches) and not stopping else None
            for rid, d, composed in await current:
                if stop is not None and stop.is_set():
                    break
                if isinstance(composed, str):
                    in_flight.pop(rid)
                    ledger.failed(rid, None, "", clock(), f"could not build the mail: {composed}")
                    result.counts["failed"] += 1
                    continue
                payload, size = composed
                await queue.put(Outgoing(rid, sender, d.contact.email, payload, size))
        for _ in range(settings.connections):
            await queue.put(None)

    async def drain_on_stop() -> None:
        # Stop taking work: mails still queued are not handed to the server; the ones a
        # connection is sending finish and are recorded.
        assert stop is not None
        await stop.wait()
        while not queue.empty():
            queue.get_nowait()
        for _ in range(settings.connections):  # the queue holds 4 per connection: room enough
            queue.put_nowait(None)

    producer = asyncio.create_task(produce())
    watcher = asyncio.create_task(drain_on_stop()) if stop is not None else None
    try:
        await transport.run(queue, on_result)
    except TransportFatalError:
        producer.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for task in (producer, watcher):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (producer, watcher) if t), return_exceptions=True)
        if in_flight:
            # Claimed but never handed to the server (clean stop or fatal error): back to
            # pending, so the next pass sends them as first sends.
            ledger.release(list(in_flight), clock())
            result.stopped = True
    return result

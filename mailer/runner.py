"""One sending pass: plan, record skips, claim, compose, send and record each outcome."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from . import planner
from .compose import Composer
from .errors import MailerError, TransportFatalError
from .ledger import Ledger
from .planner import Due, Plan
from .transport import Outgoing, Result, Transport, TransportSettings
from .workspace import Workspace

__all__ = ["PassResult", "Clock", "run_pass", "virtual_clock"]

Clock = Callable[[], datetime]
CLAIM_BATCH = 200


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
    plan: Plan | None = None
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

    def on_result(job: Outgoing, res: Result) -> None:
        nonlocal done
        d = in_flight.pop(job.key)
        t = clock()
        attempts = (d.row.attempts if d.row else 0) + 1
        outcome = res.outcome
        if outcome == "sent":
            ledger.sent(job.key, res.code or 250, res.text, t)
        elif outcome == "deferred" and attempts < policy.max_attempts:
            mid = composer.message_id(d.step, d.contact.email)
            nxt = planner.retry_at(policy, attempts, mid, t)
            ledger.deferred(job.key, res.code, res.text, t, nxt)
            result.next_wake = min(filter(None, (result.next_wake, nxt)))
        elif outcome == "deferred":
            outcome = "failed"
            ledger.failed(job.key, res.code, res.text, t, f"gave up after {attempts} attempts")
        else:
            ledger.failed(job.key, res.code, res.text, t)
        result.counts[outcome] += 1
        done += 1
        if progress:
            progress(done, len(due))

    async def produce() -> None:
        for i in range(0, len(due), CLAIM_BATCH):
            if stop is not None and stop.is_set():
                break
            batch = due[i : i + CLAIM_BATCH]
            t = clock()
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
                t,
            )
            for d, (rid, _, _) in zip(batch, claims, strict=True):
                in_flight[rid] = d
            for d, (rid, claimed_at, seq) in zip(batch, claims, strict=True):
                if stop is not None and stop.is_set():
                    break
                try:
                    composed = composer.compose_due(d.step, d.event, d.contact, when=claimed_at, sequence=seq)
                except MailerError as exc:
                    in_flight.pop(rid)
                    ledger.failed(rid, None, "", clock(), f"could not build the mail: {exc}")
                    result.counts["failed"] += 1
                    continue
                await queue.put(Outgoing(rid, sender, d.contact.email, composed.data))
        for _ in range(settings.connections):
            await queue.put(None)

    async def drain_on_stop() -> None:
        # Stop taking work: mails still queued are not handed to the server; the ones a
        # connection is sending finish and are recorded.
        assert stop is not None
        await stop.wait()
        while not queue.empty():
            if queue.get_nowait() is None:
                queue.put_nowait(None)
                break
        for _ in range(settings.connections):
            queue.put_nowait(None) if not queue.full() else None

    producer = asyncio.create_task(produce())
    watcher = asyncio.create_task(drain_on_stop()) if stop is not None else None
    try:
        await transport.run(queue, on_result)
    except TransportFatalError:
        producer.cancel()
        raise
    finally:
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


def utcnow() -> datetime:
    return datetime.now(UTC)

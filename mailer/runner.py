"""One sending pass, as named stages: revise, plan, record, then claim, compose, send, record.

:meth:`SendPass.run` is the whole pass and the order of its commits (the ledger's promise);
:meth:`SendPass.dry_run` is the same stages stopped after planning, so it reports exactly what
the real pass at the same time would send, and writes nothing.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from . import pacing, planner
from .bounces import envelope_for
from .clock import Clock, virtual_clock
from .compose import Composer, compose_batch, init_worker
from .dkim import Signer
from .errors import MailerError, Problem, TransportFatalError
from .gate import gate_due
from .planner import Due, Plan
from .store import Claim, Claimed, Decided, LedgerStore, NewRow, Outcome, RecordedRevision, Row
from .transport import Outgoing, Result, Transport, TransportSettings
from .vocab import Attempt, Status
from .workspace import Workspace

__all__ = ["Change", "PassResult", "SendPass", "run_pass"]

CLAIM_BATCH = 200
#: Passes with at least this many mails compose them in worker processes (on other cores).
WORKER_MIN = 1000
#: The longest an outcome waits for the other connections' to share its commit (seconds).
FLUSH_WAIT = 0.002


def composing_workers(cpus: int | None) -> int:
    """How many composing workers a large pass starts: one per core (composing costs more CPU
    per mail than sending it: bench/README.md), at most 4; none on one core.

    >>> composing_workers(1), composing_workers(2), composing_workers(16)
    (0, 2, 4)
    """
    n = cpus or 1
    return 0 if n < 2 else min(n, 4)


@dataclass(frozen=True)
class Change:
    """A revision of an event found by :meth:`SendPass.revise`, with the people it goes to
    (everyone who has the calendar entry; none for ``initial`` and ``amend``)."""

    revision: planner.Revision
    holders: tuple[tuple[str, str], ...] = ()

    @property
    def sends(self) -> bool:
        return self.revision.kind.sends


@dataclass
class PassResult:
    """What one pass did. ``counts`` has sent/deferred/failed/unknown/skipped/suppressed/resent/held."""

    now: datetime
    due: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    next_wake: datetime | None = None
    # Not in the repr: at 100,000 recipients the repr of the plan costs 250 MB, and asyncio
    # formats it when it restores the SIGINT handler (bench/README.md, finding 3).
    plan: Plan | None = field(default=None, repr=False)
    stopped: bool = False
    revisions: list[tuple[planner.Revision, int]] = field(default_factory=list)
    #: Why steps were held back by the render gate (template file and line, step); their
    #: mails are counted as ``held``, and nothing of them was sent or recorded.
    problems: list[Problem] = field(default_factory=list)
    #: Why the SMTP server could not be reached (the rest of the pass was deferred), or None.
    unreachable: str | None = None
    #: Pacing (issue 17): what the window, the quotas or a server's quota pause held back.
    paced: pacing.Paced[Due] | None = field(default=None, repr=False)
    #: The server's quota pause in force in this pass: a quota reply ("452 4.5.3 ...") it got,
    #: or one an earlier pass got and the ledger kept (``LedgerStore.server_pause``; then nothing went),
    #: and until when: nothing more goes until ``paused_until``.
    quota_reply: str | None = None
    paused_until: datetime | None = None

    def __getitem__(self, key: str) -> int:
        return self.counts[key]


class SendPass:
    """One pass over a campaign at ``now``. The caller holds the ledger's sending lock."""

    def __init__(
        self,
        ws: Workspace,
        store: LedgerStore,
        now: datetime,
        *,
        settings: TransportSettings | None = None,
        clock: Clock | None = None,
        limit: int | None = None,
        steps: Iterable[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        log: Callable[[str], None] | None = None,
        stop: asyncio.Event | None = None,
        unsubscribe_secret: str | None = None,
        paused_until: datetime | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.ws, self.store, self.now = ws, store, now
        #: DKIM (``dkim:``, :func:`mailer.dkim.load_signer`): signs each mail as it is composed.
        self.signer = signer
        self.paused_until = paused_until
        #: Counted attempt times (pacing.COUNTED) of the last day, read by :meth:`pace`.
        self.sent_times: list[datetime] = []
        self.campaign = ws.campaign
        self.settings = settings
        self.clock = clock or virtual_clock(now)
        self.limit = limit
        self.steps = list(steps) if steps is not None else None
        self.progress = progress
        self.say = log or (lambda msg: None)
        self.stop = stop
        self.secret = unsubscribe_secret
        self.result = PassResult(now=now)

    # -- the pass -----------------------------------------------------------------------------

    async def run(self) -> PassResult:
        """The pass. Nothing is written until every due mail has rendered (:meth:`gate`: a step
        with one that does not is left out whole). Commits, in this order: (1) event revisions
        with their pending updates, (2) steps started, skipped/suppressed rows and pending rows,
        in :meth:`record_plan` (and a server's quota pause that has ended is removed,
        :meth:`kept_pause`); then per batch (3) the claim (``sending``, with its Message-ID)
        before any of its DATA, and (4) each outcome before that connection sends its next mail
        (:class:`_Delivery`)."""
        if self.settings is not None and len(self.ws.contacts) >= WORKER_MIN:
            warm_workers()  # the composing workers' start-up overlaps planning
        changes = self.revise()
        plan = self.gate(self.plan(changes), changes)
        self.record_changes(changes)
        self.record_plan(plan)
        self.kept_pause(clear=True)
        due = self.pace(plan.due)
        due = due[: self.limit] if self.limit is not None else due
        if due:
            if self.settings is None:
                raise MailerError("no SMTP settings given")
            if self.campaign.dkim is not None and self.signer is None:
                raise MailerError("dkim: is configured but no signer was given; nothing was sent")
            await _Delivery(self, due, self.settings).run()
        return self.result

    def dry_run(self) -> PassResult:
        """The same stages as :meth:`run` up to the gate: what it would send and hold, nothing
        written."""
        changes = self.revise()
        plan = self.gate(self.plan(changes), changes)
        self.kept_pause(clear=False)
        self.pace(plan.due)
        return self.result

    # -- stages -------------------------------------------------------------------------------

    def revise(self) -> list[Change]:
        """Which events changed since their last recorded revision, and who has each entry."""
        cid = self.campaign.id
        holders: dict[str, tuple[tuple[str, str], ...]] = {}

        def has(event: str) -> bool:
            holders[event] = tuple(self.store.calendar_holders(cid, event))
            return bool(holders[event])

        out = []
        for rev in planner.revisions(self.campaign, self.store.latest_revisions(cid), has):
            change = Change(rev, holders.get(rev.event, ()) if rev.kind.sends else ())
            out.append(change)
            if change.sends:
                self.result.revisions.append((rev, len(change.holders)))
                self.say(
                    f"event {rev.event} changed: {rev.kind} (SEQUENCE {rev.sequence}) for "
                    f"{len(change.holders)} recipient(s) who have it in their calendar"
                )
        return out

    def plan(self, changes: list[Change]) -> Plan:
        """What is due: the planner on the ledger as it is plus the ``changes`` about to be
        recorded (a pure function of both: nothing is written here)."""
        cid, now = self.campaign.id, self.now
        known = {e.id for e in self.campaign.events}
        recorded = [r for r in self.store.revision_steps(cid) if r.event in known]
        proposed = {c.revision.step_id: c for c in changes if c.sends}
        dynamic = [planner.dynamic_step(self.campaign, r.event, r.kind, r.sequence, r.at) for r in recorded]
        dynamic += [
            planner.dynamic_step(self.campaign, c.revision.event, c.revision.kind, c.revision.sequence, now)
            for c in proposed.values()
        ]

        def rows_for(step_id: str) -> Mapping[str, Row]:
            change = proposed.get(step_id)
            if change is None:
                return self.store.step_rows(cid, step_id)
            # The rows record_changes will create: one pending row per holder.
            return {e: Row(0, step_id, e, Status.PENDING, 0, None, None, None, n) for e, n in change.holders}

        plan = planner.plan(
            self.campaign,
            self.ws.contacts,
            rows_for,
            self.store.suppressed(),
            self.store.steps_started(cid),
            now,
            only_steps=self.steps,
            replies=self.store.answers(cid),
            dynamic=dynamic,
            invalid=self.ws.invalid,
        )
        self.result.due, self.result.plan, self.result.next_wake = len(plan.due), plan, plan.next_wake
        return plan

    def gate(self, plan: Plan, changes: list[Change]) -> Plan:
        """The render gate (pure: nothing is written): render every due mail with the variables
        its delivery will use. A step with one mail that does not render is held back whole:
        its mails, its skips and its start leave the plan, so nothing of it is sent or recorded
        (its rows stay as they are) and the next pass plans it afresh. Its problems (template
        file and line) go to ``result.problems``; the other steps go."""
        if not plan.due:
            return plan
        kept, problems = gate_due(self._composer(changes), plan.due)
        if not problems:
            return plan
        held = {p.step for p in problems}
        for step in sorted(s for s in held if s is not None):
            n = sum(d.step.id == step for d in plan.due)
            self.say(f"step {step} held: none of its {n} mail(s) sent, a template does not render")
        self.result.problems += problems
        self.result.counts["held"] += len(plan.due) - len(kept)
        plan = replace(
            plan,
            due=kept,
            skips=[s for s in plan.skips if s.step.id not in held],
            steps_due=[s for s in plan.steps_due if s.id not in held],
        )
        self.result.due, self.result.plan = len(kept), plan
        return plan

    def kept_pause(self, *, clear: bool) -> None:
        """A server's quota pause an earlier pass (another process, before a restart) kept in
        the ledger: while it runs nothing goes (:meth:`pace`); once it has ended it is removed
        (with ``clear``: not by a dry run)."""
        kept = self.store.server_pause()
        if kept is None:
            return
        until, reply = kept
        if until > self.now:
            self.paused_until = max(filter(None, (self.paused_until, until)))
            self.result.paused_until, self.result.quota_reply = self.paused_until, reply
        elif clear:
            self.store.clear_server_pause(self.now)

    def pace(self, due: list[Due]) -> list[Due]:
        """Send windows, quotas and deadline order (:func:`mailer.pacing.pace`, pure), on the
        attempts of the last day as the ledger counts them: what may go now, in order. What
        waits keeps its pending row (recorded by :meth:`record_plan`); the pass wakes again
        when the first of it may go."""
        if not due:
            return due
        c = self.campaign
        if pacing.quotas(c.smtp):
            times = self.store.attempt_times(self.now - timedelta(days=1))
            self.sent_times = pacing.counted_since(times, self.now - timedelta(days=1))
        paced = pacing.pace(due, c, self.now, self.sent_times, paused_until=self.paused_until)
        self.result.paced = paced
        if paced.wake is not None:
            self.result.next_wake = min(filter(None, (self.result.next_wake, paced.wake)))
        for why, (n, until, detail) in sorted(paced.reasons().items()):
            self.say(
                f"waiting ({why}): {n} mail(s) until {until.astimezone(c.timezone):%Y-%m-%d %H:%M}: {detail}"
            )
        if paced.outside:
            self.say(f"{len(paced.outside)} mail(s) go outside the delivery window: their event comes first")
        return paced.go

    def _composer(self, changes: list[Change]) -> Composer:
        """A composer that sees the ledger as it will be once ``changes`` are recorded (the
        SEQUENCE and snapshots an update is built with)."""
        cid = self.campaign.id
        latest = {
            e: (r.sequence, r.fingerprint, r.snapshot) for e, r in self.store.latest_revisions(cid).items()
        }
        snapshots = dict(self.store.revision_snapshots(cid))
        for c in changes:
            r = c.revision
            latest[r.event] = (r.sequence, r.fingerprint, r.snapshot)  # never below the recorded one
            snapshots[(r.event, r.sequence)] = r.snapshot
        return Composer(self.campaign, self.ws.templates, latest, snapshots, unsubscribe_secret=self.secret)

    def record_changes(self, changes: list[Change]) -> None:
        """Commit (1): each revision with the pending update/cancel rows it causes."""
        for c in changes:
            r = c.revision
            rec = RecordedRevision(r.event, r.sequence, r.kind, r.fingerprint, r.snapshot, self.now)
            self.store.record_revision(self.campaign.id, rec, r.step_id, c.holders)

    def record_plan(self, plan: Plan) -> None:
        """Commit (2): the steps this pass handled, every decision made without sending, and a
        pending row for each due mail (so `mailer status` shows what --limit or a stop leaves)."""
        cid, now = self.campaign.id, self.now
        self.store.mark_steps_started(cid, [s.id for s in plan.steps_due if not s.kind.revises], now)
        decided = [
            Decided(sk.step.id, sk.event.id, sk.email, sk.name, sk.step.at, Status(sk.status), sk.reason)
            for sk in plan.skips
        ]
        written = self.store.record_decided(cid, decided, now)
        for status, n in written.items():
            self.result.counts[status] += n
        for (status, reason), n in Counter((Status(sk.status), sk.reason) for sk in plan.skips).items():
            self.say(f"{status}: {n} ({reason})")
        fresh = [d for d in plan.due if d.row is None]
        if fresh:
            self.store.add_pending(
                cid,
                [NewRow(d.step.id, d.event.id, d.contact.email, d.contact.name, d.step.at) for d in fresh],
                now,
            )


def warm_workers() -> None:
    """Start multiprocessing's forkserver now, with the composing code imported once in it, when
    this machine composes in workers: every worker is then a fork of a process that already
    imported Jinja2, the config and the MIME code (about 0.5 s of CPU each otherwise, while
    the connections wait for the first batch), and the server's own start-up runs on the other
    core while this one plans. Idempotent: a running forkserver is kept."""
    if not composing_workers(os.cpu_count()):
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["__main__", "mailer.compose", "mailer.dkim"]
    )
    forkserver.ensure_running()


class _Delivery:
    """Stages (3) and (4) of a pass: claim a batch, compose it, hand it to the connections,
    record each outcome. Any stage that fails stops the pass within seconds: the outcomes
    already received are recorded, then claimed mails no connection took go back to pending;
    a mail a connection took and whose outcome is unknown stays ``sending`` (the crash policy:
    it goes again, identical). Then the error is raised."""

    def __init__(self, sp: SendPass, due: list[Due], settings: TransportSettings) -> None:
        self.sp, self.due, self.settings = sp, due, settings
        store, cid = sp.store, sp.campaign.id
        self.store = store
        latest = store.latest_revisions(cid)
        self.revisions = {e: (r.sequence, r.fingerprint, r.snapshot) for e, r in latest.items()}
        self.snapshots = store.revision_snapshots(cid)
        # The answers as this pass starts (issue 13): each claim records the one its mail
        # carries, so a mail left in doubt goes again with the same answer (byte-identical).
        self.composer = Composer(
            sp.campaign,
            sp.ws.templates,
            self.revisions,
            self.snapshots,
            unsubscribe_secret=sp.secret,
            answers=store.answers(cid),
            signer=sp.signer,
        )
        # The envelope sender per delivery (VERP, issue 15): a function of the row id, so a
        # re-send after a crash goes out with the same MAIL FROM.
        self.mail_from = envelope_for(sp.campaign, sp.secret)
        self.transport = Transport(settings, log=sp.say)
        self.queue: asyncio.Queue[Outgoing | None] = asyncio.Queue(maxsize=settings.connections * 4)
        self.in_flight: dict[int, Due] = {}  # claimed, no outcome recorded yet
        self.to_commit: list[Outcome] = []
        self.flushed: asyncio.Future[None] | None = None
        self._flush_at: asyncio.TimerHandle | None = None
        self.done = 0
        self.failure: BaseException | None = None
        self.pool: ProcessPoolExecutor | None = None
        self.workers = 0  # composing worker processes (0: composed inline)
        self.cancelled = False

    async def run(self) -> None:
        sp, counts = self.sp, self.sp.result.counts
        for d in self.due:
            if d.resend:
                counts["resent"] += 1
        if counts["resent"]:
            sp.say(
                f"re-sending {counts['resent']} mail(s) left 'sending' by an interrupted run "
                "(same Message-ID, so mailboxes and calendars collapse any duplicate)"
            )
        workers = composing_workers(os.cpu_count()) if len(self.due) >= WORKER_MIN else 0
        self.workers = workers
        if workers:
            # forkserver, not fork: this process may run threads (an embedded server, the
            # inbox poller), and a forked copy of a thread's lock can deadlock.
            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=init_worker,
                initargs=(sp.campaign, self.revisions, self.snapshots, sp.secret, os.getpid(), sp.signer),
            )
        producer = asyncio.create_task(self._produce())
        watcher = asyncio.create_task(self._drain_on_stop()) if sp.stop is not None else None
        try:
            await self.transport.run(self.queue, self._on_result)
        except TransportFatalError as exc:
            self.failure = self.failure or exc
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            await self._finish(producer, watcher)
            sp.result.unreachable = self.transport.unreachable
        if self.failure is not None:
            raise self.failure

    # -- (3) claim and compose ------------------------------------------------------------------

    def _claim(self, batch: list[Due]) -> list[tuple[Due, Claimed]]:
        comp, cid = self.composer, self.sp.campaign.id
        claims = [
            Claim(
                d.step.id,
                d.event.id,
                d.contact.email,
                d.contact.name,
                d.step.at,
                message_id=comp.message_id(d.step, d.contact.email),
                sequence=comp.sequence(d.event.id),
                has_ics=comp.has_ics(d.step),
                partstat=comp.answer(d.event.id, d.contact.email) if comp.has_ics(d.step) else None,
            )
            for d in batch
        ]
        out = []
        for d, claimed in zip(batch, self.store.claim(cid, claims, self.sp.clock()), strict=True):
            if claimed is None:  # final meanwhile (never sent twice)
                continue
            self.in_flight[claimed.id] = d
            out.append((d, claimed))
        return out

    async def _compose(self, claimed: list[tuple[Due, Claimed]]) -> list[tuple[bytes, int] | str]:
        jobs = [
            (d.step, d.event, d.contact, c.claimed_at, self._sequence(d, c), c.partstat) for d, c in claimed
        ]
        if self.pool is not None:
            return await asyncio.get_running_loop().run_in_executor(self.pool, compose_batch, jobs)
        return compose_batch(jobs, self.composer)

    def _sequence(self, d: Due, c: Claimed) -> int:
        """The SEQUENCE a claimed mail carries: its claim's, so a re-send is identical. An
        invitation or reminder never carries less than the event's current SEQUENCE: one
        claimed before an update and sent after it (a 4xx, then a retry) would otherwise show
        its attendee the SEQUENCE going back (issue 13); its text is the new one anyway. An
        update or cancellation carries its own revision's."""
        if d.step.kind.revises:
            return c.sequence
        return max(c.sequence, self.composer.sequence(d.event.id))

    async def _produce(self) -> None:
        """Claim and compose batch after batch (one composing ahead, so the connections never
        wait), and queue the mails. A failure here stops the connections: see :meth:`_stop`."""
        due, stop = self.due, self.sp.stop
        batches = [due[i : i + CLAIM_BATCH] for i in range(0, len(due), CLAIM_BATCH)]
        # One batch composing ahead per worker, so every worker is busy while the
        # connections send the current batch.
        depth = max(1, self.workers)
        ahead: deque[asyncio.Task[tuple[list[tuple[Due, Claimed]], list[tuple[bytes, int] | str]]]] = deque()
        started = 0

        def fill() -> None:
            nonlocal started
            while len(ahead) < depth and started < len(batches) and not (stop is not None and stop.is_set()):
                ahead.append(self._start(batches[started]))
                started += 1

        try:
            fill()
            while ahead:
                if stop is not None and stop.is_set():
                    break
                current = ahead.popleft()
                fill()
                claimed, composed = await current
                for (d, c), mail in zip(claimed, composed, strict=True):
                    if stop is not None and stop.is_set():
                        break
                    if isinstance(mail, str):
                        self._commit_now(
                            Outcome(
                                c.id,
                                Attempt.FAILED,
                                None,
                                "",
                                self.sp.clock(),
                                None,
                                f"could not build the mail: {mail}",
                            )
                        )
                        self.sp.result.counts[Attempt.FAILED] += 1
                        continue
                    payload, size = mail
                    await self.queue.put(Outgoing(c.id, self.mail_from(c.id), d.contact.email, payload, size))
            if ahead:
                await asyncio.gather(*ahead, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - a claim or the composing worker failed
            self.failure = _stopped(exc)
            self.sp.say(f"stopping the pass: {self.failure}")
            self._drain()
            for task in ahead:  # the batches composing ahead: their claims are released below
                task.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
        finally:
            for _ in range(self.settings.connections):
                await self.queue.put(None)

    def _start(
        self, batch: list[Due]
    ) -> asyncio.Task[tuple[list[tuple[Due, Claimed]], list[tuple[bytes, int] | str]]]:
        claimed = self._claim(batch)  # committed before any of its DATA

        async def both() -> tuple[list[tuple[Due, Claimed]], list[tuple[bytes, int] | str]]:
            return claimed, await self._compose(claimed)

        return asyncio.ensure_future(both())

    # -- (4) outcomes -------------------------------------------------------------------------

    async def _on_result(self, job: Outgoing, res: Result) -> None:
        """Record a mail's outcome; the connection sends its next mail only once the outcome
        is committed (the ledger's promise: at most one mail in doubt per connection)."""
        sp = self.sp
        d = self.in_flight[job.key]
        t = sp.clock()
        policy = sp.campaign.delivery
        attempts = (d.row.attempts if d.row else 0) + 1
        outcome = Attempt(res.outcome)
        outside = sp.result.paced.outside if sp.result.paced is not None else {}
        if outcome is Attempt.SENT:
            reason = outside.get((d.step.id, d.contact.email))
            o = Outcome(job.key, outcome, res.code or 250, res.text, t, None, reason)
            sp.sent_times.append(t)
        elif outcome is Attempt.DEFERRED and res.quota:
            # A quota reply (issue 17): this mail and the rest of the pass wait for the quota.
            until = pacing.quota_pause(t, pacing.quotas(sp.campaign.smtp), sp.sent_times, policy.retry_max)
            if sp.result.paused_until is None:
                sp.say(
                    f"pausing: the server answered {res.code} {res.text}; sending resumes at "
                    f"{until.astimezone(sp.campaign.timezone):%Y-%m-%d %H:%M}"
                )
            sp.result.quota_reply = f"{res.code} {res.text}"
            sp.result.paused_until = max(filter(None, (sp.result.paused_until, until)))
            o = Outcome(job.key, outcome, res.code, res.text, t, until, "waiting for the server's quota")
            sp.result.next_wake = min(filter(None, (sp.result.next_wake, until)))
        elif outcome in (Attempt.DEFERRED, Attempt.UNKNOWN) and attempts < policy.max_attempts:
            nxt = planner.retry_at(policy, attempts, self.composer.message_id(d.step, d.contact.email), t)
            reason = (
                "outcome unknown: sent again, identical, at the next attempt"
                if outcome is Attempt.UNKNOWN
                else None
            )
            o = Outcome(job.key, outcome, res.code, res.text, t, nxt, reason)
            sp.result.next_wake = min(filter(None, (sp.result.next_wake, nxt)))
        elif outcome in (Attempt.DEFERRED, Attempt.UNKNOWN):
            why = f"gave up after {attempts} attempts"
            if outcome is Attempt.UNKNOWN:
                why += (
                    "; the outcome of the last one is unknown (the server may have it): "
                    "check before `mailer retry`"
                )
            o = Outcome(job.key, Attempt.FAILED, res.code, res.text, t, None, why)
            outcome = Attempt.FAILED
        else:
            o = Outcome(job.key, Attempt.FAILED, res.code, res.text, t, None, "refused by the server")
        self.to_commit.append(o)
        loop = asyncio.get_running_loop()
        if self.flushed is None:
            self.flushed = loop.create_future()
            self._flush_at = loop.call_later(FLUSH_WAIT, self._flush)
        if len(self.to_commit) >= self.transport.busy and self._flush_at is not None:
            # Every connection in a transaction has its outcome here: commit them now.
            self._flush_at.cancel()
            self._flush_at = None
            loop.call_soon(self._flush)
        await self.flushed
        sp.result.counts[outcome] += 1
        self.done += 1
        if sp.progress:
            sp.progress(self.done, len(self.due))

    def _flush(self) -> None:
        """One commit for the outcomes of the connections that finished a mail together: a
        group commit, far cheaper than a commit per mail (the BEGIN/COMMIT is most of its
        cost). It runs once every connection in a transaction has its outcome waiting, or
        FLUSH_WAIT after the first, whichever comes first; no connection sends its next mail
        before its outcome is committed."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        batch, fut = list(self.to_commit), self.flushed
        self.to_commit.clear()
        self.flushed = None
        for o in batch:
            self.in_flight.pop(o.delivery_id, None)
        try:
            self.store.record_outcomes(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting connection
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            self.failure = self.failure or exc
            self._drain()
        else:
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _commit_now(self, outcome: Outcome) -> None:
        self.in_flight.pop(outcome.delivery_id, None)
        self.store.record_outcomes([outcome])

    # -- stopping -----------------------------------------------------------------------------

    def _drain(self) -> None:
        """Take every mail still queued back out (no connection will get it), and let each
        connection stop after its current mail."""
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in range(self.settings.connections):
            if not self.queue.full():
                self.queue.put_nowait(None)

    async def _drain_on_stop(self) -> None:
        stop = self.sp.stop
        assert stop is not None
        await stop.wait()
        self._drain()

    async def _finish(self, producer: asyncio.Task[None], watcher: asyncio.Task[None] | None) -> None:
        """After the connections stopped (or failed): outcomes first, then the release."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        for task in (producer, watcher):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (producer, watcher) if t), return_exceptions=True)
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self.to_commit:  # outcomes received but not yet committed: they come first
            fut, self.flushed = self.flushed, None
            batch = list(self.to_commit)
            self.to_commit.clear()
            for o in batch:
                self.in_flight.pop(o.delivery_id, None)
            self.store.record_outcomes(batch)
            if fut is not None and not fut.done():
                fut.set_result(None)
        if self.in_flight:
            if self.cancelled:
                # Cancelled from outside (Ctrl-C at the worst moment): a connection may have
                # been mid-mail, so every claim without an outcome stays 'sending', as after a
                # crash: the next pass sends those again, identical.
                self.sp.say(f"{len(self.in_flight)} mail(s) without an outcome left 'sending'")
            else:
                # The connections stopped in order (each finishes its mail and records it):
                # a claim without an outcome never reached a server. Back to pending.
                self.store.release(list(self.in_flight), self.sp.clock())
            self.sp.result.stopped = True


def _stopped(exc: Exception) -> Exception:
    """The error a failed stage stops the pass with: ours as they are, others explained."""
    if isinstance(exc, MailerError):
        return exc
    if isinstance(exc, BrokenProcessPool):
        err = MailerError(
            "the composing worker process died (killed, or out of memory); the pass stopped: "
            "what was sent is recorded, the rest goes out on the next pass"
        )
    else:
        err = MailerError(f"the pass stopped: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


async def run_pass(
    ws: Workspace,
    ledger: LedgerStore,
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
    paused_until: datetime | None = None,
    signer: Signer | None = None,
) -> PassResult:
    """Send everything due at ``now`` (see :meth:`SendPass.run`); with ``dry_run``, only plan
    (:meth:`SendPass.dry_run`). The caller holds the ledger lock. ``paused_until``: the
    previous pass's :attr:`PassResult.paused_until` (a server's quota pause still running).

    :raises TransportFatalError: login or TLS failure; mails no connection took go back to pending.
    :raises LedgerError: the ledger cannot record (the pass stops at once, as after a crash).
    """
    sp = SendPass(
        ws,
        ledger,
        now,
        settings=settings,
        clock=clock,
        limit=limit,
        steps=steps,
        progress=progress,
        log=log,
        stop=stop,
        unsubscribe_secret=unsubscribe_secret,
        paused_until=paused_until,
        signer=signer,
    )
    return sp.dry_run() if dry_run else await sp.run()

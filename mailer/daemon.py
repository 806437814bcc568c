"""The long-running daemon (``mailer run``): APScheduler wakes it, a clock tells it the time."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from .clock import Clock, SystemClock
from .dkim import load_signer
from .errors import ConfigError, LockedError, MailerError, TransportFatalError
from .gate import check_workspace
from .inbox import InboxResult, process_configured
from .ledger import Ledger
from .mailboxes import configured_source
from .pacing import Wait, deadline
from .runner import PassResult, run_pass
from .tokens import secret_from
from .transport import TransportSettings
from .workspace import Workspace, load_workspace

__all__ = ["Daemon", "Quiet", "quiet_after", "run_daemon"]

log = logging.getLogger("mailer")

#: How often the daemon looks for edited files and for work made due from outside (mailer retry).
WATCH_SECONDS = 2.0
SWEEP_SECONDS = 60.0
#: How often the organiser's mailbox is read for replies, bounces and unsubscribes.
INBOX_SECONDS = 180.0
#: A reload that would drop more than DROP_SHARE of the running campaign's contacts *and* more
#: than DROP_MIN of them at once is refused (a half-saved or wrongly exported file); to drop them
#: on purpose, restart the daemon, which takes the files as they are.
DROP_SHARE = 0.20
DROP_MIN = 5

#: A file's state as the watcher sees it: modification time and size.
_Stat = tuple[int, int]


@dataclass(frozen=True)
class Quiet:
    """What a pass that found nothing to send (and wrote nothing) leaves for the next sweep:
    the same inputs give the same plan until ``until``, so a sweep before then does nothing.

    The plan is a pure function of the workspace, the ledger and ``now`` (mailer.planner), so
    nothing can come due unless one of them changes: ``ws`` (a reload replaces the object),
    ``ledger_version`` (SQLite's ``PRAGMA data_version``: it moves when another connection
    commits, e.g. ``mailer retry``, ``mailer web`` answers and unsubscribes, the inbox poll) or
    the clock passing ``until``, the earliest edge the pass saw: a step's (or a zone's) time, a
    retry's ``next_attempt``, a window closing on a contact who left, the pacing's wake (a
    window opening, a quota freeing, a server pause ending) and the deadlines of the mails
    pacing holds back (issue 16, target 3).
    """

    ws: Workspace
    ledger_version: int
    until: datetime | None

    def holds(self, ws: Workspace, ledger_version: int, now: datetime) -> bool:
        """True when nothing can have come due since the pass that left this."""
        return (
            ws is self.ws
            and ledger_version == self.ledger_version
            and (self.until is None or now < self.until)
        )


def quiet_after(ws: Workspace, r: PassResult, ledger_version: int) -> Quiet | None:
    """The :class:`Quiet` a pass leaves, or None when the next sweep must plan again: the pass
    sent or decided something (its own writes change what the next plan sees), recorded a
    revision, held a step at the render gate, or stopped."""
    if r.plan is None or r.stopped or r.problems or r.revisions or any(r.counts.values()):
        return None
    go = r.paced.go if r.paced is not None else r.plan.due
    if go:
        return None
    until = r.next_wake
    seen: set[tuple[str, datetime]] = set()
    for d in r.plan.due:  # held back by pacing: a deadline passing changes their fate
        if (d.step.id, d.step.at) not in seen:
            seen.add((d.step.id, d.step.at))
            limit = min(deadline(d, ws.campaign))
            until = limit if until is None else min(until, limit)
    return Quiet(ws, ledger_version, until)


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(
            logging.Formatter("%(asctime)s mailer %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
        )
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _template_files(root: Path) -> list[str]:
    """Every file under ``root`` (symlinks followed, each directory once), with ``os.scandir``,
    whose entries carry their type, and as strings (a ``Path`` per file costs more than its
    stat). The watcher lists them every WATCH_SECONDS: most of an idle daemon's CPU (issue 16,
    target 3)."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    todo = [str(root)]
    while todo:
        folder = todo.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_dir():
                        todo.append(e.path)
                    elif e.is_file():
                        out.append(e.path)
        except OSError:
            continue
    return out


def _snapshot(ws: Workspace) -> dict[str, _Stat]:
    """The state of every file the campaign is read from, by path."""
    files = {str(p) for p in ws.files}
    files.update(str(p) for p in ws.campaign.contact_paths())
    files.update(_template_files(ws.campaign.templates_dir))
    out: dict[str, _Stat] = {}
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out[f] = (-1, -1)
        else:
            out[f] = (st.st_mtime_ns, st.st_size)
    return out


class Daemon:
    """Wakes at each step's time and each retry time, runs a pass, reloads on edits.

    The daemon knows the time only through ``clock`` (:class:`~mailer.clock.SystemClock` in
    ``mailer run``): each pass, each wake-up and the inbox poll ask it. APScheduler decides on
    real time *when* to wake. A test starts the daemon with ``run_jobs=False`` (the scheduler
    paused: jobs are scheduled but never fire), moves a :class:`~mailer.clock.ManualClock` and
    awaits :meth:`tick` / :meth:`watch` itself, then reads :attr:`wake_at`.

    The daemon owns ``ledger`` from :meth:`start` on and closes it (releasing the sending lock)
    in :meth:`close`.
    """

    def __init__(
        self,
        config_path: Path,
        ws: Workspace,
        ledger: Ledger,
        settings: TransportSettings,
        environ: Mapping[str, str],
        *,
        clock: Clock | None = None,
    ) -> None:
        self.config_path = config_path
        self.environ = environ
        self.ws = ws
        self.ledger = ledger
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.stop = asyncio.Event()
        self.scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._files = _snapshot(ws)
        self._settling: dict[str, _Stat] | None = None  # a change seen, not yet still
        self._lock = asyncio.Lock()
        #: Why the daemon stopped on its own (a failed pass, a login refused); exit status 1.
        self.fatal: str | None = None
        #: Issue 17: a server's quota pause still running (no pass sends before it ends), and
        #: what sending waits for now ({reason: until}), for the pause/resume log lines.
        self.paused_until: datetime | None = None
        self.waiting: dict[str, datetime] = {}
        #: Issue 16: what the last pass left when it found nothing to send (None: plan again).
        self.quiet: Quiet | None = None
        #: Passes run, and sweeps that found nothing changed and did nothing (for tests and logs).
        self.passes = 0
        self.idle_sweeps = 0

    @property
    def wake_at(self) -> datetime | None:
        """When the next pass is scheduled (the "wake" job's run time), or None."""
        job = self.scheduler.get_job("wake")
        # A job added before the scheduler started has no run time yet.
        return getattr(job, "next_run_time", None) if job is not None else None

    def _schedule(self, at: datetime | None) -> None:
        if at is None:
            return
        at = max(at, self.clock())
        current = self.wake_at
        if current is not None and current <= at:
            return
        self.scheduler.add_job(
            self.tick, DateTrigger(run_date=at, timezone=UTC), id="wake", replace_existing=True
        )
        log.info(
            "next wake-up %s",
            at.astimezone(self.ws.campaign.timezone).isoformat(timespec="seconds"),
        )

    async def tick(self) -> None:
        """One pass at the clock's time. A pass that cannot go on (any exception: the ledger
        locked or full, the composing worker dead, a login refused) stops the daemon."""
        if self.stop.is_set():
            return
        async with self._lock:
            if self.stop.is_set():  # stopped while waiting for the previous pass
                return
            now = self.clock()
            wake = self.wake_at
            try:
                version = self._ledger_version()
                if (wake is None or wake > now) and self.quiet is not None:
                    if self.quiet.holds(self.ws, version, now):
                        self.idle_sweeps += 1
                        return  # nothing changed, no edge passed: the plan would be the same
                self.quiet = None
                if wake is not None and wake <= now:
                    # This pass does the work of a wake-up due by now (a sweep or a reload came
                    # first, or a test drives the daemon); keeping it would block a later one.
                    self.scheduler.remove_job("wake")
                self.passes += 1
                self._log_steps_due(now)
                result = await run_pass(
                    self.ws,
                    self.ledger,
                    now,
                    settings=self.settings,
                    clock=self.clock,
                    log=lambda m: log.info("%s", m),
                    stop=self.stop,
                    unsubscribe_secret=secret_from(self.environ),
                    signer=load_signer(self.ws.campaign, self.environ),  # read per pass: a new key counts
                    paused_until=self.paused_until,
                )
            except Exception as exc:  # noqa: BLE001 - every failure stops the daemon, exit 1
                self._fail(exc)
                return
            self._report(result)
            self._log_pacing(result, now)
            self._schedule(result.next_wake)
            # The version read before the pass: a commit by another process during it moves the
            # version again, so the next sweep plans again.
            self.quiet = quiet_after(self.ws, result, version)

    def _ledger_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes when another connection (process) commits."""
        row = self.ledger.conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def _log_pacing(self, r: PassResult, now: datetime) -> None:
        """Log when sending pauses (for the window, a quota, a server's quota reply) and when it
        resumes, once each, with the reason and until when (issue 17)."""
        if r.paused_until is not None:
            self.paused_until = r.paused_until
        elif self.paused_until is not None and self.paused_until <= now:
            self.paused_until = None
        waiting: dict[str, tuple[datetime, str]] = {}
        if r.paced is not None:
            for wait, (n, until, detail) in r.paced.reasons().items():
                waiting[str(wait)] = (until, f"{n} mail(s): {detail}")
        if r.quota_reply is not None and r.paused_until is not None:
            waiting[str(Wait.SERVER)] = (r.paused_until, f"the server answered {r.quota_reply}")
        tz = self.ws.campaign.timezone
        for why, (until, text) in waiting.items():
            if self.waiting.get(why) != until:
                log.info(
                    "pause (%s) until %s: %s", why, until.astimezone(tz).isoformat(timespec="minutes"), text
                )
        for why in self.waiting.keys() - waiting.keys():
            log.info("resume (%s): sending again", why)
        self.waiting = {why: until for why, (until, _) in waiting.items()}

    def _log_steps_due(self, now: datetime) -> None:
        c = self.ws.campaign
        started = self.ledger.steps_started(c.id)
        for s in c.steps:
            if s.at <= now and s.id not in started:
                log.info(
                    "step due: %s (%s)",
                    s.id,
                    s.at.astimezone(c.timezone).isoformat(timespec="minutes"),
                )

    def _fail(self, exc: Exception) -> None:
        """Stop after a pass that could not go on. Going on would leave the daemon idle with
        the lock held (issue 11, item 9); exit status 1 lets systemd's Restart=on-failure
        start a fresh one, which re-sends what the crash policy says."""
        text = str(exc) if isinstance(exc, MailerError) else f"{type(exc).__name__}: {exc}"
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
        if isinstance(exc, TransportFatalError):
            log.error("stopping: %s", text)
        else:
            log.error("stopping: the pass failed: %s", text)
        self.fatal = text
        self.stop.set()

    def _report(self, r: PassResult) -> None:
        if r.due or any(r.counts.values()):
            log.info(
                "batch: %d due, %s",
                r.due,
                ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "nothing sent",
            )

    async def watch(self) -> None:
        """Reload when schedules.yaml, a contact file or a template changes and has stopped
        changing. An edit that is invalid, that would drop many contacts at once, or whose mails
        do not all render is logged at ERROR and the running campaign goes on unchanged."""
        # A few stat() calls every WATCH_SECONDS; the campaign (all contact files) is read
        # again only when one of its files changed, and only once two looks a watch period
        # apart agree: an editor's non-atomic save was read half-written (issue 12).
        current = _snapshot(self.ws)
        if current == self._files:
            self._settling = None
            return
        if current != self._settling:
            self._settling = current
            return
        self._settling = None
        self._files = current
        try:
            ws = load_workspace(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, schedules.yaml is invalid; still running the previous version:")
            for p in exc.problems:
                log.error("  %s", p)
            return
        after = _snapshot(ws)
        if any(after.get(f, st) != st for f, st in current.items()):
            return  # changed while being read: the next look sees it and waits again
        self._files = after
        if ws.blocking:
            log.error("reload refused; still running the previous version:")
            for p in ws.blocking:
                log.error("  %s", p)
            return
        if ws.campaign.id != self.ws.campaign.id:
            log.error(
                "reload refused: the campaign id changed (%s -> %s); restart the daemon with the new ledger",
                self.ws.campaign.id,
                ws.campaign.id,
            )
            return
        if not self._few_dropped(ws) or not await self._renders(ws):
            return
        self.ws = ws
        log.info("reload: %d steps, %d contacts", len(ws.campaign.steps), len(ws.contacts))
        self.scheduler.remove_all_jobs()
        self._add_periodic()
        await self.tick()

    def _few_dropped(self, ws: Workspace) -> bool:
        """False (logged) when ``ws`` would drop a large share of the contacts at once."""
        before = len(self.ws.contacts)
        gone = before - len({c.email for c in self.ws.contacts} & {c.email for c in ws.contacts})
        if gone > DROP_MIN and gone > DROP_SHARE * before:
            log.error(
                "reload refused: the edit would drop %d of the %d contacts at once (more than %d and "
                "more than %d %%; a half-saved or wrongly exported file?); still running the "
                "previous version. If that is meant, restart the daemon.",
                gone,
                before,
                DROP_MIN,
                round(DROP_SHARE * 100),
            )
            return False
        return True

    async def _renders(self, ws: Workspace) -> bool:
        """False (every problem logged) when a mail of ``ws`` would not render: the render gate
        (:func:`mailer.gate.check_workspace`), in a thread, since it renders every mail."""
        secret = secret_from(self.environ)
        found = await asyncio.to_thread(check_workspace, ws, unsubscribe_secret=secret)
        errors = [p for p in found if p.severity == "error"]
        if errors:
            log.error("reload refused, %d mail problem(s); still running the previous version:", len(errors))
            for p in errors:
                log.error("  %s", p)
        return not errors

    def _add_periodic(self) -> None:
        self.scheduler.add_job(
            self.watch, "interval", seconds=WATCH_SECONDS, id="watch", replace_existing=True
        )
        self.scheduler.add_job(
            self.tick, "interval", seconds=SWEEP_SECONDS, id="sweep", replace_existing=True
        )
        if configured_source(self.environ) is not None:
            self.scheduler.add_job(
                self.poll_inbox,
                "interval",
                seconds=INBOX_SECONDS,
                id="inbox",
                replace_existing=True,
                next_run_time=self.clock(),
            )

    async def poll_inbox(self) -> None:
        """Read the organiser's mailbox. imapclient blocks, so the work runs in a thread with
        its own ledger connection; a mailbox problem is logged and never stops sending."""
        path = self.ledger.path
        assert path is not None
        now = self.clock()

        def work() -> InboxResult | None:
            with Ledger.open(path) as ledger:
                return process_configured(self.ws.campaign, ledger, self.environ, now=now)

        try:
            result = await asyncio.to_thread(work)
        except MailerError as exc:
            log.warning("inbox: %s", exc)
            return
        if result and (result.handled or result.counts):  # skipped messages are for a person to read
            for line in result.lines:
                log.info("inbox: %s", line)
            log.info("inbox: %s", result.summary())
        if result and result.handled:
            self._schedule(self.clock())  # answers and suppressions change audiences

    async def start(self, *, run_jobs: bool = True) -> None:
        """Start the scheduler and catch up on whatever is due.

        :param run_jobs: False starts the scheduler paused: wake-ups are scheduled (see
            :attr:`wake_at`) but only the caller runs :meth:`tick` and :meth:`watch`.
        """
        c = self.ws.campaign
        log.info(
            "start: campaign %s, %d steps, %d contacts, ledger %s, %s",
            c.id,
            len(c.steps),
            len(self.ws.contacts),
            self.ledger.path,
            self.settings.describe(),
        )
        self.scheduler.start(paused=not run_jobs)
        self._add_periodic()
        await self.tick()  # catch up on whatever is due

    async def close(self) -> int:
        """Stop taking work, let a running pass record what is in flight, stop the scheduler
        and close the ledger (which releases the sending lock). Returns the exit status."""
        self.stop.set()
        async with self._lock:
            pass
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.ledger.close()
        log.info("stop")
        return 1 if self.fatal else 0

    async def main(self) -> int:
        """Run until SIGTERM/SIGINT or a failed pass; returns the exit status (0, or 1)."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self.stop.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            code = await self.close()
        return code

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: finishing mails in flight", sig.name)
        self.stop.set()


def run_daemon(config_path: Path, db_path: Path | None, *, environ: Mapping[str, str]) -> int:
    """``mailer run``: returns the exit code."""
    _setup_logging()
    ws = load_workspace(config_path)
    for p in ws.problems:
        (log.error if p.severity == "error" else log.warning)("%s", p)
    if ws.blocking:
        raise MailerError(
            f"{len(ws.blocking)} problem(s) stop the daemon from starting; fix them and run `mailer check`"
        )
    # The same render gate a reload passes (issue 12): a daemon never starts on templates that
    # fail for some recipient; each pass would hold those steps back, quietly, for ever.
    rendered = [
        p for p in check_workspace(ws, unsubscribe_secret=secret_from(environ)) if p.severity == "error"
    ]
    for p in rendered:
        log.error("%s", p)
    if rendered:
        raise MailerError(
            f"{len(rendered)} mail(s) would not render (see above); the daemon did not start: fix the "
            "templates and run `mailer check`"
        )
    settings = TransportSettings.from_config(ws.campaign.smtp, environ)
    load_signer(ws.campaign, environ)  # a DKIM key that cannot be used stops the start, not a pass
    ledger = Ledger.create(db_path or ws.campaign.ledger)
    try:
        ledger.lock()
    except LockedError:
        ledger.close()
        raise
    try:
        return asyncio.run(Daemon(config_path, ws, ledger, settings, environ, clock=SystemClock()).main())
    finally:
        ledger.close()

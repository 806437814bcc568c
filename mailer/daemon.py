"""Scheduling: the long-running daemon (APScheduler) and the virtual-clock demo."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from .errors import ConfigError, LockedError, MailerError, TransportFatalError
from .inbox import InboxResult, process_configured
from .ledger import Ledger
from .mailboxes import configured_source
from .runner import PassResult, run_pass
from .transport import TransportSettings
from .workspace import Workspace, load_workspace

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("mailer")

#: How often the daemon looks for edited files and for work made due from outside (mailer retry).
WATCH_SECONDS = 2.0
SWEEP_SECONDS = 60.0
#: How often the organiser's mailbox is read for replies, bounces and unsubscribes.
INBOX_SECONDS = 180.0


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(
            logging.Formatter("%(asctime)s mailer %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
        )
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _snapshot(ws: Workspace) -> dict[Path, int]:
    files = set(ws.files) | set(ws.campaign.contact_paths())
    files |= {p for p in ws.campaign.templates_dir.rglob("*") if p.is_file()}
    out: dict[Path, int] = {}
    for f in files:
        try:
            out[f] = f.stat().st_mtime_ns
        except OSError:
            out[f] = -1
    return out


class Daemon:
    """Wakes at each step's time and each retry time, runs a pass, reloads on edits."""

    def __init__(
        self,
        config_path: Path,
        ws: Workspace,
        ledger: Ledger,
        settings: TransportSettings,
        environ: Mapping[str, str],
    ) -> None:
        self.config_path = config_path
        self.environ = environ
        self.ws = ws
        self.ledger = ledger
        self.settings = settings
        self.stop = asyncio.Event()
        self.scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._files = _snapshot(ws)
        self._lock = asyncio.Lock()
        self.fatal: str | None = None

    def _schedule(self, at: datetime | None) -> None:
        if at is None:
            return
        at = max(at, datetime.now(UTC))
        job = self.scheduler.get_job("wake")
        if job is not None and job.next_run_time is not None and job.next_run_time <= at:
            return
        self.scheduler.add_job(
            self.tick, DateTrigger(run_date=at, timezone=UTC), id="wake", replace_existing=True
        )
        log.info(
            "next wake-up %s",
            at.astimezone(self.ws.campaign.timezone).isoformat(timespec="seconds"),
        )

    async def tick(self) -> None:
        """One pass at the clock's time (the only place the daemon reads the clock)."""
        if self.stop.is_set():
            return
        async with self._lock:
            now = datetime.now(UTC)
            c = self.ws.campaign
            started = self.ledger.steps_started(c.id)
            for s in c.steps:
                if s.at <= now and s.id not in started:
                    log.info(
                        "step due: %s (%s)",
                        s.id,
                        s.at.astimezone(c.timezone).isoformat(timespec="minutes"),
                    )
            try:
                result = await run_pass(
                    self.ws,
                    self.ledger,
                    now,
                    settings=self.settings,
                    log=lambda m: log.info("%s", m),
                    stop=self.stop,
                    unsubscribe_secret=self.environ.get("MAILER_UNSUBSCRIBE_SECRET"),
                )
            except TransportFatalError as exc:
                log.error("stopping: %s", exc)
                self.fatal = str(exc)
                self.stop.set()
                return
            except MailerError as exc:
                log.error("pass failed: %s", exc)
                return
            self._report(result)
            self._schedule(result.next_wake)

    def _report(self, r: PassResult) -> None:
        if r.due or any(r.counts.values()):
            log.info(
                "batch: %d due, %s",
                r.due,
                ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "nothing sent",
            )

    async def watch(self) -> None:
        """Reload when schedules.yaml, a contact file or a template changes. An invalid edit
        is logged with its problems and the running campaign goes on unchanged."""
        # A few stat() calls every WATCH_SECONDS; the campaign (all contact files) is read
        # again only when one of its files changed.
        current = _snapshot(self.ws)
        if current == self._files:
            return
        self._files = current
        try:
            ws = load_workspace(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, schedules.yaml is invalid; still running the previous version:")
            for p in exc.problems:
                log.error("  %s", p)
            return
        self._files = _snapshot(ws)
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
        self.ws = ws
        log.info("reload: %d steps, %d contacts", len(ws.campaign.steps), len(ws.contacts))
        self.scheduler.remove_all_jobs()
        self._add_periodic()
        await self.tick()

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
                next_run_time=datetime.now(UTC),
            )

    async def poll_inbox(self) -> None:
        """Read the organiser's mailbox. imapclient blocks, so the work runs in a thread with
        its own ledger connection; a mailbox problem is logged and never stops sending."""
        path = self.ledger.path
        assert path is not None

        def work() -> InboxResult | None:
            with Ledger(path) as ledger:
                return process_configured(self.ws.campaign, ledger, self.environ, now=datetime.now(UTC))

        try:
            result = await asyncio.to_thread(work)
        except MailerError as exc:
            log.warning("inbox: %s", exc)
            return
        if result and result.handled:
            for line in result.lines:
                log.info("inbox: %s", line)
            log.info("inbox: %s", result.summary())
            self._schedule(datetime.now(UTC))  # answers and suppressions change audiences

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        c = self.ws.campaign
        log.info(
            "start: campaign %s, %d steps, %d contacts, ledger %s, %s",
            c.id,
            len(c.steps),
            len(self.ws.contacts),
            self.ledger.path,
            self.settings.describe(),
        )
        self.scheduler.start()
        self._add_periodic()
        await self.tick()  # catch up on whatever is due
        await self.stop.wait()
        async with self._lock:  # let a running pass record what is in flight
            pass
        self.scheduler.shutdown(wait=False)
        log.info("stop")
        return 1 if self.fatal else 0

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
    settings = TransportSettings.from_config(ws.campaign.smtp, environ)
    ledger = Ledger(db_path or ws.campaign.ledger)
    try:
        ledger.lock()
    except LockedError:
        ledger.close()
        raise
    try:
        return asyncio.run(Daemon(config_path, ws, ledger, settings, environ).main())
    finally:
        ledger.close()

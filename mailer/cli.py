"""The ``mailer`` command line: a thin Click group over the library."""

from __future__ import annotations

import asyncio
import csv
import functools
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .compose import Composer
from .config import Campaign
from .errors import ConfigError, MailerError, Problem
from .ledger import STATUSES, Ledger, parse_iso
from .runner import PassResult, run_pass, virtual_clock
from .transport import TransportSettings
from .workspace import Workspace, load_workspace

__all__ = ["main", "cli"]

F = TypeVar("F", bound=Callable[..., Any])
# Tables stay readable when piped or captured (rich assumes 80 columns off a terminal).
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
for _console in (out, err):
    if not _console.is_terminal:
        _console.width = 160


class Failed(click.ClickException):
    """A MailerError shown without a traceback; exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        for line in self.message.splitlines():
            err.print(f"[red]error:[/red] {escape(line)}", markup=True)


def _problems(problems: list[Problem]) -> None:
    for p in problems:
        colour = "red" if p.severity == "error" else "yellow"
        err.print(f"[{colour}]{p.severity}:[/{colour}] ", end="", markup=True)
        err.print(str(p), markup=False)


def handle_errors(fn: F) -> F:
    """Turn our errors into clean messages and exit 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _problems(exc.problems)
            err.print(
                f"{len(exc.problems)} problem(s); fix them and run `mailer check` again. Nothing was sent.",
                markup=False,
            )
            raise SystemExit(1) from None
        except MailerError as exc:
            raise Failed(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default="schedules.yaml",
        show_default=True,
        envvar="MAILER_CONFIG",
        help="The campaign file (env MAILER_CONFIG).",
    )(fn)


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar="MAILER_DB",
        help="The ledger file (default: ledger: in schedules.yaml; env MAILER_DB).",
    )(fn)


def _parse_now(value: str | None, campaign: Campaign | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise MailerError(
            f"--now {value!r}: not an ISO time; write e.g. 2018-01-04T09:00 or 2018-01-04T08:00Z"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=campaign.timezone if campaign else UTC)
    return dt


def _workspace(config_path: Path, *, for_sending: bool) -> Workspace:
    ws = load_workspace(config_path)
    if ws.problems:
        _problems(ws.problems)
    if for_sending and ws.blocking:
        raise MailerError(
            f"{len(ws.blocking)} problem(s) above stop sending (a contact file or template "
            "cannot be used); fix them, run `mailer check`, then try again. Nothing was sent."
        )
    return ws


def _known_steps(c: Campaign, step_ids: tuple[str, ...]) -> None:
    unknown = [s for s in step_ids if s not in {st.id for st in c.steps}]
    if unknown:
        raise MailerError(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(s.id for s in c.steps)}")


def _ledger_path(db_path: Path | None, config_path: Path) -> Path:
    if db_path is not None:
        return db_path
    try:
        from .config import load

        return load(config_path).ledger
    except ConfigError:
        return Path("mailer.db")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mailer")
def cli() -> None:
    """Event invitation campaigns by email: invitations with calendar invites, reminders,
    and a crash-safe delivery ledger.

    Typical use: `mailer check`, `mailer preview --out preview/`, then `mailer run`.
    """


# --------------------------------------------------------------------------------------
# check / preview
# --------------------------------------------------------------------------------------


def _when(dt: datetime) -> str:
    return f"{dt:%a %Y-%m-%d %H:%M} {dt.tzname()}"


@cli.command()
@config_option
@handle_errors
def check(config_path: Path) -> None:
    """Validate schedules.yaml, the contact lists and the templates (rendering every mail),
    and show the events, the steps with their send times and recipient counts.

    Exits 1 when anything is wrong; every problem is listed at once.
    """
    ws = load_workspace(config_path)
    c = ws.campaign
    problems = list(ws.problems)
    composer = Composer(c, ws.templates, unsubscribe_secret=os.environ.get("MAILER_UNSUBSCRIBE_SECRET"))
    counts: dict[str, int] = {}
    template_broken = {p.where.split(":")[0] for p in ws.errors}
    seen: set[str] = set()
    for step in c.steps:
        audience = ws.audience(step)
        counts[step.id] = len(audience)
        if any(step.template in w for w in template_broken):
            continue
        for contact in audience:
            try:
                composer.compose(step, c.event(step.event), contact, when=step.at)
            except MailerError as exc:
                for line in str(exc).splitlines():
                    if line not in seen:  # one report per distinct template problem
                        seen.add(line)
                        problems.append(Problem(contact.source, f"step {step.id}: {line}"))

    out.print(f"[bold]{c.name}[/bold] ({c.id}), time zone {c.timezone.key}, language {c.language}")
    out.print(f"From {c.sender.name} <{c.sender.address}>, organizer {c.sender.organizer}", markup=False)
    events = Table(title="Events", title_justify="left")
    for col in ("id", "when", "where", "status"):
        events.add_column(col)
    for e in c.events:
        if e.all_day:
            days = f"{e.start:%a %Y-%m-%d}" + (
                f" to {e.last_date:%Y-%m-%d}" if e.last_date != e.start_date else ""
            )
            when = f"{days} (all day)"
        else:
            when = f"{e.start:%a %Y-%m-%d %H:%M}-{e.end:%H:%M} {e.start.tzname()}"
        events.add_row(e.id, when, e.location or "(no location)", e.status)
    out.print(events)
    steps = Table(title="Steps", title_justify="left")
    for col in ("step", "event", "kind", "sends at", "rule", "recipients", "ics"):
        steps.add_column(col)
    for s in c.steps:
        steps.add_row(
            s.id,
            s.event,
            s.kind,
            _when(s.at),
            s.at_text,
            str(counts[s.id]),
            "yes" if s.attach_ics else "no",
        )
    out.print(steps)
    lists: dict[str, int] = {}
    for ct in ws.contacts:
        for name in ct.lists or {"(no list)"}:
            lists[name] = lists.get(name, 0) + 1
    out.print(f"{len(ws.contacts)} contacts: " + ", ".join(f"{k} {v}" for k, v in sorted(lists.items())))
    _pending_changes(c)
    _problems(problems)
    n_err = sum(p.severity == "error" for p in problems)
    n_warn = len(problems) - n_err
    if n_err:
        err.print(f"{n_err} error(s), {n_warn} warning(s).", markup=False)
        raise SystemExit(1)
    out.print(f"OK: {n_warn} warning(s).")


@cli.command()
@config_option
@click.option("--step", "step_ids", multiple=True, help="Only this step (repeatable).")
@click.option("--contact", "emails", multiple=True, help="Only this address (repeatable).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write DIR/<step>/<address>.eml into.",
)
@handle_errors
def preview(config_path: Path, step_ids: tuple[str, ...], emails: tuple[str, ...], out_dir: Path) -> None:
    """Write every mail each recipient will get as .eml files. Sends nothing.

    The Date header and calendar DTSTAMP are the step's send time.
    """
    ws = _workspace(config_path, for_sending=True)
    c = ws.campaign
    _known_steps(c, step_ids)
    wanted = {e.strip().lower() for e in emails}
    composer = Composer(c, ws.templates, unsubscribe_secret=os.environ.get("MAILER_UNSUBSCRIBE_SECRET"))
    written = 0
    for step in c.steps:
        if step_ids and step.id not in step_ids:
            continue
        folder = out_dir / step.id
        folder.mkdir(parents=True, exist_ok=True)
        for contact in ws.audience(step):
            if wanted and contact.email.lower() not in wanted:
                continue
            composed = composer.compose(step, c.event(step.event), contact, when=step.at)
            (folder / f"{_safe_name(contact.email)}.eml").write_bytes(composed.data)
            written += 1
    if wanted and not written:
        raise MailerError(f"no recipient matches --contact {', '.join(sorted(wanted))}")
    out.print(f"Wrote {written} mail(s) under {out_dir}/ (nothing was sent).", markup=False)


def _pending_changes(c: Campaign) -> None:
    """Say what an edit of an event will send on the next pass (read-only look at the ledger)."""
    if not c.ledger.exists():
        return
    import json

    from . import planner

    with Ledger(c.ledger) as ledger:
        recorded = ledger.revisions(c.id)
        for rev in planner.revisions(c, recorded, lambda ev: bool(ledger.ics_recipients(c.id, ev))):
            if rev.kind not in ("update", "cancel"):
                continue
            n = len(ledger.ics_recipients(c.id, rev.event))
            diff = planner.changes(json.loads(recorded[rev.event][2]), json.loads(rev.snapshot))
            what = "; ".join(f"{d['field']}: {d['before']} -> {d['after']}" for d in diff)
            out.print(
                f"Event {rev.event} changed since its invitations went out ({what}): the next "
                f"pass sends {'a cancellation' if rev.kind == 'cancel' else 'an update'} "
                f"(SEQUENCE {rev.sequence}) to {n} recipient(s).",
                markup=False,
            )


def _safe_name(email: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "@._+-" else "_" for ch in email)


# --------------------------------------------------------------------------------------
# send / status / log / export / retry
# --------------------------------------------------------------------------------------


@cli.command()
@config_option
@db_option
@click.option("--now", "now_text", help="Plan as if it were this time (ISO; default: the clock).")
@click.option("--dry-run", is_flag=True, help="Show what is due; send and record nothing.")
@click.option("--limit", type=click.IntRange(min=1), help="Send at most N mails in this pass.")
@click.option("--step", "step_ids", multiple=True, help="Only this step (repeatable).")
@handle_errors
def send(
    config_path: Path,
    db_path: Path | None,
    now_text: str | None,
    dry_run: bool,
    limit: int | None,
    step_ids: tuple[str, ...],
) -> None:
    """Send what is due now, once, and exit (the daemon `mailer run` repeats this).

    SMTP settings come from schedules.yaml and MAILER_SMTP_HOST, MAILER_SMTP_PORT,
    MAILER_SMTP_USER, MAILER_SMTP_PASSWORD, MAILER_SMTP_TLS.
    """
    ws = _workspace(config_path, for_sending=True)
    c = ws.campaign
    _known_steps(c, step_ids)
    now = _parse_now(now_text, c)
    settings = TransportSettings.from_config(c.smtp, os.environ)
    with Ledger(db_path or c.ledger) as ledger:
        if not dry_run:
            ledger.lock()
        result = _send_with_progress(ws, ledger, now, settings, limit, step_ids or None, dry_run)
    _report(result, c, dry_run)


def _send_with_progress(
    ws: Workspace,
    ledger: Ledger,
    now: datetime,
    settings: TransportSettings,
    limit: int | None,
    steps: tuple[str, ...] | None,
    dry_run: bool,
) -> PassResult:
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=dry_run or not err.is_terminal,
    ) as bar:
        task = bar.add_task("send", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return asyncio.run(
            run_pass(
                ws,
                ledger,
                now,
                settings=settings,
                clock=virtual_clock(now),
                limit=limit,
                steps=steps,
                dry_run=dry_run,
                progress=progress,
                log=lambda m: err.print(m, markup=False),
                unsubscribe_secret=os.environ.get("MAILER_UNSUBSCRIBE_SECRET"),
            )
        )


def _report(result: PassResult, c: Campaign, dry_run: bool) -> None:
    local = result.now.astimezone(c.timezone)
    if dry_run and result.plan is not None:
        table = Table(
            title=f"Due at {_when(local)} (dry run: nothing sent or recorded)", title_justify="left"
        )
        for col in ("step", "recipient", "note"):
            table.add_column(col)
        for d in result.plan.due:
            table.add_row(d.step.id, d.contact.email, "re-send (was sending)" if d.resend else "")
        for s in result.plan.skips:
            table.add_row(s.step.id, s.email, f"{s.status}: {s.reason}")
        out.print(table)
    parts = [
        f"{k} {result.counts[k]}"
        for k in ("sent", "deferred", "failed", "skipped", "suppressed", "resent")
        if result.counts[k]
    ]
    out.print(
        f"At {_when(local)}: {result.due} due; " + (", ".join(parts) or "nothing sent") + ".",
        markup=False,
    )
    if result.next_wake:
        out.print(f"Next send time: {_when(result.next_wake.astimezone(c.timezone))}", markup=False)


@cli.command()
@config_option
@db_option
@handle_errors
def status(config_path: Path, db_path: Path | None) -> None:
    """Per campaign and step: sent, deferred, failed, skipped, suppressed, pending, next send time."""
    campaign: Campaign | None
    try:
        from .config import load

        campaign = load(config_path)
    except ConfigError:
        campaign = None
    path = db_path or (campaign.ledger if campaign else Path("mailer.db"))
    if not path.exists():
        raise MailerError(f"{path}: no ledger yet; nothing has been sent (run `mailer send` or `mailer run`)")
    with Ledger(path) as ledger:
        rows = ledger.summary()
        answers = ledger.reply_counts()
    tz = campaign.timezone if campaign else UTC
    cols = ("sent", "deferred", "failed", "bounced", "skipped", "suppressed", "pending")
    per: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        k = (r["campaign"], r["step"])
        d = per.setdefault(k, {c: 0 for c in cols} | {"next": None})
        status_ = "pending" if r["status"] == "sending" else r["status"]
        d[status_] = d.get(status_, 0) + r["n"]
        if r["status"] == "deferred" and r["next_attempt"]:
            d["next"] = min(filter(None, (d["next"], parse_iso(r["next_attempt"]))))
    if campaign:
        now = datetime.now(UTC)
        for s in campaign.steps:
            d = per.setdefault((campaign.id, s.id), {c: 0 for c in cols} | {"next": None})
            if s.at > now:
                d["next"] = s.at
    table = Table(title=f"Ledger {path}", title_justify="left")
    for col in ("campaign", "step", *cols, "next send"):
        table.add_column(col, justify="right" if col in cols else "left")
    order = {s.id: i for i, s in enumerate(campaign.steps)} if campaign else {}
    for (camp, step), d in sorted(per.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 999), kv[0][1])):
        nxt = _when(d["next"].astimezone(tz)) if d["next"] else ""
        table.add_row(camp, step, *(str(d[c]) for c in cols), nxt)
    out.print(table)
    if answers:
        t2 = Table(title="Answers per event (iMIP replies)", title_justify="left")
        for col in ("campaign", "event", "accepted", "tentative", "declined"):
            t2.add_column(col)
        per_ev: dict[tuple[str, str], dict[str, int]] = {}
        for a in answers:
            per_ev.setdefault((a["campaign"], a["event"]), {})[a["partstat"].lower()] = a["n"]
        for (camp, ev), d in sorted(per_ev.items()):
            t2.add_row(camp, ev, *(str(d.get(k, 0)) for k in ("accepted", "tentative", "declined")))
        out.print(t2)


@cli.command()
@config_option
@db_option
@click.option("--status", "status_", type=click.Choice(list(STATUSES)))
@click.option("--email", help="Only this address.")
@click.option("--step", help="Only this step.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N rows.")
@click.option("--attempts", "show_attempts", is_flag=True, help="Also list every SMTP attempt.")
@handle_errors
def log(
    config_path: Path,
    db_path: Path | None,
    status_: str | None,
    email: str | None,
    step: str | None,
    limit: int | None,
    show_attempts: bool,
) -> None:
    """The delivery rows: who got what, when, and what the server said."""
    path = _ledger_path(db_path, config_path)
    if not path.exists():
        raise MailerError(f"{path}: no ledger yet; nothing has been sent")
    with Ledger(path) as ledger:
        table = Table(title_justify="left")
        for col in ("step", "email", "status", "tries", "updated (UTC)", "reply / reason"):
            table.add_column(col, overflow="fold")
        n = 0
        for r in ledger.log(
            status=status_, email=email.strip().lower() if email else None, step=step, limit=limit
        ):
            n += 1
            reply = " ".join(str(x) for x in (r["smtp_code"], r["smtp_text"]) if x is not None)
            why = r["reason"] or ""
            table.add_row(
                r["step"],
                r["email"],
                r["status"],
                str(r["attempts"]),
                r["updated"],
                "; ".join(x for x in (reply, why) if x),
            )
            if show_attempts:
                for a in ledger.attempts(r["id"]):
                    table.add_row(
                        "",
                        "",
                        f"  {a['outcome']}",
                        "",
                        a["at"],
                        f"{a['code'] or ''} {a['text'] or ''}",
                    )
    out.print(table)
    out.print(f"{n} row(s).")


@cli.command()
@config_option
@db_option
@click.option("--status", "status_", default="failed", show_default=True, type=click.Choice(list(STATUSES)))
@click.option("--step", help="Only this step.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV file to write (usable as a contacts: list).",
)
@handle_errors
def export(config_path: Path, db_path: Path | None, status_: str, step: str | None, output: Path) -> None:
    """Write deliveries with a status as a CSV that `contacts:` accepts, to re-send elsewhere."""
    path = _ledger_path(db_path, config_path)
    if not path.exists():
        raise MailerError(f"{path}: no ledger yet; nothing to export")
    n = 0
    with Ledger(path) as ledger, output.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["email", "name", "step", "status", "smtp_code", "smtp_text", "reason", "updated"])
        for r in ledger.log(status=status_, step=step):
            w.writerow(
                [
                    r["email"],
                    r["name"],
                    r["step"],
                    r["status"],
                    r["smtp_code"] or "",
                    r["smtp_text"] or "",
                    r["reason"] or "",
                    r["updated"],
                ]
            )
            n += 1
    out.print(f"Wrote {n} row(s) to {output}.", markup=False)


@cli.command()
@config_option
@db_option
@click.option("--step", help="Only this step.")
@handle_errors
def retry(config_path: Path, db_path: Path | None, step: str | None) -> None:
    """Make failed deliveries due again; the next `mailer send` or daemon pass sends them."""
    path = _ledger_path(db_path, config_path)
    if not path.exists():
        raise MailerError(f"{path}: no ledger yet; nothing to retry")
    with Ledger(path) as ledger:
        n = ledger.retry(None, step, datetime.now(UTC))
    out.print(f"{n} failed deliver{'y' if n == 1 else 'ies'} will be sent again on the next pass.")


@cli.group()
def suppress() -> None:
    """Addresses that are never mailed again (bounces, unsubscribes, by hand)."""


@suppress.command("add")
@config_option
@db_option
@click.argument("emails", nargs=-1)
@click.option("--reason", default="added by hand", show_default=True)
@click.option(
    "--link",
    "links",
    multiple=True,
    help="An unsubscribe link (or its token) from a mail: verified with "
    "MAILER_UNSUBSCRIBE_SECRET, then its address is suppressed.",
)
@handle_errors
def suppress_add(
    config_path: Path,
    db_path: Path | None,
    emails: tuple[str, ...],
    reason: str,
    links: tuple[str, ...],
) -> None:
    """Suppress EMAILS: every later delivery to them is recorded as suppressed, not sent."""
    from . import unsubscribe
    from .contacts import normalise_address

    if not emails and not links:
        raise MailerError("give at least one address or --link")
    secret = os.environ.get("MAILER_UNSUBSCRIBE_SECRET")
    found = list(emails)
    for ln in links:
        if not secret:
            raise MailerError(
                "--link needs MAILER_UNSUBSCRIBE_SECRET (the secret the links were signed with)"
            )
        checked = unsubscribe.verify(secret, ln)
        if checked is None:
            raise MailerError(f"{ln}: not a valid unsubscribe link (forged, damaged or another secret)")
        found.append(checked[1])
        reason = "unsubscribed (one-click link)"
    path = _ledger_path(db_path, config_path)
    with Ledger(path) as ledger:
        for e in found:
            addr = normalise_address(e)
            ledger.suppress(addr, reason, datetime.now(UTC))
            out.print(f"suppressed {addr}", markup=False)


@suppress.command("remove")
@config_option
@db_option
@click.argument("emails", nargs=-1, required=True)
@handle_errors
def suppress_remove(config_path: Path, db_path: Path | None, emails: tuple[str, ...]) -> None:
    """Allow EMAILS again (deliveries already recorded as suppressed stay so)."""
    from .contacts import normalise_address

    with Ledger(_ledger_path(db_path, config_path)) as ledger:
        for e in emails:
            addr = normalise_address(e)
            found = ledger.unsuppress(addr)
            out.print(f"{'removed' if found else 'not suppressed:'} {addr}", markup=False)


@suppress.command("list")
@config_option
@db_option
@handle_errors
def suppress_list(config_path: Path, db_path: Path | None) -> None:
    """List suppressed addresses with the reason and time."""
    path = _ledger_path(db_path, config_path)
    if not path.exists():
        raise MailerError(f"{path}: no ledger yet")
    with Ledger(path) as ledger:
        rows = ledger.suppressions()
    table = Table(title_justify="left")
    for col in ("email", "reason", "since (UTC)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["email"], r["reason"], r["at"])
    out.print(table)
    out.print(f"{len(rows)} suppressed address(es).")


@cli.command()
@config_option
@db_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any but loopback needs a password "
    "(env MAILER_DASHBOARD_PASSWORD_HASH, from `datasette hash-password`).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Port to listen on."
)
@click.option("--allow-sql", is_flag=True, help="Let visitors run their own read-only SQL.")
@handle_errors
def dashboard(config_path: Path, db_path: Path | None, host: str, port: int, allow_sql: bool) -> None:
    """Show the delivery log in the browser, read-only: counts per step, failures with the
    server's reply, who was not reached, answers. Every list downloads as CSV.

    Needs the optional extra: pip install 'mailer[dashboard]'. Times are in the campaign's
    time zone. Stop with Ctrl-C.
    """
    from . import dashboard as board
    from .config import load

    try:
        campaign: Campaign | None = load(config_path)
    except ConfigError:
        campaign = None
    board.serve(
        db_path or (campaign.ledger if campaign else Path("mailer.db")),
        host=host,
        port=port,
        allow_sql=allow_sql,
        timezone=campaign.timezone.key if campaign else "UTC",
        password_hash=os.environ.get(board.PASSWORD_ENV) or None,
        log=lambda line: out.print(line, markup=False),
    )


@cli.command("inbox")
@config_option
@db_option
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Read this local Maildir instead of IMAP.",
)
@handle_errors
def inbox(config_path: Path, db_path: Path | None, maildir: Path | None) -> None:
    """Record replies, bounces and unsubscribes found in the organiser's mailbox.

    Reads IMAP (MAILER_IMAP_HOST, MAILER_IMAP_PORT, MAILER_IMAP_USER, MAILER_IMAP_PASSWORD,
    MAILER_IMAP_TLS=tls|starttls|none, MAILER_IMAP_MAILBOX, MAILER_IMAP_CA_FILE) or a local
    Maildir. Handled messages are flagged so they are read once; other mail is left alone.
    """
    from .inbox import run_inbox

    result = run_inbox(config_path, db_path, maildir, os.environ)
    for line in result.lines:
        out.print(line, markup=False)
    out.print(result.summary(), markup=False)


# --------------------------------------------------------------------------------------
# run / demo
# --------------------------------------------------------------------------------------


@cli.command()
@config_option
@db_option
@handle_errors
def run(config_path: Path, db_path: Path | None) -> None:
    """Run the daemon: send each step at its time, retry deferred mail, reload on edits.

    Stops cleanly on SIGTERM or Ctrl-C. One daemon per ledger.
    """
    from .daemon import run_daemon

    raise SystemExit(run_daemon(config_path, db_path, environ=os.environ))


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the Maildir, the ledger and the log go.",
)
@config_option
@handle_errors
def demo(out_dir: Path, config_path: Path) -> None:
    """Run the whole campaign in seconds on a virtual clock against an embedded SMTP server."""
    from .daemon import run_demo

    raise SystemExit(run_demo(config_path, out_dir, console=out))


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="mailer")
    except KeyboardInterrupt:  # pragma: no cover - interactive
        err.print("interrupted")
        sys.exit(130)

"""The ``mailer`` command line: a thin Click group over the library."""

from __future__ import annotations

import gc
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .clikit import (
    config_option,
    db_option,
    err,
    handle_errors,
    out,
    print_problems,
    progress_bar,
    table,
    when,
)
from .errors import MailerError, Problem, display_path
from .records import dashboard, export, inbox, log, retry, status, suppress
from .tokens import secret_from

if TYPE_CHECKING:
    # Each command imports what it needs when it runs: `mailer status` or `mailer log` on a
    # big ledger should not pay for pydantic, asyncio, Jinja2 or the SMTP client up front.
    from .config import Campaign
    from .dkim import Signer
    from .ledger import Ledger
    from .runner import PassResult
    from .transport import TransportSettings
    from .workspace import Workspace

__all__ = ["main", "cli"]


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
    from .workspace import load_workspace

    ws = load_workspace(config_path)
    if ws.problems:
        print_problems(ws.problems)
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


@cli.command()
@config_option
@click.option("--strict", is_flag=True, help="Treat warnings as errors (exit 1 when there are any).")
@click.option("--dns", is_flag=True, help="Also look up the DKIM key's DNS record (needs the network).")
@handle_errors
def check(config_path: Path, strict: bool, dns: bool) -> None:
    """Validate schedules.yaml, the contact lists and the templates (rendering every mail),
    warn about mistakes that would send the wrong thing, and show the events, the steps with
    their send times and recipient counts.

    Every problem of every stage is listed at once. Exits 1 with errors (or, with --strict,
    warnings), 0 with warnings only. With --dns, the published DKIM key is compared with
    the configured one.
    """
    from .dkim import check_dkim
    from .gate import check_workspace
    from .planner import send_times
    from .review import review
    from .workspace import survey

    ws, problems = survey(config_path)
    if ws is None:  # schedules.yaml has errors: every other stage's problems are in the list too
        _verdict(problems, strict)
        return
    c = ws.campaign
    if c.web is not None and not secret_from(os.environ):
        problems.append(
            Problem(
                display_path(c.config_path),
                "web.url is set but MAILER_WEB_SECRET is not: the answer, calendar and unsubscribe "
                "links cannot be signed, so mails would carry none and `mailer web` would not "
                "start; set it (a long random string) where check, send, run and web run",
                field="web.url",
            )
        )
    # DKIM (issue 15): a key that cannot sign is an error (send refuses it too). dkim_lines
    # (ok or not) are for the deliverability section; --dns also compares the DNS record.
    dkim_lines = check_dkim(c, os.environ, dns=dns)
    problems += [Problem(display_path(c.config_path), d.text, field="dkim") for d in dkim_lines if not d.ok]
    counts = {step.id: len(ws.audience(step)) for step in c.steps}
    # Every mail of every step, and every update and cancellation (mailer.gate). Rendering a
    # large campaign takes a while: show how far it is (on a terminal).
    with progress_bar("rendering every mail", disable=sum(counts.values()) < 2000) as bar:
        task = bar.add_task("render", total=None)
        problems += check_workspace(
            ws,
            unsubscribe_secret=secret_from(os.environ),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )

    out.print(f"[bold]{c.name}[/bold] ({c.id}), time zone {c.timezone.key}, language {c.language}")
    out.print(f"From {c.sender.name} <{c.sender.address}>, organizer {c.sender.organizer}", markup=False)
    events = table("Events", ("id", "when", "where", "status"))
    for e in c.events:
        if e.all_day:
            days = f"{e.start:%a %Y-%m-%d}" + (
                f" to {e.last_date:%Y-%m-%d}" if e.last_date != e.start_date else ""
            )
            span = f"{days} (all day)"
        else:
            span = f"{e.start:%a %Y-%m-%d %H:%M}-{e.end:%H:%M} {e.start.tzname()}"
        events.add_row(e.id, span, e.location or "(no location)", e.status)
    out.print(events)
    steps = table("Steps", ("step", "event", "kind", "sends at", "rule", "recipients", "ics"))
    for s in c.steps:
        # A local step (at: ... local) goes at its hour in each recipient's zone: one line per
        # zone with its count, earliest first (issue 13).
        times = send_times(c, s, ws.audience(s)) if s.local else []
        for i, t in enumerate(times or [None]):
            steps.add_row(
                s.id if i == 0 else "",
                s.event if i == 0 else "",
                s.kind if i == 0 else "",
                when(s.at) if t is None else f"{when(t.at)} {t.zone.key}",
                s.at_text if i == 0 else "",
                str(counts[s.id] if t is None else t.count),
                ("yes" if s.attach_ics else "no") if i == 0 else "",
            )
            if t is not None and t.problem:
                problems.append(
                    Problem(
                        display_path(c.config_path),
                        f"{t.problem.removesuffix('; pick another time')} for {t.count} contact(s) "
                        f"of this local step; pick another time",
                        field="at",
                        step=s.id,
                    )
                )
    out.print(steps)
    # Issue 17: with a quota, a send window or rate:, when each step's last mail is expected to
    # go, and a warning for a step that cannot finish before its event (mailer.forecast).
    from .forecast import check_section

    problems += check_section(ws, datetime.now(UTC))
    lists: dict[str, int] = {}
    for ct in ws.contacts:
        for name in ct.lists or {"(no list)"}:
            lists[name] = lists.get(name, 0) + 1
    out.print(f"{len(ws.contacts)} contacts: " + ", ".join(f"{k} {v}" for k, v in sorted(lists.items())))
    # The bulk-sender rules (issue 15; README "Deliverability"): warnings are advice and leave
    # the exit code alone (even with --strict); an error fails check. DKIM errors are listed above.
    from .deliverability import gather, rules

    out.print("Deliverability (Gmail, Yahoo and Microsoft bulk-sender rules):")
    for rule in rules(c, gather(ws, os.environ, dkim=dkim_lines)):
        out.print(f"  {rule.level:<5} {rule.name}: {rule.text}", markup=False)
        if rule.level == "error" and rule.name != "DKIM":
            problems.append(Problem(display_path(c.config_path), f"{rule.name}: {rule.text}"))
    _pending_changes(c)
    _verdict([*problems, *review(ws)], strict)


def _verdict(problems: list[Problem], strict: bool) -> None:
    """Print every problem, then the count; exit 1 with errors (with ``strict``, warnings)."""
    print_problems(problems)
    n_err = sum(p.severity == "error" for p in problems)
    n_warn = len(problems) - n_err
    if n_err:
        err.print(f"{n_err} error(s), {n_warn} warning(s).", markup=False)
        raise SystemExit(1)
    if strict and n_warn:
        err.print(f"{n_warn} warning(s) (--strict: warnings are errors).", markup=False)
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
    from .compose import Composer
    from .dkim import load_signer
    from .errors import ConfigError

    wanted = {e.strip().lower() for e in emails}
    unsigned: str | None = None  # with dkim:, the previews carry the signatures a send would (t= their Date)
    try:
        signer = load_signer(c, os.environ)
    except ConfigError as exc:  # still preview the mails; say once why they are unsigned
        signer, unsigned = None, "; ".join(str(p) for p in exc.problems)
    composer = Composer(c, ws.templates, unsubscribe_secret=secret_from(os.environ), signer=signer)
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
    if unsigned:
        err.print("[yellow]warning:[/yellow] ", end="", markup=True)
        err.print(
            f"these previews are NOT DKIM-signed: {unsigned} (`mailer send` would stop on this)",
            markup=False,
        )


def _pending_changes(c: Campaign) -> None:
    """Say what an edit of an event will send on the next pass (read-only look at the ledger)."""
    if not c.ledger.exists():
        return
    import json

    from . import planner
    from .ledger import Ledger
    from .templates import describe_changes

    with Ledger.read(c.ledger) as ledger:
        recorded = ledger.latest_revisions(c.id)
        for rev in planner.revisions(c, recorded, lambda ev: bool(ledger.calendar_holders(c.id, ev))):
            if not rev.kind.sends:
                continue
            n = len(ledger.calendar_holders(c.id, rev.event))
            diff = planner.changes(json.loads(recorded[rev.event].snapshot), json.loads(rev.snapshot))
            # In words, as the update's reader in the campaign language gets them (a text given
            # per language, a span, a status: never a raw dict or datetime).
            ctx = {"event": {}, "campaign": {"timezone": c.timezone.key}, "contact": {}}
            words = describe_changes(diff, ctx, language=c.language, reader=c.language, default=c.language)
            what = "; ".join(
                str(d.get("text") or f"{d['field']}: {d['before']} -> {d['after']}") for d in words
            )
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
@click.option("--force", is_flag=True, help="Allow a --now more than a day ahead of the clock.")
@handle_errors
def send(
    config_path: Path,
    db_path: Path | None,
    now_text: str | None,
    dry_run: bool,
    limit: int | None,
    step_ids: tuple[str, ...],
    force: bool,
) -> None:
    """Send what is due now, once, and exit (the daemon `mailer run` repeats this).

    SMTP settings come from schedules.yaml and MAILER_SMTP_HOST, MAILER_SMTP_PORT,
    MAILER_SMTP_USER, MAILER_SMTP_PASSWORD, MAILER_SMTP_TLS.
    """
    ws = _workspace(config_path, for_sending=True)
    c = ws.campaign
    _known_steps(c, step_ids)
    now = _parse_now(now_text, c)
    if not dry_run and not force:
        _not_far_ahead(now, datetime.now(UTC))
    from .ledger import Ledger
    from .transport import TransportSettings

    settings = TransportSettings.from_config(c.smtp, os.environ)
    from .dkim import load_signer

    signer = load_signer(c, os.environ)  # before the ledger: a key that cannot sign stops here
    path = db_path or c.ledger
    if dry_run:
        # A dry run writes nothing: it reads the ledger read-only, or plans against an empty one
        # when none exists yet (nothing is recorded, so that is what the real pass would see).
        ledger = Ledger.read(path) if path.exists() else Ledger(":memory:")
    else:
        ledger = Ledger.create(path)  # send and run alone start a ledger
    with ledger:
        if not dry_run:
            ledger.lock()
        result = _send_with_progress(ws, ledger, now, settings, limit, step_ids or None, dry_run, signer)
    _report(result, c, dry_run)


#: How far ahead of the clock `send --now` goes without --force.
AHEAD_LIMIT = timedelta(days=1)


def _not_far_ahead(now: datetime, clock: datetime) -> None:
    """Refuse a pass in the future: it would record every step whose event has "started" by
    then as skipped, and the real time would never send them (issue 11 item 12).

    >>> _not_far_ahead(datetime(2030, 1, 1, tzinfo=UTC), datetime(2029, 12, 31, 1, tzinfo=UTC))
    >>> _not_far_ahead(datetime(2030, 1, 3, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC))
    Traceback (most recent call last):
    mailer.errors.MailerError: --now 2030-01-03 00:00 UTC is 2 day(s) ahead of the clock (...); ...
    """
    if now - clock <= AHEAD_LIMIT:
        return
    days = (now - clock) // timedelta(days=1)
    raise MailerError(
        f"--now {now:%Y-%m-%d %H:%M %Z} is {days} day(s) ahead of the clock ({clock:%Y-%m-%d %H:%M %Z}); "
        "such a pass records every step whose event has started by then as skipped, and the "
        "real time will not send them. Add --force if that is what you want (`mailer retry "
        "--status skipped` undoes it). Nothing was sent."
    )


def _send_with_progress(
    ws: Workspace,
    ledger: Ledger,
    now: datetime,
    settings: TransportSettings,
    limit: int | None,
    steps: tuple[str, ...] | None,
    dry_run: bool,
    signer: Signer | None = None,
) -> PassResult:
    import asyncio
    import signal

    from .clock import virtual_clock
    from .runner import run_pass

    with progress_bar("sending", disable=dry_run) as bar:
        task = bar.add_task("send", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        async def main() -> PassResult:
            # The first Ctrl-C (or SIGTERM) stops the pass in order: each connection finishes
            # and records its mail, queued ones go back to pending. A second one interrupts.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()

            def on_signal() -> None:
                if stop.is_set():
                    raise KeyboardInterrupt
                err.print("stopping: finishing the mails in flight (Ctrl-C again to interrupt)")
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
            try:
                return await run_pass(
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
                    stop=stop,
                    unsubscribe_secret=secret_from(os.environ),
                    signer=signer,
                )
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        return asyncio.run(main())


def _report(result: PassResult, c: Campaign, dry_run: bool) -> None:
    local = result.now.astimezone(c.timezone)
    if dry_run and result.plan is not None:
        title = f"Due at {when(local)} (dry run: nothing sent or recorded)"
        due = table(title, ("step", "recipient", "note"))
        for d in result.plan.due:
            due.add_row(d.step.id, d.contact.email, "re-send (was sending)" if d.resend else "")
        for s in result.plan.skips:
            due.add_row(s.step.id, s.email, f"{s.status}: {s.reason}")
        out.print(due)
    parts = [
        f"{k} {result.counts[k]}"
        for k in (
            "sent",
            "deferred",
            "failed",
            "unknown",
            "skipped",
            "suppressed",
            "invalid",
            "resent",
            "held",
        )
        if result.counts[k]
    ]
    out.print(
        f"At {when(local)}: {result.due} due; " + (", ".join(parts) or "nothing sent") + ".",
        markup=False,
    )
    if result.next_wake:
        out.print(f"Next send time: {when(result.next_wake.astimezone(c.timezone))}", markup=False)
    if result.problems:  # the render gate held steps back (issue 12: nothing half-sent)
        print_problems(result.problems)
        steps = sorted({p.step for p in result.problems if p.step})
        err.print(
            f"Held {result.counts['held']} mail(s) of step(s) {', '.join(steps)}: a template above does "
            "not render, so nothing of those steps was sent or recorded. Fix it, run `mailer check`, "
            "then send again.",
            markup=False,
        )
        raise SystemExit(1)
    if result.paused_until is not None and result.paused_until > result.now and result.due:
        # Issue 17: a server's quota pause (this pass's reply, or one the ledger kept from an
        # earlier pass): nothing goes before it ends; exit 1 when it stopped the pass.
        until = when(result.paused_until.astimezone(c.timezone))
        err.print(
            f"paused by the server's quota until {until}: {result.quota_reply}; the rest goes out then",
            markup=False,
        )
        if (result.stopped or not result.counts["sent"]) and not dry_run:
            raise SystemExit(1)
    if result.stopped:
        err.print("Stopped before everything due was sent; the rest goes out on the next pass.", markup=False)
        raise SystemExit(1)
    if result.unreachable and not result.counts["sent"]:
        # Nothing could go out: exit 1, so a cron job or a script sees it (issue 12).
        wake = result.next_wake.astimezone(c.timezone) if result.next_wake else None
        later = f" to {wake:%a %Y-%m-%d %H:%M:%S %Z}" if wake else ""
        n = result.counts["deferred"]
        err.print(f"{result.unreachable}; {n} mail(s) deferred{later}", markup=False)
        raise SystemExit(1)


for _command in (status, log, export, retry, suppress, inbox, dashboard):
    cli.add_command(_command)


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
@config_option
@db_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Listen on this address (the proxy's side)."
)
@click.option(
    "--port", default=8025, show_default=True, type=click.IntRange(1, 65535), help="Listen on this port."
)
@handle_errors
def web(config_path: Path, db_path: Path | None, host: str, port: int) -> None:
    """Serve the links in the mails: RSVP buttons, one-click unsubscribe, calendar files.

    Runs behind an HTTPS reverse proxy at the campaign's web.url; needs MAILER_WEB_SECRET (the
    one `mailer run` signs the links with). Writes answers and unsubscribes to the ledger the
    daemon sends from. Stops cleanly on SIGTERM or Ctrl-C.
    """
    from .web import serve

    serve(
        config_path,
        db_path,
        host=host,
        port=port,
        environ=os.environ,
        log_line=lambda s: out.print(s, markup=False),
    )


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the Maildir, the ledger and the log go.",
)
@click.option(
    "--serve",
    is_flag=True,
    help="Keep the demo's mailer web running after the demo, until Ctrl-C, for its links.",
)
@config_option
@handle_errors
def demo(out_dir: Path, serve: bool, config_path: Path) -> None:
    """Run the whole campaign in seconds on a virtual clock against an embedded SMTP server;
    mailer web answers the mails' links meanwhile (and after it, with --serve)."""
    from .demo import run_demo

    raise SystemExit(run_demo(config_path, out_dir, console=out, serve=serve))


@cli.group()
def dkim() -> None:
    """DKIM signing keys (the dkim: key of schedules.yaml; README "DKIM")."""


@dkim.command()
@click.option(
    "--selector", required=True, help="The key's name in DNS (S._domainkey.DOMAIN), e.g. mailer2026."
)
@click.option("--domain", help="The signing domain (d=); default: the From domain of --config.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (mode 0600); default: dkim-SELECTOR.key.",
)
@click.option("--ed25519", is_flag=True, help="An ed25519 key (a second signature) instead of RSA 2048.")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
@config_option
@handle_errors
def keygen(
    selector: str, domain: str | None, out_path: Path | None, ed25519: bool, force: bool, config_path: Path
) -> None:
    """Make a signing key: writes the private key and prints the DNS TXT record to publish."""
    from . import dkim as dk
    from .config import load

    if domain is None:
        if not config_path.exists():
            raise MailerError(f"give --domain (no {display_path(config_path)} to take the From domain from)")
        domain = load(config_path).sender.domain
    path = out_path or Path(f"dkim-{selector}.key")
    key = dk.keygen(selector, domain, path, ed25519=ed25519, force=force)
    kind = "ed25519" if ed25519 else f"RSA {key.bits}-bit"
    out.print(
        f"Wrote the {kind} private key to {display_path(path)} (mode 0600; keep it secret).", markup=False
    )
    out.print("Publish this DNS TXT record:", markup=False)
    out.print(
        f"{dk.txt_name(selector, domain)} IN TXT {dk.txt_strings(dk.txt_record(key))}",
        markup=False,
        soft_wrap=True,
    )
    keys = ("ed25519_selector", "ed25519_key_file") if ed25519 else ("selector", "key_file")
    out.print(
        "Then in schedules.yaml (the key path is relative to it; or set MAILER_DKIM_"
        f"{'ED25519_' if ed25519 else ''}KEY_FILE):",
        markup=False,
    )
    out.print(f"dkim:\n  {keys[0]}: {selector}\n  {keys[1]}: {path}", markup=False)
    out.print("and check the record with `mailer check --dns` once it is published.", markup=False)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="mailer")
    except KeyboardInterrupt:  # pragma: no cover - interactive
        err.print("interrupted")
        sys.exit(130)
    finally:
        # The process is ending: spare the interpreter's last full garbage collection of
        # every object the imports made (~0.05-0.1 s with pydantic loaded; `mailer status`
        # should answer in well under half a second). atexit handlers and flushing still run.
        gc.freeze()

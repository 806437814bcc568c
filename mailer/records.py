"""Commands for the delivery records: status, log, export, retry, suppress, inbox, dashboard."""

from __future__ import annotations

import csv
import errno
import itertools
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import staff_inbox
from .clikit import (
    config_option,
    db_option,
    err,
    handle_errors,
    ledger_path,
    out,
    table,
    when,
)
from .csvcells import protect_row
from .errors import ConfigError, MailerError
from .ledger import Ledger
from .times import parse_iso
from .vocab import Status

if TYPE_CHECKING:  # loaded by the commands that need it (pydantic alone takes ~0.1 s to import)
    from .config import Campaign
    from .contacts import Contact
    from .statusview import CampaignTimes

__all__ = ["dashboard", "export", "inbox", "log", "retry", "status", "suppress"]

#: Up to this many rows `mailer log` draws a table on a terminal; beyond, tab-separated lines.
TABLE_ROWS = 500


@click.command()
@config_option
@db_option
@handle_errors
def status(config_path: Path, db_path: Path | None) -> None:
    """Per campaign and step: sent, deferred, failed, bounced, skipped, suppressed, invalid,
    pending, next send time."""
    path, view, campaign = _status_view(config_path, db_path)
    with Ledger.read(path) as ledger:
        rows = ledger.summary()
        answers = ledger.reply_counts()
        unmatched = ledger.unmatched_count()
        recent = ledger.unmatched_replies(limit=UNMATCHED_SHOWN) if unmatched else []
        inbox_line = staff_inbox.status_line(*staff_inbox.counts(ledger.conn))
        pause = ledger.server_pause()
    tz = view.timezone if view else UTC
    if pause is not None and pause[0] <= datetime.now(UTC):
        pause = None  # it has ended (the next pass removes it)
    cols = (
        Status.SENT,
        Status.DEFERRED,
        Status.FAILED,
        Status.BOUNCED,
        Status.SKIPPED,
        Status.SUPPRESSED,
        Status.INVALID,
        Status.PENDING,
    )
    per: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        k = (r["campaign"], r["step"])
        d = per.setdefault(k, {c: 0 for c in cols} | {"next": None})
        status_ = Status.PENDING if r["status"] == Status.SENDING else Status(r["status"])
        d[status_] = d.get(status_, 0) + r["n"]
        if r["status"] == Status.DEFERRED and r["next_attempt"]:
            d["next"] = min(filter(None, (d["next"], parse_iso(r["next_attempt"]))))
    if view:
        now = datetime.now(UTC)
        local = _local_send_times(campaign, now) if campaign else {}
        for s in view.steps:
            d = per.setdefault((view.id, s.id), {c: 0 for c in cols} | {"next": None})
            if s.id in local:  # at: ... local: the earliest recipient's time not yet reached
                d["next"] = local[s.id]
            elif s.at > now:
                d["next"] = s.at
    from rich.table import Table

    grid = Table(title=f"Ledger {path}", title_justify="left")
    for col in ("campaign", "step", *cols, "next send"):
        grid.add_column(col, justify="right" if col in cols else "left")
    order = {s.id: i for i, s in enumerate(view.steps)} if view else {}
    for (camp, step), d in sorted(per.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 999), kv[0][1])):
        nxt = when(d["next"].astimezone(tz)) if d["next"] else ""
        grid.add_row(camp, step, *(str(d[c]) for c in cols), nxt)
    out.print(grid)
    if pause is not None:  # issue 17: a server's quota reply, kept by the pass that got it
        out.print(
            f"paused by the server's quota until {when(pause[0].astimezone(tz))}: {pause[1]}", markup=False
        )
    if view:  # issue 17: what the send window or a quota holds back, and until when
        _print_waiting(config_path, path, view.id, campaign, per, pause[0] if pause else None)
    if answers:
        t2 = table(
            "Answers per event (iMIP replies)", ("campaign", "event", "accepted", "tentative", "declined")
        )
        per_ev: dict[tuple[str, str], dict[str, int]] = {}
        for a in answers:
            per_ev.setdefault((a["campaign"], a["event"]), {})[a["partstat"].lower()] = a["n"]
        for (camp, ev), d in sorted(per_ev.items()):
            t2.add_row(camp, ev, *(str(d.get(k, 0)) for k in ("accepted", "tentative", "declined")))
        out.print(t2)
    if unmatched:
        _print_unmatched(unmatched, recent, tz)
    if inbox_line:  # unmatched and skipped mails (issue 15): the dashboard's Inbox page lists them
        out.print(inbox_line, markup=False)


def _status_view(
    config_path: Path, db_path: Path | None
) -> tuple[Path, CampaignTimes | None, Campaign | None]:
    """The ledger (as :func:`ledger_path`) and what status shows of the campaign: its id, time
    zone and step times, as remembered from the last run while schedules.yaml is unchanged (no
    YAML to parse, no pydantic to import: issue 16), else from :func:`_campaign_if_valid` (then
    remembered). The whole campaign too when it was loaded (a ``local`` step needs it: the
    contacts' time zones); no view without a valid campaign.

    :raises ConfigError: as :func:`ledger_path`.
    """
    from . import statusview

    try:
        data: bytes | None = config_path.read_bytes()
    except OSError:
        data = None  # missing (fine with --db) or unreadable: ledger_path() says what is wrong
    if data is not None:
        view = statusview.lookup(config_path, data)
        if view is not None and not any(s.local for s in view.steps):
            return db_path or view.ledger, view, None
    path = ledger_path(db_path, config_path)
    if data is None:  # only with --db: the ledger alone
        return path, None, None
    campaign = _campaign_if_valid(config_path)
    if campaign is None:
        return path, None, None
    view = statusview.CampaignTimes.of(campaign)
    try:
        same = config_path.read_bytes() == data  # not edited meanwhile
    except OSError:
        same = False
    if same:
        statusview.remember(config_path, data, view)
    return path, view, campaign


def _local_send_times(campaign: Campaign, now: datetime) -> dict[str, datetime | None]:
    """For each ``local`` step, the earliest send time of its recipients still ahead of ``now``
    (None when every zone's has come); reads the contact files only when there is one."""
    steps = [s for s in campaign.steps if s.local]
    if not steps:
        return {}
    from .contacts import load_contacts
    from .planner import send_times

    contacts = load_contacts(campaign.contact_paths()).contacts
    out: dict[str, datetime | None] = {}
    for s in steps:
        audience = [c for c in contacts if s.audience.matches(c.lists, c.tags)]
        ahead = [t.at for t in send_times(campaign, s, audience) if t.at > now]
        out[s.id] = min(ahead, default=None)
    return out


#: Without one of these words in schedules.yaml nothing waits for a window or a quota, and
#: `mailer status` needs neither the campaign's model nor mailer.pacing (issue 16: fast start).
_PACING_WORDS = (b"per_day", b"per_hour", b"window")


def _print_waiting(
    config_path: Path,
    path: Path,
    cid: str,
    campaign: Campaign | None,
    per: dict[tuple[str, str], dict[str, Any]],
    paused_until: datetime | None = None,
) -> None:
    """Per step, how many of its pending mails wait for the send window, the quota or the
    server's quota pause, and until when (:func:`mailer.forecast.waiting` over the ledger's
    counts and the last day's attempts; the window in each recipient's zone when the contact
    files have a ``timezone`` column, see :func:`_pending_zones`)."""
    pending = {s: d[Status.PENDING] for (camp, s), d in per.items() if camp == cid and d[Status.PENDING]}
    if not pending:
        return
    if campaign is None:
        try:
            data = config_path.read_bytes()
        except OSError:
            return
        if paused_until is None and not any(w in data for w in _PACING_WORDS):
            return
        campaign = _campaign_if_valid(config_path)
        if campaign is None:
            return
    from datetime import timedelta

    from . import pacing

    if not pacing.quotas(campaign.smtp) and campaign.delivery.window is None and paused_until is None:
        return
    from .forecast import waiting

    now = datetime.now(UTC)
    day = now - timedelta(days=1)
    with Ledger.read(path) as ledger:
        times = pacing.counted_since(ledger.attempt_times(day), day)
        zones = _pending_zones(ledger, campaign) if campaign.delivery.window is not None else None
    waits = waiting(campaign, pending, times, now, paused_until=paused_until, zones=zones)
    if not waits:
        return
    names = ", ".join(str(q) for q in pacing.quotas(campaign.smtp))
    what = {
        pacing.Wait.WINDOW: f"the send window ({pacing.campaign_window(campaign)})",
        pacing.Wait.QUOTA: f"the quota ({names})",
        pacing.Wait.SERVER: "the server's quota pause",
    }
    t = table("Waiting (send window, quota)", ("step", "mails", "waiting for", "until"))
    for s in campaign.steps:
        for why, n, until in waits.get(s.id, []):
            t.add_row(s.id, str(n), what[why], when(until.astimezone(campaign.timezone)))
    out.print(t)


#: A contact file's header line that may name a ``timezone`` column (the aliases of
#: mailer.contacts' ``_ROLES``, loosely: a false match only costs reading the contacts).
_TZ_HEADER = re.compile(r"time\s*zone|\btz\b|tijdzone|fuseau\s*horaire")


def _has_timezone_column(paths: list[Path]) -> bool:
    """Whether a contact file's header (its first non-blank line) may have a ``timezone`` column."""
    for p in paths:
        try:
            with p.open("rb") as f:
                head = f.read(8192)
        except OSError:
            continue
        first = next((ln for ln in head.decode("utf-8", "replace").splitlines() if ln.strip()), "")
        if _TZ_HEADER.search(first.lower()):
            return True
    return False


def _pending_zones(ledger: Ledger, campaign: Campaign) -> dict[str, dict[str, int]] | None:
    """Per step, how many pending mails are for recipients of each zone other than the
    campaign's (their ``timezone`` column, :func:`mailer.pacing.zone_of`): a send window is
    read in each recipient's zone (issue 17). None, without reading the contacts, when no
    contact file has a ``timezone`` column."""
    paths = campaign.contact_paths()
    if not _has_timezone_column(paths):
        return None
    from . import pacing
    from .contacts import load_contacts

    zone = {
        c.email: key
        for c in load_contacts(paths).contacts
        if c.timezone and (key := pacing.zone_of(campaign, c).key) != campaign.timezone.key
    }
    if not zone:
        return None
    out: dict[str, dict[str, int]] = {}
    for st in (Status.PENDING, Status.SENDING):  # status counts both as pending
        for r in ledger.log(campaign=campaign.id, status=st, columns=("step", "email")):
            their = zone.get(r["email"])
            if their is not None:
                per = out.setdefault(r["step"], {})
                per[their] = per.get(their, 0) + 1
    return out


#: `mailer status` lists this many of the newest unmatched replies; the dashboard has them all.
UNMATCHED_SHOWN = 10


def _print_unmatched(n: int, recent: list[dict[str, Any]], tz: Any) -> None:
    """The replies no invitee matched (an alias, a forward): counted for nobody, shown to staff."""
    t3 = table(
        f"{n} {'reply' if n == 1 else 'replies'} could not be matched to an invitee (counted for "
        'nobody); see the dashboard\'s "Replies we could not match"'
        + (f", newest {len(recent)} here" if n > len(recent) else ""),
        ("event", "attendee", "from", "answer", "received", "why"),
    )
    for r in recent:
        t3.add_row(
            r["event"],
            r["attendee"],
            r["sender"] or "",
            r["partstat"].lower(),
            when(parse_iso(r["at"]).astimezone(tz)),
            r["why"],
        )
    out.print(t3)


def _campaign_if_valid(config_path: Path) -> Campaign | None:
    """The campaign, for its steps and time zone, when schedules.yaml is valid; else None (the
    ledger alone), with its problems shown as a warning. Only for readers whose ledger was
    found by --db or the file's own ``ledger:`` (:func:`ledger_path`), never to guess one."""
    if not config_path.exists():  # only with --db: the ledger alone (and no pydantic to import)
        return None
    from .config import load

    try:
        return load(config_path)
    except ConfigError as exc:
        err.print(
            f"warning: {config_path} has {len(exc.problems)} problem(s) (run `mailer check`); "
            "showing the ledger without the campaign's steps and time zone:",
            markup=False,
        )
        for p in exc.problems:
            err.print(f"  {p}", markup=False)
        return None


@click.command()
@config_option
@db_option
@click.option("--status", "status_", type=click.Choice([s.value for s in Status]))
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
    path = ledger_path(db_path, config_path)
    if email:
        from .contacts import normalise_address

        try:
            email = normalise_address(email)
        except MailerError:
            email = email.strip()
    cols = ("step", "email", "status", "tries", "updated (UTC)", "reply / reason")
    with Ledger.read(path) as ledger:
        rows = ledger.log_tuples(_LOG_COLUMNS, status=status_, email=email, step=step, limit=limit)
        lines = _log_lines(ledger, rows, show_attempts)
        first = list(itertools.islice(lines, TABLE_ROWS + 1))
        # sys.stdout, not out.is_terminal: piped, `mailer log` never loads rich (issue 16)
        if sys.stdout.isatty() and len(first) <= TABLE_ROWS:
            grid = table(None, ())
            for col in cols:
                grid.add_column(col, overflow="fold")
            for ln in first:
                grid.add_row(*ln)
            out.print(grid)
            out.print(f"{sum(1 for ln in first if ln[0])} row(s).")
            return
        # Many rows, or piped: tab-separated lines as they come from the ledger (memory stays
        # flat), fast and easy to grep or load elsewhere (rich's table costs ~1.5 ms a row).
        write = sys.stdout.write
        write("\t".join(cols) + "\n")
        tabs = len(cols) - 1
        for ln in itertools.chain(first, lines):
            line = "\t".join(ln)
            if line.count("\t") != tabs or "\n" in line or "\r" in line:  # rare: mend the fields
                line = "\t".join(" ".join(x.split("\t")).replace("\r", " ").replace("\n", " ") for x in ln)
            write(line + "\n")


_LOG_COLUMNS = ("id", "step", "email", "status", "attempts", "updated", "smtp_code", "smtp_text", "reason")


def _log_lines(
    ledger: Ledger, rows: Iterator[tuple[Any, ...]], show_attempts: bool
) -> Iterator[tuple[str, ...]]:
    """`mailer log`'s lines: one per delivery (a row of :data:`_LOG_COLUMNS`), then (with
    --attempts) one per SMTP attempt."""
    for id_, step, email, status_, attempts, updated, code, text, reason in rows:
        reply = text or "" if code is None else f"{code} {text}" if text else str(code)
        why = f"{reply}; {reason}" if reply and reason else reply or reason or ""
        yield step, email, status_, str(attempts), updated, why
        if show_attempts:
            for a in ledger.attempts(id_):
                text = f"{a['code'] or ''} {a['text'] or ''}".strip()
                yield "", "", f"  {a['outcome']}", "", a["at"], text


@click.command()
@config_option
@db_option
@click.option(
    "--status", "status_", default="failed", show_default=True, type=click.Choice([s.value for s in Status])
)
@click.option("--step", help="Only this step.")
@click.option(
    "-o",
    "--output",
    # Not click.Path(dir_okay=False): a folder would get click's usage screen and exit 2;
    # _check_output says what is wrong with any path in one line (exit 1).
    type=click.Path(path_type=Path),
    required=True,
    help="CSV file to write (usable as a contacts: list).",
)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists (never the ledger).")
@handle_errors
def export(
    config_path: Path, db_path: Path | None, status_: str, step: str | None, output: Path, force: bool
) -> None:
    """Write deliveries with a status as a CSV that `contacts:` accepts, to re-send elsewhere.

    Each row has the delivery columns, then every column of the contact (language, lists, tags
    and the extra columns) from the campaign's contact files, so a re-send keeps each person's
    language and lists. Cells a spreadsheet would run as a formula start with a ' (which
    `contacts:` removes again).
    """
    path = ledger_path(db_path, config_path)
    _check_output(output, path, force)
    contacts, extras, why = _export_contacts(config_path)
    contact_columns = ("language", "lists", "tags", *extras) if why is None else ()
    # A contact column named like a delivery column (a CSV with its own "status") keeps its
    # name, so that `contacts:` reads the contact's value back; the delivery's gets a prefix.
    header = [f"delivery_{c}" if c in extras else c for c in _EXPORT_COLUMNS] + list(contact_columns)
    n = lacking = 0
    with Ledger.read(path) as ledger:
        rows = ledger.log_tuples(_EXPORT_COLUMNS, status=status_, step=step)
        try:
            # "x": a file that appeared since the check above is not overwritten either.
            fh = output.open("w" if force else "x", newline="", encoding="utf-8")
        except OSError as exc:
            raise MailerError(_path_error(output, exc)) from None
        try:
            with fh:
                w = csv.writer(fh)
                w.writerow(protect_row(header))
                for r in rows:
                    values: list[object] = list(r)
                    contact = contacts.get(r[0].lower())  # _EXPORT_COLUMNS[0]: the address
                    if contact is None:
                        lacking += 1
                        values += [""] * len(contact_columns)
                    elif contact_columns:
                        values += [
                            contact.language or "",
                            ";".join(sorted(contact.lists)),
                            ";".join(sorted(contact.tags)),
                            *(contact.fields.get(k, "") for k in extras),
                        ]
                    w.writerow(protect_row(values))
                    n += 1
        except BaseException:
            output.unlink(missing_ok=True)  # no half export left behind to be taken for a whole one
            raise
    if lacking:
        reason = why or "their addresses are no longer in the campaign's contact files"
        err.print(
            f"warning: {lacking} row(s) written without contact data (language, lists, tags, "
            f"other columns): {reason}; a re-send from {output} uses the campaign language for them",
            markup=False,
        )
    out.print(f"Wrote {n} row(s) to {output}.", markup=False)


def _export_contacts(config_path: Path) -> tuple[dict[str, Contact], list[str], str | None]:
    """The campaign's contacts by lower-cased address, their extra columns in file order, and
    None; or, without a valid schedules.yaml, no contacts and why (the ledger stores no contact
    columns: they come from the contact files as `mailer check` reads them)."""
    if not config_path.exists():
        return {}, [], f"there is no {config_path} to read the contact files from"
    from .workspace import load_workspace

    try:
        ws = load_workspace(config_path)
    except ConfigError as exc:
        return {}, [], f"{config_path} has {len(exc.problems)} problem(s) (run `mailer check`)"
    extras = dict.fromkeys(k for c in ws.contacts for k in c.fields)
    return {c.email.lower(): c for c in ws.contacts}, list(extras), None


def _check_output(output: Path, ledger: Path, force: bool) -> None:
    """Refuse, in one line, an -o that cannot or must not be written: the ledger or one of its
    files, an existing file without --force, a folder, a missing or non-folder parent, a name
    too long, a loop of symbolic links. (/dev/stdout with --force is fine.)

    :raises MailerError: naming the path and what to do.
    """
    if not str(output) or str(output) == ".":
        raise MailerError("-o: no file name; give the CSV file to write, e.g. -o failed.csv")
    try:
        if _is_ledger_file(output, ledger):
            raise MailerError(
                f"-o {output}: that is the ledger {ledger} (or one of its own files); "
                "write the export to another file"
            )
        if output.is_dir():
            raise MailerError(
                f"-o {output}: is a folder; give a file name in it, e.g. -o {output / 'failed.csv'}"
            )
        parent = output.absolute().parent
        if not parent.exists():
            raise MailerError(f"-o {output}: the folder {parent} does not exist; create it or choose another")
        if not parent.is_dir():
            raise MailerError(f"-o {output}: {parent} is not a folder; choose another path")
        if (output.exists() or output.is_symlink()) and not force:
            raise MailerError(
                f"-o {output}: the file exists; choose another name, or add --force to overwrite it"
            )
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.resolve() on a symlink loop
        raise MailerError(_path_error(output, exc)) from None


def _path_error(output: Path, exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return f"-o {output}: a loop of symbolic links; choose another path"
    if getattr(exc, "errno", None) == errno.ENAMETOOLONG:
        return f"-o {output}: the name is too long for the file system; choose a shorter one"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"-o {output}: cannot write it: {text}"


_EXPORT_COLUMNS = ("email", "name", "step", "status", "smtp_code", "smtp_text", "reason", "updated")
#: The files SQLite and mailer keep next to a ledger: none of them may become an export.
_LEDGER_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")


def _is_ledger_file(output: Path, ledger: Path) -> bool:
    """True when writing ``output`` would write the ledger or a file that belongs to it,
    whatever the spelling: relative or absolute, ``..``, a symlink or a hard link.

    >>> _is_ledger_file(Path("/srv/c/sub/../ledger.db-wal"), Path("/srv/c/ledger.db"))
    True
    >>> _is_ledger_file(Path("/srv/c/failed.csv"), Path("/srv/c/ledger.db"))
    False
    """
    target = output.resolve()
    base = ledger.resolve()
    own = [base.with_name(base.name + suffix) for suffix in _LEDGER_SUFFIXES]
    if target in own:
        return True
    if not output.exists():
        return False
    for f in own:
        try:
            if f.exists() and os.path.samefile(output, f):  # a hard link
                return True
        except OSError:
            continue
    return False


@click.command()
@config_option
@db_option
@click.option(
    "--status",
    "status_",
    type=click.Choice([Status.FAILED.value, Status.SKIPPED.value]),
    default=Status.FAILED.value,
    show_default=True,
    help="Which rows: failed ones are sent again; skipped ones are planned afresh (after a "
    "pass at a wrong --now or a clock jump skipped a step as 'the event had started').",
)
@click.option("--step", help="Only this step.")
@handle_errors
def retry(config_path: Path, db_path: Path | None, status_: str, step: str | None) -> None:
    """Make failed (or skipped) deliveries pending again: the next `mailer send` or daemon pass
    decides afresh and sends what is still due."""
    which = Status(status_)
    with Ledger.open(ledger_path(db_path, config_path)) as ledger:
        n = ledger.retry(None, step, datetime.now(UTC), status=which)
    rows = f"{n} {which} deliver{'y' if n == 1 else 'ies'}"
    if which is Status.FAILED:
        out.print(f"{rows} will be sent again on the next pass.", markup=False)
    else:
        out.print(
            f"{rows} pending again: the next pass decides afresh whether each is still due.", markup=False
        )


@click.group()
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
    "MAILER_WEB_SECRET (or MAILER_UNSUBSCRIBE_SECRET), then its address is suppressed.",
)
@click.option(
    "--create",
    is_flag=True,
    help="Start the ledger if none exists yet (before the first send); it goes where --db or "
    "the ledger: of a valid schedules.yaml says.",
)
@handle_errors
def suppress_add(
    config_path: Path,
    db_path: Path | None,
    emails: tuple[str, ...],
    reason: str,
    links: tuple[str, ...],
    create: bool,
) -> None:
    """Suppress EMAILS: every later delivery to them is recorded as suppressed, not sent."""
    from . import unsubscribe
    from .contacts import normalise_address

    if not emails and not links:
        raise MailerError("give at least one address or --link")
    from .tokens import secret_from

    secret = secret_from(os.environ)
    found = list(emails)
    for ln in links:
        if not secret:
            raise MailerError(
                "--link needs MAILER_WEB_SECRET (or the older MAILER_UNSUBSCRIBE_SECRET): "
                "the secret the links were signed with"
            )
        checked = unsubscribe.verify(secret, ln)
        if checked is None:
            raise MailerError(f"{ln}: not a valid unsubscribe link (forged, damaged or another secret)")
        found.append(checked[1])
        reason = "unsubscribed (one-click link)"
    addresses = [normalise_address(e) for e in found]  # all valid before the ledger is touched
    if create:
        ledger = Ledger.create(db_path or _campaign(config_path).ledger)
    else:
        path = ledger_path(db_path, config_path)
        if not path.exists():
            raise MailerError(
                f"{path}: no ledger yet (`mailer send` or `mailer run` create it); to suppress "
                "addresses before the first send, run this again with --create"
            )
        ledger = Ledger.open(path)
    with ledger:
        for addr in addresses:
            ledger.suppress(addr, reason, datetime.now(UTC))
            out.print(f"suppressed {addr}", markup=False)


def _campaign(config_path: Path) -> Campaign:
    """The whole campaign, validated: `suppress add --create` makes the ledger only where the
    campaign will look for it (a misspelt ``ledger:`` key would otherwise mean mailer.db)."""
    from .config import load

    return load(config_path)


@suppress.command("remove")
@config_option
@db_option
@click.argument("emails", nargs=-1, required=True)
@handle_errors
def suppress_remove(config_path: Path, db_path: Path | None, emails: tuple[str, ...]) -> None:
    """Allow EMAILS again (deliveries already recorded as suppressed stay so)."""
    from .contacts import normalise_address

    addresses = [normalise_address(e) for e in emails]
    with Ledger.open(ledger_path(db_path, config_path)) as ledger:
        for addr in addresses:
            found = ledger.unsuppress(addr)
            out.print(f"{'removed' if found else 'not suppressed:'} {addr}", markup=False)


@suppress.command("list")
@config_option
@db_option
@handle_errors
def suppress_list(config_path: Path, db_path: Path | None) -> None:
    """List suppressed addresses with the reason and time."""
    with Ledger.read(ledger_path(db_path, config_path)) as ledger:
        rows = ledger.suppressions()
    listing = table(None, ("email", "reason", "since (UTC)"))
    for r in rows:
        listing.add_row(r["email"], r["reason"], r["at"])
    out.print(listing)
    out.print(f"{len(rows)} suppressed address(es).")


@click.command()
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

    path = ledger_path(db_path, config_path)
    campaign = _campaign_if_valid(config_path)
    board.serve(
        path,
        host=host,
        port=port,
        allow_sql=allow_sql,
        timezone=campaign.timezone.key if campaign else "UTC",
        password_hash=os.environ.get(board.PASSWORD_ENV) or None,
        log=lambda line: out.print(line, markup=False),
        plan=board.Plan.of(campaign) if campaign else None,
    )


@click.command("inbox")
@config_option
@db_option
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Read this local Maildir instead of IMAP.",
)
@click.option(
    "--list",
    "list_",
    is_flag=True,
    help="Read no mailbox: list the mails recorded as unmatched or skipped, newest first.",
)
@handle_errors
def inbox(config_path: Path, db_path: Path | None, maildir: Path | None, list_: bool) -> None:
    """Record replies, bounces and unsubscribes found in the organiser's mailbox.

    Reads IMAP (MAILER_IMAP_HOST, MAILER_IMAP_PORT, MAILER_IMAP_USER, MAILER_IMAP_PASSWORD,
    MAILER_IMAP_TLS=tls|starttls|none, MAILER_IMAP_MAILBOX, MAILER_IMAP_CA_FILE) or a local
    Maildir. Handled messages are flagged so they are read once; other mail is left alone.
    With --list, shows what needs a person instead: unmatched and skipped mails.
    """
    if list_:
        _list_inbox(ledger_path(db_path, config_path))
        return
    from .inbox import run_inbox

    result = run_inbox(config_path, db_path, maildir, os.environ)
    for line in result.lines:
        out.print(line, markup=False)
    out.print(result.summary(), markup=False)


def _list_inbox(path: Path) -> None:
    """``mailer inbox --list``: the mails that need a person (issue 15), one block each."""
    with Ledger.read(path) as ledger:
        total, per = staff_inbox.counts(ledger.conn)
        rows = staff_inbox.newest(ledger.conn)
    if not total:
        out.print("inbox: no mail needs a person", markup=False)
        return
    out.print(staff_inbox.status_line(total, per).split(": see ")[0], markup=False)
    for r in rows:
        out.print(f"\n{r.at}  {r.kind}  {r.email or '-'}  {r.message_id}\n  {r.detail}", markup=False)

"""``mailer demo``: the whole campaign on a virtual clock against an embedded SMTP server,
with simulated answers from recipients (an acceptance, a decline, a bounce)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import icalendar
from rich.console import Console
from rich.table import Table

from .clock import virtual_clock
from .config import Campaign
from .errors import MailerError
from .inbox import process
from .ledger import Ledger
from .mailboxes import MaildirSource
from .runner import run_pass
from .smtpd import MaildirHandler, SmtpServer
from .transport import TransportSettings
from .vocab import StepKind
from .workspace import load_workspace

__all__ = ["run_demo", "simulated_answers"]


def run_demo(config_path: Path, out_dir: Path, *, console: Console) -> int:
    """``mailer demo``: every due time of the campaign in order, against an embedded server."""
    ws = load_workspace(config_path)
    if ws.blocking:
        raise MailerError("the campaign has problems; run `mailer check`")
    c = ws.campaign
    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    maildir = out_dir / "Maildir"
    if maildir.exists():
        shutil.rmtree(maildir)
    handler = MaildirHandler(maildir)
    with SmtpServer(handler) as server, Ledger.create(db) as ledger:
        ledger.lock()
        settings = TransportSettings(
            host=server.host, port=server.port, tls="none", connections=c.smtp.connections
        )
        console.print(
            f"[bold]Demo of {c.name}[/bold]: {len(c.steps)} steps, {len(ws.contacts)} contacts, "
            f"embedded SMTP server on {server.host}:{server.port}"
        )
        now: datetime | None = min(s.at for s in c.steps) - timedelta(minutes=1)
        invitations = [s.at for s in c.steps if s.kind is StepKind.INVITATION and s.attach_ics]
        answers_at = max(invitations) if invitations else None
        passes = 0
        while now is not None and passes < 1000:
            passes += 1
            if answers_at is not None and now > answers_at:
                # The recipients answer between the invitations and the first reminder.
                inbox_dir = out_dir / "organiser-inbox"
                shutil.rmtree(inbox_dir, ignore_errors=True)
                for line in simulated_answers(c, ledger, inbox_dir, now):
                    console.print(f"  {line}", markup=False)
                found = process(MaildirSource(inbox_dir), ledger, c, now)
                console.print(f"  mailer inbox: {found.summary()}", markup=False)
                answers_at = None
            result = asyncio.run(run_pass(ws, ledger, now, settings=settings, clock=virtual_clock(now)))
            sent = result.counts["sent"]
            if result.due or any(result.counts.values()):
                local = now.astimezone(c.timezone)
                steps = sorted({d.step.id for d in result.plan.due}) if result.plan else []
                console.print(
                    f"  {local:%a %d %b %Y %H:%M %Z}: {', '.join(steps) or '(records only)'}: "
                    f"sent {sent}"
                    + "".join(f", {k} {v}" for k, v in sorted(result.counts.items()) if k != "sent" and v),
                    markup=False,
                )
            now = result.next_wake
        table = Table(title="Delivery ledger", title_justify="left")
        for col in ("step", "sent", "deferred", "failed", "bounced", "skipped", "suppressed"):
            table.add_column(col, justify="left" if col == "step" else "right")
        per: dict[str, dict[str, int]] = {}
        for r in ledger.summary(c.id):
            per.setdefault(r["step"], {})[r["status"]] = r["n"]
        for n, s in enumerate(c.steps, 1):
            d = per.get(s.id, {})
            table.add_row(
                f"{n}. {s.id}",
                *(
                    str(d.get(k, 0))
                    for k in ("sent", "deferred", "failed", "bounced", "skipped", "suppressed")
                ),
            )
        console.print(table)
        # One column per step (numbered as in the table above), a mark per mail received.
        who = Table(title="What each recipient received (step numbers as above)", title_justify="left")
        who.add_column("recipient")
        for i, _ in enumerate(c.steps, 1):
            who.add_column(str(i), justify="center")
        got: dict[str, set[str]] = {}
        for r in ledger.log(campaign=c.id, status="sent"):
            got.setdefault(r["email"], set()).add(r["step"])
        for email in sorted(got):
            who.add_row(email, *("x" if s.id in got[email] else "" for s in c.steps))
        console.print(who)
    console.print(
        f"{len(handler.received)} mails are in {maildir}/new (open them with any mail client), "
        f"the ledger is {db}.",
        markup=False,
    )
    prog = _prog()
    console.print(f"Read the log: {prog} status --db {db}   |   {prog} log --db {db}", markup=False)
    console.print(
        f"See it in the browser: {prog} dashboard --db {db} --config {config_path}"
        "   (then open http://127.0.0.1:8001/)",
        markup=False,
    )
    return 0


def _prog() -> str:
    """How the user can run mailer again: plain ``mailer`` when it is on PATH (an activated
    venv), else the path it was started by (``make demo`` runs .venv/bin/mailer)."""
    argv0 = Path(sys.argv[0])
    if shutil.which("mailer") or argv0.name != "mailer":
        return "mailer"
    try:
        return str(argv0.relative_to(Path.cwd()))
    except ValueError:
        return str(argv0)


def simulated_answers(campaign: Campaign, ledger: Ledger, inbox_dir: Path, now: datetime) -> list[str]:
    """Put what recipients would send back into a Maildir: for the last invitation, the first
    recipient accepts, the second declines (iMIP REPLY, RFC 6047) and the third's mailbox turns
    out not to exist (a bounce report, RFC 3464). Returns what was simulated, for the output."""
    import mailbox

    steps = [s for s in campaign.steps if s.kind is StepKind.INVITATION and s.attach_ics]
    if not steps:
        return []
    step = max(steps, key=lambda s: s.at)
    event = campaign.event(step.event)
    sent = sorted(ledger.log(campaign=campaign.id, step=step.id, status="sent"), key=lambda r: r["email"])
    box = mailbox.Maildir(inbox_dir, create=True)
    lines = []
    for row, partstat in zip(sent[:2], ("ACCEPTED", "DECLINED"), strict=False):
        box.add(_reply(campaign, event.uid, event.start, row["email"], row["name"], partstat, now))
        lines.append(f"{row['email']} answers {partstat.lower()} ({event.id})")
    if len(sent) > 2:
        row = sent[2]
        box.add(_bounce(campaign, row["email"], row["message_id"], now))
        lines.append(f"{row['email']} bounces: 550 5.1.1 mailbox does not exist")
    return lines


def _reply(
    campaign: Campaign, uid: str, start: datetime, email: str, name: str, partstat: str, now: datetime
) -> bytes:
    cal = icalendar.Calendar()
    cal.add("prodid", "-//mailer demo//a calendar client//EN")
    cal.add("version", "2.0")
    cal.add("method", "REPLY")
    ev = icalendar.Event()
    ev.add("uid", uid)
    ev.add("dtstamp", now.astimezone(UTC))
    ev.add("dtstart", start.astimezone(UTC))
    ev.add("organizer", icalendar.vCalAddress(f"mailto:{campaign.sender.organizer}"))
    attendee = icalendar.vCalAddress(f"mailto:{email}")
    attendee.params["PARTSTAT"] = partstat
    attendee.params["CN"] = name or email
    ev.add("attendee", attendee)
    cal.add_component(ev)
    msg = EmailMessage()
    msg["From"] = email
    msg["To"] = campaign.sender.organizer
    msg["Subject"] = f"{partstat.title()}: {uid}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<reply.{partstat.lower()}.{_tag(uid, email)}@demo.example>"
    msg.set_content(f"{name or email} has answered: {partstat}.\n")
    msg.add_alternative(cal.to_ical().decode(), subtype="calendar", params={"method": "REPLY"})
    return bytes(msg)


def _bounce(campaign: Campaign, email: str, original_id: str, now: datetime) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        f"To: {campaign.sender.address}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <bounce.{_tag(email)}@mx.example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {email}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 mailbox does not exist\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {original_id}\r\nFrom: {campaign.sender.address}\r\n\r\n"
        "--B--\r\n"
    ).encode()


def _tag(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]

"""``mailer demo``: the whole campaign on a virtual clock against an embedded SMTP server,
with simulated answers from recipients (an acceptance and a decline by iMIP, a bounce, and a
decline by link through `mailer web`, which runs on a loopback port while the demo does)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import os
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from urllib.parse import urljoin, urlsplit

import icalendar
from rich.console import Console
from rich.table import Table

from .addresses import address_key
from .clock import virtual_clock
from .config import Campaign, Event, Web
from .dkim import Signer, load_signer
from .errors import MailerError
from .inbox import process
from .ledger import Ledger, ReplySource
from .links import links_for
from .mailboxes import MaildirSource
from .runner import run_pass
from .smtpd import MaildirHandler, SmtpServer, free_port
from .transport import TransportSettings
from .vocab import Answer, Status, StepKind
from .workspace import Workspace, load_workspace

__all__ = ["DEMO_SECRET", "DEMO_WEB_PORT", "LinkAnswer", "answer_by_link", "run_demo", "simulated_answers"]

#: Signs the links of the demo's mails, set in-process for the demo only: it is in the source
#: code, so it protects nothing. A real campaign signs with its own MAILER_WEB_SECRET.
DEMO_SECRET = "mailer-demo-only-secret-it-is-public-never-use-it"
#: The port the demo's web service takes when it is free (else any free one): with the fixed
#: secret, `mailer demo --serve` then serves the very links a previous `make demo` printed.
DEMO_WEB_PORT = 8025
WEB_HOST = "127.0.0.1"


def run_demo(
    config_path: Path,
    out_dir: Path,
    *,
    console: Console,
    serve: bool = False,
    port: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """``mailer demo``: every due time of the campaign in order, against an embedded server.

    `mailer web` runs on ``127.0.0.1:port`` (default :data:`DEMO_WEB_PORT` when free, else a
    free port) while the demo does, so the mails' links work; the campaign gets that
    ``web.url`` in memory (schedules.yaml is not touched). With ``serve``, the web service stays
    up after the demo until Ctrl-C (or ``stop`` is set).
    """
    loaded = load_workspace(config_path)
    if loaded.blocking:
        raise MailerError("the campaign has problems; run `mailer check`")
    # With dkim: the demo signs as `mailer send` does; a key that cannot be used stops it here.
    signer = load_signer(loaded.campaign, os.environ)
    port = port or _web_port()
    c = replace(loaded.campaign, web=Web(f"http://{WEB_HOST}:{port}/"))
    ws = replace(loaded, campaign=c)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = out_dir / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    maildir = out_dir / "Maildir"
    if maildir.exists():
        shutil.rmtree(maildir)
    handler = MaildirHandler(maildir)
    answered: LinkAnswer | None = None
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(SmtpServer(handler))
        ledger = stack.enter_context(Ledger.create(db))
        ledger.lock()
        web_clock = _FollowingClock(min(s.at for s in c.steps))
        web = stack.enter_context(_WebService(config_path, db, ws, web_clock, port))
        settings = TransportSettings(
            host=server.host, port=server.port, tls="none", connections=c.smtp.connections
        )
        console.print(
            f"[bold]Demo of {c.name}[/bold]: {len(c.steps)} steps, {len(ws.contacts)} contacts, "
            f"embedded SMTP server on {server.host}:{server.port}, mailer web on {web.url} "
            "(links signed with a demo-only secret)" + _signed_by(signer)
        )
        now: datetime | None = min(s.at for s in c.steps) - timedelta(minutes=1)
        invitations = [s.at for s in c.steps if s.kind is StepKind.INVITATION and s.attach_ics]
        answers_at = max(invitations) if invitations else None
        passes = 0
        while now is not None and passes < 1000:
            passes += 1
            web_clock.set(now)
            if answers_at is not None and now > answers_at:
                # The recipients answer between the invitations and the first reminder.
                inbox_dir = out_dir / "organiser-inbox"
                shutil.rmtree(inbox_dir, ignore_errors=True)
                for line in simulated_answers(c, ledger, inbox_dir, now):
                    console.print(f"  {line}", markup=False)
                found = process(MaildirSource(inbox_dir), ledger, c, now)
                console.print(f"  mailer inbox: {found.summary()}", markup=False)
                answered = answer_by_link(c, ledger, maildir)
                if answered is not None:
                    for line in answered.lines:
                        console.print(f"  {line}", markup=False)
                answers_at = None
            result = asyncio.run(
                run_pass(
                    ws,
                    ledger,
                    now,
                    settings=settings,
                    clock=virtual_clock(now),
                    unsubscribe_secret=DEMO_SECRET,
                    signer=signer,
                )
            )
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
        _tables(console, c, ledger)
        if answered is not None:
            console.print(_reminders_after(c, ledger, answered), markup=False)
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
        if answered is not None:
            _print_urls(console, ws, answered)
        if serve:
            try:
                console.print(
                    f"mailer web is serving {web.url} for the demo ledger; press Ctrl-C to stop it.",
                    markup=False,
                )
                _wait(stop)
            except KeyboardInterrupt:
                pass
            console.print("mailer web stopped.", markup=False)
        else:
            console.print(
                f"The demo's web service stopped with it: `{prog} demo --serve` runs the demo again and "
                f"keeps mailer web up until Ctrl-C"
                + (" (the same links)." if port == DEMO_WEB_PORT else "."),
                markup=False,
            )
    return 0


def _signed_by(signer: Signer | None) -> str:
    """What the header line says of DKIM: nothing without ``dkim:`` (the shipped demo)."""
    if signer is None:
        return ""
    keys = ", ".join(f"{k.algorithm} d={k.domain} s={k.selector}" for k in signer.keys)
    return f"; mails DKIM-signed ({keys})"


def _tables(console: Console, c: Campaign, ledger: Ledger) -> None:
    """The delivery ledger per step, and what each recipient received."""
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
            *(str(d.get(k, 0)) for k in ("sent", "deferred", "failed", "bounced", "skipped", "suppressed")),
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
    for addr in sorted(got):
        who.add_row(addr, *("x" if s.id in got[addr] else "" for s in c.steps))
    console.print(who)


def _reminders_after(c: Campaign, ledger: Ledger, answered: LinkAnswer) -> str:
    """What the reminders of the event answered by link did for that person."""
    reminders = [s.id for s in c.steps if s.event == answered.event.id and s.kind is StepKind.REMINDER]
    rows = {r["step"]: r for r in ledger.log(campaign=c.id, email=answered.address)}
    done = []
    for step in reminders:
        row = rows.get(step)
        if row is not None:
            why = (
                f" ({row['reason'].split(';')[0]})"
                if row["status"] == Status.SKIPPED and row["reason"]
                else ""
            )
            done.append(f"{step} {row['status']}{why}")
    return (
        f"{answered.address} answered {answered.answer.value} by link; "
        f"the reminders of {answered.event.id}: {', '.join(done) or 'none'}."
    )


def _print_urls(console: Console, ws: Workspace, answered: LinkAnswer) -> None:
    """The web pages of the person who answered by link, to open in a browser."""
    contact = next((k for k in ws.contacts if address_key(k.email) == address_key(answered.address)), None)
    links = links_for(ws.campaign, DEMO_SECRET, answered.event, contact) if contact else None
    if links is None:
        return
    feed = "http" + links.feed.removeprefix("webcal")
    console.print(f"Try {answered.address}'s links in a browser (mailer web, demo ledger):", markup=False)
    for label, url in (
        ("event page", links.page),
        ("RSVP page ", links.accept.split("?", 1)[0]),
        (".ics      ", links.ics),
        ("feed      ", f"{feed}   (a calendar app subscribes to {links.feed})"),
    ):
        console.print(f"  {label}  {url}", markup=False)


def _web_port() -> int:
    """:data:`DEMO_WEB_PORT` when nothing listens there, else any free port."""
    try:
        with socket.socket() as sock:
            sock.bind((WEB_HOST, DEMO_WEB_PORT))
    except OSError:
        return free_port(WEB_HOST)
    return DEMO_WEB_PORT


def _wait(stop: threading.Event | None) -> None:
    """Until Ctrl-C, or ``stop`` is set (tests)."""
    while not (stop and stop.is_set()):
        time.sleep(0.2)


class _FollowingClock:
    """The web service's clock: the demo's virtual time (set at each pass), advancing with real
    time in between, so an answer by link is recorded at the campaign's time, not today's."""

    def __init__(self, now: datetime) -> None:
        self.set(now)

    def set(self, now: datetime) -> None:
        self._now, self._t0 = now.astimezone(UTC), time.monotonic()

    def __call__(self) -> datetime:
        return self._now + timedelta(seconds=time.monotonic() - self._t0)


class _WebService:
    """``mailer web``'s app on uvicorn in a background thread (``with _WebService(...) as w:``)."""

    def __init__(self, config_path: Path, db: Path, ws: Workspace, clock: _FollowingClock, port: int) -> None:
        import uvicorn

        from .web import create_app

        app = create_app(config_path, db, secret=DEMO_SECRET, clock=clock, workspace=ws)
        self.url = f"http://{WEB_HOST}:{port}/"
        self.port = port
        # No access log: every path holds a token (as `mailer web`).
        config = uvicorn.Config(
            app, host=WEB_HOST, port=port, access_log=False, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mailer-demo-web", daemon=True)

    def __enter__(self) -> _WebService:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise MailerError(f"the demo's web service could not start on {WEB_HOST}:{self.port}")
            time.sleep(0.01)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ------------------------------------------------------------------------------------------
# One recipient answers by link, as in a browser
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkAnswer:
    """Who answered by link, to which event, what, and what the demo prints about it."""

    address: str
    event: Event
    answer: Answer
    lines: tuple[str, ...]


class _Form(HTMLParser):
    """The first ``<form method="post">`` of a page: its action and its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and not self._done and a.get("method", "").lower() == "post":
            self.action, self._inside = a.get("action", ""), True
        elif tag == "input" and self._inside and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._inside:
            self._inside, self._done = False, True


def answer_by_link(
    campaign: Campaign, ledger: Ledger, maildir: Path, answer: Answer = Answer.DECLINED
) -> LinkAnswer | None:
    """The first recipient (by address) of the last invitation who has not answered yet nor
    bounced (see :func:`simulated_answers`) opens the ``answer`` link of that mail: the RSVP
    link is read from the mail in ``maildir``, its page fetched (GET, which records nothing),
    and the page's form posted as a browser does. Returns None when there is no such person.

    :raises MailerError: the mail has no such link, or the web service did not record it.
    """
    import httpx

    steps = [s for s in campaign.steps if s.kind is StepKind.INVITATION and s.attach_ics]
    if not steps or campaign.web is None:
        return None
    step = max(steps, key=lambda s: s.at)
    event = campaign.event(step.event)
    sent = sorted(ledger.log(campaign=campaign.id, step=step.id, status="sent"), key=lambda r: r["email"])
    row = next((r for r in sent if ledger.reply(campaign.id, event.id, r["email"]) is None), None)
    if row is None:
        return None
    url = _rsvp_link(_mail(maildir, row["message_id"]), campaign.web.base, answer)
    shown = url.replace(campaign.web.base, "", 1).split("?")[0][:14] + "…"
    with httpx.Client(timeout=10, follow_redirects=True) as browser:
        page = browser.get(url)
        if page.status_code != 200:
            raise MailerError(f"demo: GET {shown} answered {page.status_code}")
        before = ledger.reply(campaign.id, event.id, row["email"])
        form = _Form()
        form.feed(page.text)
        if form.action is None:
            raise MailerError(f"demo: the page of {shown} has no form to post")
        posted = browser.post(urljoin(url, form.action), data=form.fields)
        if posted.status_code != 200:
            raise MailerError(f"demo: POST {shown} answered {posted.status_code}")
    stored = ledger.reply(campaign.id, event.id, row["email"])
    if stored is None or stored["source"] != ReplySource.WEB or stored["partstat"] != answer.partstat:
        raise MailerError(f"demo: the answer by link of {row['email']} is not in the ledger ({stored})")
    path = urlsplit(url).path.split("/")[1]
    return LinkAnswer(
        address=row["email"],
        event=event,
        answer=answer,
        lines=(
            f"{row['email']} clicks {answer.value} in the mail: GET /{path}/… shows the confirmation "
            f"page ({page.status_code}, the ledger unchanged: {'no answer' if before is None else 'kept'})",
            f"  and presses the button: POST {posted.status_code}; the ledger has "
            f"{stored['partstat'].lower()}, source {stored['source']}, SEQUENCE {stored['sequence']} "
            f"({event.id})",
        ),
    )


def _mail(maildir: Path, message_id: str) -> EmailMessage:
    """The mail with this Message-ID in the demo's Maildir."""
    import mailbox

    box = mailbox.Maildir(maildir, create=False)
    for key in box.keys():
        msg = email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
        if isinstance(msg, EmailMessage) and msg["Message-ID"] == message_id:
            return msg
    raise MailerError(f"demo: {message_id} is not in {maildir}")


def _rsvp_link(msg: EmailMessage, base: str, answer: Answer) -> str:
    """The ``answer`` RSVP link of a mail, from its plain-text part."""
    body = msg.get_body(("plain",))
    text = body.get_content() if isinstance(body, EmailMessage) else ""
    found = re.search(re.escape(base) + r"/r/[^\s<>\"?]+\?answer=" + answer.value + r"\b", str(text))
    if found is None:
        raise MailerError(f"demo: no {answer.value} link ({base}/r/...) in the mail {msg['Message-ID']}")
    return found.group(0)


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

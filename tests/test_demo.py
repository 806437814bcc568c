"""`mailer demo`: the shipped campaign end to end, with simulated answers; every mail it
delivers passes the interop checklist and the answers change who gets the reminders. One
recipient answers by link through `mailer web`, which runs on a loopback port meanwhile."""

from __future__ import annotations

import collections
import email
import email.policy
import io
import mailbox
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import icalendar
import pytest
from click.testing import CliRunner
from interop import check_message
from rich.console import Console

from mailer.cli import cli
from mailer.demo import run_demo
from mailer.ledger import Ledger
from mailer.smtpd import free_port

#: The demo's "Try ...'s links in a browser" lines: label, then the URL.
URL_LINE = re.compile(r"^  (event page|RSVP page|\.ics|feed)\s+(http://\S+)", re.M)


def _urls(output: str) -> dict[str, str]:
    return {label: url for label, url in URL_LINE.findall(output)}


@pytest.mark.slow  # the whole shipped campaign, end to end
def test_demo_runs_the_whole_campaign(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "mailer inbox: 2 replies, 1 bounce" in r.output
    box = mailbox.Maildir(out / "Maildir", create=False)
    per_step: collections.Counter[str] = collections.Counter()
    with Ledger(out / "ledger.db") as led:
        rows = list(led.log())
        by_id = {row["message_id"]: row for row in rows if row["message_id"]}
        status = collections.Counter(row["status"] for row in rows)
        replies = led.answers("integratiepact-2018")
        sources = {
            (e, p, s)
            for (e, p, s) in led.conn.execute("SELECT email, partstat, source FROM replies").fetchall()
        }
    assert f"{len(box)} mails are in" in r.output
    for key in box.keys():
        # Maildir files use the local line ending (LF); on the wire it was CRLF.
        raw = box.get_bytes(key).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        row = by_id[msg["Message-ID"]]
        per_step[row["step"]] += 1
        check_message(raw, expect_method="REQUEST" if row["step"].startswith("uitnodiging") else None)
        # the links point at the demo's web service; http:// is no RFC 8058 one-click link
        plain = msg.get_body(("plain",))
        assert plain is not None and "/u/" in plain.get_content()
        assert "List-Unsubscribe-Post" not in msg
    # every invitation went out; the bounce came back afterwards
    assert per_step["uitnodiging-infosessie"] == 8 and per_step["uitnodiging-aan-de-slag"] == 14
    assert status["bounced"] == 1 and sorted(replies.values()) == ["ACCEPTED", "DECLINED", "DECLINED"]
    # two answers by iMIP, one by link (the page's form posted as a browser does)
    assert sorted(s for _, _, s in sources) == ["imip", "imip", "web"]
    by_link = next(e for e, p, s in sources if s == "web")
    assert f"{by_link} clicks declined in the mail: GET /r/" in r.output
    assert "the ledger has declined, source web" in r.output
    declined = {e for (ev, e), p in replies.items() if p == "DECLINED"}
    bounced = next(row["email"] for row in rows if row["status"] == "bounced")
    for row in rows:
        if row["step"].startswith("herinnering-aan-de-slag") and row["email"] in declined:
            assert row["status"] == "skipped" and "declined" in row["reason"]
        if row["step"].startswith("herinnering") and row["email"] == bounced:
            assert row["status"] == "suppressed"
    # who answered by link still gets the reminders of the other event
    assert {row["step"] for row in rows if row["email"] == by_link and row["status"] == "sent"} >= {
        "herinnering-infosessie-week",
        "herinnering-infosessie-dag",
    }
    assert f"{by_link} answered declined by link; the reminders of aan-de-slag: " in r.output
    # everyone else got every reminder of their lists
    assert per_step["herinnering-aan-de-slag-week"] == 14 - 3
    # the URLs to try in a browser, for the person who answered by link
    urls = _urls(r.output)
    assert set(urls) == {"event page", "RSVP page", ".ics", "feed"}
    assert all("/" in u.split("://", 1)[1] for u in urls.values())
    assert "demo --serve" in r.output  # how to keep the web service up
    # running the demo again starts from scratch and gives the same result
    again = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert again.exit_code == 0 and f"{len(box)} mails are in" in again.output


@pytest.mark.slow  # the whole shipped campaign, then the web service it leaves up
def test_demo_serve_keeps_the_printed_urls_working(shipped: Path, tmp_path: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=160, soft_wrap=True, highlight=False)
    stop = threading.Event()
    port = free_port()
    codes: list[int] = []
    demo = threading.Thread(
        target=lambda: codes.append(
            run_demo(
                shipped / "schedules.yaml",
                tmp_path / "demo",
                console=console,
                serve=True,
                port=port,
                stop=stop,
            )
        )
    )
    demo.start()
    try:
        deadline = time.monotonic() + 60
        while "press Ctrl-C" not in buf.getvalue():
            assert demo.is_alive() and time.monotonic() < deadline, buf.getvalue()
            time.sleep(0.05)
        urls = _urls(buf.getvalue())
        assert set(urls) == {"event page", "RSVP page", ".ics", "feed"}
        assert all(u.startswith(f"http://127.0.0.1:{port}/") for u in urls.values())
        page = httpx.get(urls["event page"])
        assert page.status_code == 200 and "Aan de slag INTEGRATIEPACT" in page.text
        rsvp = httpx.get(urls["RSVP page"])
        # the page shows the answer given by link in the demo ("so far: declined", in Dutch)
        assert rsvp.status_code == 200 and 'id="current"' in rsvp.text
        ics = httpx.get(urls[".ics"])
        assert ics.status_code == 200 and ics.headers["content-type"].startswith("text/calendar")
        uids = {str(e["UID"]) for e in icalendar.Calendar.from_ical(ics.content).walk("VEVENT")}
        feed = httpx.get(urls["feed"])
        assert feed.status_code == 200
        in_feed = {str(e["UID"]) for e in icalendar.Calendar.from_ical(feed.content).walk("VEVENT")}
        assert uids and uids <= in_feed
    finally:
        stop.set()
        demo.join(timeout=30)
    assert codes == [0] and "mailer web stopped." in buf.getvalue()
    with socket.socket() as sock:  # the port is free again: the service really stopped
        sock.bind(("127.0.0.1", port))


@pytest.mark.slow  # a real `mailer demo --serve` process
def test_demo_serve_stops_cleanly_on_ctrl_c(shipped: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    mailer = Path(sys.executable).with_name("mailer")
    proc = subprocess.Popen(
        [str(mailer), "demo", "--out", str(tmp_path / "demo"), "--serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a background process may inherit SIGINT ignored; Ctrl-C must reach this one
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "COLUMNS": "160"},
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "press Ctrl-C" in line:
            break
    urls = _urls("".join(seen))
    assert httpx.get(urls["event page"]).status_code == 200  # served after the demo ended
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and rest == "mailer web stopped.\n", rest

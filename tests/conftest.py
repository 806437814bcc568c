"""Real fixtures: campaign folders on disk, an aiosmtpd server on 127.0.0.1, SQLite ledgers."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.smtpd import MaildirHandler, SmtpServer

ROOT = Path(__file__).resolve().parent.parent
#: A test that takes one of these fixtures starts an outside program (Chromium, Dovecot).
SLOW_FIXTURES = frozenset({"browser", "dovecot"})


def pytest_configure(config: pytest.Config) -> None:
    """`mailer status` remembers a campaign's steps in a cache folder (mailer/statusview.py):
    the tests, and the commands they start, use one of their own, never the user's
    ~/.cache/mailer."""
    if "MAILER_CACHE_DIR" not in os.environ:
        os.environ["MAILER_CACHE_DIR"] = _OUR_CACHE[0] = tempfile.mkdtemp(prefix="mailer-test-cache-")


_OUR_CACHE = [""]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OUR_CACHE[0]:
        shutil.rmtree(_OUR_CACHE[0], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start Chromium or Dovecot as slow (``make test-fast`` leaves them out)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped campaign in a temp folder (cwd), so tests may write ledgers."""
    for name in ("schedules.yaml", "contacts", "templates"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name)
        else:
            shutil.copy(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


SIMPLE_TEMPLATES = {
    "invite/en/subject.txt": "Invitation: {{ event.title }}",
    "invite/en/body.txt": "Dear {{ contact.name }},\nyou are invited to {{ event.title }} on {{ event.start | datetime }}.\n",
    "invite/en/body.html": "<p>Dear {{ contact.name }},</p><p>{{ event.title }}</p>",
    "remind/en/subject.txt": "Reminder: {{ event.title }}",
    "remind/en/body.txt": "Reminder for {{ contact.email }}\n",
    "remind/en/body.html": "<p>Reminder for {{ contact.email }}</p>",
}


def write_campaign(
    folder: Path,
    *,
    events: str,
    steps: str,
    contacts: str = "email,name,lists\nann@example.org,Ann,a\nbob@example.org,Bob,a\n",
    extra: str = "",
    templates: dict[str, str] | None = None,
) -> Path:
    """Write a small campaign (English templates) and return its schedules.yaml path."""
    (folder / "contacts").mkdir(parents=True, exist_ok=True)
    (folder / "contacts" / "list.csv").write_text(contacts, encoding="utf-8")
    for rel, text in (templates or SIMPLE_TEMPLATES).items():
        p = folder / "templates" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    cfg = folder / "schedules.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            campaign: test
            timezone: Europe/Brussels
            language: en
            sender: {from: events@example.org, name: Events Team}
            contacts: [contacts/*.csv]
            ledger: ledger.db
            smtp: {connections: 2}
            """
        )
        + "events:\n"
        + textwrap.indent(textwrap.dedent(events), "  ")
        + "steps:\n"
        + textwrap.indent(textwrap.dedent(steps), "  ")
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return cfg


@dataclass
class FaultyHandler(MaildirHandler):
    """A real SMTP server's handler whose replies the test scripts (server-side faults).

    ``rcpt_replies``: address -> reply for RCPT (e.g. "550 5.1.1 no such user").
    ``data_replies``: list of replies consumed by the next DATA commands (then 250).
    ``drop_in_data``: number of DATA commands on which the connection is cut.
    ``data_delay``: seconds to wait before answering DATA.
    """

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    drop_in_data: int = 0
    data_delay: float = 0.0
    rcpt_seen: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_seen.append(address)
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.drop_in_data > 0:
            self.drop_in_data -= 1
            assert server.transport is not None
            server.transport.close()
            return "421 closing"
        if self.data_replies:
            return self.data_replies.pop(0)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    with SmtpServer(FaultyHandler()) as server:
        yield server


@pytest.fixture
def smtp_env(smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "MAILER_SMTP_HOST": smtp_server.host,
        "MAILER_SMTP_PORT": str(smtp_server.port),
        "MAILER_SMTP_TLS": "none",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


Factory = Callable[..., Path]


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """What the daemon logs (the "mailer" logger may not propagate once `mailer run` ran)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("mailer")
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- headless Chromium, for the dashboard, mailer web and mail screenshot tests ----------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing(what: str) -> None:
    """Skip on a developer's machine; fail in CI, where .ci/run installs everything."""
    message = f"{what} is not installed (see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def start_chromium(profile: Path, *flags: str) -> Any:
    """A headless Chromium driven by selenium, with a fresh profile in ``profile``. The flags
    keep it off the network (this machine's closed network refuses its background calls)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        missing("chromium and chromium-driver (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        *flags,
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))

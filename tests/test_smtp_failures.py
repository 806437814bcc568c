"""A server that refuses us as a whole (a login missing, STARTTLS not offered, nobody there) is
one clear line and exit 1, never a failure per recipient; a login never goes out in clear to
another machine unless the organiser says so (issue 12: "Nothing half-sent", "Secure defaults")."""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import FaultyHandler, write_campaign
from rawsmtp import SILENT, RawSmtp, Reply

from mailer.cli import cli
from mailer.config import load as load_campaign
from mailer.errors import ConfigError, TransportFatalError
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer, free_port
from mailer.transport import Outgoing, Result, Transport, TransportSettings
from mailer.vocab import Attempt

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
"""
MAIL = b"Subject: hello\r\n\r\nbody\r\n"


def send(cfg: Path, env: dict[str, str]) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", "2018-01-04T10:00"], env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.output


def statuses(cfg: Path) -> collections.Counter[str]:
    with Ledger(cfg.parent / "ledger.db") as led:
        return collections.Counter(r["status"] for r in led.log())


def rows(cfg: Path) -> list[dict[str, Any]]:
    with Ledger(cfg.parent / "ledger.db") as led:
        return list(led.log())


def plain(env: dict[str, str] | None = None, **more: str) -> dict[str, str]:
    base = {"MAILER_SMTP_TLS": "none", "MAILER_SMTP_USER": "", "MAILER_SMTP_PASSWORD": ""}
    return base | (env or {}) | more


async def run_raw(server: RawSmtp, n: int, results: dict[int, Result], **settings: Any) -> None:
    settings.setdefault("tls", "none")
    settings.setdefault("timeout", 2.0)
    ts = TransportSettings(host=server.host, port=server.port, connections=1, **settings)
    queue: Any = __import__("asyncio").Queue()
    for i in range(n):
        queue.put_nowait(Outgoing(i, "organiser@example.org", f"r{i}@example.org", MAIL))
    queue.put_nowait(None)

    def on_result(job: Outgoing, result: Result) -> None:
        results[job.key] = result

    await Transport(ts).run(queue, on_result)


# --- 1. A login missing or refused, whenever the server says so --------------------------------

AUTH_REFUSALS: dict[str, tuple[dict[str, list[Reply]], str]] = {
    "530 to MAIL (no login given)": (
        {"MAIL": [b"530 5.7.0 Authentication required\r\n"]},
        "MAILER_SMTP_USER",
    ),
    "530 to RCPT": ({"RCPT": [b"530 5.7.0 Authentication required\r\n"]}, "MAILER_SMTP_USER"),
    "535 to MAIL": ({"MAIL": [b"535 5.7.8 Authentication credentials invalid\r\n"]}, "MAILER_SMTP_PASSWORD"),
    "538 to RCPT": (
        {"RCPT": [b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"]},
        "MAILER_SMTP_TLS",
    ),
    "530 must issue STARTTLS first": (
        {"MAIL": [b"530 5.7.0 Must issue a STARTTLS command first\r\n"]},
        "tls",
    ),
}


@pytest.mark.parametrize("name", list(AUTH_REFUSALS))
async def test_a_login_refusal_during_the_transaction_stops_the_run(name: str) -> None:
    """Today each recipient is `failed` with the 530 (a whole campaign lost to a missing login)."""
    replies, hint = AUTH_REFUSALS[name]
    results: dict[int, Result] = {}
    async with RawSmtp({k: list(v) for k, v in replies.items()}) as server:
        with pytest.raises(TransportFatalError) as info:
            await run_raw(server, 3, results)
    text = str(info.value)
    assert hint in text and replies[next(iter(replies))][0].decode().split()[0] in text, text  # type: ignore[union-attr]
    assert results == {}  # no recipient failed: the rows go back to pending
    assert server.payloads == []
    assert sum(c.startswith("MAIL") for c in server.commands) == 1  # stopped at the first
    assert server.quits == 1  # the connection was closed politely


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_send_without_a_login_the_server_requires_exits_1_and_leaves_rows_pending(tmp_path: Path) -> None:
    """aiosmtpd with ``auth_required``: ``530 5.7.0 Authentication required`` to MAIL FROM."""
    handler = FaultyHandler()
    with SmtpServer(handler, auth_required=True, auth_require_tls=False) as server:
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
        env = plain(MAILER_SMTP_HOST=server.host, MAILER_SMTP_PORT=str(server.port))
        code, out = send(cfg, env)
    assert code == 1, out
    assert "530" in out and "MAILER_SMTP_USER" in out and "Traceback" not in out
    assert statuses(cfg) == {"pending": 2}
    assert handler.received == []


# --- 2. STARTTLS configured, not offered --------------------------------------------------------


async def test_starttls_not_offered_stops_at_once_and_sends_nothing_in_clear() -> None:
    """aiosmtplib raises a bare SMTPException, which today was taken for "unreachable": every
    mail deferred, retried for hours, and the organiser never told why."""
    results: dict[int, Result] = {}
    async with RawSmtp() as server:  # its EHLO offers no STARTTLS
        with pytest.raises(TransportFatalError, match="does not offer STARTTLS") as info:
            await run_raw(server, 3, results, tls="starttls")
    assert "MAILER_SMTP_TLS" in str(info.value)
    assert results == {}
    assert not any(c.split(" ")[0].upper() in {"MAIL", "AUTH", "RCPT", "DATA"} for c in server.commands)
    assert server.connections == 1


def test_send_to_a_server_without_starttls_exits_1_rows_pending(tmp_path: Path) -> None:
    handler = FaultyHandler()
    with SmtpServer(handler) as server:  # no TLS context: no STARTTLS offered
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
        env = plain(
            MAILER_SMTP_HOST=server.host, MAILER_SMTP_PORT=str(server.port), MAILER_SMTP_TLS="starttls"
        )
        code, out = send(cfg, env)
    assert code == 1, out
    assert "does not offer STARTTLS" in out and "unreachable" not in out and "Traceback" not in out
    assert statuses(cfg) == {"pending": 2}
    assert handler.received == []


async def test_a_login_to_a_server_that_offers_no_auth_stops_the_run() -> None:
    """A login is configured and the server offers no AUTH: today deferred as unreachable."""
    results: dict[int, Result] = {}
    async with RawSmtp() as server:
        with pytest.raises(TransportFatalError, match="does not offer AUTH"):
            await run_raw(server, 2, results, username="u", password="p")
    assert results == {} and server.payloads == []


# --- 3. Nobody there: one clear line, rows deferred, exit 1 -------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket that never answers (the kernel completes the handshake)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def unreachable_campaign(tmp_path: Path, timeout: float = 30) -> Path:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    cfg.write_text(
        cfg.read_text().replace("smtp: {connections: 2}", f"smtp: {{connections: 2, timeout: {timeout}}}")
    )
    return cfg


def assert_deferred(cfg: Path, text: str) -> None:
    got = rows(cfg)
    assert [r["status"] for r in got] == ["deferred", "deferred"], got
    assert all(r["next_attempt"] and text in (r["smtp_text"] or "") for r in got), got


@pytest.mark.parametrize(("verb", "outcome"), [("RCPT", Attempt.DEFERRED), (".", Attempt.UNKNOWN)])
async def test_a_timeout_in_a_transaction_says_so(verb: str, outcome: Attempt) -> None:
    """The row's text read `CancelledError` (the root of aiosmtplib's timeout error)."""
    results: dict[int, Result] = {}
    async with RawSmtp({verb: [SILENT]}) as server:
        await run_raw(server, 1, results, timeout=0.3)
    assert results[0].outcome is outcome
    assert results[0].text.endswith(": no answer in 0.3 s"), results[0]


def test_a_refused_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    cfg = unreachable_campaign(tmp_path)
    code, out = send(cfg, plain(MAILER_SMTP_HOST="127.0.0.1", MAILER_SMTP_PORT=str(port)))
    assert code == 1, out
    line = f"could not reach 127.0.0.1:{port}: connection refused; 2 mail(s) deferred to Thu 2018-01-04"
    assert line in out, out
    assert "Errno" not in out and "Traceback" not in out
    assert_deferred(cfg, f"could not reach 127.0.0.1:{port}: connection refused")


def test_a_server_that_never_answers_gives_up_after_the_timeout(tmp_path: Path, silent_port: int) -> None:
    cfg = unreachable_campaign(tmp_path, timeout=0.4)
    t0 = time.monotonic()
    code, out = send(cfg, plain(MAILER_SMTP_HOST="127.0.0.1", MAILER_SMTP_PORT=str(silent_port)))
    elapsed = time.monotonic() - t0
    assert code == 1, out
    assert f"no answer from 127.0.0.1:{silent_port} in 0.4 s; 2 mail(s) deferred to" in out, out
    assert "CancelledError" not in out and "TimeoutError" not in out and "Traceback" not in out
    assert_deferred(cfg, f"no answer from 127.0.0.1:{silent_port} in 0.4 s")
    assert elapsed < 3, elapsed  # one timeout, not one per mail


def test_an_unknown_host_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = unreachable_campaign(tmp_path)
    code, out = send(cfg, plain(MAILER_SMTP_HOST="nonexistent.invalid", MAILER_SMTP_PORT="2525"))
    assert code == 1, out
    assert "could not reach nonexistent.invalid:2525: unknown host (DNS: " in out, out
    assert "2 mail(s) deferred to" in out and "Traceback" not in out
    assert_deferred(cfg, "unknown host")


def test_the_cli_in_a_subprocess_says_one_line_for_a_refused_port(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    port = free_port()
    cfg = unreachable_campaign(tmp_path)
    env = os.environ | plain(MAILER_SMTP_HOST="127.0.0.1", MAILER_SMTP_PORT=str(port))
    p = subprocess.run(
        [sys.executable, "-m", "mailer", "send", "--config", str(cfg), "--now", "2018-01-04T10:00"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"could not reach 127.0.0.1:{port}: connection refused; 2 mail(s) deferred" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr


# --- 4. tls: none with a login to another machine -----------------------------------------------


def test_a_plaintext_login_to_another_host_is_refused_before_connecting(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    env = plain(
        MAILER_SMTP_HOST="192.0.2.1",  # TEST-NET-1: nothing answers there, and nothing may be tried
        MAILER_SMTP_PORT="25",
        MAILER_SMTP_USER="organiser",
        MAILER_SMTP_PASSWORD="secret",
    )
    t0 = time.monotonic()
    code, out = send(cfg, env)
    assert code == 1, out
    assert "smtp.allow_plaintext_login" in out and "secret" not in out and "Traceback" not in out
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "ledger.db").exists() or statuses(cfg) == {}


def settings_for(tmp_path: Path, host: str, extra: str = "") -> TransportSettings:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    if extra:
        cfg.write_text(
            cfg.read_text().replace("smtp: {connections: 2}", f"smtp: {{connections: 2, {extra}}}")
        )
    c = load_campaign(cfg)
    env = {
        "MAILER_SMTP_HOST": host,
        "MAILER_SMTP_TLS": "none",
        "MAILER_SMTP_USER": "u",
        "MAILER_SMTP_PASSWORD": "p",
    }
    return TransportSettings.from_config(c.smtp, env)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1", "LOCALHOST"])
def test_a_plaintext_login_to_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    assert settings_for(tmp_path, host).username == "u"


@pytest.mark.parametrize("host", ["smtp.example.org", "10.0.0.5", "localhost.example.org"])
def test_a_plaintext_login_elsewhere_needs_the_setting(tmp_path: Path, host: str) -> None:
    with pytest.raises(TransportFatalError, match="allow_plaintext_login"):
        settings_for(tmp_path, host)
    assert settings_for(tmp_path, host, "allow_plaintext_login: true").username == "u"


def test_allow_plaintext_login_is_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_plaintext_login"):
        settings_for(tmp_path, "localhost", "allow_plaintext_login: perhaps")

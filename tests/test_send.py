"""Sending over real SMTP (aiosmtpd on 127.0.0.1) into a real ledger file: idempotency,
server-side faults, TLS and login failures, crashes (SIGKILL) and two senders at once."""

from __future__ import annotations

import collections
import email
import email.policy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner
from conftest import FaultyHandler, write_campaign
from interop import check_message

from mailer.cli import cli
from mailer.ledger import Ledger
from mailer.smtpd import MaildirHandler, SmtpServer

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
- {id: remind, event: ev, template: remind, at: -1d 09:00}
"""


def contacts(n: int) -> str:
    return "email,name,lists\n" + "".join(f"p{i:04d}@example.org,Person {i},a\n" for i in range(n))


def send(cfg: Path, now: str, env: dict[str, str], *extra: str) -> tuple[int, str]:
    r = CliRunner().invoke(
        cli, ["send", "--config", str(cfg), "--now", now, *extra], env=env, catch_exceptions=False
    )
    return r.exit_code, r.output


def rows(cfg: Path) -> dict[tuple[str, str], dict[str, Any]]:
    with Ledger(cfg.parent / "ledger.db") as led:
        return {(r["step"], r["email"]): r for r in led.log()}


def faulty(server: SmtpServer) -> FaultyHandler:
    """The handler of conftest's ``smtp_server``, which is always a FaultyHandler."""
    assert isinstance(server.handler, FaultyHandler)
    return server.handler


def ids(handler: MaildirHandler) -> list[str]:
    return [
        email.message_from_bytes(r.data, policy=email.policy.default)["Message-ID"] for r in handler.received
    ]


def test_send_once_then_nothing(tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 0, out
    assert "sent 2" in out
    handler = smtp_server.handler
    assert sorted(r.rcpt_tos[0] for r in handler.received) == ["ann@example.org", "bob@example.org"]
    for r in handler.received:
        check_message(r.data, expect_method="REQUEST")
        assert r.mail_from == "events@example.org"
    # a second pass, later the same day, sends nothing
    code, out = send(cfg, "2018-01-04T12:00", smtp_env)
    assert code == 0 and "0 due" in out
    assert len(handler.received) == 2
    # ledger agrees with the server
    led = rows(cfg)
    assert {k: r["status"] for k, r in led.items()} == {
        ("invite", "ann@example.org"): "sent",
        ("invite", "bob@example.org"): "sent",
    }
    assert {r["message_id"] for r in led.values()} == set(ids(handler))
    # the reminder at its time, without a calendar
    code, out = send(cfg, "2018-01-21T09:00", smtp_env)
    assert code == 0 and "sent 2" in out
    for r in handler.received[2:]:
        check_message(r.data, expect_method=None)


def test_faults_each_outcome(tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]) -> None:
    handler = smtp_server.handler
    assert isinstance(handler, FaultyHandler)
    handler.rcpt_replies = {
        "p0001@example.org": "550 5.1.1 <p0001@example.org>: Recipient address rejected",
        "p0002@example.org": "450 4.2.0 mailbox busy",
        "p0003@example.org": "451 4.7.1 greylisted, come back later",
    }
    handler.data_replies = ["421 4.3.2 too many connections, slow down"]
    handler.drop_in_data = 1
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts(12))
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 0, out
    led = rows(cfg)
    st = collections.Counter(r["status"] for r in led.values())
    # 550 failed; 450, 451 and the 421 deferred; the connection dropped once the payload was on
    # the wire leaves its mail's outcome unknown: still `sending`, sent again, identical, later
    assert st == {"sent": 7, "failed": 1, "deferred": 3, "sending": 1}, led
    dropped = next(r for r in led.values() if r["status"] == "sending")
    assert dropped["attempts"] == 1 and dropped["next_attempt"] > "2018-01-04T09:00:00Z"
    failed = led[("invite", "p0001@example.org")]
    assert failed["smtp_code"] == 550 and "Recipient address rejected" in failed["smtp_text"]
    busy = led[("invite", "p0002@example.org")]
    assert busy["smtp_code"] == 450 and busy["next_attempt"] > "2018-01-04T09:00:00Z"
    assert any("connection lost" in (r["smtp_text"] or "") for r in led.values())
    assert any(r["smtp_code"] == 421 for r in led.values())
    # log, export and the server agree
    r = CliRunner().invoke(cli, ["log", "--config", str(cfg), "--status", "failed"])
    assert "p0001@example.org" in r.output and "550" in r.output
    out_csv = tmp_path / "failed.csv"
    r = CliRunner().invoke(cli, ["export", "--config", str(cfg), "-o", str(out_csv)])
    assert r.exit_code == 0
    assert out_csv.read_text().splitlines()[1].startswith("p0001@example.org,")
    delivered = {r.rcpt_tos[0] for r in handler.received}
    assert delivered == {e for (_, e), r in led.items() if r["status"] == "sent"}

    # the server recovers; retries go out once their time has come, the 550 does not
    handler.rcpt_replies = {"p0001@example.org": handler.rcpt_replies["p0001@example.org"]}
    code, out = send(cfg, "2018-01-04T10:00:30", smtp_env)
    assert "0 due" in out  # backoff: not yet
    code, out = send(cfg, "2018-01-04T11:00", smtp_env)
    assert code == 0 and "sent 4" in out, out
    led = rows(cfg)
    assert collections.Counter(r["status"] for r in led.values()) == {"sent": 11, "failed": 1}
    # the exported failed list is a contact list mailer accepts
    from mailer.contacts import load_contacts

    assert [c.email for c in load_contacts([out_csv]).contacts] == ["p0001@example.org"]
    # mailer retry makes the failed one due again
    r = CliRunner().invoke(cli, ["retry", "--config", str(cfg)])
    assert "1 failed delivery" in r.output
    code, out = send(cfg, "2018-01-04T11:05", smtp_env)
    assert "failed 1" in out
    # every Message-ID the server got, it got once (no crash here)
    assert len(ids(handler)) == len(set(ids(handler)))


def test_slow_server_times_out_and_the_outcome_is_unknown(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """No reply to the final dot within the timeout: the server may have stored the mail (this
    one does, late). The row stays `sending` and goes again, identical, at its next attempt."""
    faulty(smtp_server).data_delay = 2.0
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, extra="delivery: {retry_base: 1m}\n")
    cfg.write_text(cfg.read_text().replace("smtp: {connections: 2}", "smtp: {connections: 2, timeout: 0.5}"))
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 0, out
    first = rows(cfg)
    assert {r["status"] for r in first.values()} == {"sending"}
    assert all(r["attempts"] == 1 and r["next_attempt"] for r in first.values())
    faulty(smtp_server).data_delay = 0.0
    code, out = send(cfg, "2018-01-04T11:00", smtp_env)
    assert code == 0 and "sent 2" in out, out
    again = rows(cfg)
    assert {r["status"] for r in again.values()} == {"sent"}
    assert {k: r["message_id"] for k, r in again.items()} == {k: r["message_id"] for k, r in first.items()}


def test_tls_verified_and_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    from aiosmtpd.smtp import AuthResult, LoginPassword

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"right-secret"
        # an explicit reply: this aiosmtpd version sends none for a bare failed AuthResult
        return AuthResult(
            success=ok,
            handled=False,
            message=None if ok else "535 5.7.8 Authentication credentials invalid",
        )

    handler = FaultyHandler()
    with SmtpServer(
        handler,
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    ) as server:
        cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
        env = {
            "MAILER_SMTP_HOST": "localhost",
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "starttls",
            "MAILER_SMTP_USER": "mailer",
            "MAILER_SMTP_PASSWORD": "wrong-secret",
        }
        # 1. certificate not trusted: stop, nothing sent, nothing marked sent
        code, out = send(cfg, "2018-01-04T10:00", env)
        assert code == 1 and "TLS failed" in out and "Traceback" not in out
        assert handler.received == []
        assert {r["status"] for r in rows(cfg).values()} == {"pending"}
        # 2. trusted CA, wrong password: stop with a clear message; the password is never shown
        env["MAILER_SMTP_CA_FILE"] = str(ca_file)
        code, out = send(cfg, "2018-01-04T10:00", env)
        assert code == 1 and "login refused" in out and "wrong-secret" not in out
        assert {r["status"] for r in rows(cfg).values()} == {"pending"}
        # 3. right password: delivered over verified TLS
        env["MAILER_SMTP_PASSWORD"] = "right-secret"
        code, out = send(cfg, "2018-01-04T10:00", env)
        assert code == 0 and "sent 2" in out, out
        assert len(handler.received) == 2


def _sender_cmd(cfg: Path, now: str) -> list[str]:
    return [sys.executable, "-m", "mailer", "send", "--config", str(cfg), "--now", now]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 9, 23])
def test_crash_then_restart_sends_everything_once(
    kill_after: int, tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    handler = faulty(smtp_server)
    handler.data_delay = 0.03
    n = 40
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts(n))
    env = {**os.environ, **smtp_env}
    proc = subprocess.Popen(
        _sender_cmd(cfg, "2018-01-04T10:00"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while len(handler.received) < kill_after and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got_before = len(handler.received)
    assert got_before < n, "the crash must happen mid-run"
    with Ledger(cfg.parent / "ledger.db") as led:
        sending = [r["message_id"] for r in led.log(status="sending")]
    # restart: everything due is delivered
    done = subprocess.run(
        _sender_cmd(cfg, "2018-01-04T10:00"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    received = ids(handler)
    counts = collections.Counter(received)
    assert len(counts) == n, "every due mail arrived"
    dupes = [m for m, k in counts.items() if k > 1]
    # only a mail in flight at the crash repeats: at most one per connection, it was left
    # 'sending', and the copy is byte-identical (same Message-ID, Date, UID, DTSTAMP)
    assert len(dupes) <= 2
    for m in dupes:
        assert m in sending
        copies = [r.data for r in handler.received if f"Message-ID: {m}".encode() in r.data]
        assert len(set(copies)) == 1
    assert {r["status"] for r in rows(cfg).values()} == {"sent"}


@pytest.mark.slow
def test_two_senders_at_once_never_duplicate(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    faulty(smtp_server).data_delay = 0.01
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts(30))
    env = {**os.environ, **smtp_env}
    a = subprocess.Popen(
        _sender_cmd(cfg, "2018-01-04T10:00"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    b = subprocess.Popen(
        _sender_cmd(cfg, "2018-01-04T10:00"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outs = [p.communicate(timeout=60) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    received = ids(smtp_server.handler)
    assert len(received) == len(set(received)) == 30
    if codes == [0, 1]:
        assert any("in use by another mailer process" in o[1] for o in outs)
    else:  # the first finished before the second started: the second found nothing due
        assert codes == [0, 0]


def test_retries_run_out_then_failed_with_the_reason(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    faulty(smtp_server).rcpt_replies = {"ann@example.org": "450 4.2.1 mailbox temporarily unavailable"}
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, extra="delivery: {max_attempts: 2}\n")
    send(cfg, "2018-01-04T10:00", smtp_env)
    assert rows(cfg)[("invite", "ann@example.org")]["status"] == "deferred"
    code, out = send(cfg, "2018-01-04T12:00", smtp_env)
    assert "failed 1" in out
    row = rows(cfg)[("invite", "ann@example.org")]
    assert (row["status"], row["attempts"], row["reason"]) == ("failed", 2, "gave up after 2 attempts")
    assert "temporarily unavailable" in row["smtp_text"]
    assert rows(cfg)[("invite", "bob@example.org")]["status"] == "sent"


def test_a_mail_that_cannot_be_built_holds_its_whole_step(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """A template that needs a column one contact lacks: the render gate holds the whole step
    (nothing sent, nothing recorded as failed), names the template's file:line and the contact's
    file:row, and exits 1; after the fix every mail goes (issue 12: nothing half-sent)."""
    templates = {**__import__("conftest").SIMPLE_TEMPLATES, "invite/en/body.txt": "For {{ contact.org }}\n"}
    cfg = write_campaign(
        tmp_path,
        events=EVENTS,
        steps=STEPS,
        templates=templates,
        contacts="email,name,lists,org\nann@example.org,Ann,a,ACME\nbob@example.org,Bob,a,\n",
    )
    (tmp_path / "contacts" / "more.csv").write_text("email,name,lists\ncy@example.org,Cy,a\n")
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 1, out
    assert "invite/en/body.txt:1" in out and "more.csv:row 2" in out and "Traceback" not in out
    assert smtp_server.handler.received == []
    assert "failed" not in {r["status"] for r in rows(cfg).values()}
    (tmp_path / "templates" / "invite" / "en" / "body.txt").write_text("For {{ contact.get('org', '') }}\n")
    code, out = send(cfg, "2018-01-04T10:05", smtp_env)
    assert code == 0, out
    assert {r["status"] for r in rows(cfg).values()} == {"sent"} and len(smtp_server.handler.received) == 3


@pytest.mark.slow
def test_large_pass_composes_in_a_worker_with_identical_bytes(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """From WORKER_MIN mails on, a second process composes; its bytes equal inline ones."""
    from mailer import runner
    from mailer.compose import Composer
    from mailer.times import parse_iso
    from mailer.workspace import load_workspace

    n = runner.WORKER_MIN + 50
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=contacts(n))
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 0 and f"sent {n}" in out, out
    received = smtp_server.handler.received
    assert len(received) == n and len(set(ids(smtp_server.handler))) == n
    ws = load_workspace(cfg)
    inline = Composer(ws.campaign, ws.templates)
    led = rows(cfg)
    by_rcpt = {r.rcpt_tos[0]: r.data for r in received}
    for c in ws.contacts[:: n // 25]:
        row = led[("invite", c.email)]
        step = ws.campaign.step("invite")
        expected = inline.compose_due(
            step, ws.campaign.event("ev"), c, when=parse_iso(row["claimed_at"]), sequence=0
        )
        assert by_rcpt[c.email] == expected.data
        check_message(by_rcpt[c.email], expect_method="REQUEST")


def test_an_address_beyond_ascii_goes_out_with_smtputf8(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    """RFC 6531/6532: a local part in UTF-8 travels with SMTPUTF8 and stays UTF-8 in To:."""
    people = "email,name,lists\njörg.müller@example.org,Jörg Müller,a\nann@example.org,Ann,a\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=people)
    code, out = send(cfg, "2018-01-04T10:00", smtp_env)
    assert code == 0 and "sent 2" in out, out
    handler = smtp_server.handler
    assert isinstance(handler, FaultyHandler)
    got = {r.rcpt_tos[0]: r for r in handler.received}
    assert set(got) == {"jörg.müller@example.org", "ann@example.org"}
    # RFC 6532 headers are UTF-8: read them as text (the bytes parser would surrogate-escape them)
    data = got["jörg.müller@example.org"].data.decode("utf-8")
    msg = email.message_from_string(data, policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "jörg.müller@example.org"
    assert rows(cfg)[("invite", "jörg.müller@example.org")]["status"] == "sent"

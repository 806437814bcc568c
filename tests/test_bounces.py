"""The envelope sender per delivery (VERP) and the unsubscribe-by-mail token (issue 15): the
tokens on their own, then on the wire (aiosmtpd sees each delivery's MAIL FROM) and in the
List-Unsubscribe header of composed mails."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner
from conftest import FaultyHandler, write_campaign

from mailer.bounces import (
    TAG_CHARS,
    delivery_of,
    envelope_sender,
    unsubscribe_token,
    unsubscribed_address,
)
from mailer.cli import cli
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer

SECRET = "a-long-random-secret-for-the-tests"
BOUNCES = "bounces@example.org"


# -- the envelope token ---------------------------------------------------------------------


@pytest.mark.parametrize("delivery_id", [0, 1, 35, 36, 1234, 2**31, 10**12])
def test_envelope_sender_round_trips_in_any_case(delivery_id: int) -> None:
    addr = envelope_sender(BOUNCES, SECRET, delivery_id)
    local, _, domain = addr.partition("@")
    assert domain == "example.org" and local.startswith("bounces+")
    assert len(local) <= 64 and local == local.lower()  # RFC 5321 4.5.3.1.1; relays fold case
    assert delivery_of(BOUNCES, SECRET, addr) == delivery_id
    assert delivery_of(BOUNCES, SECRET, addr.upper()) == delivery_id
    assert delivery_of(BOUNCES, SECRET, f"<{addr}>") == delivery_id
    assert delivery_of("Bounces@Example.ORG", SECRET, addr) == delivery_id


def test_envelope_sender_is_a_function_of_the_row() -> None:
    assert envelope_sender(BOUNCES, SECRET, 7) == envelope_sender(BOUNCES, SECRET, 7)
    assert envelope_sender(BOUNCES, SECRET, 7) != envelope_sender(BOUNCES, SECRET, 8)


def flip(ch: str) -> str:
    return "b" if ch != "b" else "c"


def test_delivery_of_refuses_what_we_did_not_sign() -> None:
    addr = envelope_sender(BOUNCES, SECRET, 1234)
    local, _, domain = addr.partition("@")
    token = local.removeprefix("bounces+")
    forged = [
        envelope_sender(BOUNCES, "another campaign's secret", 1234),  # another secret
        f"bounces+{flip(token[0])}{token[1:]}@{domain}",  # another id, same tag
        f"bounces+{token[:-1]}{flip(token[-1])}@{domain}",  # an altered tag
        f"bounces+{token[:-1]}@{domain}",  # truncated
        f"bounces+0{token}@{domain}",  # the same id spelled with a leading zero
        f"bounces+{token}@example.net",  # another domain
        f"other+{token}@{domain}",  # another local part
        BOUNCES,  # no token
        "bounces+@example.org",
        "bounces+" + "z" * 200 + "@example.org",
        "bounces+yä3gx7hirupvma@example.org",
        "not an address",
        "",
    ]
    for bad in forged:
        assert delivery_of(BOUNCES, SECRET, bad) is None, bad
    assert delivery_of(BOUNCES, "", addr) is None
    assert len(token) == len("ya") + TAG_CHARS


# -- the unsubscribe token ------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    ["unsubscribe {t}", "Re: unsubscribe {t}", "RE: Fwd: unsubscribe  {t} ", "unsubscribe\r\n {t}"],
)
def test_unsubscribed_address_finds_the_token_in_a_reply_subject(subject: str) -> None:
    t = unsubscribe_token(SECRET, "camp", "Jan.Peeters@Example.BE")
    assert unsubscribed_address(SECRET, "camp", subject.format(t=t)) == "jan.peeters@example.be"


def test_unsubscribed_address_refuses_forged_and_foreign_tokens() -> None:
    t = unsubscribe_token(SECRET, "camp", "jan@example.be")
    assert unsubscribed_address(SECRET, "other-campaign", f"unsubscribe {t}") is None
    assert unsubscribed_address("another secret", "camp", f"unsubscribe {t}") is None
    assert unsubscribed_address(SECRET, "camp", f"unsubscribe {t[:-1]}") is None
    assert unsubscribed_address(SECRET, "camp", f"unsubscribe {t[:-1]}{flip(t[-1])}") is None
    assert unsubscribed_address(SECRET, "camp", "unsubscribe") is None
    assert unsubscribed_address(SECRET, "camp", "unsubscribe jan@example.be") is None
    assert unsubscribed_address("", "camp", f"unsubscribe {t}") is None


# -- on the wire: MAIL FROM per delivery -----------------------------------------------------

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
"""


def campaign(folder: Path, extra: str = "") -> Path:
    cfg = write_campaign(folder, events=EVENTS, steps=STEPS, extra=extra)
    text = cfg.read_text().replace(
        "sender: {from: events@example.org, name: Events Team}",
        f"sender: {{from: events@example.org, name: Events Team, bounces: {BOUNCES}}}",
    )
    cfg.write_text(text.replace("smtp: {connections: 2}", "smtp: {connections: 2, timeout: 0.5}"))
    return cfg


def send(cfg: Path, now: str, env: dict[str, str]) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", now], env=env)
    return r.exit_code, r.output


def row_ids(cfg: Path) -> dict[str, int]:
    with Ledger(cfg.parent / "ledger.db") as led:
        return {r["email"]: r["id"] for r in led.log()}


@dataclass
class MailFromHandler(FaultyHandler):
    """Records each transaction's MAIL FROM and RCPT TO, also of mails whose DATA never ends."""

    transactions: list[tuple[str, str]] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        self.transactions.append((envelope.mail_from or "", address))
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.mark.slow
def test_each_delivery_has_its_own_envelope_sender_and_keeps_it_on_a_resend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers the final dot too late: the outcome is unknown, the row stays
    ``sending`` and goes again at its next attempt, as after a crash; the copy has the same
    MAIL FROM, which names that delivery's ledger row."""
    handler = MailFromHandler(data_delay=2.0)
    with SmtpServer(handler) as server:
        cfg = campaign(tmp_path, extra="delivery: {retry_base: 1m}\n")
        env = {
            "MAILER_SMTP_HOST": server.host,
            "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_TLS": "none",
            "MAILER_WEB_SECRET": SECRET,
        }
        assert send(cfg, "2018-01-04T10:00", env)[0] == 0
        handler.data_delay = 0.0
        code, out = send(cfg, "2018-01-04T11:00", env)
    assert code == 0 and "sent 2" in out, out
    by_rcpt: dict[str, set[str]] = {}
    for mail_from, rcpt in handler.transactions:
        by_rcpt.setdefault(rcpt, set()).add(mail_from)
    assert len(handler.transactions) == 4 and set(by_rcpt) == {"ann@example.org", "bob@example.org"}
    assert {r.mail_from for r in handler.received} == by_rcpt["ann@example.org"] | by_rcpt["bob@example.org"]
    ids = row_ids(cfg)
    for rcpt, senders in by_rcpt.items():
        assert len(senders) == 1, "the re-send keeps its envelope sender"
        (mail_from,) = senders
        assert re.fullmatch(r"bounces\+[0-9a-z]+@example\.org", mail_from)
        assert delivery_of(BOUNCES, SECRET, mail_from) == ids[rcpt]
    assert by_rcpt["ann@example.org"] != by_rcpt["bob@example.org"]


def test_without_bounces_the_envelope_sender_is_the_from_address(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS)
    assert send(cfg, "2018-01-04T10:00", {**smtp_env, "MAILER_WEB_SECRET": SECRET})[0] == 0
    assert {r.mail_from for r in smtp_server.handler.received} == {"events@example.org"}


def test_bounces_without_a_secret_is_refused_with_what_to_do(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = campaign(tmp_path)
    env = {**smtp_env, "MAILER_WEB_SECRET": "", "MAILER_UNSUBSCRIBE_SECRET": ""}
    code, out = send(cfg, "2018-01-04T10:00", env)
    assert code != 0 and "Traceback" not in out
    assert "sender.bounces is set but MAILER_WEB_SECRET" in out, out
    assert smtp_server.handler.received == []


# -- the List-Unsubscribe mailto -------------------------------------------------------------


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def mailto_subject(msg: EmailMessage) -> str | None:
    (mailto,) = [
        u for u in re.findall(r"<([^<>]*)>", str(msg["List-Unsubscribe"])) if u.startswith("mailto:")
    ]
    parts = urlsplit(mailto)
    assert parts.path == "afmelden@example.org"
    query = dict(q.split("=", 1) for q in parts.query.split("&"))
    return unquote(query["subject"])


UNSUB = "unsubscribe: {mailto: afmelden@example.org}\n"


def test_the_mailto_carries_a_token_that_names_the_recipient(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, extra=UNSUB)
    assert send(cfg, "2018-01-04T10:00", {**smtp_env, "MAILER_WEB_SECRET": SECRET})[0] == 0
    seen = {}
    for r in smtp_server.handler.received:
        subject = mailto_subject(parse(r.data))
        assert subject is not None and subject.startswith("unsubscribe ")
        # what a mail client sends back, as a reply or as a new mail
        assert unsubscribed_address(SECRET, "test", f"Re: {subject}") == r.rcpt_tos[0]
        assert unsubscribed_address(SECRET, "test", subject) == r.rcpt_tos[0]
        seen[r.rcpt_tos[0]] = subject
    assert len(seen) == 2 and len(set(seen.values())) == 2


def test_without_a_secret_the_mailto_has_no_token(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, extra=UNSUB)
    env = {**smtp_env, "MAILER_WEB_SECRET": "", "MAILER_UNSUBSCRIBE_SECRET": ""}
    assert send(cfg, "2018-01-04T10:00", env)[0] == 0
    assert smtp_server.handler.received
    for r in smtp_server.handler.received:
        assert parse(r.data)["List-Unsubscribe"] == "<mailto:afmelden@example.org?subject=unsubscribe>"

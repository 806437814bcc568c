"""DKIM (issue 15): every mail of the shipped campaign, sent over real SMTP, verifies with dkimpy
against the key `mailer dkim keygen` printed (through a DNS stub), on the first send and on a
crash re-send; the signed headers; the keys a send or check refuses."""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from click.testing import CliRunner

from mailer import dkim
from mailer.cli import cli
from mailer.config import load
from mailer.errors import ConfigError
from mailer.smtpd import MaildirHandler, SmtpServer

SECRET = "s" * 40


@dataclass
class LateReply(MaildirHandler):
    """Stores the mail, then answers the final dot ``delay`` seconds late: past the client's
    timeout, the outcome is unknown to the sender (as when it crashes before reading it)."""

    delay: float = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return reply


def keygen(folder: Path, selector: str, *extra: str) -> tuple[str, str]:
    """`mailer dkim keygen`: the (name, joined value) of the TXT record it prints."""
    r = CliRunner().invoke(
        cli,
        ["dkim", "keygen", "--selector", selector, "--domain", "example.be", *extra],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if " IN TXT " in x)
    name, _, strings = line.partition(" IN TXT ")
    parts = re.findall(r'"([^"]*)"', strings)
    assert all(len(p) <= 255 for p in parts) and "dkim:" in r.output
    return name, "".join(parts)


def dns_stub(records: dict[str, str]) -> dkim.DnsFunc:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        found = records.get(name.decode().rstrip("."))
        return found.encode() if found else None

    return lookup


@pytest.fixture
def signed(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dkim.DnsFunc]:
    """The shipped campaign with both keys made by keygen, a web.url (so the one-click
    List-Unsubscribe headers are there) and a short SMTP timeout."""
    rsa = keygen(shipped, "mailer2026", "--out", "dkim.key")
    ed = keygen(shipped, "ed2026", "--ed25519", "--out", "dkim-ed.key")
    assert (shipped / "dkim.key").stat().st_mode & 0o777 == 0o600
    cfg = shipped / "schedules.yaml"
    text = cfg.read_text(encoding="utf-8").replace("rate: 10/s", "timeout: 0.5")
    cfg.write_text(
        text
        + "\nweb: {url: https://rsvp.example.be}\n"
        + "dkim: {selector: mailer2026, key_file: dkim.key, ed25519_selector: ed2026, "
        + "ed25519_key_file: dkim-ed.key}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MAILER_WEB_SECRET", SECRET)
    return cfg, dns_stub(dict([rsa, ed]))


def send(cfg: Path, server: SmtpServer, now: str, *extra: str) -> str:
    env = {"MAILER_SMTP_HOST": server.host, "MAILER_SMTP_PORT": str(server.port), "MAILER_SMTP_TLS": "none"}
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", now, *extra], env=env)
    assert r.exit_code == 0, r.output
    return r.output


def verify_both(data: bytes, dnsfunc: dkim.DnsFunc) -> list[dict[bytes, bytes]]:
    """Each DKIM-Signature of ``data`` verified by dkimpy; their tags."""
    d = dkimpy.DKIM(data)
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    assert len(sigs) == 2
    tags = []
    for i in range(2):
        assert d.verify(idx=i, dnsfunc=dnsfunc), f"signature {i} does not verify"
        tags.append(dict(d.signature_fields))
    return tags


@pytest.mark.slow
def test_every_shipped_mail_verifies_first_send_and_crash_resend(signed: tuple[Path, dkim.DnsFunc]) -> None:
    cfg, dnsfunc = signed
    handler = LateReply(delay=1.0)
    with SmtpServer(handler) as server:
        # The server keeps the first two mails but the client gives up waiting for the reply:
        # their outcome is unknown, the rows stay `sending`, the next pass sends them again.
        send(cfg, server, "2018-01-04T10:00", "--limit", "2")
        handler.delay = 0.0
        out = send(cfg, server, "2018-01-04T10:05")
    assert "re-sending 2" in out, out
    copies: dict[str, list[bytes]] = collections.defaultdict(list)
    for r in handler.received:
        msg = email.message_from_bytes(r.data, policy=email.policy.default)
        copies[msg["Message-ID"]].append(r.data)
        tags = verify_both(r.data, dnsfunc)
        assert {t[b"a"] for t in tags} == {b"rsa-sha256", b"ed25519-sha256"}
        for t in tags:
            assert t[b"d"] == b"example.be" and t[b"c"] == b"relaxed/relaxed"
            # t= is the claimed row's time (the Date header), never the clock
            assert int(t[b"t"]) == int(email.utils.parsedate_to_datetime(msg["Date"]).timestamp())
            h = [x.strip() for x in t[b"h"].split(b":")]
            assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            for name in (b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe"):
                assert h.count(name) == 2, name  # signed, and over-signed against an added copy
            assert {b"content-type", b"mime-version", b"list-unsubscribe-post"} <= set(h)
    assert len(copies) >= 14
    twice = [m for m, c in copies.items() if len(c) == 2]
    assert len(twice) == 2 and all(len(c) <= 2 for c in copies.values())
    assert all(len(set(copies[m])) == 1 for m in twice), "a re-sent copy is byte-identical"


def test_world_readable_key_is_refused_by_check_and_send(
    signed: tuple[Path, dkim.DnsFunc], smtp_server: SmtpServer
) -> None:
    cfg, _ = signed
    (cfg.parent / "dkim.key").chmod(0o644)
    r = CliRunner().invoke(cli, ["check", "--config", str(cfg)])
    assert r.exit_code == 1 and "chmod 600" in r.output and "dkim.key" in r.output, r.output
    assert "Traceback" not in r.output
    env = {
        "MAILER_SMTP_HOST": smtp_server.host,
        "MAILER_SMTP_PORT": str(smtp_server.port),
        "MAILER_SMTP_TLS": "none",
    }
    r = CliRunner().invoke(cli, ["send", "--config", str(cfg), "--now", "2018-01-04T10:00"], env=env)
    assert r.exit_code == 1 and "chmod 600" in r.output and "dkim.key" in r.output, r.output
    assert smtp_server.handler.received == []


def test_check_loads_the_key_and_compares_dns(signed: tuple[Path, dkim.DnsFunc]) -> None:
    cfg, dnsfunc = signed
    c = load(cfg)
    lines = dkim.check_dkim(c, {}, dns=True, dnsfunc=dnsfunc)
    assert [x.ok for x in lines] == [True] * 4, lines
    other = dns_stub({})
    lines = dkim.check_dkim(c, {}, dns=True, dnsfunc=other)
    assert [x.ok for x in lines] == [True, False, True, False]
    assert "no TXT record at mailer2026._domainkey.example.be" in lines[1].text
    # a key that is not the published one
    (cfg.parent / "dkim.key").unlink()
    keygen(cfg.parent, "mailer2026", "--out", "dkim.key")
    lines = dkim.check_dkim(c, {}, dns=True, dnsfunc=dnsfunc)
    assert not lines[1].ok and "different key" in lines[1].text
    # the key from the environment; a broken one says what to do
    lines = dkim.check_dkim(c, {"MAILER_DKIM_KEY": "not a key"})
    assert not lines[0].ok and "MAILER_DKIM_KEY" in lines[0].text and "keygen" in lines[0].text


def test_unaligned_domain_and_missing_key(tmp_path: Path, shipped: Path) -> None:
    cfg = shipped / "schedules.yaml"
    base = cfg.read_text(encoding="utf-8")
    cfg.write_text(base + "\ndkim: {selector: s1, domain: other.org}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not aligned with the From domain"):
        load(cfg)
    cfg.write_text(base + "\ndkim: {selector: s1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="MAILER_DKIM_KEY"):
        dkim.load_signer(load(cfg), {})


def test_keygen_refuses_to_overwrite(shipped: Path) -> None:
    keygen(shipped, "s1", "--out", "k.key")
    r = CliRunner().invoke(
        cli, ["dkim", "keygen", "--selector", "s1", "--domain", "example.be", "--out", "k.key"]
    )
    assert r.exit_code == 1 and "--force" in r.output


def test_fast_relaxed_body_is_dkimpys() -> None:
    """The signer's own relaxed body canonicalization (a fast path for message.build's bytes)
    gives dkimpy's result whenever it answers, on random bodies of spaces, tabs and line ends."""
    import random

    policy = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    rnd = random.Random(15)
    answered = 0
    for _ in range(20_000):
        body = bytes(rnd.choice(b"ab \t\r\n=.") for _ in range(rnd.randint(0, 30)))
        fast = dkim._relaxed_body(body)
        if fast is not None:
            answered += 1
            assert fast == policy.canonicalize_body(body), body
    assert answered > 100


@pytest.mark.slow
def test_the_composing_worker_signs_the_same_bytes(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """From WORKER_MIN mails on a second process composes (and signs): every mail verifies and
    equals the one an inline signer makes from the same claim."""
    from conftest import write_campaign

    from mailer import runner
    from mailer.compose import Composer
    from mailer.times import parse_iso
    from mailer.workspace import load_workspace

    n = runner.WORKER_MIN + 10
    people = "email,name,lists\n" + "".join(f"p{i:04d}@example.org,Person {i},a\n" for i in range(n))
    key = dkim.keygen("w1", "example.org", tmp_path / "dkim.key")
    cfg = write_campaign(
        tmp_path,
        events="- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30}\n",
        steps="- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n",
        contacts=people,
        extra="dkim: {selector: w1, key_file: dkim.key}\n",
    )
    send(cfg, smtp_server, "2018-01-04T10:00")
    received = {r.rcpt_tos[0]: r.data for r in smtp_server.handler.received}
    assert len(received) == n
    dnsfunc = dns_stub({"w1._domainkey.example.org": dkim.txt_record(key)})
    ws = load_workspace(cfg)
    inline = Composer(ws.campaign, ws.templates, signer=dkim.load_signer(ws.campaign, {}))
    from mailer.ledger import Ledger

    with Ledger(cfg.parent / "ledger.db") as led:
        claimed = {r["email"]: r["claimed_at"] for r in led.log()}
    for c in ws.contacts[:: n // 20]:
        data = received[c.email]
        assert dkimpy.verify(data, dnsfunc=dnsfunc)
        step = ws.campaign.step("invite")
        when = parse_iso(claimed[c.email])
        assert data == inline.compose_due(step, ws.campaign.event("ev"), c, when=when, sequence=0).data

"""DKIM in `mailer preview` and `mailer demo` (issue 15): the previews carry the very signatures a
send would (dkimpy verifies every .eml against the keygen'd keys through a DNS stub); a key that
cannot be loaded still writes the previews and says once why they are unsigned; the demo of a
campaign with `dkim:` signs every mail it delivers."""

from __future__ import annotations

import email
import email.policy
import email.utils
import mailbox
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_dkim import SECRET, dns_stub, keygen, verify_both

from mailer import dkim
from mailer.cli import cli


@pytest.fixture
def signed(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dkim.DnsFunc]:
    """The shipped campaign signing with an RSA and an ed25519 key made by `mailer dkim keygen`,
    and a web.url (the one-click List-Unsubscribe headers, signed too); the DNS stub serves both."""
    rsa = keygen(shipped, "mailer2026", "--out", "dkim.key")
    ed = keygen(shipped, "ed2026", "--ed25519", "--out", "dkim-ed.key")
    cfg = shipped / "schedules.yaml"
    with cfg.open("a", encoding="utf-8") as f:
        f.write(
            "\nweb: {url: https://rsvp.example.be}\n"
            "dkim: {selector: mailer2026, key_file: dkim.key, ed25519_selector: ed2026, "
            "ed25519_key_file: dkim-ed.key}\n"
        )
    monkeypatch.setenv("MAILER_WEB_SECRET", SECRET)
    return cfg, dns_stub(dict([rsa, ed]))


def preview(cfg: Path, out: Path, *extra: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["preview", "--config", str(cfg), "--out", str(out), *extra])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


def test_preview_signs_every_mail_as_a_send_would(signed: tuple[Path, dkim.DnsFunc], tmp_path: Path) -> None:
    cfg, dnsfunc = signed
    code, output = preview(cfg, tmp_path / "out")
    assert code == 0, output
    files = sorted((tmp_path / "out").glob("*/*.eml"))
    assert len(files) >= 14, output
    for f in files:
        data = f.read_bytes()
        msg = email.message_from_bytes(data, policy=email.policy.default)
        for t in verify_both(data, dnsfunc):
            # t= is the preview's time: the Date header (the step's send time), never the clock
            assert int(t[b"t"]) == int(email.utils.parsedate_to_datetime(msg["Date"]).timestamp())
            assert t[b"d"] == b"example.be"
    assert "unsigned" not in output.lower()


def test_preview_without_a_usable_key_writes_unsigned_mails_and_says_why_once(
    signed: tuple[Path, dkim.DnsFunc], tmp_path: Path
) -> None:
    cfg, _ = signed
    (cfg.parent / "dkim.key").chmod(0o644)  # refused by send: open to others
    code, output = preview(cfg, tmp_path / "out", "--step", "uitnodiging-aan-de-slag")
    assert code == 0, output
    files = list((tmp_path / "out").glob("*/*.eml"))
    assert len(files) == 14
    assert all(b"DKIM-Signature" not in f.read_bytes() for f in files)
    # one line, not one per mail, with load_signer's reason (what to do) and the file
    assert output.count("NOT DKIM-signed") == 1, output
    assert "chmod 600" in output and "dkim.key" in output


@pytest.mark.slow  # the whole shipped campaign, end to end
def test_demo_signs_when_the_campaign_has_dkim(signed: tuple[Path, dkim.DnsFunc], tmp_path: Path) -> None:
    cfg, dnsfunc = signed  # the demo gives the campaign its own web.url
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--config", str(cfg), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    box = mailbox.Maildir(out / "Maildir", create=False)
    assert len(box) >= 14
    for key in box.keys():
        # Maildir files use the local line ending (LF); on the wire it was CRLF.
        raw = box.get_bytes(key).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        verify_both(raw, dnsfunc)
    assert "DKIM-signed" in r.output


def test_demo_with_an_unusable_key_stops_before_sending(
    signed: tuple[Path, dkim.DnsFunc], tmp_path: Path
) -> None:
    cfg, _ = signed
    (cfg.parent / "dkim.key").chmod(0o644)
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--config", str(cfg), "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "chmod 600" in r.output and "Nothing was sent" in r.output
    assert not (out / "Maildir").exists()

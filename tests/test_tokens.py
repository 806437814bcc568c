"""Signed link tokens (mailer/tokens.py) and the unsubscribe links built on them (issue 14)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import string
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_campaign

from mailer import tokens, unsubscribe
from mailer.cli import cli
from mailer.ledger import Ledger

S = "s3cret-for-tests"
PURPOSES = sorted(tokens.PURPOSES)


def test_round_trip_for_every_purpose_and_url_safe() -> None:
    for purpose in PURPOSES:
        t = tokens.sign(S, purpose, "camp", "ev-1.a_b", "Jan.Peeters@Example.BE")
        assert set(t) <= set(string.ascii_letters + string.digits + "-_")
        assert tokens.verify(S, purpose, t) == ("camp", "ev-1.a_b", "jan.peeters@example.be")


def test_a_token_works_for_its_own_purpose_only() -> None:
    for made, used in itertools.permutations(PURPOSES, 2):
        assert tokens.verify(S, used, tokens.sign(S, made, "c", "*", "a@x.org")) is None


def test_every_altered_character_truncation_or_extension_fails() -> None:
    t = tokens.sign(S, "rsvp", "c", "ev", "a@x.org")
    for i, ch in enumerate(t):
        for other in "Aa0_-":
            if other != ch:
                assert tokens.verify(S, "rsvp", t[:i] + other + t[i + 1 :]) is None, (i, other)
    assert tokens.verify(S, "rsvp", t[:-1]) is None
    assert tokens.verify(S, "rsvp", t + "A") is None
    assert tokens.verify(S, "rsvp", t[1:]) is None


def test_another_address_secret_or_campaign_gives_another_token() -> None:
    a = tokens.sign(S, "rsvp", "c", "ev", "a@x.org")
    assert tokens.sign(S, "rsvp", "c", "ev", "A@X.ORG") == a  # one mailbox, one token
    others = [
        tokens.sign(S, "rsvp", "c", "ev", "b@x.org"),
        tokens.sign(S, "rsvp", "c", "ev2", "a@x.org"),
        tokens.sign(S, "rsvp", "c2", "ev", "a@x.org"),
        tokens.sign("other", "rsvp", "c", "ev", "a@x.org"),
    ]
    assert a not in others
    # Another address's payload with this signature: refused.
    b_payload = others[0][: -tokens.SIG_CHARS]
    assert tokens.verify(S, "rsvp", b_payload + a[-tokens.SIG_CHARS :]) is None
    assert tokens.verify("other", "rsvp", a) is None


@pytest.mark.parametrize(
    "junk",
    ["", "x", "A" * 22, "A" * 23, "é" * 40, "\x00" * 40, "a.b", "A" * 5000, "%2F" * 20],
)
def test_junk_is_none_never_an_error(junk: str) -> None:
    for purpose in [*PURPOSES, "nope"]:
        assert tokens.verify(S, purpose, junk) is None
    assert tokens.verify("", "rsvp", tokens.sign(S, "rsvp", "c", "e", "a@x.org")) is None


def test_a_signed_payload_that_is_not_three_fields_is_refused() -> None:
    """Even a correctly signed payload (someone who has the secret, or a bug) must hold
    three non-empty fields."""
    payload = base64.urlsafe_b64encode(b"only\0two").rstrip(b"=").decode()
    msg = f"mailer-token-v1\0rsvp\0{payload}".encode()
    sig = base64.urlsafe_b64encode(hmac.new(S.encode(), msg, hashlib.sha256).digest()[:16]).rstrip(b"=")
    assert tokens.verify(S, "rsvp", payload + sig.decode()) is None


def test_sign_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="purpose"):
        tokens.sign(S, "admin", "c", "e", "a@x.org")
    with pytest.raises(ValueError, match="secret"):
        tokens.sign("", "rsvp", "c", "e", "a@x.org")
    with pytest.raises(ValueError, match="NUL"):
        tokens.sign(S, "rsvp", "c\0x", "e", "a@x.org")


def test_secret_from_prefers_the_new_name() -> None:
    assert tokens.secret_from({}) is None
    assert tokens.secret_from({"MAILER_UNSUBSCRIBE_SECRET": "old"}) == "old"
    assert tokens.secret_from({"MAILER_WEB_SECRET": "new", "MAILER_UNSUBSCRIBE_SECRET": "old"}) == "new"
    assert tokens.secret_from({"MAILER_WEB_SECRET": "", "MAILER_UNSUBSCRIBE_SECRET": "old"}) == "old"


def _legacy_token(secret: str, campaign: str, email: str) -> str:
    """An unsubscribe token as mailer signed it before tokens.py (already in inboxes)."""
    payload = base64.urlsafe_b64encode(f"{campaign}\0{email.lower()}".encode()).rstrip(b"=").decode()
    sig = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16]
    return f"{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def test_unsubscribe_links_old_and_new_verify() -> None:
    new = unsubscribe.token(S, "camp", "Ann@Example.org")
    assert new == tokens.sign(S, "unsubscribe", "camp", "*", "ann@example.org")
    old = _legacy_token(S, "camp", "Ann@Example.org")
    for form in (
        new,
        old,
        f"https://x.org/unsub?t={old}",
        f"https://x.org/u/{new}",
        unsubscribe.link("https://x.org/u", S, "camp", "a@x.org"),
    ):
        found = unsubscribe.verify(S, form)
        assert found is not None and found[0] == "camp", form
    assert unsubscribe.verify("other", new) is None and unsubscribe.verify("other", old) is None
    # An RSVP token (another purpose) is no unsubscribe token.
    assert unsubscribe.verify(S, tokens.sign(S, "rsvp", "camp", "*", "a@x.org")) is None


def test_suppress_add_link_with_new_and_old_links(tmp_path: Path) -> None:
    cfg = write_campaign(
        tmp_path,
        events="- {id: ev, title: T, start: 2018-01-22 09:30, end: 2018-01-22 16:30}\n",
        steps="- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}\n",
    )
    Ledger.create(tmp_path / "ledger.db").close()
    links = [
        "https://rsvp.example.org/u/" + unsubscribe.token(S, "test", "ann@example.org"),
        "https://example.org/unsub?t=" + _legacy_token(S, "test", "bob@example.org"),
    ]
    args = ["suppress", "add", "--config", str(cfg)]
    for ln in links:
        args += ["--link", ln]
    r = CliRunner().invoke(cli, args, env={"MAILER_UNSUBSCRIBE_SECRET": S})
    assert r.exit_code == 0, r.output
    with Ledger.read(tmp_path / "ledger.db") as led:
        assert sorted(led.suppressed()) == ["ann@example.org", "bob@example.org"]

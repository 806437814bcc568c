"""The envelope sender per delivery (VERP) and the unsubscribe-by-mail token (issue 15): the
tokens on their own, then on the wire (aiosmtpd sees each delivery's MAIL FROM) and in the
List-Unsubscribe header of composed mails."""

from __future__ import annotations

import pytest

from mailer.bounces import (
    TAG_CHARS,
    delivery_of,
    envelope_sender,
    unsubscribe_token,
    unsubscribed_address,
)

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

"""Tests for mailer.message: headers, MIME tree, encodings, determinism (speed: bench/micro.py)."""

from __future__ import annotations

import dataclasses
import doctest
import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from interop import check_message

import mailer.message
from mailer import config
from mailer.config import Campaign, Unsubscribe
from mailer.ics import prototype
from mailer.message import build, encoded_words, message_id

SHIPPED = Path(__file__).resolve().parent.parent / "schedules.yaml"
DTSTAMP = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)
NAMES = [
    "Jan Peeters",
    "Éloïse Dupont-Lefèvre",
    "Peeters, Jan",
    "Ça va; d'Hondt: ok",
    "Zoë 🎉 van den Berg",
    'Jan "JP" \\ Peeters',
    "",
]


@pytest.fixture(scope="module")
def shipped() -> Campaign:
    return config.load(SHIPPED)


def mail(
    c: Campaign,
    *,
    event: str | None = "aan-de-slag",
    method: str = "REQUEST",
    sequence: int = 0,
    **kw: Any,
) -> bytes:
    """One mail for the shipped campaign; keyword arguments override build()'s."""
    to = kw.pop("to_email", "jan.peeters@example.be")
    name = kw.pop("to_name", "Jan Peeters")
    ics = None
    if event is not None:
        proto = prototype(
            c,
            c.event(event),
            method=method,  # type: ignore[arg-type]
            sequence=sequence,
            dtstamp=DTSTAMP,
        )
        ics = proto.for_attendee(to, name)
    args: dict[str, Any] = dict(
        campaign=c,
        to_email=to,
        to_name=name,
        subject="Uitnodiging: Aan de slag",
        text="Beste Jan,\n\nU bent uitgenodigd.\n",
        html="<p>Beste Jan,</p>\n<p>Welkom.</p>\n",
        language="nl",
        message_id=message_id(c.id, "uitnodiging", to, c.sender.domain),
        date=DTSTAMP,
        ics=ics,
        method=method,
    )
    args.update(kw)
    return build(**args)


def head(raw: bytes) -> list[str]:
    return raw.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# --------------------------------------------------------------------------------------
# The whole message through the interop checker.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("event", ["aan-de-slag", "infosessie"])
def test_shipped_events_pass_the_checklist(shipped: Campaign, event: str, name: str) -> None:
    raw = mail(shipped, event=event, to_name=name)
    msg = check_message(raw, from_domain="example.be")
    to = msg["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == (" ".join(name.split()), "jan.peeters@example.be")
    assert msg["From"].addresses[0].addr_spec == "integratiepact@example.be"


def test_mime_tree_and_calendar_copies(shipped: Campaign) -> None:
    proto = prototype(shipped, shipped.event("aan-de-slag"), dtstamp=DTSTAMP)
    ics = proto.for_attendee("jan.peeters@example.be", "Jan Peeters")
    msg = check_message(mail(shipped))
    alt, att = msg.iter_parts()
    plain, html, cal = alt.iter_parts()
    raw = mail(shipped)
    assert b"\r\nContent-Type: text/calendar; method=REQUEST; charset=UTF-8\r\n" in raw
    assert "Content-Disposition" not in cal
    assert b'\r\nContent-Type: application/ics; name="invite.ics"\r\n' in raw
    assert b'\r\nContent-Disposition: attachment; filename="invite.ics"\r\n' in raw
    assert cal.get_payload(decode=True) == att.get_payload(decode=True) == ics  # CRLF kept
    assert plain.get_content() == "Beste Jan,\r\n\r\nU bent uitgenodigd.\r\n"
    assert html.get_content() == "<p>Beste Jan,</p>\r\n<p>Welkom.</p>\r\n"


def test_no_ics_variant_is_just_alternative(shipped: Campaign) -> None:
    raw = mail(shipped, event=None)
    msg = check_message(raw, expect_method=None)
    assert msg.get_content_type() == "multipart/alternative"
    assert b"text/calendar" not in raw and b"application/ics" not in raw
    with pytest.raises(AssertionError, match=r"\[12\]"):
        check_message(raw)  # the checker insists on the calendar when one is expected


def test_cancel_message(shipped: Campaign) -> None:
    raw = mail(shipped, method="CANCEL", sequence=1)
    msg = check_message(raw, expect_method="CANCEL")
    alt, att = msg.iter_parts()
    assert list(alt.iter_parts())[2].get_param("method") == "CANCEL"
    assert att.get_filename() == "cancel.ics"
    with pytest.raises(ValueError, match="METHOD"):
        mail(
            shipped,
            method="REQUEST",
            ics=prototype(
                shipped, shipped.events[1], method="CANCEL", sequence=1, dtstamp=DTSTAMP
            ).for_attendee("a@example.be"),
        )
    with pytest.raises(ValueError, match="REQUEST or CANCEL"):
        mail(shipped, event=None, method="PUBLISH")


# --------------------------------------------------------------------------------------
# Headers.
# --------------------------------------------------------------------------------------


def test_core_headers(shipped: Campaign) -> None:
    raw = mail(shipped, language="nl_BE")
    lines = head(raw)
    assert lines[0] == 'From: "Integratiepact" <integratiepact@example.be>'
    assert lines[1] == 'To: "Jan Peeters" <jan.peeters@example.be>'
    assert "Subject: Uitnodiging: Aan de slag" in lines
    assert f"Date: {format_datetime(DTSTAMP)}" in lines
    assert "Reply-To: integratiepact@example.be" in lines
    assert "MIME-Version: 1.0" in lines and "Auto-Submitted: auto-generated" in lines
    assert "Content-Language: nl-BE" in lines
    no_reply = dataclasses.replace(shipped, sender=dataclasses.replace(shipped.sender, reply_to=None))
    assert "Reply-To" not in parse(mail(no_reply))


@pytest.mark.parametrize(
    "subject",
    [
        "Uitnodiging: infosessie over projectoproep 426 – één dag, ç’est ça",
        "🎉 Aan de slag! 🎉 👩‍💻",
        "x" * 300,
        "Aan de slag " * 25,
        "Aan dé slag " * 25 + "🎉",
        "y" * 1500,
        "literal =?utf-8?q?not-encoded?= text",
        "  spaced   out  ",
    ],
)
def test_subjects_fold_and_read_back(shipped: Campaign, subject: str) -> None:
    raw = mail(shipped, subject=subject)
    msg = check_message(raw)
    assert msg["Subject"] == subject.strip()
    subject_lines: list[str] = []
    for line in head(raw):
        if line.startswith("Subject:") or (subject_lines and line.startswith(" ")):
            subject_lines.append(line)
        elif subject_lines:
            break
    assert all(len(x) <= 78 for x in subject_lines), subject_lines
    for word in re.findall(r"=\?utf-8\?b\?[^?]*\?=", "".join(subject_lines)):
        assert len(word) <= 75


def test_encoded_words_never_split_characters() -> None:
    for prefix in range(0, 60):
        text = "a" * prefix + "é🎉ç" * 30
        words = encoded_words(text, 20 + prefix % 50)
        assert all(len(w) <= 75 for w in words)
        decoded = [email.header.decode_header(w)[0][0] for w in words]
        for d in decoded:
            d.decode("utf-8")  # each word alone is whole characters
        assert b"".join(decoded).decode() == text


@pytest.mark.parametrize("field", ["subject", "to_name", "from_name", "to_email", "language", "message_id"])
def test_header_injection_is_blocked(shipped: Campaign, field: str) -> None:
    evil = "\r\nBcc: evil@example.com\r\n"
    c, kw = shipped, dict[str, Any]()
    if field == "from_name":
        c = dataclasses.replace(shipped, sender=dataclasses.replace(shipped.sender, name="Org" + evil))
    elif field == "to_email":  # an address is refused, not mended (it would reach another)
        with pytest.raises(ValueError, match="not an email address"):
            mail(c, to_email="jan@example.be" + evil, event=None)
        return
    elif field == "message_id":
        kw = {"message_id": "<a@b>" + evil}
    else:
        kw = {field: "x" + evil}
    raw = mail(c, **kw)
    msg = parse(raw)
    assert "Bcc" not in msg and b"\r\nBcc:" not in raw
    check_message(raw)


def test_addresses(shipped: Campaign) -> None:
    msg = parse(mail(shipped, to_name='Jan "JP" \\ Peeters', to_email="jan@bücher.example"))
    to = msg["To"].addresses[0]
    assert to.display_name == 'Jan "JP" \\ Peeters'
    assert to.addr_spec == "jan@xn--bcher-kva.example"
    raw = mail(shipped, to_name="Ëlçé " * 30, event=None)
    lines = head(raw)
    assert all(len(x) <= 78 for x in lines)
    # RFC 2047 6.2 readers drop the space between encoded-words: exact name back. Python's
    # address parser adds one between them instead; breaks at spaces keep it to doubling.
    name = ("Ëlçé " * 30).strip()
    to_line = re.search(r"^To:(.*?)<", raw.decode(), re.S | re.M)
    assert to_line is not None
    words = email.header.decode_header(re.sub(r"\r\n ", " ", to_line.group(1)))
    assert b"".join(bytes(w) for w, _ in words).decode().strip() == name
    assert " ".join(parse(raw)["To"].addresses[0].display_name.split()) == name
    with pytest.raises(ValueError, match="not an email address"):
        mail(shipped, to_email="nobody", event=None)


# --------------------------------------------------------------------------------------
# List-Unsubscribe (RFC 2369, RFC 8058).
# --------------------------------------------------------------------------------------


def test_list_unsubscribe_mailto_only(shipped: Campaign) -> None:
    msg = check_message(mail(shipped))
    assert msg["List-Unsubscribe"] == "<mailto:afmelden@example.be?subject=unsubscribe>"
    assert "List-Unsubscribe-Post" not in msg


def test_list_unsubscribe_with_one_click(shipped: Campaign) -> None:
    url = "https://example.be/afmelden?t=abc123&c=integratiepact-2018#x"
    msg = check_message(mail(shipped, unsubscribe_url=url))
    # The https link first (RFC 2369 3.2: a client uses the first method it supports; issue 14).
    assert msg["List-Unsubscribe"] == f"<{url}>, <mailto:afmelden@example.be?subject=unsubscribe>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    only_url = dataclasses.replace(shipped, unsubscribe=Unsubscribe(url="https://example.be/u"))
    msg = check_message(mail(only_url, unsubscribe_url="https://example.be/u?t=1 2>"))
    assert msg["List-Unsubscribe"] == "<https://example.be/u?t=12%3E>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_no_list_unsubscribe_without_configuration(shipped: Campaign) -> None:
    msg = check_message(mail(dataclasses.replace(shipped, unsubscribe=None)))
    assert "List-Unsubscribe" not in msg and "List-Unsubscribe-Post" not in msg


# --------------------------------------------------------------------------------------
# Bodies, determinism, Message-ID.
# --------------------------------------------------------------------------------------


def test_bodies_normalised_to_crlf_and_boundary_safe(shipped: Campaign) -> None:
    tricky = "a\nb\rc\r\nd\n--=_mailer_x_alt\n.\n" + "lange regel é " * 40 + "\n=3D trailing  \n"
    msg = check_message(mail(shipped, text=tricky, html=tricky))
    plain = list(msg.iter_parts())[0].get_body(("plain",))
    assert plain is not None
    expected = re.sub(r"\r\n?|\n", "\r\n", tricky)
    assert plain.get_content() == expected
    assert all(len(x) <= 78 for x in mail(shipped, text=tricky).split(b"\r\n"))


def test_same_inputs_same_bytes(shipped: Campaign) -> None:
    assert mail(shipped) == mail(shipped)
    other = mail(shipped, message_id="<other@example.be>")
    assert re.search(rb'boundary="([^"]+)"', other) != re.search(rb'boundary="([^"]+)"', mail(shipped))


def test_message_id() -> None:
    one = message_id("integratiepact-2018", "uitnodiging", "jan@example.be", "example.be")
    assert one == message_id("integratiepact-2018", "uitnodiging", "jan@example.be", "example.be")
    assert re.fullmatch(r"<[a-z2-7]{26}\.integratiepact-2018@example\.be>", one)
    others = {
        message_id("integratiepact-2018", "herinnering", "jan@example.be", "example.be"),
        message_id("other", "uitnodiging", "jan@example.be", "example.be"),
        message_id("integratiepact-2018", "uitnodiging", "els@example.be", "example.be"),
        message_id("integratiepact-2018", "uitnodiging\0jan@example.be", "", "example.be"),
    }
    assert len(others) == 4 and one not in others
    weird = message_id("a..b c", "s", "é@x", "Bücher.Example")
    assert weird.isascii() and weird.endswith(".a.b-c@xn--bcher-kva.example>"), weird


def test_doctests() -> None:
    assert doctest.testmod(mailer.message).failed == 0


# --------------------------------------------------------------------------------------
# The checker catches what it should.
# --------------------------------------------------------------------------------------


def test_checker_rejects_the_lf_trap(shipped: Campaign) -> None:
    """Checklist 1: EmailMessage.set_content(str, subtype="calendar") under policy.default
    turns the calendar's CRLF into LF."""
    ics = prototype(shipped, shipped.events[1], dtstamp=DTSTAMP).for_attendee("a@example.be")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "o@example.be", "a@example.be", "x"
    msg.set_content(ics.decode(), subtype="calendar", params={"method": "REQUEST"})
    with pytest.raises(AssertionError):
        check_message(msg.as_bytes(policy=email.policy.SMTP))


def test_checker_rejects_duplicate_headers_and_tampering(shipped: Campaign) -> None:
    raw = mail(shipped)
    with pytest.raises(AssertionError, match=r"\[15\]"):
        check_message(b"Subject: again\r\n" + raw)
    with pytest.raises(AssertionError, match=r"\[16\]"):
        check_message(b"Bcc: evil@example.com\r\n" + raw)
    with pytest.raises(AssertionError, match=r"\[18\]"):
        check_message(raw.replace(b"auto-generated", b"no"))
    with pytest.raises(AssertionError, match=r"\[3\]"):
        check_message(raw, expect_method="CANCEL")


def test_one_click_unsubscribe_link_is_signed(tmp_path: Path) -> None:
    """RFC 8058: with unsubscribe.url and a secret, every mail carries its own signed link."""
    from mailer import unsubscribe
    from mailer.compose import Composer
    from mailer.contacts import Contact
    from mailer.errors import ConfigError
    from mailer.templates import Templates

    root = Path(__file__).resolve().parent.parent
    text = (
        (root / "schedules.yaml")
        .read_text(encoding="utf-8")
        .replace(
            "  mailto: afmelden@example.be",
            "  mailto: afmelden@example.be\n  url: https://example.be/afmelden",
        )
    )
    camp = config.loads(text, root / "schedules.yaml")
    tpl = Templates(camp.templates_dir, camp.language)
    with pytest.raises(ConfigError, match="MAILER_UNSUBSCRIBE_SECRET"):
        Composer(camp, tpl)
    comp = Composer(camp, tpl, unsubscribe_secret="k" * 32)
    step = camp.steps[0]
    who = Contact("jan@example.org", "Jan")
    raw = comp.compose(step, camp.event(step.event), who, when=step.at).data
    msg = check_message(raw, expect_method="REQUEST")
    header = str(msg["List-Unsubscribe"])
    assert "<mailto:afmelden@example.be" in header and "<https://example.be/afmelden?t=" in header
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = header.split("<https://")[1].split(">")[0]
    assert unsubscribe.verify("k" * 32, "https://" + link) == (camp.id, "jan@example.org")
    assert unsubscribe.verify("wrong", "https://" + link) is None
    body = msg.get_body(("html",))
    assert body is not None
    assert "https://example.be/afmelden?t=" in body.get_content()

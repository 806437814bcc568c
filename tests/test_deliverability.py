"""The deliverability section of `mailer check` (issue 15): the bulk-sender rules of Gmail,
Yahoo and Microsoft, each line passed or warned with what to do. Real campaign folders and the
CLI; :func:`mailer.deliverability.rules` on its own for the thresholds."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer.cli import cli
from mailer.config import load
from mailer.deliverability import ONE_CLICK_ABOVE, Facts, Rule, rules

EVENTS = """\
- {id: ev, title: Launch, start: 2030-06-24 09:30, end: 2030-06-24 16:30}
"""
ONE_STEP = """\
- {id: invite, event: ev, template: invite, at: 2030-06-04 10:00}
"""
#: Two steps on one day: their recipients add up.
TWO_STEPS_ONE_DAY = """\
- {id: invite, event: ev, template: invite, at: 2030-06-04 09:00}
- {id: remind, event: ev, template: remind, at: 2030-06-04 15:00}
"""
SECRET = "a-long-random-secret-for-the-tests"
NO_SECRET = {"MAILER_WEB_SECRET": "", "MAILER_UNSUBSCRIBE_SECRET": ""}
#: Templates that show the unsubscribe link in both parts.
WITH_LINK = {
    **SIMPLE_TEMPLATES,
    "invite/en/body.txt": "Dear {{ contact.name }}\nUnsubscribe: {{ campaign.unsubscribe_url }}\n",
    "invite/en/body.html": '<p>Dear {{ contact.name }}</p><a href="{{ campaign.unsubscribe_url }}">Unsubscribe</a>',
    "remind/en/body.txt": "Reminder\nUnsubscribe: {{ campaign.unsubscribe_url }}\n",
    "remind/en/body.html": '<p>Reminder</p><a href="{{ campaign.unsubscribe_url }}">Unsubscribe</a>',
}


def contacts(n: int) -> str:
    return "email,name,lists\n" + "".join(f"p{i:05d}@example.org,Person {i},a\n" for i in range(n))


def check(cfg: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["check", "--config", str(cfg)], env=env or NO_SECRET, catch_exceptions=False)
    return r.exit_code, r.output


def section(text: str) -> dict[str, tuple[str, str]]:
    """The section's lines as ``{name: (level, text)}``."""
    lines = text.split("Deliverability (Gmail, Yahoo and Microsoft bulk-sender rules):\n", 1)[1].splitlines()
    found = {}
    for ln in lines:
        if not ln.startswith("  "):
            break
        level, _, rest = ln.strip().partition(" ")
        name, _, what = rest.strip().partition(": ")
        found[name] = (level, what)
    return found


def test_the_shipped_campaign_reads_sensibly(shipped: Path) -> None:
    code, text = check(shipped / "schedules.yaml")
    assert code == 0, text
    got = section(text)
    assert list(got) == [
        "DKIM",
        "one-click unsubscribe",
        "unsubscribe link in the body",
        "unsubscribe by mail",
        "addresses that receive",
        "envelope sender",
        "TLS",
        "Message-ID",
    ]
    assert got["DKIM"][0] == "warn" and "smtp.relay_signs: true" in got["DKIM"][1]
    assert got["one-click unsubscribe"][0] == "ok" and "22 recipients" in got["one-click unsubscribe"][1]
    assert got["unsubscribe link in the body"] == ("ok", "in every body (15 template/language pairs)")
    assert got["unsubscribe by mail"][0] == "warn" and "cannot be trusted" in got["unsubscribe by mail"][1]
    assert got["TLS"] == ("ok", "starttls to localhost")
    assert got["Message-ID"][0] == "ok" and "@example.be>" in got["Message-ID"][1]
    # with the secret, the mailto carries a token: nothing to warn about unsubscribing by mail
    code, text = check(shipped / "schedules.yaml", {"MAILER_WEB_SECRET": SECRET})
    assert code == 0 and section(text)["unsubscribe by mail"][0] == "ok", text


def test_relay_signs_silences_the_dkim_warning(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=ONE_STEP)
    assert section(check(cfg)[1])["DKIM"][0] == "warn"
    cfg.write_text(
        cfg.read_text().replace("smtp: {connections: 2}", "smtp: {connections: 2, relay_signs: true}")
    )
    code, text = check(cfg)
    assert code == 0, text
    assert section(text)["DKIM"] == (
        "ok",
        "your relay signs (smtp.relay_signs: true); make sure it signs for the From domain",
    )


@pytest.mark.slow
def test_6000_recipients_a_day_without_one_click_fails_check(tmp_path: Path) -> None:
    """3,000 invitations and 3,000 reminders on the same day: 6,000 recipients that day. Without
    an https List-Unsubscribe Gmail and Yahoo reject the mail, so check fails; with one it passes."""
    unsub = "unsubscribe: {mailto: afmelden@example.org, url: 'https://example.org/u'}\n"
    cfg = write_campaign(
        tmp_path, events=EVENTS, steps=TWO_STEPS_ONE_DAY, contacts=contacts(3000), templates=WITH_LINK
    )
    cfg.write_text(cfg.read_text() + "unsubscribe: {mailto: afmelden@example.org}\n")
    code, text = check(cfg, {"MAILER_WEB_SECRET": SECRET})
    assert code == 1, text
    level, what = section(text)["one-click unsubscribe"]
    assert level == "error" and "busiest day 2030-06-04: 6,000 recipients" in what, what
    assert any(
        ln.startswith("error: ") and "schedules.yaml: one-click unsubscribe: missing" in ln
        for ln in text.splitlines()
    )
    cfg.write_text(cfg.read_text().replace("unsubscribe: {mailto: afmelden@example.org}\n", unsub))
    code, text = check(cfg, {"MAILER_WEB_SECRET": SECRET})
    assert code == 0, text
    assert section(text)["one-click unsubscribe"][0] == "ok"
    assert section(text)["unsubscribe link in the body"][0] == "ok"


def test_each_warning_says_what_to_do(tmp_path: Path) -> None:
    """No unsubscribe link in the bodies, a no-reply From, TLS off to a remote relay."""
    cfg = write_campaign(tmp_path, events=EVENTS, steps=ONE_STEP)
    text = cfg.read_text().replace("from: events@example.org", "from: no-reply@example.org")
    cfg.write_text(text + "unsubscribe: {url: 'https://example.org/u'}\n")
    env = {"MAILER_WEB_SECRET": SECRET, "MAILER_SMTP_HOST": "smtp.example.org", "MAILER_SMTP_TLS": "none"}
    code, text = check(cfg, env)
    assert code == 0, text  # warnings are advice
    got = section(text)
    assert got["unsubscribe link in the body"] == (
        "warn",
        "not visible in invite/en (text and HTML): put {{ campaign.unsubscribe_url }} (or the unsubscribe "
        "address) in the footer of both parts",
    )
    assert got["addresses that receive"][0] == "warn"
    assert got["addresses that receive"][1].startswith(
        "From no-reply@example.org, organizer no-reply@example.org (the organizer defaults to From) looks like"
    )
    assert got["TLS"][0] == "warn" and "use smtp.tls: starttls or tls" in got["TLS"][1]


def test_bounces_without_a_secret_fails_check(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=ONE_STEP)
    cfg.write_text(
        cfg.read_text().replace("name: Events Team}", "name: Events Team, bounces: b@example.org}")
    )
    code, text = check(cfg)
    assert code == 1 and section(text)["envelope sender"][0] == "error", text
    code, text = check(cfg, {"MAILER_WEB_SECRET": SECRET})
    assert code == 0 and section(text)["envelope sender"] == (
        "ok",
        "b+TOKEN@example.org, one per delivery (sender.bounces)",
    )


@pytest.mark.parametrize(("per_day", "level"), [(ONE_CLICK_ABOVE, "ok"), (ONE_CLICK_ABOVE + 1, "error")])
def test_one_click_is_required_above_5000_a_day(tmp_path: Path, per_day: int, level: str) -> None:
    campaign = load(write_campaign(tmp_path, events=EVENTS, steps=ONE_STEP))
    got = {r.name: r for r in rules(campaign, Facts(secret=True, daily={date(2030, 6, 4): per_day}))}
    assert got["one-click unsubscribe"].level == level
    with_it = Facts(secret=True, daily={date(2030, 6, 4): per_day}, one_click=True)
    assert {r.name: r for r in rules(campaign, with_it)}["one-click unsubscribe"].level == "ok"
    assert isinstance(got["DKIM"], Rule)

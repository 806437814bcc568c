"""`mailer check` as the organiser's gate (issue 12): bad rows are warnings and the contact is
recorded `invalid`; every problem of every stage in one run; warnings for mistakes that send the
wrong thing; `--strict`. Real campaign folders, the CLI, aiosmtpd and the ledger file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer.cli import cli
from mailer.ledger import Ledger
from mailer.smtpd import SmtpServer

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00, audience: {lists: [a]}}
- {id: remind, event: ev, template: remind, at: -1d 09:00, audience: {lists: [a]}}
"""
WITH_BAD_ROW = (
    "email,name,lists\n"
    "ann@example.org,Ann,a\n"
    " marc.dupont@@example ,Marc Dupont,a\n"
    "bob@example.org,Bob,a\n"
    "zed@@example.org,Zed,other\n"
)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture
def campaign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=WITH_BAD_ROW)


# --- 1. errors vs warnings: a bad row is a warning, the contact is recorded invalid -------------


def test_a_bad_row_is_a_warning_and_strict_makes_it_an_error(campaign: Path) -> None:
    code, text = run("check")
    assert code == 0, text
    assert "warning: contacts/list.csv:row 3: email: 'marc.dupont@@example' is not a usable" in text
    assert "error:" not in text
    assert "OK: 4 warning(s)" in text  # two bad rows; no update and no cancel template
    code, text = run("check", "--strict")
    assert code == 1, text
    assert "4 warning(s) (--strict: warnings are errors)" in text


def test_an_invalid_contact_is_recorded_and_shown_in_status_log_and_export(
    campaign: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    code, text = run("send", "--now", "2018-01-04T10:00", env=smtp_env)
    assert code == 0, text
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == [
        "ann@example.org",
        "bob@example.org",
    ]
    with Ledger.read(campaign.parent / "ledger.db") as led:
        got = {(r["step"], r["email"]): (r["status"], r["reason"]) for r in led.log()}
    status, reason = got[("invite", "marc.dupont@@example")]  # the address as written, trimmed
    assert status == "invalid"
    assert "contacts/list.csv:row 3" in reason and "not a usable email address" in reason
    # zed is in list `other`: the invitation's audience would not have included him
    assert not any(email == "zed@@example.org" for _, email in got)
    # a second pass records nothing twice and sends nothing
    code, text = run("send", "--now", "2018-01-04T12:00", env=smtp_env)
    assert code == 0 and "0 due" in text, text
    assert len(smtp_server.handler.received) == 2
    # the reminder's step records him too, once its time comes
    code, text = run("send", "--now", "2018-01-21T09:00", env=smtp_env)
    assert code == 0, text
    with Ledger.read(campaign.parent / "ledger.db") as led:
        invalid = [(r["step"], r["email"]) for r in led.log(status="invalid")]
    assert invalid == [("invite", "marc.dupont@@example"), ("remind", "marc.dupont@@example")]

    code, text = run("status")
    assert code == 0, text
    header = next(ln for ln in text.splitlines() if "campaign" in ln and "sent" in ln)
    assert "invalid" in header
    code, text = run("log", "--status", "invalid")
    assert code == 0 and "marc.dupont@@example" in text and "not a usable email address" in text, text
    code, text = run("export", "--status", "invalid", "-o", "invalid.csv")
    assert code == 0, text
    with open("invalid.csv", newline="", encoding="utf-8") as fh:
        exported = list(csv.DictReader(fh))
    assert {r["email"] for r in exported} == {"marc.dupont@@example"}
    assert all(r["status"] == "invalid" and "row 3" in r["reason"] for r in exported)


def test_dry_run_shows_the_invalid_contact(campaign: Path, smtp_env: dict[str, str]) -> None:
    code, text = run("send", "--dry-run", "--now", "2018-01-04T10:00", env=smtp_env)
    assert code == 0, text
    assert "marc.dupont@@example" in text and "invalid:" in text


# --- 2. every problem of every stage in one run -----------------------------------------------


def test_bad_time_zone_bad_event_time_missing_template_and_bad_row_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    events = EVENTS + "- {id: late, title: Evening, start: 2018-03-26 25:00, end: 2018-03-26 21:00}\n"
    steps = STEPS + "- {id: thanks, event: ev, template: merci, at: -2d}\n"
    cfg = write_campaign(tmp_path, events=events, steps=steps, contacts=WITH_BAD_ROW)
    cfg.write_text(cfg.read_text().replace("Europe/Brussels", "Europe/Brussel"))
    code, text = run("check")
    assert code == 1, text
    assert "schedules.yaml:2: timezone: unknown time zone 'Europe/Brussel'" in text
    assert "events[1].start" in text
    assert "template 'merci' not found" in text
    assert "contacts/list.csv:row 3: email: 'marc.dupont@@example'" in text
    assert "Traceback" not in text


def test_a_schema_error_does_not_hide_times_contacts_or_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    steps = (
        "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00, colour: red}\n"
        "- {id: remind, event: ev, template: remind, at: next week}\n"
        "- {id: thanks, event: ev, template: merci, at: -2d}\n"
    )
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=WITH_BAD_ROW)
    cfg.write_text(cfg.read_text().replace("language: en", "language: en\nlanguages: [fr]"))
    code, text = run("check")
    assert code == 1, text
    assert "languages: unknown key" in text
    assert "steps[0].colour: unknown key" in text
    assert "schedules.yaml:13: steps[1].at: 'next week' is not a send time" in text  # its own line
    assert "template 'merci' not found" in text
    assert "contacts/list.csv:row 3" in text


# --- 3. warnings for mistakes that send the wrong thing ----------------------------------------


def _check_with(tmp_path: Path, *, steps: str, contacts: str, templates: dict[str, str] | None = None) -> str:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=steps, contacts=contacts, templates=templates)
    code, text = run("check", "--config", str(cfg))
    assert "Traceback" not in text
    return f"exit {code}\n{text}"


def test_reminder_to_people_the_invitation_does_not_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    steps = (
        "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00, audience: {lists: [a]}}\n"
        "- {id: remind, event: ev, template: remind, at: -1d 09:00}\n"
    )
    contacts = "email,lists\nann@example.org,a\ncarl@example.org,b\ndora@example.org,b\n"
    text = _check_with(tmp_path, steps=steps, contacts=contacts)
    assert "exit 0" in text
    assert (
        "warning: schedules.yaml:12: steps[1]: reminder remind reaches 2 contact(s) that no "
        "invitation of event ev reaches (carl@example.org, dora@example.org)"
    ) in text


def test_two_invitations_for_one_event_that_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    steps = (
        "- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00, audience: {lists: [a]}}\n"
        "- {id: invite2, event: ev, template: invite, at: 2018-01-05 10:00, kind: invitation}\n"
    )
    contacts = "email,lists\nann@example.org,a\ncarl@example.org,b\n"
    text = _check_with(tmp_path, steps=steps, contacts=contacts)
    assert "exit 0" in text
    assert (
        "warning: schedules.yaml:12: steps[1]: invitations invite and invite2 of event ev both "
        "go to 1 contact(s) (ann@example.org)"
    ) in text


def test_a_step_at_or_after_its_event_start_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    steps = STEPS + "- {id: late, event: ev, template: remind, at: 2018-01-22 12:00}\n"
    text = _check_with(tmp_path, steps=steps, contacts="email,lists\nann@example.org,a\n")
    assert "exit 1" in text
    assert "schedules.yaml:13: steps[2].at: 2018-01-22 12:00 is at or after event ev starts" in text
    assert "every recipient would be skipped" in text


def test_a_language_without_a_template_is_named_with_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    contacts = (
        "email,lists,language\nann@example.org,a,en\nclaire@example.org,a,fr\n"
        "marc@example.org,a,fr_BE\nbob@example.org,a,\n"
    )
    text = _check_with(tmp_path, steps=STEPS, contacts=contacts)
    assert "exit 0" in text
    assert (
        "warning: templates: 2 contact(s) with language fr get mails in en (claire@example.org, "
        "marc@example.org): template(s) invite, remind have no fr version"
    ) in text
    assert text.count("contact(s) with language") == 1  # ann reads en: no warning for her


def test_the_organisers_own_address_among_the_contacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    contacts = "email,lists\nann@example.org,a\nEvents@Example.org,a\n"
    text = _check_with(tmp_path, steps=STEPS, contacts=contacts)
    assert "exit 0" in text
    assert (
        "warning: contacts/list.csv:row 3: email: Events@example.org is the organiser's own address" in text
    )


def test_the_shipped_campaign_has_no_warning(shipped: Path) -> None:
    """The shipped templates exist in nl, fr and en, the languages its contact files name
    (issue 13): nobody falls back to Dutch, so check has nothing to warn about."""
    code, text = run("check")
    assert code == 0, text
    assert [ln for ln in text.splitlines() if ln.startswith("warning:")] == [], text
    assert run("check", "--strict")[0] == 0


# --- 4. Jinja whitespace, as the README documents it --------------------------------------------


def test_readme_whitespace_example_renders_as_documented(tmp_path: Path) -> None:
    """The README's Templates section shows a template and what it renders to: a blank line after
    `{% endif %}` survives (trim_blocks removes only the newline right after a tag)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Templates", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")
    template = next(b for b in blocks if b.startswith("jinja\n")).removeprefix("jinja\n")
    rendered = next(b for b in blocks if b.startswith("text\n")).removeprefix("text\n")
    assert "{% endif %}\n\n" in template

    from mailer.config import loads
    from mailer.contacts import Contact
    from mailer.templates import Templates, context

    files = {**SIMPLE_TEMPLATES, "invite/en/body.txt": template}
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=files)
    c = loads(cfg.read_text(), cfg)
    ctx = context(c, c.event("ev"), c.step("invite"), Contact("ann@example.org", "Ann"))
    out = Templates(c.templates_dir, "en").render("invite", "en", ctx)
    assert out.text == rendered

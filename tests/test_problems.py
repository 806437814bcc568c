"""Problems as data: every problem carries file, line, row, step, template and language as fields,
and `mailer check` decides what to skip from those fields, never from the location text."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer.cli import cli
from mailer.errors import ConfigError, Problem
from mailer.workspace import load_workspace

EVENTS = """\
- {id: ev, title: Launch, start: 2018-01-22 09:30, end: 2018-01-22 16:30}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2018-01-04 10:00}
- {id: remind, event: ev, template: remind, at: -1d 09:00}
"""


def check(cfg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["check", "--config", str(cfg)], catch_exceptions=False)
    return r.exit_code, r.output


def test_bad_row_in_a_file_named_like_a_template_does_not_hide_its_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 7: a bad row in contacts/invite.csv used to skip rendering template `invite`
    (its name is in the path), hiding an undefined variable that would fail every mail."""
    templates = {**SIMPLE_TEMPLATES, "invite/en/body.txt": "Dear {{ contact.name }}, {{ no_such_thing }}\n"}
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=templates)
    (tmp_path / "contacts" / "invite.csv").write_text("email,name\nnot-an-address,Zed\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code, text = check(cfg)
    assert code == 1, text
    assert "contacts/invite.csv:row 2: email: 'not-an-address' is not a usable email address" in text
    assert "undefined variable no_such_thing" in text
    assert "Traceback" not in text


def test_a_broken_template_is_still_skipped_for_its_own_steps_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syntax error is reported once (not once per recipient); the other template still renders."""
    templates = {
        **SIMPLE_TEMPLATES,
        "invite/en/body.txt": "Dear {% if %}\n",
        "remind/en/body.txt": "{{ also_missing }}\n",
    }
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=templates)
    monkeypatch.chdir(tmp_path)
    code, text = check(cfg)
    assert code == 1, text
    assert text.count("template syntax error") == 1
    assert "undefined variable also_missing" in text


def test_a_broken_language_does_not_hide_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Dutch version does not parse: the English one is still rendered for English readers."""
    templates = {
        **SIMPLE_TEMPLATES,
        "invite/en/body.txt": "{{ missing_in_english }}\n",
        "invite/nl/subject.txt": "Uitnodiging",
        "invite/nl/body.txt": "{% if %}\n",
        "invite/nl/body.html": "<p>Beste</p>",
    }
    contacts = "email,name,language\nann@example.org,Ann,en\njan@example.org,Jan,nl\n"
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=templates, contacts=contacts)
    monkeypatch.chdir(tmp_path)
    code, text = check(cfg)
    assert code == 1, text
    assert text.count("template syntax error") == 1 and "templates/invite/nl/body.txt:1" in text
    assert "contacts/list.csv:row 2: step invite: templates/invite/en/body.txt:1: undefined variable" in text
    assert "row 3: step invite" not in text  # Jan's Dutch mail: its problem is listed once, above


def test_problems_carry_structured_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = {**SIMPLE_TEMPLATES, "invite/en/body.txt": "Dear {% if %}\n"}
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=templates)
    (tmp_path / "contacts" / "invite.csv").write_text("email,name\nnot-an-address,Zed\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ws = load_workspace(cfg)
    row = next(p for p in ws.warnings if p.row is not None)  # a bad row is a warning (issue 12)
    assert (row.file, row.row, row.field, row.template) == ("contacts/invite.csv", 2, "email", None)
    assert str(row).startswith("contacts/invite.csv:row 2: email: ")
    syntax = next(p for p in ws.errors if "syntax" in p.message)
    assert (syntax.file, syntax.line, syntax.template, syntax.language) == (
        "templates/invite/en/body.txt",
        1,
        "invite",
        "en",
    )
    assert syntax.where == "templates/invite/en/body.txt:1"
    assert ws.blocking == [syntax]  # a bad row alone does not stop sending

    bad = cfg.read_text().replace("at: -1d 09:00", "at: someday")
    cfg.write_text(bad)
    with pytest.raises(ConfigError) as info:
        load_workspace(cfg)
    [p] = info.value.problems
    assert (p.file, p.line, p.field, p.step) == ("schedules.yaml", 12, "steps[1].at", "remind")
    assert str(p).startswith("schedules.yaml:12: steps[1].at: 'someday' is not a send time")


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        (Problem("a.yaml", "bad", line=3, field="x.y"), "a.yaml:3: x.y: bad"),
        (Problem("c.csv", "bad", row=4, field="email"), "c.csv:row 4: email: bad"),
        (Problem("c.csv", "empty"), "c.csv: empty"),
        (Problem("", "no file"), ": no file"),
    ],
)
def test_problem_text_is_unchanged(problem: Problem, text: str) -> None:
    assert str(problem) == text

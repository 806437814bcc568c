"""A contacts glob never reads a file outside the campaign folder through a symbolic link
(issue 12): the first line of any readable file used to appear in an error and the daemon's log."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_campaign

from mailer.cli import cli
from mailer.workspace import load_workspace

EVENTS = "- {id: ev, title: Launch, start: 2030-01-22 09:30, end: 2030-01-22 16:30}\n"
STEPS = "- {id: invite, event: ev, template: invite, at: 2030-01-04 10:00}\n"
SECRET = "root-secret-line:x:0:0\nsecond@example.org\n"


@pytest.fixture
def campaign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "campaign"
    cfg = write_campaign(folder, events=EVENTS, steps=STEPS)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.csv").write_text(SECRET, encoding="utf-8")
    monkeypatch.chdir(folder)
    return cfg


def assert_refused(cfg: Path, link: str) -> None:
    ws = load_workspace(cfg)
    assert [c.email for c in ws.contacts] == ["ann@example.org", "bob@example.org"]
    [problem] = [p for p in ws.problems if p.file == link]
    assert "symbolic link" in problem.message and "outside the campaign folder" in problem.message
    assert problem in ws.blocking, "a file not read is refused: its people would be missed"
    everything = " ".join(map(str, ws.problems))
    assert "root-secret-line" not in everything and "second@example.org" not in everything
    assert "outside/secret.csv" not in everything, "the link is named, not where it leads"
    result = CliRunner().invoke(cli, ["check", "--config", str(cfg)])
    assert result.exit_code == 1, result.output
    assert f"{link}: contacts: " in result.output and "root-secret-line" not in result.output


def test_a_linked_file_outside_the_folder_is_not_read(campaign: Path) -> None:
    (campaign.parent / "contacts" / "more.csv").symlink_to(campaign.parent.parent / "outside" / "secret.csv")
    assert_refused(campaign, "contacts/more.csv")


def test_a_linked_folder_on_the_glob_path_is_not_read(campaign: Path) -> None:
    (campaign.parent / "contacts" / "shared").symlink_to(campaign.parent.parent / "outside")
    text = campaign.read_text().replace(
        "contacts: [contacts/*.csv]", "contacts: [contacts/*.csv, contacts/*/*.csv]"
    )
    campaign.write_text(text, encoding="utf-8")
    assert_refused(campaign, "contacts/shared/secret.csv")


def test_a_link_inside_the_folder_and_an_absolute_path_outside_are_read(campaign: Path) -> None:
    folder = campaign.parent
    (folder / "archive").mkdir()
    (folder / "archive" / "2030.csv").write_text("email\ncees@example.org\n", encoding="utf-8")
    (folder / "contacts" / "current.csv").symlink_to(folder / "archive" / "2030.csv")
    shared = folder.parent / "outside" / "shared.csv"
    shared.write_text("email\ndirk@example.org\n", encoding="utf-8")
    text = campaign.read_text().replace(
        "contacts: [contacts/*.csv]", f"contacts: [contacts/*.csv, '{shared}']"
    )
    campaign.write_text(text, encoding="utf-8")
    ws = load_workspace(campaign)
    assert ws.errors == []
    assert [c.email for c in ws.contacts] == [
        "ann@example.org",
        "bob@example.org",
        "cees@example.org",
        "dirk@example.org",
    ]

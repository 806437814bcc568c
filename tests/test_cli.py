"""The command line on real files: check, preview (every mail read back by independent
parsers), a table of bad inputs (clear message, exit code, no traceback) and --help everywhere."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from click.testing import CliRunner
from interop import check_message

from mailer.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output  # stdout and stderr, interleaved


def test_every_command_has_help() -> None:
    code, text = invoke("--help")
    assert code == 0
    commands = list(cli.commands)
    assert {"check", "preview", "send", "status", "log", "export", "retry", "run", "demo"} <= set(commands)
    for name in commands:
        code, text = invoke(name, "--help")
        assert code == 0 and "Usage: " in text and len(text.splitlines()) > 4, name


def test_check_shipped_campaign(shipped: Path) -> None:
    code, text = invoke("check")
    assert code == 0, text
    # both sessions and every step at the right Brussels time
    assert "infosessie" in text and "Tue 2018-01-16 (all day)" in text and "(no location)" in text
    assert "Mon 2018-01-22 09:30-16:30 CET" in text and "Arduinkaai 7" in text
    for line in (
        "uitnodiging-infosessie",
        "Thu 2018-01-04 09:00 CET",
        "herinnering-aan-de-slag-week",
        "Mon 2018-01-15 09:00 CET",
        "herinnering-aan-de-slag-dag",
        "Fri 2018-01-19 09:00 CET",
    ):
        assert line in text
    # The shipped call is in Dutch only: its three French and English readers get Dutch (issue 12).
    assert "OK: 0 warning(s)" in text


def test_preview_shipped_campaign_golden(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "prev"
    code, text = invoke("preview", "--out", str(out))
    assert code == 0, text
    files = sorted(out.rglob("*.eml"))
    # 8 indieners get 3 mails about the info session; 14 contacts 3 about the meeting
    assert len(files) == 8 * 3 + 14 * 3
    invitations = 0
    for f in files:
        raw = f.read_bytes()
        step = f.parent.name
        if step.startswith("uitnodiging"):
            msg = check_message(raw, expect_method="REQUEST")
            invitations += 1
        else:
            msg = check_message(raw, expect_method=None)
        assert msg["To"].addresses[0].addr_spec == f.stem
        body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        lang = msg["Content-Language"]  # every contact reads their own language (issue 13)
        jan = {"nl": "januari", "fr": "janvier", "en": "January"}[lang]
        if "infosessie" in step:
            assert f"16 {jan} 2018" in body
            assert "09:30" not in body  # no invented hour for the info session
        else:
            assert f"22 {jan} 2018" in body and "09:30" in body and "Arduinkaai 7" in body
    assert invitations == 8 + 14


def test_preview_one_contact_one_step(shipped: Path, tmp_path: Path) -> None:
    code, text = invoke(
        "preview",
        "--step",
        "uitnodiging-aan-de-slag",
        "--contact",
        "NOBODY@example.org",
        "--out",
        str(tmp_path / "p"),
    )
    assert code == 1 and "no recipient matches" in text
    code, text = invoke("preview", "--step", "nope", "--out", str(tmp_path / "p"))
    assert code == 1 and "unknown step(s) nope" in text


BASE_YAML = (ROOT / "schedules.yaml").read_text(encoding="utf-8")


def _campaign(
    folder: Path,
    *,
    yaml_text: str | None = None,
    csv: bytes | None = None,
    template_edit: tuple[str, str] | None = None,
) -> None:
    import shutil

    for name in ("contacts", "templates"):
        shutil.copytree(ROOT / name, folder / name, dirs_exist_ok=True)
    (folder / "schedules.yaml").write_text(yaml_text or BASE_YAML, encoding="utf-8")
    if csv is not None:
        (folder / "contacts" / "extra.csv").write_bytes(csv)
    if template_edit is not None:
        rel, text = template_edit
        (folder / "templates" / rel).write_text(text, encoding="utf-8")


HDR = b"email,name,language,lists\n"
BAD_INPUTS = [
    # (id, yaml replace (old, new) | None, csv bytes | None, template edit | None, exit code, expected fragments)
    (
        "malformed yaml",
        ("events:", "events: ["),
        None,
        None,
        1,
        ["schedules.yaml:", "not valid YAML"],
    ),
    (
        "unknown key",
        ("language: nl", "language: nl\nlanguages: [nl]"),
        None,
        None,
        1,
        ["schedules.yaml:7: languages: unknown key"],
    ),
    (
        "bad time zone",
        ("Europe/Brussels", "Europe/Bruxelles"),
        None,
        None,
        1,
        ["timezone: unknown time zone 'Europe/Bruxelles'"],
    ),
    (
        "dst gap",
        ("at: 2018-01-04 09:00", "at: 2018-03-25 02:30"),
        None,
        None,
        1,
        ["steps[0].at", "does not exist in Europe/Brussels"],
    ),
    (
        "unknown event",
        (
            "event: infosessie\n    template: uitnodiging-infosessie",
            "event: info\n    template: uitnodiging-infosessie",
        ),
        None,
        None,
        1,
        ["steps[0].event: unknown event 'info'"],
    ),
    (
        "missing template",
        ("template: herinnering\n    at: -7d", "template: herinering\n    at: -7d"),
        None,
        None,
        1,
        ["herinering"],
    ),
    (
        "undefined variable",
        None,
        None,
        ("herinnering/nl/subject.txt", "Herinnering {{ contact.nickname }}"),
        1,
        ["herinnering/nl/subject.txt:1", "nickname"],
    ),
    ("csv without email column", None, b"naam,taal\nJan,nl\n", None, 1, ["extra.csv", "email"]),
    (
        "bad address",
        None,
        HDR + b"jan@@example.be,Jan,nl,indieners\n",
        None,
        0,  # a warning: Jan is left out and recorded as invalid (issue 12)
        ["warning: contacts/extra.csv:row 2", "jan@@example.be", "recorded as invalid"],
    ),
    (
        "duplicate address",
        None,
        HDR + b"x1@example.org,A,nl,indieners\nX1@example.org,B,nl,indieners\n",
        None,
        0,
        ["extra.csv:row 3", "merged"],
    ),
    (
        "semicolon csv with bom",
        None,
        "\ufeffemail;name;language;lists\nsemi@example.org;Zoë;nl;indieners\n".encode(),
        None,
        0,
        ["OK: 0 warning(s)"],
    ),
    (
        "cp1252 file",
        None,
        HDR + "cp@example.org,Ren\u00e9e,nl,indieners\n".encode("cp1252"),
        None,
        0,
        ["extra.csv", "Windows-1252"],
    ),
    (
        "name with cr/lf",  # a row read into the name, or a header injection: the file is refused
        None,
        HDR + b'crlf@example.org,"Evil\r\nBcc: x@example.com",nl,indieners\n',
        None,
        1,
        ["extra.csv:row 2: name: the cell in column 'name' spans lines 2-3"],
    ),
    (
        "name with a vertical tab",
        None,
        HDR + b'vt@example.org,"Evil\x0bBcc: x@example.com",nl,indieners\n',
        None,
        0,
        ["extra.csv:row 2", "line breaks"],
    ),
    (
        "name with html",
        None,
        HDR + b"html@example.org,<b>Bold</b>,nl,indieners\n",
        None,
        0,
        ["OK: 0 warning(s)"],
    ),
    (
        "comma in name",
        None,
        HDR + b'comma@example.org,"Peeters, Jan",nl,indieners\n',
        None,
        0,
        ["OK: 0 warning(s)"],
    ),
    (
        "step after event",
        ("at: -3d 09:00", "at: 2018-01-23 09:00"),
        None,
        None,
        1,
        ["after event 'aan-de-slag' ends"],
    ),
    (
        "template syntax error",
        None,
        None,
        ("herinnering/nl/body.txt", "{% if %}"),
        1,
        ["herinnering/nl/body.txt:1"],
    ),
]


@pytest.mark.parametrize(
    ("replace", "csv", "tedit", "code", "fragments"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input_table(
    replace: tuple[str, str] | None,
    csv: bytes | None,
    tedit: tuple[str, str] | None,
    code: int,
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yaml_text = BASE_YAML.replace(*replace, 1) if replace else None
    if replace:
        assert yaml_text != BASE_YAML, "the replacement must apply"
    _campaign(tmp_path, yaml_text=yaml_text, csv=csv, template_edit=tedit)
    monkeypatch.chdir(tmp_path)
    got, text = invoke("check")
    assert "Traceback" not in text
    assert got == code, text
    for frag in fragments:
        assert frag in text, text


def test_hostile_names_are_safe_in_the_mail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = HDR + (
        b'crlf@example.org,"Evil\xe2\x80\xa8Bcc: x@example.com\x0bCc: y@example.com",nl,indieners\n'
        b"html@example.org,<script>alert(1)</script>,nl,indieners\n"
        b'comma@example.org,"Peeters, Jan",nl,indieners\n'
    )
    _campaign(tmp_path, csv=csv)
    monkeypatch.chdir(tmp_path)
    code, text = invoke("preview", "--step", "uitnodiging-infosessie", "--out", "p")
    assert code == 0, text
    for addr in ("crlf@example.org", "html@example.org", "comma@example.org"):
        raw = (tmp_path / "p" / "uitnodiging-infosessie" / f"{addr}.eml").read_bytes()
        msg = check_message(raw, expect_method="REQUEST")
        assert msg["Bcc"] is None
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert "<script>" not in html
    raw = (tmp_path / "p" / "uitnodiging-infosessie" / "comma@example.org.eml").read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["To"].addresses[0].display_name == "Peeters, Jan"


def test_send_refuses_when_a_contact_file_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _campaign(tmp_path, csv=b"naam\nJan\n")
    monkeypatch.chdir(tmp_path)
    code, text = invoke(
        "send",
        "--now",
        "2018-01-04T10:00",
        env={"MAILER_SMTP_HOST": "127.0.0.1", "MAILER_SMTP_PORT": "9", "MAILER_SMTP_TLS": "none"},
    )
    assert code == 1 and "Nothing was sent" in text
    assert not (tmp_path / "mailer.db").exists() or "sent" not in text


def test_log_beyond_a_screenful_is_tab_separated_and_complete(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from mailer.ledger import Ledger
    from mailer.store import Decided
    from mailer.vocab import Status

    db = tmp_path / "ledger.db"
    now = datetime(2018, 1, 4, 9, tzinfo=UTC)
    with Ledger(db) as led:
        items = [("invite", "ev", f"p{i:04d}@example.org", f"P {i}", now) for i in range(700)]
        why = "address\trejected\nby policy"
        led.record_decided("camp", [Decided(*i, Status.FAILED, why) for i in items[:650]], now)
        led.record_decided("camp", [Decided(*i, Status.SKIPPED, "unsubscribed") for i in items[650:]], now)
    r = CliRunner().invoke(cli, ["log", "--db", str(db), "--status", "failed"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split("\t") == ["step", "email", "status", "tries", "updated (UTC)", "reply / reason"]
    assert len(lines) == 651
    rows = [ln.split("\t") for ln in lines[1:]]
    assert all(len(row) == 6 for row in rows)  # tabs and line breaks in the data are flattened
    assert [row[1] for row in rows] == [f"p{i:04d}@example.org" for i in range(650)]
    assert {row[2] for row in rows} == {"failed"} and rows[0][5] == "address rejected by policy"


def test_record_commands_start_without_the_sending_machinery() -> None:
    """`mailer status` / `mailer log` must start fast: no pydantic, asyncio, Jinja2 or SMTP
    client is imported before a command needs it (they cost ~0.3 s on every start)."""
    import subprocess
    import sys

    probe = (
        "import sys, mailer.cli; "
        "print(' '.join(m for m in ('pydantic', 'asyncio', 'jinja2', 'aiosmtplib', 'email_validator',"
        " 'rich.progress', 'sqlite_utils') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""

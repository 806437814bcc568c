"""schedules.yaml: resolved times of the shipped campaign and a table of bad inputs."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailer import config
from mailer.errors import ConfigError
from mailer.times import parse_duration

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
campaign: t
timezone: Europe/Brussels
language: nl
sender: {from: a@example.org}
contacts: [c.csv]
events:
  - id: ev
    title: Event
    start: 2018-01-22 09:30
    end: 2018-01-22 16:30
steps:
  - id: s1
    event: ev
    template: invite
    at: -7d 09:00
"""


def test_shipped_campaign_times() -> None:
    c = config.load(ROOT / "schedules.yaml")
    assert c.timezone.key == "Europe/Brussels"
    info, meeting = c.event("infosessie"), c.event("aan-de-slag")
    assert info.all_day and info.location is None
    assert info.start.date().isoformat() == "2018-01-16"
    assert meeting.start.astimezone(UTC) == datetime(2018, 1, 22, 8, 30, tzinfo=UTC)
    assert meeting.end.astimezone(UTC) == datetime(2018, 1, 22, 15, 30, tzinfo=UTC)
    assert "Arduinkaai 7" in (meeting.location or "") and "zaal Top" in (meeting.location or "")
    at = {s.id: s.at for s in c.steps}
    assert at["herinnering-aan-de-slag-week"].replace(tzinfo=None) == datetime(2018, 1, 15, 9, 0)
    assert at["herinnering-aan-de-slag-dag"].replace(tzinfo=None) == datetime(2018, 1, 19, 9, 0)
    kinds = {s.id: s.kind for s in c.steps}
    assert kinds["uitnodiging-aan-de-slag"] == "invitation"
    assert kinds["herinnering-infosessie-dag"] == "reminder"
    # steps come sorted by send time
    assert [s.at for s in c.steps] == sorted(s.at for s in c.steps)


@pytest.mark.parametrize(
    ("rule", "local"),
    [
        ("-7d 09:00", datetime(2018, 1, 15, 9, 0)),
        ("-1d", datetime(2018, 1, 21, 9, 30)),
        ("-2h", datetime(2018, 1, 22, 7, 30)),
        ("-30m", datetime(2018, 1, 22, 9, 0)),
        ("-1d 2h", datetime(2018, 1, 21, 7, 30)),
        ("2018-01-03 10:15", datetime(2018, 1, 3, 10, 15)),
    ],
)
def test_relative_times(rule: str, local: datetime, tmp_path: Path) -> None:
    c = config.loads(BASE.replace("-7d 09:00", rule), tmp_path / "s.yaml")
    assert c.steps[0].at.replace(tzinfo=None) == local


def test_relative_days_keep_wall_clock_across_dst(tmp_path: Path) -> None:
    # Event on Monday 26 March 2018, after the switch to summer time on the 25th:
    # "-7d 09:00" is 09:00 local (CET, UTC+1) on the 19th, not 08:00 or 10:00.
    text = BASE.replace("2018-01-22 09:30", "2018-03-26 09:30").replace(
        "2018-01-22 16:30", "2018-03-26 16:30"
    )
    c = config.loads(text, tmp_path / "s.yaml")
    assert c.steps[0].at.utcoffset() == timedelta(hours=1)
    assert c.steps[0].at.hour == 9
    assert c.event("ev").start.utcoffset() == timedelta(hours=2)


def _err(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(textwrap.dedent(text), tmp_path / "schedules.yaml")
    return [str(p) for p in info.value.problems]


BAD = [
    ("malformed yaml", BASE + "steps: [\n", ["schedules.yaml:", "not valid YAML"]),
    (
        "unknown key",
        BASE.replace("language: nl", "language: nl\ncolour: red"),
        ["schedules.yaml:4: colour: unknown key"],
    ),
    (
        "unknown key in a step",
        BASE + "    atx: 1\n",
        ["schedules.yaml:16: steps[0].atx: unknown key"],
    ),
    (
        "bad time zone",
        BASE.replace("Europe/Brussels", "Europe/Brussel"),
        ["schedules.yaml:2: timezone: unknown time zone 'Europe/Brussel'"],
    ),
    (
        "dst gap",
        BASE.replace("-7d 09:00", "2018-03-25 02:30"),
        ["steps[0].at", "does not exist in Europe/Brussels"],
    ),
    (
        "dst overlap",
        BASE.replace("-7d 09:00", "2017-10-29 02:30"),
        ["steps[0].at", "happens twice"],
    ),
    (
        "unknown event",
        BASE.replace("event: ev", "event: nope"),
        ["schedules.yaml:13: steps[0].event: unknown event 'nope'; known events: ev"],
    ),
    (
        "step after event",
        BASE.replace("-7d 09:00", "2018-01-23 09:00"),
        ["steps[0].at", "after event 'ev' ends"],
    ),
    (
        "end before start",
        BASE.replace("end: 2018-01-22 16:30", "end: 2018-01-22 08:00"),
        ["events[0].end: end must be after start"],
    ),
    (
        "missing key",
        BASE.replace("    title: Event\n", ""),
        ["events[0].title: required key is missing"],
    ),
    (
        "bad send time",
        BASE.replace("-7d 09:00", "next week"),
        ["steps[0].at", "is not a send time"],
    ),
    (
        "bad sender",
        BASE.replace("a@example.org", "not-an-address"),
        ["sender.from", "not a valid address"],
    ),
    (
        "date and start",
        BASE.replace("    start: 2018-01-22 09:30\n", "    start: 2018-01-22 09:30\n    date: 2018-01-22\n"),
        ["events[0].date: give either date"],
    ),
    (
        "duplicate step",
        BASE + "  - {id: s1, event: ev, template: invite, at: -1d}\n",
        ["steps[1].id: duplicate step id 's1'"],
    ),
    ("bad rate", BASE + "smtp: {rate: fast}\n", ["smtp.rate", "is not a rate"]),
    (
        "update kind by hand",
        BASE.replace("at: -7d 09:00", "at: -7d 09:00\n    kind: update"),
        ["steps[0].kind", "mailer sends updates and cancellations itself"],
    ),
    (
        "bad event status",
        BASE.replace("    title: Event\n", "    title: Event\n    status: postponed\n"),
        ["events[0].status", "'confirmed' or 'cancelled'"],
    ),
    (
        "bad rsvp",
        BASE.replace("at: -7d 09:00", "at: -7d 09:00\n    audience: {rsvp: [maybe]}"),
        ["steps[0].audience.rsvp[0]", "'accepted', 'tentative', 'declined' or 'no-reply'"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config(text: str, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    problems = _err(text, tmp_path)
    joined = "\n".join(problems)
    for piece in expected:
        assert piece in joined, joined


def test_all_problems_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = (
        BASE.replace("event: ev", "event: nope")
        + "  - {id: s2, event: ev, template: x, at: 2018-03-25 02:30}\n"
    )
    problems = _err(text, tmp_path)
    assert any("unknown event" in p for p in problems)
    assert any("does not exist" in p for p in problems)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.yaml")
    assert "file not found" in str(info.value)


def test_all_day_multi_day(tmp_path: Path) -> None:
    text = BASE.replace(
        "    start: 2018-01-22 09:30\n    end: 2018-01-22 16:30\n",
        "    date: 2018-01-22\n    end_date: 2018-01-23\n",
    )
    c = config.loads(text, tmp_path / "s.yaml")
    ev = c.event("ev")
    assert ev.all_day and ev.last_date.isoformat() == "2018-01-23"
    assert ev.end.replace(tzinfo=None) == datetime(2018, 1, 24)


def test_durations() -> None:
    assert parse_duration("1w 2d 3h 4m") == timedelta(weeks=1, days=2, hours=3, minutes=4)
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.parametrize("ledger_line", ["", "ledger: data/ledger.db\n", "ledger: /srv/mailer/x.db\n"])
def test_ledger_setting_is_the_path_load_resolves(
    ledger_line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record commands read `ledger:` without validating the file; it must be the same path."""
    from mailer.yamlsource import ledger_setting

    (tmp_path / "c.csv").write_text("email\nx@example.org\n", encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "schedules.yaml").write_text(BASE + ledger_line, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for path in (Path("schedules.yaml"), tmp_path / "schedules.yaml"):
        assert ledger_setting(path) == config.load(path).ledger
    assert ledger_setting(ROOT / "schedules.yaml") == config.load(ROOT / "schedules.yaml").ledger
    # an unrelated mistake does not hide the ledger from `mailer log`
    (tmp_path / "schedules.yaml").write_text(BASE.replace("Europe/Brussels", "Mars/Base") + ledger_line)
    with pytest.raises(ConfigError):
        config.load(tmp_path / "schedules.yaml")
    expected = (tmp_path / (ledger_line.split(": ")[1].strip() if ledger_line else "mailer.db")).resolve()
    assert ledger_setting(tmp_path / "schedules.yaml") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "missing.yaml: file not found; pass --config PATH or create schedules.yaml"),
        ("campaign: [unclosed\n", "schedules.yaml:2: not valid YAML: while parsing a flow sequence"),
        ("- just\n- a list\n", "schedules.yaml:1: expected a mapping of keys"),
        ("campaign: t\nledger: ''\n", "schedules.yaml:2: ledger: must be a file name such as mailer.db"),
        ("campaign: t\nledger: [a, b]\n", "schedules.yaml:2: ledger: must be a file name such as mailer.db"),
        ("campaign: t\nledger: 7\n", "schedules.yaml:2: ledger: must be a file name such as mailer.db"),
        (b"\xff\xfe\x00", "schedules.yaml: cannot read: 'utf-8' codec can't decode"),
        ("a: &x [1]\nledger: *x\n", "schedules.yaml:1: YAML aliases (&/*) are not allowed"),
    ],
)
def test_ledger_setting_says_why_it_cannot_name_the_ledger(
    text: str | bytes | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 2: None here made the record commands fall back to ./mailer.db."""
    from mailer.yamlsource import ledger_setting

    monkeypatch.chdir(tmp_path)
    path = Path("missing.yaml" if text is None else "schedules.yaml")
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        ledger_setting(path)
    assert str(info.value).startswith(expected), str(info.value)


def test_an_empty_ledger_setting_is_a_config_error_too(tmp_path: Path) -> None:
    """`ledger: ""` resolved to the campaign folder itself."""
    (tmp_path / "c.csv").write_text("email\nx@example.org\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ledger: String should have at least 1 character"):
        config.loads(BASE + "ledger: ' '\n", tmp_path / "s.yaml")


def test_replace_leaves_the_original_campaign_alone(tmp_path: Path) -> None:
    """Issue 11 item 6: replace() shared the event index dict, and the copy rewrote it."""
    import dataclasses
    import pickle

    c = config.loads(BASE, tmp_path / "s.yaml")
    moved = dataclasses.replace(c.event("ev"), title="Moved", id="ev2")
    other = dataclasses.replace(c, events=(moved,))
    assert other.event("ev2").title == "Moved"
    with pytest.raises(KeyError):
        other.event("ev")
    assert c.event("ev").title == "Event"
    with pytest.raises(KeyError):
        c.event("ev2")
    # immutable in fact: no field can be set and the index cannot be written through
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.events = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        c._events_by_id["x"] = moved  # type: ignore[index]
    # the composing worker receives a pickled campaign; it must answer the same
    again = pickle.loads(pickle.dumps(c))
    assert again == c and again.event("ev") == c.event("ev")
    # no list, dict or set in any field of the resolved values
    values: list[Any] = [c, c.sender, c.smtp, c.delivery, *c.events, *c.steps, *(s.audience for s in c.steps)]
    for value in values:
        for f in dataclasses.fields(value):
            assert not isinstance(getattr(value, f.name), list | dict | set), (type(value), f.name)

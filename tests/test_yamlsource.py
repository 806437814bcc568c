"""Hostile campaign files (issue 11 item 14): an alias bomb, deep nesting and a huge file are
refused with a one-line problem naming file and line, in every reader of schedules.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from mailer.cli import cli
from mailer.errors import ConfigError
from mailer.yamlsource import MAX_BYTES, ledger_setting, load_yaml

# "Billion laughs": 9 levels of 9 aliases, 9**9 (387 million) strings once expanded.
BOMB = textwrap.dedent(
    """\
    campaign: t
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    events: *i
    """
)
DEEP = "campaign: t\nevents: " + "[" * 5000 + "]" * 5000 + "\n"

# Run in a child process so that the old loader (minutes, gigabytes) fails by timeout instead
# of taking the machine down; the child reports its own time and memory growth.
CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # the old loader would take 8.9 GB
from pathlib import Path
from mailer.errors import ConfigError
from mailer import config
from mailer.yamlsource import ledger_setting
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
messages = []
for read in (config.load, ledger_setting):
    try:
        read(path)
        messages.append(None)
    except ConfigError as exc:
        messages.append(str(exc))
seconds = time.perf_counter() - t0
grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"messages": messages, "seconds": seconds, "grew_kib": grew_kib}))
"""


def test_alias_bomb_is_refused_at_once_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(BOMB, encoding="utf-8")
    assert len(BOMB.encode()) < 400
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's mailer
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = "schedules.yaml:2: YAML aliases (&/*) are not allowed in a campaign file"
    assert [m and m.startswith(expected) for m in result["messages"]] == [True, True], result
    assert result["seconds"] < 1.0, result
    assert result["grew_kib"] < 20_000, result  # nothing was expanded


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BOMB, "s.yaml:2: YAML aliases (&/*) are not allowed"),
        ("steps:\n  - &one {id: a}\n", "s.yaml:2: YAML aliases (&/*) are not allowed"),
        ("a: 1\nb: <<\n<<: *x\n", "s.yaml:3: YAML aliases (&/*) are not allowed"),
        (DEEP, "s.yaml:2: nested more than 32 levels deep"),
        ("a:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(200)), "s.yaml:32: nested more than"),
        ("#" * (MAX_BYTES + 1), "s.yaml: larger than 1024 KiB"),
    ],
)
def test_load_yaml_refuses_with_file_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml(text, "s.yaml")
    assert str(info.value).startswith(expected), str(info.value)
    assert len(info.value.problems) == 1


def test_a_normal_campaign_nests_well_within_the_limits() -> None:
    text = (ROOT / "schedules.yaml").read_text(encoding="utf-8")
    data, lines = load_yaml(text, "schedules.yaml")
    assert data["campaign"] and lines[("steps", 0, "id")] > 1


def test_a_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_bytes(b"# padding\n" * (MAX_BYTES // 10 + 1))
    for read in (ledger_setting, __import__("mailer.config").config.load):
        with pytest.raises(ConfigError, match="larger than 1024 KiB; a campaign file is a few KiB"):
            read(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BOMB, "schedules.yaml:2: YAML aliases (&/*) are not allowed"),
        (DEEP, "schedules.yaml:2: nested more than 32 levels deep"),
    ],
)
def test_check_says_what_is_wrong_without_a_traceback(
    text: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("schedules.yaml").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["check"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output

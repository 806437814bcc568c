"""Reading YAML with the line of every key, so that each problem can name its line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem

__all__ = ["YamlPath", "fmt_path", "line_for", "load_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves dates and times as strings, so that we parse them with
    the campaign's time zone and report our own errors."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

YamlPath = tuple[str | int, ...]


def _lines(node: yaml.Node, path: YamlPath = ()) -> Iterator[tuple[YamlPath, int]]:
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark)
            yield (*path, key), k.start_mark.line + 1
            for sub, line in _lines(v, (*path, key)):
                if sub != (*path, key):
                    yield sub, line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _lines(v, (*path, i))


def load_yaml(text: str, where: str) -> tuple[Any, dict[YamlPath, int]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError(
            [Problem(f"{where}{line}", f"not valid YAML: {msg}; check indentation and quoting")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(where, f"not valid YAML: {exc}")]) from None
    lines = dict(_lines(node)) if node is not None else {}
    return data, lines


def fmt_path(loc: YamlPath) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_for(lines: dict[YamlPath, int], loc: YamlPath) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def ledger_setting(config_path: Path) -> Path | None:
    """The ledger file a campaign file names (``ledger:``, relative to its folder; default
    ``mailer.db`` there), read without validating the rest of the file, or None when the file
    cannot be read as YAML.

    The record commands (log, export, retry, suppress) need only this, so they start without
    loading the validation machinery, and still work while schedules.yaml has an unrelated error.
    ``mailer.config.load`` resolves the same path for a valid file (tests/test_config.py).
    """
    try:
        data = yaml.load(config_path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = data.get("ledger", "mailer.db") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    return (config_path.parent / value).resolve()

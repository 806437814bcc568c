"""Reading YAML safely (size, depth and alias limits) with the line of every key, so that each
problem can name its line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem, display_path

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "YamlPath",
    "fmt_path",
    "ledger_setting",
    "line_for",
    "load_yaml",
    "read_yaml",
]

#: A campaign file is a few KiB (the shipped one is 3); 1 MiB leaves room for hundreds of events
#: while a hostile or mistaken file (a log, a dump) is refused before it is parsed.
MAX_BYTES = 1024 * 1024
#: schedules.yaml nests 6 levels (steps -> step -> audience -> lists -> item). PyYAML composes
#: recursively, so a file nested thousands deep would end in a RecursionError traceback.
MAX_DEPTH = 32
_ALIASES = (
    "YAML aliases (&/*) are not allowed in a campaign file; write each value out in full "
    "(anchors and aliases can expand a small file into gigabytes)"
)

YamlPath = tuple[str | int, ...]


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that we do not read: an anchor, an alias, too deep a nesting."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (issue 11 item 14: a 342-byte "billion
    laughs" file reached 8.9 GB) and deep nesting, and leaves dates and times as strings, so that
    we parse them with the campaign's time zone and report our own errors."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem=_ALIASES, problem_mark=event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(
                problem=f"nested more than {MAX_DEPTH} levels deep; a campaign file needs far fewer",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


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


def read_yaml(path: Path) -> str:
    """The text of a YAML file, read only up to :data:`MAX_BYTES`.

    :raises ConfigError: the file is missing, unreadable, too large or not UTF-8.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            [Problem(str(path), "file not found; pass --config PATH or create schedules.yaml")]
        ) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc}")]) from None
    if len(data) > MAX_BYTES:
        raise ConfigError([Problem(str(path), _too_large())])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc}")]) from None


def _too_large() -> str:
    return f"larger than {MAX_BYTES // 1024} KiB; a campaign file is a few KiB (is it the right file?)"


def load_yaml(text: str, where: str) -> tuple[Any, dict[YamlPath, int]]:
    """The data in ``text`` and the line of every key path in it.

    :param where: the file name problems show.
    :raises ConfigError: not YAML, too large, too deep, or using anchors/aliases.
    """
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError([Problem(where, _too_large())])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        if not isinstance(exc, _Refused):
            msg = f"not valid YAML: {msg}; check indentation and quoting"
        raise ConfigError([Problem(where, msg, line=mark.line + 1 if mark else None)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(where, f"not valid YAML: {exc}")]) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError([Problem(where, f"cannot read a value: {exc}")]) from None
    finally:
        loader.dispose()
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


def ledger_setting(config_path: Path) -> Path:
    """The ledger file a campaign file names (``ledger:``, relative to its folder; default
    ``mailer.db`` there), read without validating the rest of the file.

    The record commands (log, export, retry, suppress) need only this, so they start without
    loading the validation machinery, and still work while schedules.yaml has an unrelated error.
    ``mailer.config.load`` resolves the same path for a valid file (tests/test_config.py).

    :raises ConfigError: the file is missing, unreadable or not YAML (with the limits of
        :func:`load_yaml`), or ``ledger:`` is not a file name.
    """
    where = display_path(config_path)
    data, lines = load_yaml(read_yaml(config_path), where)
    if not isinstance(data, dict):
        raise ConfigError([Problem(where, "expected a mapping of keys (campaign:, events:, ...)", line=1)])
    value = data.get("ledger", "mailer.db")
    if not isinstance(value, str) or not value.strip():
        line = line_for(lines, ("ledger",))
        msg = "must be a file name such as mailer.db (relative to this file's folder)"
        raise ConfigError([Problem(where, msg, field="ledger", line=line)])
    return (config_path.parent / value.strip()).resolve()

"""What every command shares: consoles, clean error output, the common options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from .errors import ConfigError, MailerError, Problem

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

__all__ = [
    "Failed",
    "config_option",
    "db_option",
    "err",
    "handle_errors",
    "ledger_path",
    "out",
    "print_problems",
    "progress_bar",
    "table",
    "when",
]

F = TypeVar("F", bound=Callable[..., Any])


class _LazyConsole:
    """A rich Console made on first use: rich.console is about a third of the CLI's imports,
    and `mailer log` piped into a file or grep never needs it (issue 16)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
            if not console.is_terminal:  # tables stay readable when piped or captured
                console.width = 160  # (rich assumes 80 columns off a terminal)
            self._console = console
        return getattr(self._console, name)


# Typed as the Console they stand for: every attribute comes from it.
out = cast("Console", _LazyConsole(stderr=False))
err = cast("Console", _LazyConsole(stderr=True))


def _real(console: Any) -> Console:
    """The rich Console itself, for rich code that may set attributes on it (a progress bar)."""
    if isinstance(console, _LazyConsole):
        console.is_terminal  # noqa: B018  (makes it)
        assert console._console is not None
        return console._console
    return cast("Console", console)


class Failed(click.ClickException):
    """A MailerError shown without a traceback; exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        from rich.markup import escape

        for line in self.message.splitlines():
            err.print(f"[red]error:[/red] {escape(line)}", markup=True)


def print_problems(problems: list[Problem]) -> None:
    for p in problems:
        colour = "red" if p.severity == "error" else "yellow"
        err.print(f"[{colour}]{p.severity}:[/{colour}] ", end="", markup=True)
        err.print(str(p), markup=False)


def handle_errors(fn: F) -> F:
    """Turn our errors into clean messages and exit 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            print_problems(exc.problems)
            err.print(
                f"{len(exc.problems)} problem(s); fix them and run `mailer check` again. Nothing was sent.",
                markup=False,
            )
            raise SystemExit(1) from None
        except MailerError as exc:
            raise Failed(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default="schedules.yaml",
        show_default=True,
        envvar="MAILER_CONFIG",
        help="The campaign file (env MAILER_CONFIG).",
    )(fn)


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar="MAILER_DB",
        help="The ledger file (default: the ledger: schedules.yaml names; env MAILER_DB).",
    )(fn)


def ledger_path(db_path: Path | None, config_path: Path) -> Path:
    """``--db`` (or MAILER_DB), else the ``ledger:`` the campaign file names (default
    ``mailer.db`` next to it). Never a guess: a campaign file that cannot be read is an error,
    not a reason to use ``./mailer.db`` (issue 11 item 2: a second, silent ledger).

    :raises ConfigError: no ``--db`` and schedules.yaml is missing, unreadable or not YAML.
    """
    if db_path is not None:
        return db_path
    from .yamlsource import ledger_setting

    return ledger_setting(config_path)


def when(dt: datetime) -> str:
    return f"{dt:%a %Y-%m-%d %H:%M} {dt.tzname()}"


def table(title: str | None = None, columns: tuple[str, ...] = (), **kwargs: Any) -> Table:
    """A rich Table with these columns, titled on the left (rich.table loads on first use)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", **kwargs)
    for col in columns:
        t.add_column(col)
    return t


def progress_bar(label: str, *, disable: bool = False) -> Progress:
    """A progress bar on stderr, shown only on a terminal and gone when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_real(err),
        transient=True,
        disable=disable or not err.is_terminal,
    )

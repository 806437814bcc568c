"""Exception hierarchy and the Problem record used to report bad input all at once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "HasProblems",
    "Problem",
    "MailerError",
    "display_path",
    "ConfigError",
    "ContactsError",
    "TemplateError",
    "LedgerError",
    "LockedError",
    "InboxError",
    "TransportError",
    "TransportFatalError",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, with where it is and what to do.

    Where it is comes as data, for code to act on: ``file`` (as shown to the user, relative to
    the working folder when it can be), ``line`` (schedules.yaml, a template) or ``row`` (a
    contact file, the physical line the record starts on), ``field`` (a dotted path such as
    ``steps[2].at``, or a CSV column; may be empty), and what it concerns: the ``step``, the
    ``template`` name and its ``language`` (normalised, ``nl_BE``). ``where`` is only for display.

    >>> p = Problem("schedules.yaml", "unknown key", field="steps[0].foo", line=12)
    >>> str(p), p.where
    ('schedules.yaml:12: steps[0].foo: unknown key', 'schedules.yaml:12')
    >>> str(Problem("contacts/a.csv", "row skipped", "email", row=4))
    'contacts/a.csv:row 4: email: row skipped'
    """

    file: str
    message: str
    field: str = ""
    severity: Literal["error", "warning"] = "error"
    _: KW_ONLY
    line: int | None = None
    row: int | None = None
    step: str | None = None
    template: str | None = None
    language: str | None = None

    @property
    def where(self) -> str:
        """``file``, ``file:line`` or ``file:row N``."""
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file}:row {self.row}"
        return self.file

    def __str__(self) -> str:
        parts = [self.where]
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


def display_path(path: Path, root: Path | None = None) -> str:
    """``path`` as problems name it: relative to ``root`` (default: the working folder) when it
    lies under it, else as given.

    >>> display_path(Path("/srv/c/contacts/a.csv"), Path("/srv/c"))
    'contacts/a.csv'
    >>> display_path(Path("/elsewhere/a.csv"), Path("/srv/c"))
    '/elsewhere/a.csv'
    """
    root = Path.cwd() if root is None else root
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        pass
    try:  # the same place reached through a symlink (/tmp -> /private/tmp)
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


class HasProblems:
    """Splits a ``problems`` list into errors and warnings (for results that carry one)."""

    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


class MailerError(Exception):
    """Root of every error this package raises on purpose."""


class _ProblemsError(MailerError):
    """An error that carries one or more :class:`Problem` records."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p).lstrip(": ") for p in self.problems))


class ConfigError(_ProblemsError):
    """schedules.yaml is unreadable or invalid."""


class ContactsError(_ProblemsError):
    """A contact list cannot be used at all (unreadable, no email column)."""


class TemplateError(_ProblemsError):
    """A template is missing, does not parse, or fails to render."""


class LedgerError(MailerError):
    """The delivery ledger cannot be opened or is inconsistent."""


class LockedError(LedgerError):
    """Another sending process holds the ledger."""


class InboxError(MailerError):
    """The mailbox cannot be read or is not configured (IMAP, TLS, Maildir)."""


class TransportError(MailerError):
    """An SMTP problem tied to one message or one connection (may be retried)."""


class TransportFatalError(TransportError):
    """An SMTP problem that stops the run: login refused, TLS failure, bad settings."""

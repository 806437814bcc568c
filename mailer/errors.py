"""Exception hierarchy and the Problem record used to report bad input all at once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HasProblems",
    "Problem",
    "MailerError",
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

    ``where`` is ``file``, ``file:line`` or ``file:row N``; ``field`` is a dotted path
    such as ``steps[2].at`` (may be empty).

    >>> str(Problem("schedules.yaml:12", "unknown key", field="steps[0].foo"))
    'schedules.yaml:12: steps[0].foo: unknown key'
    """

    where: str
    message: str
    field: str = ""
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        parts = [self.where]
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


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

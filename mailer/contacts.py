"""Contact lists: reading CSV files into validated, normalised, de-duplicated contacts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import Problem

__all__ = ["Contact", "ContactList", "load_contacts"]


@dataclass(frozen=True)
class Contact:
    """One recipient. ``email`` is normalised (email-validator); ``fields`` holds every other
    CSV column (template variables), keys lower-cased with spaces turned into ``_``."""

    email: str
    name: str = ""
    language: str | None = None
    lists: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    fields: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # "contacts/partners.csv:row 4"


@dataclass
class ContactList:
    """What loading gives: the usable contacts (sorted by email) and every problem found."""

    contacts: list[Contact]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

"""A loaded campaign: config, contacts and templates together, with every problem found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Campaign, Step, contact_files, contact_links_outside, load
from .contacts import Contact, ContactList, InvalidContact, load_contacts
from .errors import ConfigError, HasProblems, Problem, display_path
from .templates import Templates
from .yamlsource import load_yaml, read_yaml

__all__ = ["Workspace", "load_workspace", "survey"]


@dataclass
class Workspace(HasProblems):
    """Everything a pass needs. ``problems`` holds contact and template problems (config
    problems raise :class:`~mailer.errors.ConfigError` instead, since nothing works without it).
    ``invalid`` holds the contact rows whose address cannot be used: never mailed, recorded as
    ``invalid`` in each step whose audience would include them."""

    campaign: Campaign
    contacts: list[Contact]
    templates: Templates
    problems: list[Problem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    invalid: list[InvalidContact] = field(default_factory=list)
    _audiences: dict[tuple[object, ...], list[Contact]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def blocking(self) -> list[Problem]:
        """Problems that forbid sending: every error (a contact file that could not be read,
        a template that is missing or does not parse). A row whose address cannot be used is a
        warning, not an error: that one person cannot be mailed anyway, and is recorded as
        ``invalid`` so staff see it."""
        return self.errors

    def audience(self, step: Step) -> list[Contact]:
        """The contacts of ``contacts`` whose lists and tags ``step``'s audience matches (a new
        list each call). Worked out once per audience and contact list: check asks for each
        step's several times (issue 16)."""
        key = (step.audience.lists, step.audience.tags, id(self.contacts), len(self.contacts))
        found = self._audiences.get(key)
        if found is None:
            found = [c for c in self.contacts if step.audience.matches(c.lists, c.tags)]
            self._audiences[key] = found
        return list(found)


def load_workspace(config_path: str | Path) -> Workspace:
    """Load schedules.yaml, its contact files and its templates.

    :raises ConfigError: schedules.yaml itself is invalid (every problem listed).
    """
    campaign = load(config_path)
    names = list(dict.fromkeys(s.template for s in campaign.steps))
    cl, templates, problems, paths = _contacts_and_templates(
        campaign.config_path,
        campaign.contacts,
        campaign.templates_dir,
        campaign.language,
        names,
        (campaign.update_template, campaign.cancel_template),
    )
    files = [campaign.config_path, *paths, *sorted(campaign.templates_dir.rglob("*"))]
    return Workspace(
        campaign, cl.contacts, templates, problems, [f for f in files if f.is_file()], cl.invalid
    )


def survey(config_path: str | Path) -> tuple[Workspace | None, list[Problem]]:
    """For `mailer check`: the workspace (None when schedules.yaml has errors) and the problems
    of every stage at once. When schedules.yaml is invalid, the contact files and templates it
    names are still read and checked, so one run shows everything (issue 12: a broken file used
    to take four runs)."""
    try:
        ws = load_workspace(config_path)
    except ConfigError as exc:
        return None, [*exc.problems, *_beyond_config(Path(config_path))]
    return ws, list(ws.problems)


def _beyond_config(config_path: Path) -> list[Problem]:
    """The problems of the contact files and templates an invalid schedules.yaml names, read
    from its raw values (each one that is unusable is left out: the schema already said why)."""
    try:
        data, _ = load_yaml(read_yaml(config_path), display_path(config_path))
    except ConfigError:
        return []  # not YAML at all: its one problem is already listed
    if not isinstance(data, dict):
        return []

    def text(key: str, default: str) -> str | None:
        value = data.get(key, default)
        return value.strip() if isinstance(value, str) and value.strip() else None

    patterns: Any = data.get("contacts")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        patterns = []
    steps = data.get("steps")
    names = [
        s["template"]
        for s in (steps if isinstance(steps, list) else [])
        if isinstance(s, dict) and isinstance(s.get("template"), str)
    ]
    base = config_path.absolute().parent
    folder, language = text("templates", "templates"), text("language", "en")
    extra = [n for n in (text("update_template", "update"), text("cancel_template", "cancel")) if n]
    if folder is None or language is None:
        names, extra = [], []  # no templates to look at, or no language to check them against
    _, _, problems, _ = _contacts_and_templates(
        config_path.absolute(),
        patterns,
        (base / (folder or "templates")).resolve(),
        language or "en",
        names,
        extra,
    )
    return problems


def _contacts_and_templates(
    config_path: Path,
    patterns: tuple[str, ...] | list[str],
    templates_dir: Path,
    language: str,
    names: list[str],
    revisions: tuple[str, ...] | list[str],
) -> tuple[ContactList, Templates, list[Problem], list[Path]]:
    """Read the contact files the ``patterns`` match and check the templates ``names`` (steps)
    and ``revisions`` (update and cancel, optional: a warning when missing)."""
    problems: list[Problem] = []
    found = contact_files(config_path.parent, patterns)
    for pattern, matches in found.items():
        if not matches:
            problems.append(
                Problem(config_path.name, f"contacts pattern {pattern!r} matches no file", field="contacts")
            )
    problems.extend(contact_links_outside(config_path.parent, patterns))  # never read (issue 12)
    paths = list(dict.fromkeys(m for matches in found.values() for m in matches))
    cl = load_contacts(paths, display_root=Path.cwd())
    problems.extend(cl.problems)
    templates = Templates(templates_dir, language)
    names = list(names)
    for name, what in zip(revisions, ("an update", "a cancellation"), strict=False):
        if templates.languages(name):
            names.append(name)
        elif names:  # no step template is checked either: say nothing about these
            problems.append(
                Problem(
                    display_path(templates_dir / name),
                    f"no {name!r} template: if an event changes after its invitations went out, "
                    f"{what} cannot be sent; add {name}/{templates.default_language}/ (see README)",
                    severity="warning",
                    template=name,
                )
            )
    if names:
        problems.extend(templates.check(names))
    return cl, templates, problems, paths

"""A loaded campaign: config, contacts and templates together, with every problem found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Campaign, Step, load
from .contacts import Contact, load_contacts
from .errors import HasProblems, Problem, display_path
from .templates import Templates

__all__ = ["Workspace", "load_workspace"]


@dataclass
class Workspace(HasProblems):
    """Everything a pass needs. ``problems`` holds contact and template problems (config
    problems raise :class:`~mailer.errors.ConfigError` instead, since nothing works without it)."""

    campaign: Campaign
    contacts: list[Contact]
    templates: Templates
    problems: list[Problem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def blocking(self) -> list[Problem]:
        """Problems that forbid sending: a contact file that could not be read at all (its
        recipients would be silently missed) or a template that is missing or does not parse.
        A single bad row is not blocking: that address cannot be mailed anyway."""
        return [p for p in self.errors if p.row is None]

    def audience(self, step: Step) -> list[Contact]:
        return [c for c in self.contacts if step.audience.matches(c.lists, c.tags)]


def load_workspace(config_path: str | Path) -> Workspace:
    """Load schedules.yaml, its contact files and its templates.

    :raises ConfigError: schedules.yaml itself is invalid (every problem listed).
    """
    campaign = load(config_path)
    problems: list[Problem] = []
    paths = campaign.contact_paths()
    for pattern, matches in campaign.contact_files().items():
        if not matches:
            problems.append(
                Problem(
                    campaign.config_path.name,
                    f"contacts pattern {pattern!r} matches no file",
                    field="contacts",
                )
            )
    cl = load_contacts(paths, display_root=Path.cwd())
    problems.extend(cl.problems)
    templates = Templates(campaign.templates_dir, campaign.language)
    names = sorted({s.template for s in campaign.steps})
    for name, what in (
        (campaign.update_template, "an update"),
        (campaign.cancel_template, "a cancellation"),
    ):
        if templates.languages(name):
            names.append(name)
        else:
            problems.append(
                Problem(
                    display_path(campaign.templates_dir / name),
                    f"no {name!r} template: if an event changes after its invitations went out, "
                    f"{what} cannot be sent; add {name}/{campaign.language}/ (see README)",
                    severity="warning",
                    template=name,
                )
            )
    problems.extend(templates.check(names))
    files = [campaign.config_path, *paths, *sorted(campaign.templates_dir.rglob("*"))]
    return Workspace(campaign, cl.contacts, templates, problems, [f for f in files if f.is_file()])

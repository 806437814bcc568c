"""What check warns about: mistakes that send the wrong thing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Literal

from .config import TEXT_FIELDS, Campaign, Step, language_key, pick
from .contacts import Contact
from .errors import ConfigError, Problem, display_path
from .vocab import Answer, StepKind
from .workspace import Workspace
from .yamlsource import YamlPath, fmt_path, line_for, load_yaml, read_yaml

__all__ = ["review"]

#: How many addresses a warning names before "and N more".
EXAMPLES = 3


def review(ws: Workspace) -> list[Problem]:
    """Mistakes in a valid campaign that would send someone the wrong mail, or none: a step at
    or after its event's start (an error: it can send nothing), a reminder to people no
    invitation reaches, two invitations to the same people, a language with no template, the
    organiser's own address among the contacts. Each names the file and line or row."""
    c = ws.campaign
    at = _Places(c)
    audiences = {s.id: ws.audience(s) for s in c.steps}
    keyed = _Keyed(audiences, c.steps)
    return [
        *_at_or_after_start(c, at),
        *_reminders_beyond_invitations(c, audiences, at, keyed),
        *_overlapping_invitations(c, audiences, at, keyed),
        *_languages_without_template(ws, audiences),
        *_organiser_among_contacts(c, audiences, ws.contacts),
        *_languages_without_event_text(c, audiences, at),
    ]


class _Places:
    """Problems about steps, with the line of schedules.yaml they are on."""

    def __init__(self, campaign: Campaign) -> None:
        self.file = display_path(campaign.config_path)
        self.lines: dict[YamlPath, int] = {}
        self.index: dict[str, int] = {}
        try:
            data, self.lines = load_yaml(read_yaml(campaign.config_path), self.file)
        except ConfigError:  # changed on disk since it was loaded: no lines, still the problem
            return
        steps = data.get("steps") if isinstance(data, dict) else None
        for i, s in enumerate(steps if isinstance(steps, list) else []):
            if isinstance(s, dict) and isinstance(s.get("id"), str):
                self.index.setdefault(s["id"], i)

    def problem(
        self,
        step: Step,
        message: str,
        key: str | None = None,
        severity: Literal["error", "warning"] = "warning",
    ) -> Problem:
        i = self.index.get(step.id)
        loc: YamlPath = ("steps", i) if i is not None else ()
        if loc and key:
            loc = (*loc, key)
        return Problem(
            self.file,
            message,
            fmt_path(loc),
            severity,
            line=line_for(self.lines, loc) if loc else None,
            step=step.id,
        )


def _some(emails: Iterable[str]) -> str:
    """``a, b, c and 4 more``."""
    items = sorted(emails)
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f" and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")


class _Keyed:
    """Each step's audience as {address lower-cased: address as written}, made once per
    audience (steps with the same lists and tags share it)."""

    def __init__(self, audiences: dict[str, list[Contact]], steps: Iterable[Step] = ()) -> None:
        self.audiences = audiences
        self.same = {s.id: (s.audience.lists, s.audience.tags) for s in steps}
        self.done: dict[object, dict[str, str]] = {}

    def __call__(self, step_id: str) -> dict[str, str]:
        key = self.same.get(step_id, step_id)
        found = self.done.get(key)
        if found is None:
            found = self.done[key] = {x.email.lower(): x.email for x in self.audiences[step_id]}
        return found


def _at_or_after_start(c: Campaign, at: _Places) -> Iterator[Problem]:
    """A step at or after its event's start sends nothing: the planner skips every recipient
    as "the event had started". An error, since it can never send a mail."""
    for s in c.steps:
        ev = c.event(s.event)
        if s.at >= ev.start:
            yield at.problem(
                s,
                f"{s.at:%Y-%m-%d %H:%M} is at or after event {ev.id} starts "
                f"({ev.start:%Y-%m-%d %H:%M}{', all day' if ev.all_day else ''}): every recipient "
                "would be skipped as 'the event had started', so this step sends nothing; "
                "move it before the start",
                "at",
                "error",
            )


def _reminders_beyond_invitations(
    c: Campaign, audiences: dict[str, list[Contact]], at: _Places, keyed: _Keyed | None = None
) -> Iterator[Problem]:
    """A reminder that reaches people none of the event's invitations reaches: they would be
    reminded of an event they were never invited to. (A reminder only for people who answered
    cannot reach anyone uninvited: only a ``no-reply`` or no ``rsvp`` filter can.)"""
    keyed = keyed or _Keyed(audiences)
    by_event: dict[str, set[str]] = {}  # event -> who its invitations reach
    for s in c.steps:
        if s.kind is not StepKind.REMINDER:
            continue
        if s.audience.rsvp and Answer.NO_REPLY not in s.audience.rsvp:
            continue
        invited = by_event.get(s.event)
        if invited is None:
            invited = by_event[s.event] = set()
            for inv in c.steps:
                if inv.event == s.event and inv.kind is StepKind.INVITATION:
                    invited.update(keyed(inv.id))
        mine = keyed(s.id)
        extra = {mine[k] for k in mine.keys() - invited}
        if extra:
            yield at.problem(
                s,
                f"reminder {s.id} reaches {len(extra)} contact(s) that no invitation of event "
                f"{s.event} reaches ({_some(extra)}): they would be reminded of an event they were "
                "never invited to; add their lists to an invitation's audience, or narrow the reminder's",
            )


def _overlapping_invitations(
    c: Campaign, audiences: dict[str, list[Contact]], at: _Places, keyed: _Keyed | None = None
) -> Iterator[Problem]:
    """Two invitation steps of one event whose audiences share people: those get two
    invitations (steps are sorted by time, so the later one is named)."""
    by_event: dict[str, list[Step]] = defaultdict(list)
    for s in c.steps:
        if s.kind is StepKind.INVITATION:
            by_event[s.event].append(s)
    keyed = keyed or _Keyed(audiences)
    for event, steps in by_event.items():
        for i, later in enumerate(steps):
            mine = keyed(later.id)
            for earlier in steps[:i]:
                both = [mine[k] for k in keyed(earlier.id).keys() & mine.keys()]
                if both:
                    yield at.problem(
                        later,
                        f"invitations {earlier.id} and {later.id} of event {event} both go to "
                        f"{len(both)} contact(s) ({_some(both)}): they would get two invitations; "
                        "make the audiences disjoint (lists, tags), or make one a reminder (kind:)",
                    )


def _base(language: str) -> str:
    return language.replace("-", "_").partition("_")[0].lower()


def _languages_without_template(ws: Workspace, audiences: dict[str, list[Contact]]) -> Iterator[Problem]:
    """Contacts whose language a template has no version in get the campaign language (French
    contacts silently got Dutch): one warning per language, with the count and the templates."""
    c, templates = ws.campaign, ws.templates
    # template -> the steps whose audiences read it (update and cancel: every calendar holder)
    readers: dict[str, list[str]] = defaultdict(list)
    for s in c.steps:
        readers[s.template].append(s.id)
    calendar = [s.id for s in c.steps if s.attach_ics]
    for name in (c.update_template, c.cancel_template):
        if calendar:
            readers[name] += [sid for sid in calendar if sid not in readers[name]]
    languages: dict[str, dict[str | None, None]] = {}  # step -> its contacts' languages
    for sid in {sid for sids in readers.values() for sid in sids}:
        languages[sid] = dict.fromkeys(x.language for x in audiences[sid])
    # (contact language, language used) -> the templates and the contacts concerned
    fallen: dict[tuple[str, str], tuple[dict[str, None], dict[str, None]]] = {}
    for name, sids in readers.items():
        if not templates.languages(name):
            continue  # a missing template is a problem of its own
        for language in dict.fromkeys(lang for sid in sids for lang in languages[sid]):
            if not language:
                continue
            used = templates.language_for(name, language)
            if used is not None and _base(used) != _base(language):
                names, emails = fallen.setdefault((_base(language), used), ({}, {}))
                names[name] = None
                for sid in sids:
                    emails.update((x.email, None) for x in audiences[sid] if x.language == language)
    for (language, used), (names, emails) in sorted(fallen.items()):
        listed = ", ".join(names)
        yield Problem(
            display_path(templates.root),
            f"{len(emails)} contact(s) with language {language} get mails in {used} "
            f"({_some(emails)}): template(s) {listed} have no {language} version; add "
            f"<template>/{language}/ to each, or write {used} in their language column",
            severity="warning",
            template=next(iter(names)) if len(names) == 1 else None,
            language=language,
        )


def _organiser_among_contacts(
    c: Campaign, audiences: dict[str, list[Contact]], contacts: Iterable[Contact]
) -> Iterator[Problem]:
    """The organiser's (or sender's) own address in a step's audience: the planner leaves it out
    of every step with a calendar (it must never be an ATTENDEE of its own meeting); say so, so
    the organiser knows why that row is skipped."""
    own = {c.sender.address.lower(): "sender.from", c.sender.organizer.lower(): "sender.organizer"}
    if not any(x.email.lower() in own for x in contacts):
        return
    seen: set[str] = set()
    for s in c.steps:
        for x in audiences[s.id]:
            key = x.email.lower()
            if key in own and key not in seen:
                seen.add(key)
                yield Problem(
                    x.file,
                    f"{x.email} is the organiser's own address ({own[key]} in schedules.yaml): it "
                    "gets no calendar invitation to its own meeting (recorded as skipped); remove "
                    "the row if it should get none of the mails",
                    "email",
                    "warning",
                    row=x.row,
                    step=s.id,
                )


def _languages_without_event_text(
    c: Campaign, audiences: dict[str, list[Contact]], at: _Places
) -> Iterator[Problem]:
    """An event text given per language (``title: {nl: ..., fr: ...}``) with no text in the
    language of some of the event's recipients: they read the campaign language's (issue 13).
    A language whose fallback is the same language (``nl_NL`` reading ``nl_BE``) is fine."""
    for i, event in enumerate(c.events):
        fields = [(f, own) for f in TEXT_FIELDS if (own := event.per_language(f))]
        if not fields:
            continue
        who: dict[str, set[str]] = defaultdict(set)
        for s in c.steps:
            if s.event == event.id:
                for x in audiences[s.id]:
                    if x.language:
                        who[language_key(x.language)].add(x.email)
        for field, own in fields:
            for lang, emails in sorted(who.items()):
                found = pick(own, lang, event.language)
                if found is None or found[1].partition("_")[0] == lang.partition("_")[0]:
                    continue
                loc: YamlPath = ("events", i, field)
                yield Problem(
                    at.file,
                    f"no {lang} text for event {event.id!r}; {len(emails)} contact(s) in {lang} "
                    f"({_some(emails)}) read the {found[1]} text; add {lang}: under {field}:",
                    fmt_path(loc),
                    "warning",
                    line=line_for(at.lines, loc),
                )

"""schedules.yaml: parsing, validation (with file:line for every problem) and resolved campaign values."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from .errors import ConfigError, Problem, display_path
from .schema import CampaignModel, EventModel
from .times import (
    local_wall,
    parse_date,
    parse_duration,
    parse_local,
    resolve_local,
    resolve_step_time,
    resolve_wall,
)
from .vocab import Answer, EventStatus, StepKind
from .yamlsource import YamlPath, fmt_path, line_for, load_yaml, read_yaml

__all__ = [
    "TEXT_FIELDS",
    "Audience",
    "Campaign",
    "Delivery",
    "Dkim",
    "Event",
    "Sender",
    "SmtpSettings",
    "Step",
    "Unsubscribe",
    "Web",
    "contact_files",
    "contact_links_outside",
    "language_chain",
    "language_key",
    "load",
    "pick",
    "loads",
]

# --------------------------------------------------------------------------------------
# Resolved, immutable values used by the rest of the package.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """Who the mails come from and who organises the events."""

    address: str
    name: str
    organizer: str
    organizer_name: str
    reply_to: str | None = None
    #: ``sender.bounces``: the VERP envelope sender (:mod:`mailer.bounces`), None: off.
    bounces: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True)
class Event:
    """One event. ``start``/``end`` are aware datetimes in the campaign time zone.

    For an all-day event ``start`` is local midnight of the first day and ``end`` local
    midnight after the last day (the iCalendar DTEND;VALUE=DATE convention).
    """

    id: str
    title: str
    start: datetime
    end: datetime
    all_day: bool = False
    location: str | None = None
    description: str | None = None
    url: str | None = None
    status: EventStatus = EventStatus.CONFIRMED
    uid: str = ""
    #: ``busy:`` (TRANSP, see :func:`mailer.ics.transparent`); None: all-day and multi-day
    #: events are free, timed ones busy.
    busy: bool | None = None
    #: The campaign language: ``title``, ``location`` and ``description`` above are in it.
    language: str = ""
    #: ``(field, language, text)`` for each text given per language in schedules.yaml
    #: (``title: {nl: ..., fr: ...}``), languages normalised (``nl``, ``nl_BE``); see :meth:`text`.
    texts: tuple[tuple[str, str, str], ...] = ()

    @property
    def start_date(self) -> date:
        return self.start.date()

    def per_language(self, field: str) -> dict[str, str]:
        """The texts of ``field`` by language, or ``{}`` when it is one text for everyone."""
        return {lang: text for f, lang, text in self.texts if f == field}

    def text(self, field: str, language: str | None) -> tuple[str | None, str]:
        """``field`` (title, location, description) for a reader of ``language``, and the
        language the text is in: theirs (``nl_BE``, else ``nl``), else the campaign language's
        text. A plain text is in the campaign language."""
        plain: str | None = getattr(self, field)
        own = self.per_language(field)
        if not own:
            return plain, self.language
        found = pick(own, language, self.language)
        return found if found is not None else (plain, self.language)

    def in_language(self, language: str | None) -> Event:
        """This event with its texts in ``language`` (see :meth:`text`)."""
        if not self.texts:
            return self
        title, location, description = (self.text(f, language)[0] for f in TEXT_FIELDS)
        return replace(self, title=title or self.title, location=location, description=description)

    @property
    def last_date(self) -> date:
        """The last calendar day the event covers (inclusive)."""
        return (self.end - timedelta(days=1)).date() if self.all_day else self.end.date()


RSVP_STATES = tuple(a.value for a in Answer)
#: The event fields schedules.yaml may give per language (issue 13).
TEXT_FIELDS = ("title", "location", "description")


def language_key(language: str) -> str:
    """A language as mailer compares them: ``nl-be`` / ``NL_BE`` -> ``nl_BE``; ``NL`` -> ``nl``.

    >>> language_key("fr-be"), language_key("EN")
    ('fr_BE', 'en')
    """
    base, _, region = language.strip().replace("-", "_").partition("_")
    return f"{base.lower()}_{region.upper()}" if region else base.lower()


def language_chain(language: str | None, default: str) -> list[str]:
    """The languages to try for a reader of ``language``: theirs, its base, the campaign's.

    >>> language_chain("nl_BE", "fr")
    ['nl_BE', 'nl', 'fr']
    """
    wanted = [language_key(language)] if language else []
    wanted += [wanted[0].partition("_")[0]] if wanted else []
    wanted += [language_key(default), language_key(default).partition("_")[0]] if default else []
    return list(dict.fromkeys(wanted))


def pick(texts: Mapping[str, str], language: str | None, default: str) -> tuple[str, str] | None:
    """``(text, its language)`` from per-language ``texts`` (keys normalised) for a reader of
    ``language``, falling back to the campaign language ``default``; None if neither is there.

    >>> pick({"nl": "Dag", "fr": "Jour"}, "fr_BE", "nl"), pick({"nl": "Dag"}, "en", "nl")
    (('Jour', 'fr'), ('Dag', 'nl'))
    """
    for lang in language_chain(language, default):
        if lang in texts:
            return texts[lang], lang
    return None


@dataclass(frozen=True)
class Audience:
    """Which contacts a step goes to: any of ``lists`` and all of ``tags``; empty = everyone.

    ``rsvp`` (when not empty) keeps only contacts whose answer to the step's event is one of
    ``accepted``, ``tentative``, ``declined`` or ``no-reply`` (no answer received).
    """

    lists: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    rsvp: frozenset[Answer] = frozenset()

    def matches(self, lists: frozenset[str], tags: frozenset[str]) -> bool:
        if self.lists and not (self.lists & lists):
            return False
        return self.tags <= tags


@dataclass(frozen=True)
class Step:
    """A mail sent to an audience for one event at one time (``at``: aware, campaign tz)."""

    id: str
    event: str
    template: str
    at: datetime
    at_text: str
    audience: Audience = Audience()
    attach_ics: bool = True
    kind: StepKind = StepKind.INVITATION
    #: For ``at: -1d 09:00 local``: the wall-clock time (naive) each recipient gets the mail at
    #: in their own zone; ``at`` is that time in the campaign zone. None: one time for everyone.
    wall: datetime | None = None

    @property
    def local(self) -> bool:
        """Sent at a local hour in each recipient's zone (``at: ... local``)."""
        return self.wall is not None

    def at_in(self, tz: ZoneInfo) -> datetime:
        """When this step goes to a recipient in ``tz`` (``at`` unless the step is ``local``;
        a wall time the zone skips or repeats resolves as :func:`~mailer.times.resolve_wall`)."""
        if self.wall is None:
            return self.at
        return resolve_wall(self.wall, tz)[0]


@dataclass(frozen=True)
class SmtpSettings:
    """Non-secret SMTP options; host/port/tls may be overridden by MAILER_SMTP_* variables."""

    host: str = "localhost"
    port: int | None = None
    tls: Literal["starttls", "tls", "none"] = "starttls"
    ca_file: str | None = None
    timeout: float = 30.0
    connections: int = 2
    rate: float | None = None  # messages per second across all connections
    per_hour: int | None = None
    per_day: int | None = None  # issue 17: a rolling 24 hours, counted from the ledger
    local_hostname: str | None = None
    allow_plaintext_login: bool = False  # a login over tls: none to a host other than loopback
    relay_signs: bool = False  # the relay DKIM-signs (mailer check, issue 15)


@dataclass(frozen=True)
class Delivery:
    """Planner policies (see README "Delivery rules")."""

    late_after: timedelta = timedelta(days=1)
    late_contacts: bool = True
    retry_base: timedelta = timedelta(minutes=1)
    retry_max: timedelta = timedelta(hours=1)
    max_attempts: int = 10
    window: str | None = None  # issue 17: "08:00-20:00" (see mailer.pacing.Window)
    days: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Unsubscribe:
    mailto: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Dkim:
    """``dkim:``: sign every mail (:mod:`mailer.dkim`). Key files are absolute; without one the
    key comes from MAILER_DKIM_KEY[_FILE] (MAILER_DKIM_ED25519_KEY[_FILE])."""

    selector: str
    domain: str  # d=, aligned with the From domain
    key_file: Path | None = None
    ed25519_selector: str | None = None
    ed25519_key_file: Path | None = None


@dataclass(frozen=True)
class Web:
    """``web:``: the public address of `mailer web` (RSVP, unsubscribe and calendar links)."""

    url: str

    @property
    def base(self) -> str:
        """:attr:`url` without a trailing slash, ready for ``base + "/r/" + token``."""
        return self.url.rstrip("/")


@dataclass(frozen=True)
class Campaign:
    """A validated campaign; paths are absolute."""

    id: str
    name: str
    timezone: ZoneInfo
    language: str
    sender: Sender
    events: tuple[Event, ...]
    steps: tuple[Step, ...]
    contacts: tuple[str, ...]
    templates_dir: Path
    ledger: Path
    base_dir: Path
    config_path: Path
    smtp: SmtpSettings = SmtpSettings()
    delivery: Delivery = Delivery()
    unsubscribe: Unsubscribe | None = None
    update_template: str = "update"
    cancel_template: str = "cancel"
    web: Web | None = None
    dkim: Dkim | None = None

    # Not a field: ``dataclasses.replace(campaign, events=...)`` used to hand the original's
    # index dict to the copy, which then rewrote it (issue 11 item 6). Built per instance, on
    # first use, read-only; left out of pickles (the composing worker gets a campaign).
    @cached_property
    def _events_by_id(self) -> Mapping[str, Event]:
        return MappingProxyType({e.id: e for e in self.events})

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_events_by_id"}

    def event(self, event_id: str) -> Event:
        """The event with this id (KeyError if unknown)."""
        return self._events_by_id[event_id]

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def contact_files(self) -> dict[str, list[Path]]:
        """Files matched by each ``contacts:`` glob (relative globs from the config's folder)."""
        return contact_files(self.base_dir, self.contacts)

    def contact_paths(self) -> list[Path]:
        """Contact files matched by the ``contacts:`` globs, in order, without repeats."""
        seen: dict[Path, None] = {}
        for matches in self.contact_files().values():
            for m in matches:
                seen.setdefault(m, None)
        return list(seen)


def contact_files(base_dir: Path, patterns: Iterable[str]) -> dict[str, list[Path]]:
    """Files matched by each ``contacts:`` glob (relative globs from ``base_dir``), without
    those reached through a symbolic link leading outside (see :func:`contact_links_outside`)."""
    return {
        pattern: sorted(m.resolve() for m, inside in _contact_matches(base_dir, pattern) if inside)
        for pattern in patterns
    }


_GLOB_CHARS = frozenset("*?[")
#: Why a match is not read. The link is named, never where it leads nor what it holds: the first
#: line of any readable file used to appear in an error and in the daemon's log (issue 12).
LINK_OUTSIDE = (
    "is a symbolic link (or in a linked folder) leading outside the campaign folder, so it is not "
    "read; copy the file into the campaign folder, or name its real path in contacts:"
)


def contact_links_outside(base_dir: Path, patterns: Iterable[str]) -> list[Problem]:
    """One error per file a ``contacts:`` glob meets through a symbolic link (the file itself or
    a folder on its way) that leads outside the folder the pattern starts from: the campaign
    folder for a relative pattern, the pattern's fixed folder for an absolute one. A link that
    stays inside is read; so is any real file an absolute pattern names."""
    return [
        Problem(display_path(m), LINK_OUTSIDE, "contacts")
        for pattern in patterns
        for m, inside in _contact_matches(base_dir, pattern)
        if not inside
    ]


def _contact_matches(base_dir: Path, pattern: str) -> Iterator[tuple[Path, bool]]:
    """``(file, inside)`` for each file ``pattern`` matches, as the glob found it (not resolved)."""
    p = Path(pattern)
    if p.is_absolute():
        found = Path(p.anchor).glob(str(p.relative_to(p.anchor)))
        fixed = Path(*itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), p.parts))
        root = base_dir if fixed.is_relative_to(base_dir) else fixed
    else:
        found, root = base_dir.glob(pattern), base_dir
    real_root = root.resolve()
    for m in found:
        if m.is_file():
            yield m, _inside(m, root, real_root)


def _inside(match: Path, root: Path, real_root: Path) -> bool:
    """No symbolic link on the way from ``root`` to ``match`` leads outside ``real_root``."""
    here = root
    for part in match.relative_to(root).parts:
        here = here / part
        if here.is_symlink() and not here.resolve().is_relative_to(real_root):
            return False
    return True


# --------------------------------------------------------------------------------------
# Building a Campaign.
# --------------------------------------------------------------------------------------


def load(path: str | Path) -> Campaign:
    """Read and validate a schedules.yaml file.

    :raises ConfigError: with every problem found, each naming the file, line and field.
    """
    path = Path(path)
    return loads(read_yaml(path), path)


def loads(text: str, path: str | Path = "schedules.yaml") -> Campaign:
    """Validate campaign YAML ``text`` as if read from ``path`` (relative paths resolve there)."""
    path = Path(path).absolute()
    where = display_path(path)
    data, lines = load_yaml(text, where)
    if not isinstance(data, dict):
        raise ConfigError([Problem(where, "expected a mapping of keys (campaign:, events:, ...)", line=1)])

    def problem(loc: YamlPath, msg: str) -> Problem:
        return Problem(where, msg, field=fmt_path(loc), line=line_for(lines, loc), step=_step_id(data, loc))

    try:
        model = CampaignModel.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key; check its spelling (see the schedules.yaml reference in README.md)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            loc = tuple("from" if p == "from_" else p for p in loc)
            problems.append(problem(loc, msg))
        # Every problem at once (issue 12): what the later stages (times, events, steps) find
        # in the parts of the file the schema accepted, so one run shows everything.
        problems += _beyond_schema(data, exc, path, problem)
        raise ConfigError(problems) from None
    return _build(model, path, problem)


#: Stand-ins for required keys the schema refused, used only to look further for problems
#: (a campaign built with them is never returned).
_STAND_INS: dict[str, Any] = {
    "campaign": "campaign",
    "timezone": "UTC",
    "sender": {"from": "sender@example.org"},
}


def _beyond_schema(
    data: dict[str, Any], exc: ValidationError, path: Path, problem: Callable[[YamlPath, str], Problem]
) -> list[Problem]:
    """The problems :func:`_build` finds once the parts the schema refused are set aside: a
    refused top-level value falls back to its default (or a stand-in), an unknown key in an
    event or step is dropped, and an event or step with any other schema error is left out
    (steps of a left-out event are not "unknown"). Problems keep the lines of the real file."""
    data = copy.deepcopy(data)
    kept = {k: list(range(len(data[k]))) for k in ("events", "steps") if isinstance(data.get(k), list)}
    set_aside: set[str] = set()
    errors = exc.errors()
    for _ in range(3):  # a repair can reveal a deeper error of the same item; a few rounds do
        drop: dict[str, set[int]] = {"events": set(), "steps": set()}
        for err in errors:
            loc = tuple("from" if p == "from_" else p for p in err["loc"])
            head = str(loc[0]) if loc else ""
            if head in kept and len(loc) >= 2 and isinstance(loc[1], int):
                item = data[head][loc[1]]
                if err["type"] == "extra_forbidden" and len(loc) == 3 and isinstance(item, dict):
                    item.pop(loc[2], None)
                else:
                    drop[head].add(loc[1])
            elif err["type"] == "extra_forbidden" and len(loc) == 1:
                data.pop(head, None)
            elif head in CampaignModel.model_fields and not CampaignModel.model_fields[head].is_required():
                data.pop(head, None)
            elif head in _STAND_INS:
                data[head] = copy.deepcopy(_STAND_INS[head])
            else:
                return []  # events:/steps:/contacts: themselves unusable: nothing more to learn
        for head, gone in drop.items():
            for i in sorted(gone, reverse=True):
                item = data[head].pop(i)
                del kept[head][i]
                if head == "events" and isinstance(item, dict) and isinstance(item.get("id"), str):
                    set_aside.add(item["id"])
        try:
            model = CampaignModel.model_validate(data)
        except ValidationError as again:
            errors = again.errors()
            continue

        def at(loc: YamlPath, msg: str) -> Problem:
            if len(loc) >= 2 and loc[0] in kept and isinstance(loc[1], int):
                loc = (loc[0], kept[str(loc[0])][loc[1]], *loc[2:])
            return problem(loc, msg)

        try:
            _build(model, path, at, set_aside=frozenset(set_aside))
        except ConfigError as more:
            return more.problems
        return []
    return []


def _step_id(data: dict[str, Any], loc: YamlPath) -> str | None:
    """The id of the step a problem at ``loc`` (``steps[2].at``) is in, if it has one."""
    steps = data.get("steps")
    if loc[:1] != ("steps",) or len(loc) < 2 or not isinstance(steps, list):
        return None
    i = loc[1]
    step = steps[i] if isinstance(i, int) and 0 <= i < len(steps) else None
    sid = step.get("id") if isinstance(step, dict) else None
    return sid if isinstance(sid, str) else None


def _build(
    m: CampaignModel,
    path: Path,
    problem: Callable[[YamlPath, str], Problem],
    *,
    set_aside: frozenset[str] = frozenset(),
) -> Campaign:
    """The campaign ``m`` describes. ``set_aside``: ids of events refused by the schema (steps
    naming them are not reported again as naming an unknown event).

    :raises ConfigError: with every problem found.
    """
    problems: list[Problem] = []

    def bad(loc: YamlPath, msg: str) -> None:
        problems.append(problem(loc, msg))

    try:
        tz = ZoneInfo(m.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        bad(
            ("timezone",),
            f"unknown time zone {m.timezone!r}; use an IANA name such as Europe/Brussels",
        )
        # Go on in UTC to find every other problem at once (issue 12); the error above keeps
        # this campaign from being returned. UTC has no gaps or overlaps, so no false ones.
        tz = ZoneInfo("UTC")

    base = path.parent
    sender = Sender(
        address=m.sender.from_,
        name=m.sender.name,
        organizer=m.sender.organizer or m.sender.from_,
        organizer_name=m.sender.organizer_name or m.sender.name,
        reply_to=m.sender.reply_to,
        bounces=m.sender.bounces,
    )

    events: list[Event] = []
    seen: dict[str, int] = {}
    for i, e in enumerate(m.events):
        loc: YamlPath = ("events", i)
        if e.id in seen:
            bad((*loc, "id"), f"duplicate event id {e.id!r} (also events[{seen[e.id]}])")
            continue
        seen[e.id] = i
        try:
            events.append(_event(e, tz, sender.domain, m.campaign, m.language))
        except _FieldError as fe:
            bad((*loc, fe.key), str(fe))

    by_id = {e.id: e for e in events}
    steps: list[Step] = []
    seen_steps: dict[str, int] = {}
    for i, s in enumerate(m.steps):
        loc = ("steps", i)
        if s.id in seen_steps:
            bad((*loc, "id"), f"duplicate step id {s.id!r} (also steps[{seen_steps[s.id]}])")
            continue
        seen_steps[s.id] = i
        if s.event not in by_id:
            if s.event not in seen and s.event not in set_aside:  # not a follow-on error
                known = ", ".join(sorted(seen)) or "none"
                bad((*loc, "event"), f"unknown event {s.event!r}; known events: {known}")
            continue
        ev = by_id[s.event]
        try:
            when = resolve_step_time(s.at, ev.start, tz)
            wall = local_wall(s.at, ev.start)
        except ValueError as exc:
            bad((*loc, "at"), str(exc))
            continue
        if when >= ev.end:
            bad(
                (*loc, "at"),
                f"{when:%Y-%m-%d %H:%M} is after event {ev.id!r} ends "
                f"({ev.end:%Y-%m-%d %H:%M}); a step must come before its event ends",
            )
            continue
        steps.append(
            Step(
                id=s.id,
                event=s.event,
                template=s.template,
                at=when,
                at_text=s.at,
                audience=Audience(
                    frozenset(x.strip().lower() for x in s.audience.lists),
                    frozenset(x.strip().lower() for x in s.audience.tags),
                    frozenset(s.audience.rsvp),
                ),
                attach_ics=s.attach_ics if s.attach_ics is not None else True,
                kind=s.kind or StepKind.INVITATION,
                wall=wall,
            )
        )
    # Unless told, an event's earliest step is its invitation and later ones are reminders;
    # reminders carry no calendar attachment unless attach_ics says so.
    first: dict[str, Step] = {}
    for st in sorted(steps, key=lambda s: (s.at, s.id)):
        first.setdefault(st.event, st)
    explicit = {s.id: s for s in m.steps}
    for i, st in enumerate(steps):
        src = explicit[st.id]
        kind = src.kind or (StepKind.INVITATION if first[st.event] is st else StepKind.REMINDER)
        attach = src.attach_ics if src.attach_ics is not None else kind is StepKind.INVITATION
        steps[i] = replace(st, kind=kind, attach_ics=attach)

    dkim = _dkim(m, base, sender.domain, bad)
    if m.smtp.ca_file and not (base / m.smtp.ca_file).is_file():
        bad(("smtp", "ca_file"), f"{m.smtp.ca_file!r} not found")
    if problems:
        raise ConfigError(problems)

    d = m.delivery
    return Campaign(
        id=m.campaign,
        name=m.name or m.campaign,
        timezone=tz,
        language=m.language.replace("-", "_"),
        sender=sender,
        events=tuple(events),
        steps=tuple(sorted(steps, key=lambda s: (s.at, s.id))),
        contacts=tuple(m.contacts),
        templates_dir=(base / m.templates).resolve(),
        ledger=(base / m.ledger).resolve(),
        base_dir=base,
        config_path=path,
        smtp=SmtpSettings(
            host=m.smtp.host,
            port=m.smtp.port,
            tls=m.smtp.tls,
            ca_file=str((base / m.smtp.ca_file).resolve()) if m.smtp.ca_file else None,
            timeout=m.smtp.timeout,
            connections=m.smtp.connections,
            rate=m.smtp.rate,  # type: ignore[arg-type]  # normalised to float by validator
            per_hour=m.smtp.per_hour,
            per_day=m.smtp.per_day,
            local_hostname=m.smtp.local_hostname,
            allow_plaintext_login=m.smtp.allow_plaintext_login,
            relay_signs=m.smtp.relay_signs,
        ),
        delivery=Delivery(
            late_after=parse_duration(d.late_after),
            late_contacts=d.late_contacts,
            retry_base=parse_duration(d.retry_base),
            retry_max=parse_duration(d.retry_max),
            max_attempts=d.max_attempts,
            window=d.window,
            days=tuple(d.days) if d.days is not None else None,
        ),
        unsubscribe=Unsubscribe(m.unsubscribe.mailto, m.unsubscribe.url) if m.unsubscribe else None,
        update_template=m.update_template,
        cancel_template=m.cancel_template,
        web=Web(m.web.url) if m.web else None,
        dkim=dkim,
    )


def _dkim(
    m: CampaignModel, base: Path, from_domain: str, bad: Callable[[YamlPath, str], None]
) -> Dkim | None:
    """``dkim:`` with its defaults; d= must be the From domain or a parent of it (DMARC's
    relaxed alignment, RFC 7489 3.1.1), or receivers do not count the signature for From."""
    d = m.dkim
    if d is None:
        return None
    domain = (d.domain or from_domain).lower().rstrip(".")
    if from_domain.lower() != domain and not from_domain.lower().endswith("." + domain):
        bad(
            ("dkim", "domain"),
            f"{domain!r} is not aligned with the From domain {from_domain!r}: DMARC ignores such a "
            f"signature; use {from_domain} (the default) or a parent domain of it",
        )
    if d.ed25519_key_file and not d.ed25519_selector:
        bad(("dkim", "ed25519_key_file"), "give ed25519_selector too (the DNS name of the ed25519 key)")
    if d.ed25519_selector and d.ed25519_selector == d.selector:
        bad(("dkim", "ed25519_selector"), "must differ from selector: each key has its own DNS record")
    return Dkim(
        selector=d.selector,
        domain=domain,
        key_file=(base / d.key_file).resolve() if d.key_file else None,
        ed25519_selector=d.ed25519_selector,
        ed25519_key_file=(base / d.ed25519_key_file).resolve() if d.ed25519_key_file else None,
    )


class _FieldError(ValueError):
    def __init__(self, key: str, msg: str) -> None:
        super().__init__(msg)
        self.key = key


def _event(e: EventModel, tz: ZoneInfo, domain: str, campaign_id: str, language: str) -> Event:
    uid = e.uid or f"{e.id}.{campaign_id}@{domain}"
    language = language_key(language)
    plain: dict[str, str | None] = {}
    texts: list[tuple[str, str, str]] = []
    for name in TEXT_FIELDS:
        value = getattr(e, name)
        if not isinstance(value, dict):
            plain[name] = value or None
            continue
        own: dict[str, str] = {}
        for key, text in value.items():
            lang = language_key(key)
            if lang in own:
                raise _FieldError(name, f"{key!r} is given twice (as {lang})")
            own[lang] = text
        found = pick(own, language, language)
        if found is None:
            # The campaign language's text is what everyone else reads (issue 13).
            raise _FieldError(
                name,
                f"no {language} text (given: {', '.join(own)}); the campaign language's text is "
                "the one every other language falls back to",
            )
        plain[name] = found[0]
        texts += [(name, lang, text) for lang, text in sorted(own.items())]
    common = dict(
        id=e.id,
        title=plain["title"],
        location=plain["location"],
        description=plain["description"],
        url=e.url or None,
        status=e.status,
        busy=e.busy,
        uid=uid,
        language=language,
        texts=tuple(texts),
    )
    if e.date is not None:
        if e.start is not None or e.end is not None:
            raise _FieldError("date", "give either date (all-day) or start/end, not both")
        try:
            first = parse_date(e.date)
        except ValueError as exc:
            raise _FieldError("date", str(exc)) from None
        try:
            last = parse_date(e.end_date) if e.end_date else first
        except ValueError as exc:
            raise _FieldError("end_date", str(exc)) from None
        if last < first:
            raise _FieldError("end_date", "end_date is before date")
        # Midnight exists in every zone that matters here; resolve_local still checks.
        try:
            start = resolve_local(datetime.combine(first, time()), tz)
            end = resolve_local(datetime.combine(last + timedelta(days=1), time()), tz)
        except ValueError as exc:
            raise _FieldError("date", str(exc)) from None
        return Event(start=start, end=end, all_day=True, **common)  # type: ignore[arg-type]
    if e.end_date is not None:
        raise _FieldError("end_date", "end_date goes with date (all-day events); use end:")
    if e.start is None or e.end is None:
        raise _FieldError(
            "start" if e.start is None else "end",
            "an event needs start: and end: (YYYY-MM-DD HH:MM), or date: for an all-day event",
        )
    try:
        start = resolve_local(parse_local(e.start), tz)
    except ValueError as exc:
        raise _FieldError("start", str(exc)) from None
    try:
        end = resolve_local(parse_local(e.end), tz)
    except ValueError as exc:
        raise _FieldError("end", str(exc)) from None
    if end <= start:
        raise _FieldError("end", "end must be after start")
    return Event(start=start, end=end, all_day=False, **common)  # type: ignore[arg-type]

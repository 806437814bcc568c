"""Mail templates: finding, checking and rendering them (Jinja2 + Babel).

Layout on disk (the loader root is the campaign's ``templates:`` folder)::

    templates/_layout.html                 shared HTML frame ({% extends "_layout.html" %})
    templates/<name>/<lang>/subject.txt    one line; whitespace from data is collapsed
    templates/<name>/<lang>/body.txt       plain-text part (no escaping)
    templates/<name>/<lang>/body.html      HTML part (autoescaped)

``<lang>`` is a language (``nl``) or language plus region (``nl_BE``). A recipient with
language ``nl_BE`` gets ``nl_BE`` if it exists, else ``nl``, else the campaign language.

Template variables (Jinja's ``a.b`` syntax works on these dicts):

* ``contact``: ``email``, ``name`` (may be empty), ``language`` (may be None), ``lists`` and
  ``tags`` (sorted lists), plus every extra CSV column, e.g. ``contact.organisation``; use
  ``contact.get('organisation')`` for a column that not every list has.
* ``event``: ``id``, ``title``, ``start`` and ``end`` (aware datetimes in the campaign time
  zone; ``end`` of an all-day event is midnight after its last day), ``all_day``,
  ``start_date``, ``last_date`` (last day covered, inclusive), ``location``, ``description``,
  ``url`` (each may be None), ``status`` (``confirmed`` or ``cancelled``).
* ``campaign``: ``id``, ``name``, ``timezone`` (IANA name), ``sender_name``,
  ``sender_address``, ``organizer`` (organiser's name), ``organizer_address``,
  ``unsubscribe_mailto``, ``unsubscribe_url`` (may be None).
* ``step``: ``id``, ``kind`` (``invitation`` or ``reminder``), ``at`` (send time, aware),
  ``attach_ics`` (whether a calendar invite is attached).
* ``links``: None, or (with ``web.url`` and a secret) the recipient's signed links:
  ``accept``, ``maybe``, ``decline`` (RSVP), ``unsubscribe``, ``ics`` (download), ``feed``
  (``webcal://``), ``page`` (event page), ``google``, ``outlook``, ``office``, ``yahoo``
  (add to calendar); see :mod:`mailer.links`.

Filters, formatted in the locale of the language the mail is rendered in (see
:func:`locale_for`): ``date`` (default ``full``: "maandag 22 januari 2018"), ``time``
(default ``short``: "09:30"), ``datetime`` (default: "maandag 22 januari 2018 om 09:30");
each takes ``'full'``, ``'long'``, ``'medium'``, ``'short'`` or a Babel pattern.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import babel
from babel.dates import format_date, format_datetime, format_skeleton, format_time, get_timezone_location
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    pass_context,
    select_autoescape,
)
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from .config import TEXT_FIELDS, Campaign, Event, Step, pick
from .contacts import Contact
from .errors import Problem, TemplateError, display_path

__all__ = ["Rendered", "Templates", "contact_vars", "context", "describe_changes", "finish", "locale_for"]

PARTS = ("subject.txt", "body.txt", "body.html")
# Bare languages get the region the campaign lives in (Belgium); English gets British usage.
_DEFAULT_REGION = {"nl": "nl_BE", "fr": "fr_BE", "de": "de_BE", "en": "en_GB"}
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Rendered:
    """One rendered mail: ``subject`` is a single stripped line; ``language`` is the one used."""

    subject: str
    text: str
    html: str
    language: str


def _norm(language: str) -> str:
    """``nl-be`` / ``NL_BE`` -> ``nl_BE``; ``NL`` -> ``nl``."""
    base, _, region = language.strip().replace("-", "_").partition("_")
    return f"{base.lower()}_{region.upper()}" if region else base.lower()


@lru_cache(maxsize=64)
def locale_for(language: str) -> babel.Locale:
    """The Babel locale for a language: nl/fr/de -> Belgian, en -> en_GB, xx_YY as given.

    :raises ValueError: if Babel does not know the language (the caller picks a fallback).
    """
    lang = _norm(language)
    try:
        return babel.Locale.parse(_DEFAULT_REGION.get(lang, lang))
    except (babel.UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"unknown language {language!r}") from None


def _format(kind: str, value: Any, fmt: str | None, loc: babel.Locale) -> str:
    # The zone is part of the cache key: 15:00 Brussels and 09:00 New York are equal (and hash
    # alike) as datetimes, and would share one cached text (issue 13: in_zone).
    return _format_cached(kind, value, fmt, loc, getattr(value, "tzinfo", None))


@lru_cache(maxsize=4096)
def _format_cached(kind: str, value: Any, fmt: str | None, loc: babel.Locale, _zone: object) -> str:
    # Cached because every recipient formats the same few event datetimes: a dict lookup
    # instead of ~20 µs of Babel work per call.
    if not isinstance(value, dt.date | dt.time) or (kind == "datetime" and type(value) is dt.date):
        raise TypeError(f"the {kind} filter needs a date/time, got {value!r}")
    tz = getattr(value, "tzinfo", None)  # keep the value's own (campaign) time zone
    if kind == "date":
        return format_date(value, fmt or "full", locale=loc)  # type: ignore[arg-type]
    if kind == "time":
        return format_time(value, fmt or "short", tzinfo=tz, locale=loc)  # type: ignore[arg-type]
    if fmt is not None:
        return format_datetime(value, fmt, tzinfo=tz, locale=loc)
    # CLDR 48 (Babel 2.19) moved "{1} 'om' {0}" to the relative patterns; older Babel has
    # it as the standard 'long' pattern.
    relative = getattr(loc, "datetime_formats_relative", None)
    pattern = str((relative.get("long") if relative is not None else None) or loc.datetime_formats["long"])
    if not isinstance(value, dt.datetime):
        raise TypeError(f"the datetime filter needs a date and time, got {value!r}")
    day, hour = format_date(value, "full", locale=loc), format_time(value, "HH:mm", tz, loc)
    return pattern.replace("'", "").replace("{1}", day).replace("{0}", hour)


# --------------------------------------------------------------------------------------
# Time zones (issue 13 item 10): times in the reader's zone, the zones named when they differ.
# --------------------------------------------------------------------------------------


def _tz(name: Any) -> ZoneInfo | None:
    if not isinstance(name, str) or not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _reader_zone(contact: Any) -> ZoneInfo | None:
    """The zone of a ``contact`` dict (its ``timezone``), or an IANA name given as is."""
    return _tz(contact.get("timezone") if isinstance(contact, Mapping) else contact)


@lru_cache(maxsize=256)
def _city(tz: ZoneInfo, loc: babel.Locale) -> str:
    """CLDR's city for a zone in the reader's language: Brussel, Bruxelles, Brussels."""
    return str(get_timezone_location(tz, locale=loc, return_city=True))


def _in_zone(value: Any, contact: Any) -> Any:
    """``{{ event.start | in_zone(contact) | time }}``: the datetime in the reader's zone."""
    tz = _reader_zone(contact)
    if not isinstance(value, dt.datetime) or value.tzinfo is None or tz is None:
        return value
    return value.astimezone(tz)


def _zone_name_filter(fallback: Callable[[], babel.Locale]) -> Callable[..., str]:
    @pass_context
    def zone_name(ctx: Context, value: Any) -> str:
        """``{{ contact | zone_name }}`` / ``{{ 'America/New_York' | zone_name }}``: the
        zone's city in the mail's language (New York, Brussel / Bruxelles / Brussels)."""
        tz = _reader_zone(value)
        return _city(tz, ctx.get("_locale") or fallback()) if tz is not None else str(value)

    return zone_name


def when_text(
    value: dt.datetime | dt.date,
    loc: babel.Locale,
    *,
    reader: ZoneInfo,
    campaign: ZoneInfo,
    zones: Iterable[str] = (),
    format: str | None = None,
) -> str:
    """``value`` as the ``when`` filter writes it (see the module docstring).

    >>> from babel import Locale
    >>> bxl, ny = ZoneInfo("Europe/Brussels"), ZoneInfo("America/New_York")
    >>> t = dt.datetime(2018, 1, 22, 15, tzinfo=bxl)
    >>> when_text(t, Locale.parse("nl_BE"), reader=ny, campaign=bxl)
    'maandag 22 januari 2018 om 15:00 (Brussel) / 09:00 New York'
    >>> when_text(t, Locale.parse("fr_BE"), reader=ny, campaign=bxl, format="time")
    '15:00 (Bruxelles) / 09:00 New York'
    >>> when_text(t, Locale.parse("en_GB"), reader=bxl, campaign=bxl)
    'Monday, 22 January 2018 at 15:00'
    >>> when_text(t, Locale.parse("en_GB"), reader=bxl, campaign=bxl, zones=["Asia/Tokyo"])
    'Monday, 22 January 2018 at 15:00 (Brussels)'
    >>> when_text(dt.datetime(2018, 1, 22, 18, tzinfo=bxl), Locale.parse("en_GB"),
    ...           reader=ZoneInfo("Asia/Tokyo"), campaign=bxl)
    'Monday, 22 January 2018 at 18:00 (Brussels) / Tue 23 Jan 02:00 Tokyo'
    """
    if not isinstance(value, dt.datetime):  # a day (an all-day event) is the same day everywhere
        return _format("date", value, None if format in (None, "datetime", "time") else format, loc)
    if value.tzinfo is None:
        raise TypeError(f"the when filter needs a time with its zone, got {value!r}")
    # An event's datetimes carry its own zone; others (a change's before/after) the campaign's.
    event = value.tzinfo if isinstance(value.tzinfo, ZoneInfo) else campaign
    here = value.astimezone(event)
    if format == "time":
        text = _format("time", here, None, loc)
    else:
        text = _format("datetime", here, None if format in (None, "datetime") else format, loc)
    elsewhere = reader.key != event.key
    if not (elsewhere or event.key != campaign.key or any(z != event.key for z in zones)):
        return text
    text += f" ({_city(event, loc)})"
    if elsewhere:
        there = value.astimezone(reader)
        part = _format("time", there, None, loc)
        if there.date() != here.date():
            part = f"{format_date(there, 'EEE d MMM', locale=loc)} {part}"
        text += f" / {part} {_city(reader, loc)}"
    return text


def _when_filter(fallback: Callable[[], babel.Locale]) -> Callable[..., str]:
    @pass_context
    def when(ctx: Context, value: Any, contact: Any = None, format: str | None = None) -> str:
        campaign = ctx.get("campaign")
        camp = _tz(campaign.get("timezone")) if isinstance(campaign, Mapping) else None
        camp = camp or (value.tzinfo if isinstance(getattr(value, "tzinfo", None), ZoneInfo) else None)
        camp = camp or ZoneInfo("UTC")
        zones = campaign.get("zones") or () if isinstance(campaign, Mapping) else ()
        return when_text(
            value,
            ctx.get("_locale") or fallback(),
            reader=_reader_zone(contact) or camp,
            campaign=camp,
            zones=zones,
            format=format,
        )

    return when


def zone_note_text(
    start: dt.datetime,
    end: dt.datetime,
    loc: babel.Locale,
    *,
    reader: ZoneInfo,
    campaign: ZoneInfo,
    zones: Iterable[str] = (),
) -> str:
    """What follows an event's hours written in its own zone ("van 09:30 tot 16:30"): nothing
    when everyone is in that zone; else the event's city, and the reader's own hours when they
    are elsewhere (issue 13 item 10: the calendar keeps the event's TZID, the body speaks the
    reader's time).

    >>> from babel import Locale
    >>> bxl, ny = ZoneInfo("Europe/Brussels"), ZoneInfo("America/New_York")
    >>> s, e = dt.datetime(2018, 1, 22, 9, 30, tzinfo=bxl), dt.datetime(2018, 1, 22, 16, 30, tzinfo=bxl)
    >>> zone_note_text(s, e, Locale.parse("nl_BE"), reader=ny, campaign=bxl)
    ' (Brussel) / 03:30–10:30 New York'
    >>> zone_note_text(s, e, Locale.parse("nl_BE"), reader=bxl, campaign=bxl)
    ''
    >>> zone_note_text(s, e, Locale.parse("en_GB"), reader=ZoneInfo("Asia/Tokyo"), campaign=bxl)
    ' (Brussels) / Mon 22 Jan 17:30 – Tue 23 Jan 00:30 Tokyo'
    """
    event = start.tzinfo if isinstance(start.tzinfo, ZoneInfo) else campaign
    elsewhere = reader.key != event.key
    if not (elsewhere or event.key != campaign.key or any(z != event.key for z in zones)):
        return ""
    text = f" ({_city(event, loc)})"
    if not elsewhere:
        return text
    here = start.astimezone(event).date()
    s, e = start.astimezone(reader), end.astimezone(reader)
    t1, t2 = (format_time(x.time(), "short", locale=loc) for x in (s, e))
    if s.date() == e.date():
        hours = f"{t1}–{t2}"
        if s.date() != here:
            hours = f"{format_date(s, 'EEE d MMM', locale=loc)} {hours}"
    else:
        hours = (
            f"{format_date(s, 'EEE d MMM', locale=loc)} {t1} – {format_date(e, 'EEE d MMM', locale=loc)} {t2}"
        )
    return f"{text} / {hours} {_city(reader, loc)}"


def _zone_note_filter(fallback: Callable[[], babel.Locale]) -> Callable[..., str]:
    @pass_context
    def zone_note(ctx: Context, event: Any, contact: Any = None) -> str:
        start, end = event.get("start"), event.get("end")
        if not isinstance(start, dt.datetime) or not isinstance(end, dt.datetime) or event.get("all_day"):
            return ""  # a day is the same day everywhere
        campaign = ctx.get("campaign")
        camp = _tz(campaign.get("timezone")) if isinstance(campaign, Mapping) else None
        camp = camp or (start.tzinfo if isinstance(start.tzinfo, ZoneInfo) else ZoneInfo("UTC"))
        zones = campaign.get("zones") or () if isinstance(campaign, Mapping) else ()
        return zone_note_text(
            start,
            end,
            ctx.get("_locale") or fallback(),
            reader=_reader_zone(contact) or camp,
            campaign=camp,
            zones=zones,
        )

    return zone_note


def _filter(kind: str, fallback: Callable[[], babel.Locale]) -> Callable[..., str]:
    @pass_context
    def f(ctx: Context, value: Any, format: str | None = None) -> str:
        return _format(kind, value, format, ctx.get("_locale") or fallback())

    f.__name__ = kind
    return f


class _Environment(SandboxedEnvironment):
    """Jinja's sandbox (issue 12): whoever edits a template cannot reach Python's internals
    (``cycler.__init__.__globals__``, ``''.__class__.__mro__``, ``self._TemplateReference__context``)
    and through them the environment, the SMTP password or the shell; such an attribute is a
    SecurityError, reported with its file and line like any other template error.

    Looks keys up before attributes on plain dicts: every template variable is a dict,
    and Jinja's default order raises and catches an AttributeError for each
    ``{{ contact.name }}`` (a third of the render time). A key is data, never an attribute, so
    this stays inside the sandbox; everything else goes through the sandbox's checks."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


class Templates:
    """The templates under ``root``; each file is compiled once and reused for every render."""

    def __init__(self, root: Path, default_language: str) -> None:
        self.root = Path(root).absolute()
        self.default_language = _norm(default_language)
        self._env = _Environment(
            loader=FileSystemLoader(self.root),
            undefined=StrictUndefined,
            autoescape=select_autoescape(("html", "htm"), default_for_string=False, default=False),
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # files do not change during a run; skip the mtime checks
            cache_size=-1,
        )
        for kind in ("date", "time", "datetime"):
            self._env.filters[kind] = _filter(kind, self._default_locale)
        self._env.filters["when"] = _when_filter(self._default_locale)
        self._env.filters["zone_note"] = _zone_note_filter(self._default_locale)
        self._env.filters["in_zone"] = _in_zone
        self._env.filters["zone_name"] = _zone_name_filter(self._default_locale)
        self._compiled: dict[tuple[str, str], tuple[Template, ...]] = {}
        self._languages: dict[str, dict[str, str]] = {}
        self._resolved: dict[tuple[str, str | None], str] = {}
        self._unresolved: set[tuple[str, str | None]] = set()
        #: (file, its source) -> its syntax tree: the layouts and partials every template
        #: shares are parsed once (check, the render gate; issue 16).
        self._asts: dict[tuple[str, str], nodes.Template] = {}

    def _problem(
        self,
        rel: str,
        message: str,
        *,
        line: int | None = None,
        severity: Literal["error", "warning"] = "error",
        template: str | None = None,
        language: str | None = None,
    ) -> Problem:
        """A problem with the file or folder ``rel`` (relative to the templates folder). For a
        file ``<name>/<lang>/...`` the template and language come from its path unless given."""
        parts = rel.split("/")
        if template is None and len(parts) >= 2:
            template = parts[0]
            if language is None and len(parts) >= 3:
                language = _norm(parts[1])
        return Problem(
            display_path(self.root / rel),
            message,
            severity=severity,
            line=line or None,
            template=template,
            language=language,
        )

    def _dirs(self, name: str) -> dict[str, str]:
        """Normalised language -> folder name, for the template ``name``."""
        if name not in self._languages:
            d = self.root / name
            subs = sorted(d.iterdir()) if d.is_dir() else []
            self._languages[name] = {
                _norm(s.name): s.name for s in subs if s.is_dir() and s.name[0] not in "._"
            }
        return self._languages[name]

    def languages(self, name: str) -> list[str]:
        """The languages ``name`` exists in (normalised, e.g. ``nl``, ``nl_BE``), sorted."""
        return sorted(self._dirs(name))

    def _default_locale(self) -> babel.Locale:
        try:
            return locale_for(self.default_language)
        except ValueError:
            raise TemplateError(
                [self._problem("", f"campaign language {self.default_language!r} is not one Babel knows")]
            ) from None

    def _resolve(self, name: str, language: str | None) -> str:
        key = (name, language)
        if key not in self._resolved:
            dirs, default = self._dirs(name), self.default_language
            wanted = [_norm(language), _norm(language).partition("_")[0]] if language else []
            wanted += [default, default.partition("_")[0]]
            lang = next((w for w in wanted if w in dirs), None)
            if lang is None:
                found = ", ".join(sorted(dirs)) or "none"
                raise TemplateError(
                    [
                        self._problem(
                            name,
                            f"template {name!r}: no version for {language or '-'} or {default}; "
                            f"found: {found}",
                            template=name,
                            language=_norm(language) if language else default,
                        )
                    ]
                )
            self._resolved[key] = lang
        return self._resolved[key]

    def language_for(self, name: str, language: str | None) -> str | None:
        """The language folder (normalised) ``name`` renders in for a recipient speaking
        ``language``, as :meth:`render` picks it; None when no version fits."""
        key = (name, language)
        if key in self._unresolved:
            return None
        try:
            return self._resolve(name, language)
        except TemplateError:
            self._unresolved.add(key)  # `check` asks for every recipient
            return None

    def _compile(self, rel: str) -> tuple[Template | None, Problem | None]:
        try:
            return self._env.get_template(rel), None
        except TemplateSyntaxError as exc:
            return None, self._problem(
                exc.name or rel, f"template syntax error: {exc.message}", line=exc.lineno
            )
        except TemplateNotFound as exc:
            return None, self._problem(str(exc.name or rel), "file not found")
        except (UnicodeDecodeError, OSError) as exc:
            return None, self._problem(rel, f"cannot read (save it as UTF-8): {exc}")

    def check(self, names: Iterable[str]) -> list[Problem]:
        """Every problem with the templates ``names`` and the files they extend or include."""
        if not self.root.is_dir():
            return [self._problem("", "templates folder not found; see templates: in schedules.yaml")]
        problems: list[Problem] = []
        try:
            self._default_locale()
        except TemplateError as exc:
            problems += exc.problems
        default, files = self.default_language, []
        for name in dict.fromkeys(names):  # each name once, in order
            dirs = self._dirs(name)
            if not dirs:
                problems.append(
                    self._problem(
                        name,
                        f"template {name!r} not found; expected {name}/{default}/" + ", ".join(PARTS),
                        template=name,
                    )
                )
                continue
            if default not in dirs and default.partition("_")[0] not in dirs:
                problems.append(
                    self._problem(
                        f"{name}/{default}",
                        f"missing: no version in the campaign language; found: {', '.join(dirs)}",
                        template=name,
                        language=default,
                    )
                )
            for lang, folder in sorted(dirs.items()):
                try:
                    locale_for(lang)
                except ValueError:
                    problems.append(
                        self._problem(
                            f"{name}/{folder}",
                            "not a language Babel knows; dates will use the campaign language",
                            severity="warning",
                            template=name,
                            language=lang,
                        )
                    )
                for part in PARTS:
                    rel = f"{name}/{folder}/{part}"
                    if (self.root / rel).is_file():
                        files.append(rel)
                    else:
                        problems.append(
                            self._problem(
                                rel, "file missing; every language folder needs " + ", ".join(PARTS)
                            )
                        )
        seen: set[str] = set()
        while files:  # compile every file, then whatever it extends or includes
            rel = files.pop(0)
            if rel in seen:
                continue
            seen.add(rel)
            tmpl, problem = self._compile(rel)
            if problem or tmpl is None or tmpl.filename is None:
                problems += [problem] if problem else []
                continue
            source = Path(tmpl.filename).read_text(encoding="utf-8")
            ast = self._asts.get((rel, source))
            if ast is None:
                ast = self._asts[rel, source] = self._env.parse(source, rel)
            files += [r for r in meta.find_referenced_templates(ast) if r is not None]
        return problems

    def parsed(self, name: str, lang: str) -> list[nodes.Template] | None:
        """The syntax trees of the files ``name`` renders in the language folder ``lang`` (as
        :meth:`language_for` gives it) and of every file they extend, include or import; None
        when one is named by an expression (which file is only known while rendering) or
        cannot be read or parsed (rendering reports that)."""
        folder = self._dirs(name).get(lang)
        if folder is None:
            return None
        todo, seen, out = [f"{name}/{folder}/{part}" for part in PARTS], set(), []
        while todo:
            rel = todo.pop(0)
            if rel in seen:
                continue
            seen.add(rel)
            try:
                source, _, _ = self._env.loader.get_source(self._env, rel)  # type: ignore[union-attr]
                ast = self._asts.get((rel, source))
                if ast is None:
                    ast = self._asts[rel, source] = self._env.parse(source, rel)
            except Exception:  # noqa: BLE001 - any unreadable file: no analysis
                return None
            refs = list(meta.find_referenced_templates(ast))
            if any(r is None for r in refs):
                return None
            todo += [r for r in refs if r is not None]
            out.append(ast)
        return out

    def render(self, name: str, language: str | None, context: Mapping[str, Any]) -> Rendered:
        """Render ``name`` in ``language`` (falling back: nl_BE -> nl -> campaign language).

        :raises TemplateError: naming the file and line of the problem.
        """
        return finish(*self.render_parts(name, language, context))

    def render_parts(
        self, name: str, language: str | None, context: Mapping[str, Any]
    ) -> tuple[tuple[str, str, str], str]:
        """The three parts (``PARTS``) as the templates write them, before :func:`finish`
        (the subject's whitespace is not collapsed yet), and the language folder used."""
        lang = self._resolve(name, language)
        key = (name, lang)
        if key not in self._compiled:
            folder = self._dirs(name)[lang]
            compiled = [self._compile(f"{name}/{folder}/{part}") for part in PARTS]
            if errors := [p for _, p in compiled if p]:
                raise TemplateError(errors)
            self._compiled[key] = tuple(t for t, _ in compiled if t)
        try:
            loc = locale_for(lang)
        except ValueError:
            loc = self._default_locale()
        ctx = {**context, "_locale": loc, "_language": lang}
        if isinstance(changes := ctx.get("changes"), list):
            ctx["changes"] = describe_changes(
                changes, ctx, language=lang, reader=language, default=self.default_language
            )
        out = []
        for part, tmpl in zip(PARTS, self._compiled[key], strict=True):
            try:
                out.append(tmpl.render(ctx))
            except TemplateError:
                raise
            except Exception as exc:  # noqa: BLE001 - user templates: report, never a traceback
                rel = f"{name}/{self._dirs(name)[lang]}/{part}"
                raise TemplateError([self._runtime_problem(rel, exc, ctx)]) from None
        return (out[0], out[1], out[2]), lang

    def _runtime_problem(self, rel: str, exc: Exception, ctx: Mapping[str, Any]) -> Problem:
        # The template and language rendered, even when the failing line is in a shared layout.
        template, language = rel.split("/")[0], _norm(rel.split("/")[1])
        if isinstance(exc, TemplateSyntaxError):  # e.g. in a layout, compiled on first use
            return self._problem(
                exc.name or rel,
                f"syntax error: {exc.message}",
                line=exc.lineno,
                template=template,
                language=language,
            )
        # Jinja rewrites tracebacks so template frames carry the template's file and line;
        # the innermost such frame is where it failed (maybe in _layout.html).
        at, file, line = rel, None, 0
        tb = exc.__traceback__
        while tb is not None:
            path = Path(tb.tb_frame.f_code.co_filename)
            if path.is_relative_to(self.root) and path.suffix in (".txt", ".html", ".htm"):
                file, line = path, tb.tb_lineno
                at = path.relative_to(self.root).as_posix()
            tb = tb.tb_next
        here: dict[str, Any] = {"line": line, "template": template, "language": language}
        if isinstance(exc, TemplateNotFound):
            return self._problem(at, f"template {exc.name!r} not found", **here)
        if not isinstance(exc, UndefinedError):
            return self._problem(at, f"{type(exc).__name__}: {exc}", **here)
        what, available = exc.message or "", ", ".join(k for k in ctx if k[0] != "_")
        if bare := re.fullmatch(r"'(\w+)' is undefined", what):
            what = bare[1]
        elif (attr := re.search(r"has no attribute '(\w+)'", what)) and file:
            # Name the dotted expression from the source line, and the keys its parent has.
            lines = file.read_text(encoding="utf-8").splitlines()
            text = lines[line - 1] if 0 < line <= len(lines) else ""
            if hit := re.search(rf"\b(\w+(?:\.\w+)*)\.{attr[1]}\b", text):
                expr = hit[1]
                what = f"{expr}.{attr[1]}"
                parent: Any = ctx
                for key in expr.split("."):
                    parent = parent.get(key) if isinstance(parent, Mapping) else None
                if isinstance(parent, dict):
                    what += f" ({expr} has: {', '.join(sorted(parent))})"
        hint = "; use contact.get('column') for a column not every list has" * what.startswith("contact.")
        return self._problem(at, f"undefined variable {what}; available: {available}{hint}", **here)


def finish(parts: tuple[str, str, str], lang: str) -> Rendered:
    """The mail of :meth:`Templates.render_parts`: the subject on one stripped line."""
    return Rendered(_WS.sub(" ", parts[0]).strip(), parts[1], parts[2], lang)


def contact_vars(campaign: Campaign, contact: Contact) -> dict[str, Any]:
    """The ``contact`` template variable (see the module docstring)."""
    return {
        # Extra CSV columns first, so the validated core fields win on a name clash.
        **contact.fields,
        "email": contact.email,
        "name": contact.name,
        "language": contact.language,
        # The reader's IANA zone: their timezone column, else the campaign's.
        "timezone": contact.timezone or campaign.timezone.key,
        "lists": sorted(contact.lists),
        "tags": sorted(contact.tags),
    }


def context(campaign: Campaign, event: Event, step: Step, contact: Contact) -> dict[str, Any]:
    """The template variables for one recipient of one step (see the module docstring)."""
    sender, unsub = campaign.sender, campaign.unsubscribe
    # Texts given per language in schedules.yaml: the reader's, else the campaign language's.
    title, location, description = (event.text(f, contact.language)[0] for f in TEXT_FIELDS)
    return {
        "contact": contact_vars(campaign, contact),
        "event": {
            "id": event.id,
            "title": title or event.title,
            "start": event.start,
            "end": event.end,
            "all_day": event.all_day,
            "start_date": event.start_date,
            "last_date": event.last_date,
            "location": location,
            "description": description,
            "url": event.url,
            "status": event.status,
        },
        "campaign": {
            "id": campaign.id,
            "name": campaign.name,
            "timezone": campaign.timezone.key,
            # Every zone the contacts live in (their timezone columns, and the campaign's).
            "zones": sorted(contact.zones | {campaign.timezone.key}),
            "sender_name": sender.name,
            "sender_address": sender.address,
            "organizer": sender.organizer_name,
            "organizer_address": sender.organizer,
            "unsubscribe_mailto": unsub.mailto if unsub else None,
            "unsubscribe_url": unsub.url if unsub else None,
        },
        "step": {"id": step.id, "kind": step.kind, "at": step.at, "attach_ics": step.attach_ics},
        # The recipient's links to `mailer web` (mailer.links.Links as a dict), set by the
        # Composer; None without web.url or a secret.
        "links": None,
    }


# --------------------------------------------------------------------------------------
# What changed, in words (issue 13 item 9): update and cancel templates get ``changes`` ready
# to show, in the mail's language: never ``True``, ``cancelled → confirmed`` or ``00:00``.
# --------------------------------------------------------------------------------------

#: Labels and words by language (the base of the template's language); others get English.
_WORDS: dict[str, dict[str, str]] = {
    "nl": {
        "when": "Wanneer",
        "title": "Titel",
        "location": "Plaats",
        "description": "Beschrijving",
        "status": "Status",
        "confirmed": "gaat door",
        "cancelled": "afgelast",
        "none": "niet opgegeven",
    },
    "fr": {
        "when": "Quand",
        "title": "Titre",
        "location": "Lieu",
        "description": "Description",
        "status": "Statut",
        "confirmed": "a lieu",
        "cancelled": "annulé",
        "none": "non précisé",
    },
    "en": {
        "when": "When",
        "title": "Title",
        "location": "Where",
        "description": "Description",
        "status": "Status",
        "confirmed": "going ahead",
        "cancelled": "cancelled",
        "none": "not given",
    },
    "de": {
        "when": "Wann",
        "title": "Titel",
        "location": "Ort",
        "description": "Beschreibung",
        "status": "Status",
        "confirmed": "findet statt",
        "cancelled": "abgesagt",
        "none": "nicht angegeben",
    },
}
_WHEN_FIELDS = ("start", "end", "all_day")
_ORDER = ("title", "when", "location", "description", "status")


def describe_changes(
    changes: list[Any], ctx: Mapping[str, Any], *, language: str, reader: str | None, default: str
) -> list[dict[str, Any]]:
    """``changes`` (``[{field, before, after}]`` as :func:`mailer.planner.changes` gives them)
    in words, in ``language`` (the template's), for a reader of language ``reader`` (texts
    given per language fall back to ``default``, the campaign language). ``ctx`` holds the
    template variables (``event`` as it is now, ``campaign.timezone``, ``contact.timezone``).

    Each change is ``{field, label, before_text, after_text, text, before, after}``:

    * ``start``, ``end`` and ``all_day`` become one ``when`` change showing the whole span
      before and after: dates for an all-day event ("di 23 juni → wo 24 juni", a multi-day one
      "ma 22 juni – wo 24 juni"), day and hours for a timed one ("di 23 juni 09:30–16:30", an
      overnight one with both days); the year only when the spans are in different years. When
      the reader has a ``timezone`` column naming another zone, the times are followed by the
      event's city and the reader's own times ("… 15:00–16:00 (Brussel) / 09:00–10:00 New
      York"). ``before``/``after`` of ``when`` are the start datetimes.
    * a text given per language (title, location) is the reader's (else the campaign
      language's); an empty one reads "niet opgegeven" / "non précisé" / "not given";
    * ``status`` reads "gaat door" / "afgelast" (fr: "a lieu" / "annulé", en: "going ahead" /
      "cancelled").

    ``text`` is ``"<label>: <before_text> → <after_text>"``. Fields unchanged are not listed,
    except the other parts of the span when one of them changed (taken from ``event``, the
    event as it is now). Changes already described (with a ``label``) are returned as given.
    """
    if not changes or not all(isinstance(c, Mapping) for c in changes) or "label" in changes[0]:
        return list(changes)
    try:
        loc = locale_for(language)
    except ValueError:
        loc = locale_for("en")
    words = _WORDS.get(loc.language, _WORDS["en"])
    campaign, contact, now = (_mapping(ctx.get(k)) for k in ("campaign", "contact", "event"))
    event_zone, reader_zone = _tz(campaign.get("timezone")), _reader_zone(contact)
    zones = tuple(campaign.get("zones") or ())
    by_field = {str(c.get("field")): c for c in changes}
    out: dict[str, dict[str, Any]] = {}
    if any(f in by_field for f in _WHEN_FIELDS):
        spans: list[tuple[dt.datetime, dt.datetime, bool]] = []
        for side in ("before", "after"):
            start, end, all_day = (by_field[f][side] if f in by_field else now.get(f) for f in _WHEN_FIELDS)
            if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
                spans.append((start, end, bool(all_day)))
        if len(spans) == 2:
            years = {x.year for span in spans for x in (span[0], _last_day(*span))}
            before, after = (
                _span(*span, loc, event_zone, reader_zone, zones, len(years) > 1) for span in spans
            )
            out["when"] = {
                "field": "when",
                "before": spans[0][0],
                "after": spans[1][0],
                "words": (before, after),
            }
    for field, c in by_field.items():
        if field in _WHEN_FIELDS:
            continue
        before, after = c.get("before"), c.get("after")
        pair = tuple(_words(field, v, words, reader, default) for v in (before, after))
        out[field] = {"field": field, "before": before, "after": after, "words": pair}
    described = []
    for field in sorted(out, key=lambda f: (_ORDER.index(f) if f in _ORDER else len(_ORDER), f)):
        entry = out[field]
        before_text, after_text = entry.pop("words")
        label = words.get(field, field)
        described.append(
            {
                **entry,
                "label": label,
                "before_text": before_text,
                "after_text": after_text,
                "text": f"{label}: {before_text} → {after_text}",
            }
        )
    return described


def _words(field: str, value: Any, words: Mapping[str, str], reader: str | None, default: str) -> str:
    """One side of a change of ``field`` in words."""
    if isinstance(value, Mapping):  # a text given per language
        found = pick({str(k): str(v) for k, v in value.items()}, reader, default)
        value = found[0] if found is not None else next(iter(value.values()), None)
    if field == "status" and isinstance(value, str) and value in ("confirmed", "cancelled"):
        return words[value]
    if value is None or value == "":
        return words["none"]
    if isinstance(value, bool):  # never "True": a flag outside the span has no words of its own
        return words["confirmed"] if value else words["none"]
    return str(value)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _last_day(start: dt.datetime, end: dt.datetime, all_day: bool) -> dt.date:
    """The last day a span covers (the end of an all-day event is midnight after it)."""
    return (end - dt.timedelta(days=1)).date() if all_day else end.date()


@lru_cache(maxsize=1024)
def _span(
    start: dt.datetime,
    end: dt.datetime,
    all_day: bool,
    loc: babel.Locale,
    event_zone: ZoneInfo | None,
    reader_zone: ZoneInfo | None,
    zones: tuple[str, ...],
    year: bool,
) -> str:
    """An event's whole span in words (see :func:`describe_changes`)."""
    skeleton = "yMMMMEd" if year else "MMMMEd"

    def day(d: dt.date) -> str:
        return format_skeleton(skeleton, d, locale=loc)

    if all_day:
        first, last = start.date(), _last_day(start, end, all_day)
        return day(first) if first == last else f"{day(first)} – {day(last)}"

    def hours(tz: ZoneInfo | None) -> str:
        s, e = (start.astimezone(tz), end.astimezone(tz)) if tz is not None else (start, end)
        t1, t2 = (format_time(x.time(), "short", locale=loc) for x in (s, e))
        return (
            f"{day(s.date())} {t1}–{t2}"
            if s.date() == e.date()
            else f"{day(s.date())} {t1} – {day(e.date())} {t2}"
        )

    text = hours(event_zone)
    if event_zone is None:
        return text
    # As the ``when`` filter does (item 10): the event's city when the reader is elsewhere or
    # the campaign has contacts in other zones, then the reader's own times.
    elsewhere = reader_zone is not None and reader_zone.key != event_zone.key
    if not (elsewhere or any(z != event_zone.key for z in zones)):
        return text
    text += f" ({_city(event_zone, loc)})"
    if reader_zone is not None and elsewhere:
        days = [(x.astimezone(z).date() for x in (start, end)) for z in (event_zone, reader_zone)]
        if list(days[0]) == list(days[1]):  # the same days there: only the hours
            there = "–".join(
                format_time(x.astimezone(reader_zone).time(), "short", locale=loc) for x in (start, end)
            )
        else:
            there = hours(reader_zone)
        text += f" / {there} {_city(reader_zone, loc)}"
    return text

"""iCalendar (RFC 5545) invitations and cancellations (RFC 5546 iTIP) and published calendars
(a download, a feed), written by hand."""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from .addresses import spelling
from .config import Campaign, Event

__all__ = [
    "PRODID",
    "Entry",
    "Prototype",
    "build_event",
    "escape_text",
    "fixed_offset",
    "fold",
    "param_value",
    "prototype",
    "publish",
    "transparent",
    "tzid",
    "vtimezone",
]

PRODID = "-//mailer//mailer 0.1//EN"
Method = Literal["REQUEST", "CANCEL"]

# RFC 5545 3.1: content lines end in CRLF and are folded at 75 octets.
_CRLF = b"\r\n"
_FOLD = b"\r\n "
# C0 controls (except HTAB), DEL, C1 controls and the Unicode line/paragraph separators.
# RFC 5545 3.3.11 (TSAFE-CHAR) and 3.1 (QSAFE-CHAR/SAFE-CHAR) exclude CONTROL characters.
_CONTROLS = {c: " " for c in [*range(0x00, 0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]}
_CONTROLS.update({0x2028: " ", 0x2029: " "})
_NO_CONTROLS = str.maketrans(_CONTROLS)
_PARAM = str.maketrans({**_CONTROLS, 0x09: " ", ord('"'): None})
_CARET = re.compile(r"\^(?=[n'^])")


def fold(line: str) -> bytes:
    """Encode one content line as UTF-8 and fold it (RFC 5545 3.1), ending in CRLF.

    Physical lines are at most 75 octets; continuation lines start with one space and
    carry at most 74 more. A fold never splits a multi-byte UTF-8 character, so every
    physical line is valid UTF-8 on its own (Outlook and some phones choke otherwise).
    """
    b = line.encode("utf-8")
    n = len(b)
    if n <= 75:
        return b + _CRLF
    out = []
    start, limit = 0, 75
    while n - start > limit:
        cut = start + limit
        while b[cut] & 0xC0 == 0x80:  # a continuation byte: back up to the lead byte
            cut -= 1
        out.append(b[start:cut])
        start, limit = cut, 74
    out.append(b[start:])
    return _FOLD.join(out) + _CRLF


def escape_text(value: str) -> str:
    r"""Escape a TEXT value (RFC 5545 3.3.11): ``\\``, ``\;``, ``\,`` and newlines as ``\n``.

    Other control characters are not allowed in TEXT and become spaces.

    >>> escape_text("Peeters, Jan; a\\b\r\nc")
    'Peeters\\, Jan\\; a\\\\b\\nc'
    """
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    if not value.isprintable():
        value = "\n".join(part.translate(_NO_CONTROLS) for part in value.split("\n"))
    return value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")


def param_value(value: str) -> str:
    """A quoted parameter value (RFC 5545 3.1 ``quoted-string``), e.g. for CN.

    A quoted-string may hold ``:``, ``;`` and ``,`` but cannot escape ``"`` or hold
    controls, so those are removed (``"`` dropped, CR/LF and other controls become spaces).

    RFC 6868 readers (icalendar) decode ``^n``, ``^'`` and ``^^`` while others (vobject,
    many clients) do not, so a caret before ``n``, ``'`` or ``^`` is dropped: every reader
    then shows the same name.

    >>> param_value('Peeters, "Jan"')
    '"Peeters, Jan"'
    """
    value = " ".join(value.translate(_PARAM).split())
    if "^" in value:
        value = _CARET.sub("", value)
    return '"' + value + '"'


def _uri(value: str) -> str:
    """A URI or CAL-ADDRESS value: no escaping exists, so drop controls and whitespace."""
    return "".join(value.translate(_NO_CONTROLS).split())


# --------------------------------------------------------------------------------------
# VTIMEZONE from zoneinfo (RFC 5545 3.6.5), in the RRULE form Outlook accepts.
# --------------------------------------------------------------------------------------


class _Transition(NamedTuple):
    local: datetime  # naive wall-clock time of the change, in the offset being replaced
    before: timedelta
    after: timedelta
    daylight: bool
    name: str


def _state(tz: tzinfo, ts: int) -> tuple[timedelta, timedelta, str]:
    d = datetime.fromtimestamp(ts, tz)
    return d.utcoffset() or timedelta(0), d.dst() or timedelta(0), d.tzname() or ""


def _transitions(tz: tzinfo, first_year: int, last_year: int) -> list[_Transition]:
    """Every UTC-offset change from 1 Jan ``first_year`` to 31 Dec ``last_year`` (UTC)."""
    t = int(datetime(first_year, 1, 1, tzinfo=UTC).timestamp())
    stop = int(datetime(last_year + 1, 1, 1, tzinfo=UTC).timestamp())
    out: list[_Transition] = []
    prev = _state(tz, t)
    while t < stop:
        nxt = min(t + 86400, stop)
        cur = _state(tz, nxt)
        if cur[0] != prev[0]:
            lo, hi = t, nxt  # offset(lo) == prev, offset(hi) == cur: bisect to the second
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _state(tz, mid)[0] == prev[0]:
                    lo = mid
                else:
                    hi = mid
            cur = _state(tz, hi)
            local = datetime.fromtimestamp(hi, UTC).replace(tzinfo=None) + prev[0]
            # Europe/Dublin has negative DST in winter: the summer side is still DAYLIGHT.
            daylight = cur[1] > timedelta(0) or prev[1] < timedelta(0)
            out.append(_Transition(local, prev[0], cur[0], daylight, cur[2]))
            nxt = hi
        prev, t = cur, nxt
    return out


def _byday(d: date) -> tuple[int, int]:
    """(ordinal, weekday) of ``d`` in its month: ordinal 1..4, or -1 for the last one."""
    last = calendar.monthrange(d.year, d.month)[1]
    return (-1 if d.day + 7 > last else (d.day - 1) // 7 + 1), d.weekday()


def _rule_day(year: int, month: int, ordinal: int, weekday: int) -> int:
    weeks = [w[weekday] for w in calendar.monthcalendar(year, month) if w[weekday]]
    return weeks[ordinal] if ordinal == -1 else weeks[ordinal - 1]


def _offset(td: timedelta) -> str:
    s = int(td.total_seconds())
    sign, s = ("-" if s < 0 else "+"), abs(s)
    hhmm = f"{sign}{s // 3600:02d}{s // 60 % 60:02d}"
    return hhmm + (f"{s % 60:02d}" if s % 60 else "")


_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def _observance(t: _Transition, rrule: str | None) -> list[str]:
    kind = "DAYLIGHT" if t.daylight else "STANDARD"
    lines = [f"BEGIN:{kind}", f"DTSTART:{t.local:%Y%m%dT%H%M%S}"]
    if rrule:
        lines.append(rrule)
    lines += [
        f"TZOFFSETFROM:{_offset(t.before)}",
        f"TZOFFSETTO:{_offset(t.after)}",
    ]
    if t.name:
        lines.append(f"TZNAME:{escape_text(t.name)}")
    return [*lines, f"END:{kind}"]


def _rules(trans: list[_Transition], years: range) -> list[str] | None:
    """STANDARD + DAYLIGHT observances with yearly RRULEs, or None if no such rule fits."""
    by_year: dict[int, list[_Transition]] = {}
    for t in trans:
        by_year.setdefault(t.local.year, []).append(t)
    if set(by_year) != set(years) or any(len(v) != 2 for v in by_year.values()):
        return None
    lines: list[str] = []
    for daylight in (False, True):  # STANDARD first, as Outlook writes it
        series = [t for t in trans if t.daylight == daylight]
        if len(series) != len(years):
            return None
        first = series[0]
        ordinal, weekday = _byday(first.local.date())
        for t in series:  # the rule must reproduce every year's change exactly
            expected = first.local.replace(
                year=t.local.year,
                day=_rule_day(t.local.year, first.local.month, ordinal, weekday),
            )
            if (t.local, t.before, t.after, t.name) != (expected, *first[1:3], first.name):
                return None
        rrule = f"RRULE:FREQ=YEARLY;BYMONTH={first.local.month};BYDAY={ordinal}{_DAYS[weekday]}"
        # Start the rule in 1970, as Google does: vobject (Radicale) compares a VTIMEZONE with
        # UTC over 2000-2020 and ignores one that matches, which a London rule starting in
        # 2023 would (its standard offset is +0000).
        day = _rule_day(1970, first.local.month, ordinal, weekday)
        lines += _observance(first._replace(local=first.local.replace(year=1970, day=day)), rrule)
    return lines


def fixed_offset(tz: tzinfo, start: datetime, end: datetime) -> timedelta | None:
    """The UTC offset of ``tz`` if it does not change from two years before ``start`` to two
    years after ``end`` (the span :func:`vtimezone` looks at), else None."""
    first, last = start.astimezone(tz).year, end.astimezone(tz).year
    if _transitions_cached(tz, first - 2, max(first, last) + 2):
        return None
    return start.astimezone(tz).utcoffset()


@lru_cache(maxsize=256)
def _transitions_cached(tz: tzinfo, first_year: int, last_year: int) -> tuple[_Transition, ...]:
    return tuple(_transitions(tz, first_year, last_year))


def tzid(tz: tzinfo) -> str:
    """The TZID for ``tz``: its IANA key (``Europe/Brussels``)."""
    return getattr(tz, "key", None) or str(tz)


def vtimezone(tz: ZoneInfo, start: datetime, end: datetime) -> list[str]:
    """Content lines (unfolded, no CRLF) of a VTIMEZONE for ``tz`` valid from ``start`` to ``end``.

    RFC 5545 3.6.5 lets a VTIMEZONE describe only the period it is used for. We derive the
    yearly rule (month, weekday, ordinal 1..4 or -1 for the last) from zoneinfo's changes in
    the year before ``start``, check that it reproduces every change up to the year after
    ``end``, and write ``RRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU`` observances, the form
    Outlook accepts (icalendar's ``add_missing_timezones`` writes RDATE lists it rejects).
    The rules start in 1970 (as Google writes them; see :func:`_rules`). If no yearly rule
    fits (a rule change, Morocco's Ramadan breaks), each change becomes a DTSTART-only
    observance. A zone without changes gets a single STANDARD.
    """
    s, e = start.astimezone(tz), end.astimezone(tz)
    return list(_vtimezone(tz, s.year, max(e.year, s.year)))


@lru_cache(maxsize=256)
def _vtimezone(tz: tzinfo, first: int, last: int) -> tuple[str, ...]:
    years = range(first - 1, last + 2)
    all_ = _transitions_cached(tz, years[0] - 1, years[-1] + 1)
    trans = [t for t in all_ if t.local.year in years]
    lines = ["BEGIN:VTIMEZONE", f"TZID:{escape_text(tzid(tz))}"]
    if key := getattr(tz, "key", None):
        lines.append(f"X-LIC-LOCATION:{escape_text(key)}")  # libical/Evolution, as Google does
    rules = _rules(trans, years) if trans else None
    if rules:
        lines += rules
    else:
        begin = datetime(years[0], 1, 1)
        at = begin.replace(tzinfo=UTC)
        if trans:  # the observance in force just before the first change
            begin = min(begin, trans[0].local - timedelta(days=1))
            at = (trans[0].local - trans[0].before - timedelta(seconds=1)).replace(tzinfo=UTC)
        off, dst, name = _state(tz, int(at.timestamp()))
        lines += _observance(_Transition(begin, off, off, dst > timedelta(0), name), None)
        for t in trans:
            lines += _observance(t, None)
    return (*lines, "END:VTIMEZONE")


# --------------------------------------------------------------------------------------
# The VEVENT.
# --------------------------------------------------------------------------------------


def _utc(dt: datetime) -> str:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{dt!r} is naive; pass an aware datetime")
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _when(name: str, dt: datetime, tz: ZoneInfo) -> str:
    local = dt.astimezone(tz)
    # RFC 5545 3.3.5: a local time in the repeated hour means its FIRST occurrence, so the
    # second one can only be written in UTC.
    if local.fold and local.replace(fold=0).utcoffset() != local.utcoffset():
        return f"{name}:{_utc(dt)}"
    return f"{name};TZID={tzid(tz)}:{local:%Y%m%dT%H%M%S}"


def _texts(event: Event, language: str | None) -> list[str]:
    """SUMMARY, DESCRIPTION (with the URL after it) and LOCATION for a reader of ``language``.

    A text given per language (``title: {nl: ..., fr: ...}``) is the reader's, else the campaign
    language's, and says which with ``LANGUAGE=`` (RFC 5545 3.2.10, a BCP 47 tag: ``nl-BE``). A
    plain text carries no LANGUAGE: it is one text for every reader (often a name or an address)
    and mailer does not know its language. UID and SEQUENCE never depend on the language."""

    def text(name: str) -> tuple[str | None, str]:
        value, lang = event.text(name, language)
        tagged = bool(value) and bool(event.per_language(name))
        return value, f";LANGUAGE={lang.replace('_', '-')}" if tagged else ""

    title, title_lang = text("title")
    lines = [f"SUMMARY{title_lang}:{escape_text(title or event.title)}"]
    about, about_lang = text("description")
    description = "\n\n".join(x for x in (about, event.url) if x)
    if description:
        lines.append(f"DESCRIPTION{about_lang}:{escape_text(description)}")
    location, location_lang = text("location")
    if location:
        lines.append(f"LOCATION{location_lang}:{escape_text(location)}")
    return lines


class Prototype:
    """One event's calendar object minus its ATTENDEE line, ready to be stamped per recipient.

    RFC 6047 2.4 / RFC 5546: one mail per attendee carries only that attendee, so the
    recipient sees RSVP buttons for themselves and the other recipients stay private.
    """

    __slots__ = ("_head", "_tail", "method")

    def __init__(self, head: bytes, tail: bytes, method: str) -> None:
        self._head = head
        self._tail = tail
        self.method = method

    def for_attendee(self, email: str, name: str = "", partstat: str | None = None) -> bytes:
        """The complete calendar object (bytes, CRLF, folded) for one recipient.

        The recipient is an ATTENDEE (RFC 5545 3.8.4.1), never the ORGANIZER, written as
        :func:`mailer.addresses.spelling` spells it (the mail's ``To:`` and envelope spell it
        so too). ``partstat`` is the answer the ledger knows (``ACCEPTED``, ``TENTATIVE``,
        ``DECLINED``): a REQUEST re-sent to someone who answered carries it with
        ``RSVP=FALSE``, so no client asks again or resets the answer (issue 13); without one
        (or ``NEEDS-ACTION``) it is ``PARTSTAT=NEEDS-ACTION;RSVP=TRUE``. A CANCEL keeps that
        plain form (there is nothing left to answer). The planner leaves the organiser's own address out of
        calendar steps (it is never an ATTENDEE of its own meeting).
        """
        cn = f";CN={param_value(name)}" if name and name.strip() else ""
        answer = (partstat or "").strip().upper()
        if answer in _ANSWERED and self.method == "REQUEST":
            role = f"ROLE=REQ-PARTICIPANT;PARTSTAT={answer};RSVP=FALSE"
        else:
            role = "ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION;RSVP=TRUE"
        line = f"ATTENDEE{cn};{role}:mailto:{_uri(spelling(email))}"
        return self._head + fold(line) + self._tail


#: Answers a REQUEST carries back to the attendee (RFC 5545 3.2.12).
_ANSWERED = frozenset({"ACCEPTED", "TENTATIVE", "DECLINED"})


def transparent(event: Event) -> bool:
    """Whether the event leaves its attendees free (``TRANSP:TRANSPARENT``, RFC 5545 3.8.2.7).

    All-day events and events of 24 hours or more are TRANSPARENT, as Google and Outlook
    create all-day entries (a three-day conference does not block three days of meetings);
    ``busy: true`` on the event makes them OPAQUE, ``busy: false`` makes a timed event
    TRANSPARENT. Timed events are OPAQUE by default (an overnight event too).
    """
    if event.busy is not None:
        return not event.busy
    return event.all_day or event.end - event.start >= timedelta(hours=24)


def _check(event: Event, sequence: int) -> None:
    if not event.uid.strip():
        raise ValueError(f"event {event.id!r} has no UID")
    if not isinstance(sequence, int) or sequence < 0:
        raise ValueError(f"sequence must be an integer >= 0, not {sequence!r}")


def _calendar_head(method: str) -> list[str]:
    return [
        "BEGIN:VCALENDAR",
        f"PRODID:{PRODID}",
        "VERSION:2.0",
        "CALSCALE:GREGORIAN",
        # RFC 6047 2.4: METHOD must equal the method= parameter of the text/calendar part.
        f"METHOD:{method}",
    ]


def _when_lines(campaign: Campaign, event: Event) -> tuple[bool, list[str]]:
    """DTSTART and DTEND of ``event``, and whether they refer to the campaign's VTIMEZONE."""
    tz = campaign.timezone
    if event.all_day:
        # RFC 5545 3.6.1: all-day events are DATE values; DTEND is the day after the last.
        first, after = event.start.astimezone(tz).date(), event.end.astimezone(tz).date()
        return False, [f"DTSTART;VALUE=DATE:{first:%Y%m%d}", f"DTEND;VALUE=DATE:{after:%Y%m%d}"]
    if fixed_offset(tz, event.start, event.end) == timedelta(0):
        # RFC 5545 3.3.5 form 2 (UTC) for zones that are UTC all year: vobject, and so
        # Radicale, treat a +0000 VTIMEZONE as UTC and then cannot resolve its TZID.
        return False, [f"DTSTART:{_utc(event.start)}", f"DTEND:{_utc(event.end)}"]
    # RFC 5545 3.3.5 form 3: local time with TZID, and the VTIMEZONE it refers to.
    return True, [_when("DTSTART", event.start, tz), _when("DTEND", event.end, tz)]


def _vevent(
    campaign: Campaign,
    event: Event,
    when: list[str],
    sequence: int,
    dtstamp: datetime,
    language: str | None,
    *,
    cancelled: bool,
) -> list[str]:
    """The VEVENT's lines up to (not including) ATTENDEE and END:VEVENT."""
    lines = [
        "BEGIN:VEVENT",
        f"UID:{escape_text(event.uid)}",  # RFC 5545 3.8.4.7: the same for every update
        f"DTSTAMP:{_utc(dtstamp)}",  # RFC 5545 3.8.7.2: UTC
        f"SEQUENCE:{sequence}",
        *when,  # DTEND, never DURATION (RFC 5545 3.6.1 allows only one of them)
    ]
    lines += _texts(event, language)
    if event.url:
        lines.append(f"URL:{_uri(event.url)}")
    sender = campaign.sender
    cn = f";CN={param_value(sender.organizer_name)}" if sender.organizer_name.strip() else ""
    lines += [
        # No VALARM is ever written.
        f"STATUS:{'CANCELLED' if cancelled else 'CONFIRMED'}",
        f"TRANSP:{'TRANSPARENT' if transparent(event) else 'OPAQUE'}",
        # RFC 6047 3: iMIP replies go to the ORGANIZER address; that mailbox must exist.
        f"ORGANIZER{cn}:mailto:{_uri(spelling(sender.organizer))}",
    ]
    return lines


def prototype(
    campaign: Campaign,
    event: Event,
    *,
    method: Method = "REQUEST",
    sequence: int = 0,
    dtstamp: datetime,
    language: str | None = None,
) -> Prototype:
    """Do the per-event work once; :meth:`Prototype.for_attendee` adds the recipient.

    :param method: ``REQUEST`` (invitation or update) or ``CANCEL`` (RFC 5546 3.2.2, 3.2.5).
    :param sequence: RFC 5545 3.8.7.4: 0 at first, raised at every significant change and
        for a CANCEL.
    :param dtstamp: when the object was created (aware); written in UTC.
    :param language: the reader's language: SUMMARY, LOCATION and DESCRIPTION given per
        language in schedules.yaml are written in it (see :func:`_texts`); one prototype per
        language, so the work stays per event, not per recipient.
    :raises ValueError: for an unknown method, a negative sequence, naive datetimes or an
        event without UID.

    STATUS follows ``method`` (CONFIRMED or CANCELLED), not ``event.status``: a cancelled
    event is announced by sending a CANCEL with a raised sequence.
    """
    method = method.upper()  # type: ignore[assignment]
    if method not in ("REQUEST", "CANCEL"):
        raise ValueError(f"method must be REQUEST or CANCEL, not {method!r}")
    _check(event, sequence)
    zoned, when = _when_lines(campaign, event)
    head = _calendar_head(method)
    if zoned:
        head += vtimezone(campaign.timezone, event.start, event.end)
    # RFC 5546 3.2.5: a CANCEL sets STATUS:CANCELLED.
    head += _vevent(campaign, event, when, sequence, dtstamp, language, cancelled=method == "CANCEL")
    tail = b"END:VEVENT\r\nEND:VCALENDAR\r\n"
    return Prototype(b"".join(fold(line) for line in head), tail, method)


def build_event(
    campaign: Campaign,
    event: Event,
    *,
    attendee_email: str,
    attendee_name: str = "",
    method: Method = "REQUEST",
    sequence: int = 0,
    dtstamp: datetime,
    language: str | None = None,
    partstat: str | None = None,
) -> bytes:
    """One recipient's calendar object: ``prototype(...).for_attendee(email, name, partstat)``."""
    proto = prototype(campaign, event, method=method, sequence=sequence, dtstamp=dtstamp, language=language)
    return proto.for_attendee(attendee_email, attendee_name, partstat)


# --------------------------------------------------------------------------------------
# Published calendars: a download and a subscribed feed (issue 14).
# --------------------------------------------------------------------------------------


class Entry(NamedTuple):
    """One event of a published calendar, as it is now: the SEQUENCE the mails about it carry
    and whether it is cancelled."""

    event: Event
    sequence: int
    cancelled: bool = False
    #: DTSTAMP of this VEVENT (aware): when this version of the event was made.
    dtstamp: datetime | None = None


def publish(
    campaign: Campaign,
    entries: Sequence[Entry],
    *,
    dtstamp: datetime,
    language: str | None = None,
    name: str | None = None,
    refresh: timedelta | None = None,
) -> bytes:
    """A ``METHOD:PUBLISH`` calendar (RFC 5546 3.2.1) of ``entries``: one VEVENT each, with the
    UID and SEQUENCE of the mails about it, so a client that has the invitation updates that
    entry instead of adding a second one. No ATTENDEE at all (RFC 5546 3.2.1 forbids it in a
    PUBLISH, and a feed must never list other recipients) and no iTIP semantics: nothing is
    asked, nothing is answered.

    :param dtstamp: the DTSTAMP of an entry without its own.
    :param language: the reader's language for texts given per language.
    :param name: the calendar's name (RFC 7986 NAME and X-WR-CALNAME, which Apple and Google
        read) for a feed.
    :param refresh: how often a subscriber should fetch it again (RFC 7986 REFRESH-INTERVAL and
        Outlook's X-PUBLISHED-TTL).
    :raises ValueError: an event without UID, a negative sequence, naive datetimes.
    """
    head = _calendar_head("PUBLISH")
    if name:
        head += [f"NAME:{escape_text(name)}", f"X-WR-CALNAME:{escape_text(name)}"]
    if refresh is not None:
        seconds = int(refresh.total_seconds())
        if seconds <= 0:
            raise ValueError(f"refresh must be positive, not {refresh!r}")
        period = f"PT{seconds // 3600}H" if seconds % 3600 == 0 else f"PT{seconds // 60}M"
        head += [f"REFRESH-INTERVAL;VALUE=DURATION:{period}", f"X-PUBLISHED-TTL:{period}"]
    events: list[str] = []
    zoned: list[Event] = []
    for entry in entries:
        _check(entry.event, entry.sequence)
        tz_form, when = _when_lines(campaign, entry.event)
        if tz_form:
            zoned.append(entry.event)
        stamp = entry.dtstamp or dtstamp
        events += _vevent(
            campaign, entry.event, when, entry.sequence, stamp, language, cancelled=entry.cancelled
        )
        events.append("END:VEVENT")
    if zoned:  # one VTIMEZONE, valid over every event that refers to it
        first = min(e.start for e in zoned)
        last = max(e.end for e in zoned)
        head += vtimezone(campaign.timezone, first, last)
    lines = [*head, *events, "END:VCALENDAR"]
    return b"".join(fold(line) for line in lines)

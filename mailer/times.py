"""Local times in a campaign's time zone: parsing, DST checks, relative send times (pure)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "LOCAL",
    "iso",
    "local_wall",
    "parse_iso",
    "parse_date",
    "parse_duration",
    "parse_local",
    "resolve_local",
    "resolve_step_time",
    "resolve_wall",
    "zone",
]

_DURATION = re.compile(r"^\s*(?:(\d+)\s*w)?\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*$")
_RELATIVE = re.compile(
    r"^\s*-\s*(?:(?P<d>\d+)\s*d)?\s*(?:(?P<h>\d+)\s*h)?\s*(?:(?P<m>\d+)\s*m)?"
    r"\s*(?:(?P<hh>\d{1,2}):(?P<mm>\d{2}))?\s*$"
)
_LOCAL_DT = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")
_DATE = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})\s*$")
#: ``at: -1d 09:00 local``: the step goes at that wall-clock time in each recipient's zone.
LOCAL = re.compile(r"\s+local\s*$", re.IGNORECASE)
_LOCAL_REL = re.compile(r"^\s*-\s*(?:(?P<d>\d+)\s*d)?\s*(?P<hh>\d{1,2}):(?P<mm>\d{2})\s*$")


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo | None:
    """The IANA zone ``name`` (``America/New_York``), or None if there is no such zone.

    >>> zone("Europe/Brussels").key, zone("Mars/Olympus")
    ('Europe/Brussels', None)
    """
    if not name or name != name.strip() or name.startswith(("/", ".")) or ".." in name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def parse_duration(text: str) -> timedelta:
    """Parse ``1d``, ``2h``, ``30m``, ``1w 2d``.

    >>> parse_duration("1d 2h")
    datetime.timedelta(days=1, seconds=7200)
    """
    m = _DURATION.match(text)
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 30m, 2h, 1d or 1w")
    w, d, h, mi = (int(g or 0) for g in m.groups())
    return timedelta(weeks=w, days=d, hours=h, minutes=mi)


def resolve_local(naive: datetime, tz: ZoneInfo) -> datetime:
    """Attach ``tz`` to a wall-clock time, refusing times that do not exist or are ambiguous.

    :raises ValueError: in a DST gap (the clock skips it) or a DST overlap (it happens twice).
    """
    a = naive.replace(tzinfo=tz, fold=0)
    b = naive.replace(tzinfo=tz, fold=1)
    if a.utcoffset() != b.utcoffset():
        # Either a gap (neither round-trips) or an overlap (both exist).
        back = a.astimezone(ZoneInfo("UTC")).astimezone(tz).replace(tzinfo=None)
        if back != naive:
            raise ValueError(
                f"{naive:%Y-%m-%d %H:%M} does not exist in {tz.key} (the clocks skip it "
                "for daylight saving time); pick another time"
            )
        raise ValueError(
            f"{naive:%Y-%m-%d %H:%M} happens twice in {tz.key} (the clocks go back); pick another time"
        )
    return a


def resolve_wall(naive: datetime, tz: ZoneInfo) -> tuple[datetime, str | None]:
    """A recipient's send time: ``naive`` in ``tz``, never refused (a recipient's zone is not
    the campaign's to choose). Returns the time and, when :func:`resolve_local` would refuse it,
    why: ``check`` reports that as the error the campaign's own rule gives (pick another time),
    and if it is sent anyway a time in a DST gap goes at the moment the clocks jump past it plus
    the same distance (02:30 in a 02:00->03:00 gap: 03:30), one that happens twice at its first
    occurrence (summer time), as Python's ``fold=0`` reads both.

    >>> ny = ZoneInfo("America/New_York")
    >>> resolve_wall(datetime(2018, 3, 11, 2, 30), ny)[0].isoformat()
    '2018-03-11T03:30:00-04:00'
    >>> resolve_wall(datetime(2018, 11, 4, 1, 30), ny)[0].isoformat()
    '2018-11-04T01:30:00-04:00'
    """
    try:
        return resolve_local(naive, tz), None
    except ValueError as exc:
        at = naive.replace(tzinfo=tz, fold=0)
        return at.astimezone(UTC).astimezone(tz), str(exc)


def local_wall(text: str, start: datetime) -> datetime | None:
    """The wall-clock time of a step sent ``local`` (``-1d 09:00 local``, ``2018-01-08 09:00
    local``): a naive datetime, the same in every recipient's zone, the day counted back from
    the event's start date in the event's own zone. None when ``text`` has no ``local``.

    :raises ValueError: for ``local`` without a time of day (``-2h local`` means nothing
        different in one zone or another).

    >>> local_wall("-1d 09:00 local", datetime(2018, 1, 22, 10, tzinfo=ZoneInfo("Europe/Brussels")))
    datetime.datetime(2018, 1, 21, 9, 0)
    >>> local_wall("-1d 09:00", datetime(2018, 1, 22, 10, tzinfo=ZoneInfo("Europe/Brussels"))) is None
    True
    """
    m = LOCAL.search(text)
    if m is None:
        return None
    rest = text[: m.start()]
    if _LOCAL_DT.match(rest):
        return parse_local(rest)
    r = _LOCAL_REL.match(rest)
    if r is None:
        raise ValueError(
            f"{text!r}: 'local' goes with a time of day, sent at that hour in each recipient's "
            "time zone; write e.g. -1d 09:00 local or 2018-01-08 09:00 local"
        )
    hh, mm = int(r.group("hh")), int(r.group("mm"))
    if hh > 23 or mm > 59:
        raise ValueError(f"{text!r}: {hh:02d}:{mm:02d} is not a time of day")
    day = start.date() - timedelta(days=int(r.group("d") or 0))
    return datetime.combine(day, time(hh, mm))


def parse_local(text: str) -> datetime:
    m = _LOCAL_DT.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a local time; write YYYY-MM-DD HH:MM")
    d = date.fromisoformat(m.group(1))
    return datetime.combine(d, time(int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)))


def parse_date(text: str) -> date:
    m = _DATE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a date; write YYYY-MM-DD")
    return date.fromisoformat(m.group(1))


def resolve_step_time(text: str, start: datetime, tz: ZoneInfo) -> datetime:
    """Resolve a step's ``at:`` into an aware datetime.

    ``YYYY-MM-DD HH:MM`` is a local time; ``-7d 09:00`` is 09:00 local seven days before the
    event's start date; ``-1d`` is the same wall-clock time one day earlier; ``-2h`` / ``-30m``
    are exact durations before the start. With ``local`` (``-1d 09:00 local``) the time is the
    one in ``tz``; each recipient's is :func:`local_wall` resolved in their zone.
    """
    wall = local_wall(text, start)
    if wall is not None:
        return resolve_local(wall, tz)
    if _LOCAL_DT.match(text):
        return resolve_local(parse_local(text), tz)
    m = _RELATIVE.match(text)
    if not m or not any(m.group(k) for k in ("d", "h", "m", "hh")):
        raise ValueError(
            f"{text!r} is not a send time; write an absolute local time (2018-01-08 09:00) "
            "or one relative to the event start (-7d 09:00, -1d, -2h, -30m)"
        )
    local_start = start.replace(tzinfo=None)
    days = int(m.group("d") or 0)
    wall = local_start - timedelta(days=days)
    if m.group("hh") is not None:
        hh, mm = int(m.group("hh")), int(m.group("mm"))
        if hh > 23 or mm > 59:
            raise ValueError(f"{text!r}: {hh:02d}:{mm:02d} is not a time of day")
        wall = datetime.combine(wall.date(), time(hh, mm))
    at = resolve_local(wall, tz)
    delta = timedelta(hours=int(m.group("h") or 0), minutes=int(m.group("m") or 0))
    if delta:
        utc = ZoneInfo("UTC")
        at = (at.astimezone(utc) - delta).astimezone(tz)
    return at


def iso(dt: datetime) -> str:
    """UTC timestamp as stored: ``2018-01-22T08:30:00Z`` (sorts as text).

    >>> from datetime import timezone, timedelta
    >>> iso(datetime(2018, 1, 22, 9, 30, tzinfo=timezone(timedelta(hours=1))))
    '2018-01-22T08:30:00Z'
    """
    if dt.tzinfo is None:
        raise ValueError("naive datetime")
    # isoformat: a tenth of strftime's cost (the ledger formats several per mail)
    return dt.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def parse_iso(text: str) -> datetime:
    """The inverse of :func:`iso`.

    >>> parse_iso("2018-01-22T08:30:00Z")
    datetime.datetime(2018, 1, 22, 8, 30, tzinfo=datetime.timezone.utc)
    """
    if not text.endswith("Z") or len(text) != 20:
        raise ValueError(f"not a ledger timestamp: {text!r}")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)

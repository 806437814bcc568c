"""The clock seam: where the daemon, ``--now`` and the demo get the time (an aware UTC datetime).

A clock is any callable returning an aware UTC ``datetime``. Code that needs the time takes a
clock and calls it, so a test (or the demo) decides what time it is: :class:`SystemClock` reads
the real time, :func:`virtual_clock` starts at a chosen time and advances with real time, and
:class:`ManualClock` moves only when told.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "ManualClock", "SystemClock", "virtual_clock"]

#: A source of the current time: called with no argument, returns an aware UTC datetime.
Clock = Callable[[], datetime]


class SystemClock:
    """The real time: the one place the daemon reads ``datetime.now``.

    >>> SystemClock()().tzinfo is UTC
    True
    """

    def __call__(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


def virtual_clock(now: datetime) -> Clock:
    """A clock that starts at ``now`` and advances with real time (for ``--now`` and the demo).

    >>> c = virtual_clock(datetime(2030, 1, 1, tzinfo=UTC))
    >>> timedelta(0) <= c() - datetime(2030, 1, 1, tzinfo=UTC) < timedelta(seconds=5)
    True
    """
    t0 = time.monotonic()
    return lambda: now + timedelta(seconds=time.monotonic() - t0)


class ManualClock:
    """A clock that stands still until told to move (for tests that must not sleep).

    >>> c = ManualClock(datetime(2030, 1, 1, 9, 0, tzinfo=UTC))
    >>> c.advance(timedelta(minutes=5))
    >>> c().isoformat()
    '2030-01-01T09:05:00+00:00'

    :raises ValueError: a naive datetime (every time in mailer is aware).
    """

    def __init__(self, now: datetime) -> None:
        self._now = _aware(now)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward (or back, with a negative ``delta``)."""
        self._now += delta

    def set(self, now: datetime) -> None:
        """Jump to ``now``."""
        self._now = _aware(now)

    def __repr__(self) -> str:
        return f"ManualClock({self._now.isoformat()})"


def _aware(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{dt!r} has no time zone; give an aware datetime")
    return dt.astimezone(UTC)

"""What the inbox left for a person (issue 15): the mails it recorded as unmatched or skipped.

:func:`mailer.inbox.process` keeps one row per message it read in the ledger's ``inbox`` table,
its ``kind`` the ``+``-joined kinds of what the message told us (``bounce+unmatched-bounce``).
A message needs a person when one of them is unmatched (a reply, DSN or unsubscribe mail tied to
no mail we sent: it changed nothing) or skipped (unreadable: left unflagged in the mailbox).
``mailer status`` prints the counts (:func:`counts`, :func:`status_line`), ``mailer inbox
--list`` and the dashboard's ``/-/inbox`` page the messages (:func:`newest`).

Only sqlite3 here: ``mailer status`` imports this module and must stay fast to start.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import NamedTuple

from .vocab import NEEDS_PERSON

__all__ = ["KINDS", "WHERE", "InboxRow", "counts", "describe", "kinds_of", "newest", "status_line"]

#: The recorded kinds that need a person, with their labels (singular, plural), in this order.
KINDS: dict[str, tuple[str, str]] = {k: k.labels for k in NEEDS_PERSON}
#: The inbox rows that need a person: a superset test in SQL, narrowed by :func:`kinds_of`.
WHERE = "(kind LIKE '%unmatched%' OR kind LIKE '%skipped%')"


class InboxRow(NamedTuple):
    """One message that needs a person."""

    kind: str  #: as recorded, e.g. ``bounce+unmatched-bounce``
    at: str  #: when it was read, UTC as stored
    email: str  #: the addresses it named (``a, b and 3 more``), or ``''``
    detail: str  #: what the inbox made of it, one line
    message_id: str  #: its Message-ID, or a key of ours for a skipped one


def kinds_of(kind: str) -> list[str]:
    """The kinds of a recorded ``kind`` that need a person.

    >>> kinds_of("bounce+unmatched-bounce")
    ['unmatched-bounce']
    >>> kinds_of("reply"), kinds_of("skipped")
    ([], ['skipped'])
    """
    return [k for k in kind.split("+") if k in KINDS]


def counts(conn: sqlite3.Connection) -> tuple[int, Counter[str]]:
    """(messages that need a person, how many of them per kind of :data:`KINDS`). One query
    over the small ``inbox`` table, grouped by the few distinct kinds."""
    total, per = 0, Counter[str]()
    for kind, n in conn.execute(f"SELECT kind, count(*) FROM inbox WHERE {WHERE} GROUP BY kind"):
        found = kinds_of(kind)
        if found:
            total += n
            per.update(dict.fromkeys(found, n))
    return total, per


def describe(per: Counter[str]) -> str:
    """``2 unmatched bounces, 1 skipped message``.

    >>> describe(Counter({"skipped": 1, "unmatched-bounce": 2}))
    '2 unmatched bounces, 1 skipped message'
    """
    return ", ".join(f"{n:,} {KINDS[k][n != 1]}" for k in KINDS if (n := per[k]))


def status_line(total: int, per: Counter[str]) -> str:
    """The line ``mailer status`` prints when messages need a person ('' when none do).

    >>> head, tail = status_line(3, Counter({"skipped": 1, "unmatched-bounce": 2})).split(": see ")
    >>> head
    'inbox: 3 mails need a person (2 unmatched bounces, 1 skipped message)'
    >>> tail
    'mailer dashboard or mailer inbox --list'
    >>> status_line(0, Counter())
    ''
    """
    if not total:
        return ""
    mails = "1 mail needs" if total == 1 else f"{total:,} mails need"
    return f"inbox: {mails} a person ({describe(per)}): see mailer dashboard or mailer inbox --list"


def newest(conn: sqlite3.Connection, limit: int | None = None) -> list[InboxRow]:
    """The messages that need a person, newest first (at most ``limit``)."""
    sql = (
        "SELECT kind, at, coalesce(email, ''), coalesce(detail, ''), message_id FROM inbox"
        f" WHERE {WHERE} ORDER BY at DESC, rowid DESC"
    )
    rows = (InboxRow(*r) for r in conn.execute(sql + (f" LIMIT {int(limit)}" if limit else "")))
    # LIMIT counts rows that a narrower test drops: none in practice (no other kind is named so)
    return [r for r in rows if kinds_of(r.kind)]

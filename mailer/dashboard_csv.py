"""The dashboard's streamed CSV of deliveries (issue 16): one query, rows sent as they are read.

Datasette's own table CSV (``/ledger/deliveries.csv?_stream=on``) pages through the table a
thousand rows at a time, each page a new query that sorts what is left (about 7 s for the
50,000 failed, deferred and bounced rows of a million). ``/-/deliveries.csv`` runs one query
through the ledger's indexes, in an order an index gives (no sort before the first row), and
writes rows as they come: the first bytes leave at once and memory stays flat however many
rows follow. The cells are protected against spreadsheet
formulas on the way out by the dashboard's ASGI wrapper, as every CSV download is.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .vocab import Status

__all__ = ["CHUNK_ROWS", "FILTERS", "PATH", "BadFilter", "Query", "stream_rows"]

#: Where the dashboard serves it; filters as query parameters, e.g. ``?status=failed&step=x``.
PATH = "/-/deliveries.csv"
#: The filters it takes (each repeatable: any of the values), all on indexed columns.
FILTERS = ("status", "step", "campaign", "event")
#: Rows read from SQLite and written per chunk of the response.
CHUNK_ROWS = 2000


class BadFilter(ValueError):
    """A query parameter this download does not take, or a status that does not exist."""


@dataclass(frozen=True)
class Query:
    """Which deliveries: for each filter, any of its values (no filter: every row)."""

    where: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_args(cls, args: Mapping[str, Sequence[str]]) -> Query:
        """From the request's parameters (``{name: [values]}``).

        >>> sql, args = Query.from_args({"status": ["failed", "bounced"], "step": ["invite"]}).sql()
        >>> print(sql)
        SELECT * FROM deliveries WHERE status IN (?, ?) AND step IN (?) ORDER BY status, next_attempt, id
        >>> args
        ['failed', 'bounced', 'invite']
        >>> Query.from_args({"status": ["lost"]})
        Traceback (most recent call last):
        ...
        mailer.dashboard_csv.BadFilter: status=lost: not a status; one of pending, ...
        """
        unknown = sorted(set(args) - set(FILTERS) - {"_dl"})
        if unknown:
            raise BadFilter(f"{unknown[0]}: not a filter of this download; use {', '.join(FILTERS)}")
        statuses = [s.value for s in Status]
        for value in args.get("status", ()):
            if value not in statuses:
                raise BadFilter(f"status={value}: not a status; one of {', '.join(statuses)}")
        return cls(tuple((k, tuple(args[k])) for k in FILTERS if args.get(k)))

    def sql(self) -> tuple[str, list[str]]:
        """The statement and its arguments (column names are our constants, values are bound).

        The order is one an index gives, so the first rows leave before the last are found: by
        status, then next attempt (deferred rows), then row number, the order of the index
        (status, next_attempt), when statuses are chosen; else by row number (a step's rows
        come in that order from the (step) index).
        """
        clauses = [f"{k} IN ({', '.join('?' * len(v))})" for k, v in self.where]
        args = [x for _, v in self.where for x in v]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "status, next_attempt, id" if any(k == "status" for k, _ in self.where) else "id"
        return f"SELECT * FROM deliveries{where} ORDER BY {order}", args


async def stream_rows(db: Path, query: Query, write: Callable[[str], Awaitable[Any]]) -> int:
    """Write the header and every matching row of ``db`` (opened read-only) as CSV text to
    ``write``, :data:`CHUNK_ROWS` rows at a time; SQLite is read in a worker thread so the
    server keeps answering other requests. Returns the number of rows written."""
    conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only = 1")
        sql, args = query.sql()
        cursor = await asyncio.to_thread(conn.execute, sql, args)
        buffer = io.StringIO()
        writer = csv.writer(buffer)  # the dialect Datasette's CSV uses (\r\n, minimal quoting)
        writer.writerow([d[0] for d in cursor.description])
        n = 0
        while True:
            rows = await asyncio.to_thread(cursor.fetchmany, CHUNK_ROWS)
            writer.writerows(rows)
            n += len(rows)
            await write(buffer.getvalue())
            if not rows:
                return n
            buffer.seek(0)
            buffer.truncate()
    finally:
        conn.close()

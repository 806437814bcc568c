"""The delivery ledger: one SQLite file recording every delivery, attempt, suppression and lock."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .errors import LedgerError, LockedError
from .responses import Responses, dicts
from .times import iso, parse_iso

__all__ = [
    "FINAL",
    "STATUSES",
    "Ledger",
    "Outcome",
    "Row",
    "Status",
    "iso",
    "parse_iso",
]

Status = Literal["pending", "sending", "sent", "deferred", "failed", "skipped", "suppressed", "bounced"]
STATUSES: tuple[str, ...] = (
    "pending",
    "sending",
    "sent",
    "deferred",
    "failed",
    "skipped",
    "suppressed",
    "bounced",
)
#: Statuses a row never leaves on its own (``mailer retry`` turns failed back into pending).
FINAL: frozenset[str] = frozenset({"sent", "failed", "skipped", "suppressed", "bounced"})

SCHEMA_VERSION = 3

#: Version 1: the tables and indexes. ``IF NOT EXISTS`` as in the releases before migrations,
#: which ran it on every open.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    campaign TEXT NOT NULL,
    step TEXT NOT NULL,
    event TEXT NOT NULL,
    email TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt TEXT,
    due_at TEXT NOT NULL,
    message_id TEXT,
    sequence INTEGER NOT NULL DEFAULT 0,
    ics INTEGER NOT NULL DEFAULT 0,
    smtp_code INTEGER,
    smtp_text TEXT,
    reason TEXT,
    claimed_at TEXT,
    sent_at TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    UNIQUE (campaign, step, email)
);
CREATE INDEX IF NOT EXISTS deliveries_by_status ON deliveries (campaign, step, status);
CREATE INDEX IF NOT EXISTS deliveries_by_email ON deliveries (email);
CREATE INDEX IF NOT EXISTS deliveries_retry ON deliveries (status, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (campaign, event, ics);
CREATE INDEX IF NOT EXISTS deliveries_by_event_email ON deliveries (event, campaign, email, status);
CREATE INDEX IF NOT EXISTS deliveries_by_message_id ON deliveries (message_id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    code INTEGER,
    text TEXT
);
CREATE INDEX IF NOT EXISTS attempts_by_delivery ON attempts (delivery_id);
CREATE INDEX IF NOT EXISTS attempts_by_time ON attempts (at);
CREATE TABLE IF NOT EXISTS suppressions (
    email TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    campaign TEXT NOT NULL,
    event TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    kind TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (campaign, event, sequence)
);
CREATE TABLE IF NOT EXISTS replies (
    campaign TEXT NOT NULL,
    event TEXT NOT NULL,
    email TEXT NOT NULL,
    partstat TEXT NOT NULL,
    at TEXT NOT NULL,
    message_id TEXT,
    PRIMARY KEY (campaign, event, email)
);
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    email TEXT,
    detail TEXT,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps_started (
    campaign TEXT NOT NULL,
    step TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (campaign, step)
);
"""

#: Version 2: deliveries per (campaign, step, status), kept by triggers, so `mailer status`
#: reads a few dozen rows instead of an index entry per delivery. A count may drop to 0 and
#: stay (readers skip those). The triggers fire for every INSERT, UPDATE (an upsert's DO
#: UPDATE too) and DELETE on deliveries, from any connection; a REPLACE that deletes a row
#: fires the DELETE trigger only with ``PRAGMA recursive_triggers`` on (the Ledger turns it
#: on; mailer itself never REPLACEs a delivery). Also drops two indexes that cost every
#: status change or attempt a B-tree write for nothing: one that early version-1 files still
#: carry (the schema lost it in 6cda7d8; IF NOT EXISTS never removed it), and attempts (at),
#: which no query uses (attempts are read per delivery).
_SCHEMA_V2 = """
CREATE TABLE delivery_counts (
    campaign TEXT NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (campaign, step, status)
) WITHOUT ROWID;
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_counts (campaign, step, status, n) VALUES (new.campaign, new.step, new.status, 1)
    ON CONFLICT (campaign, step, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_counts SET n = n - 1
    WHERE campaign = old.campaign AND step = old.step AND status = old.status;
END;
CREATE TRIGGER delivery_counts_update AFTER UPDATE OF campaign, step, status ON deliveries
WHEN new.campaign IS NOT old.campaign OR new.step IS NOT old.step OR new.status IS NOT old.status
BEGIN
    UPDATE delivery_counts SET n = n - 1
    WHERE campaign = old.campaign AND step = old.step AND status = old.status;
    INSERT INTO delivery_counts (campaign, step, status, n) VALUES (new.campaign, new.step, new.status, 1)
    ON CONFLICT (campaign, step, status) DO UPDATE SET n = n + 1;
END;
INSERT INTO delivery_counts (campaign, step, status, n)
    SELECT campaign, step, status, count(*) FROM deliveries GROUP BY 1, 2, 3;
DROP INDEX IF EXISTS deliveries_status_only;
DROP INDEX IF EXISTS attempts_by_time;
"""

#: Version 3: the SEQUENCE an answer was given for (RFC 5546 2.1.5). A reply to an earlier
#: revision of the event no longer counts as the attendee's answer once the event changed;
#: NULL (a client that sent no SEQUENCE) counts for every revision. Also drops the
#: (campaign, step, status) index: its last reader, the dashboard's summary, reads
#: delivery_counts now, and every status change paid for it.
_SCHEMA_V3 = """
ALTER TABLE replies ADD COLUMN sequence INTEGER;
DROP INDEX IF EXISTS deliveries_by_status;
"""

#: ``{version: the SQL that brings version - 1 to it}``: a new file runs them all, in order.
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script``, each ending at a line end (a trigger body is one)."""
    stmt = ""
    for line in script.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            yield stmt.strip()
            stmt = ""
    assert not stmt.strip(), f"unterminated statement: {stmt}"


def _filters(**columns: str | None) -> tuple[str, list[str]]:
    """``col=?`` clauses joined by AND for the columns given a value (``1=1`` for none).

    >>> _filters(status="failed", step=None)
    ('status=?', ['failed'])
    """
    given = {k: v for k, v in columns.items() if v is not None}
    return " AND ".join(f"{k}=?" for k in given) or "1=1", list(given.values())


class Outcome(NamedTuple):
    """One SMTP attempt's result for :meth:`Ledger.outcomes`."""

    delivery_id: int
    outcome: str  # sent | deferred | failed
    code: int | None
    text: str
    now: datetime
    next_attempt: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Row:
    """A delivery as the planner sees it."""

    id: int
    step: str
    email: str
    status: str
    attempts: int
    next_attempt: datetime | None
    claimed_at: datetime | None
    message_id: str | None
    name: str = ""


_ROW_COLS = "id, step, email, status, attempts, next_attempt, claimed_at, message_id, name"


def _row(r: Sequence[Any]) -> Row:
    return Row(
        id=r[0],
        step=r[1],
        email=r[2],
        status=r[3],
        attempts=r[4],
        next_attempt=parse_iso(r[5]) if r[5] else None,
        claimed_at=parse_iso(r[6]) if r[6] else None,
        message_id=r[7],
        name=r[8] or "",
    )


class Ledger(Responses):
    """The SQLite ledger. Takes a path, ``":memory:"`` or an open ``sqlite3.Connection``.

    Writes commit at once (autocommit outside :meth:`transaction`), so every state change is
    durable before the caller takes its next network step. WAL mode with
    ``synchronous=NORMAL``: a commit survives a crash of this process; only a power loss may
    lose the last commits (documented in the README).
    """

    def __init__(
        self,
        target: str | Path | sqlite3.Connection,
        *,
        tracer: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.path: Path | None = None
        self._lock_fd: int | None = None
        if isinstance(target, sqlite3.Connection):
            conn = target
        else:
            if str(target) != ":memory:":
                self.path = Path(target)
                if self.path.parent and not self.path.parent.exists():
                    raise LedgerError(
                        f"{self.path}: folder {self.path.parent} does not exist; create it or "
                        "set ledger: in schedules.yaml / --db to another path"
                    )
            try:
                conn = sqlite3.connect(str(target), isolation_level=None, timeout=30, check_same_thread=False)
            except sqlite3.Error as exc:
                raise LedgerError(f"{target}: cannot open the ledger: {exc}") from None
        conn.isolation_level = None  # autocommit; we open transactions explicitly
        self.conn = conn
        self._tracer = tracer
        self._db: Any = None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA recursive_triggers=ON")  # see _SCHEMA_V2
            # A write that fires the delivery_counts triggers keeps a statement journal.
            # By default it moves to a temp file once past 64 KiB and stays there for the
            # rest of the transaction (a claim batch, add_pending): ~60 us more per mail.
            conn.execute("PRAGMA temp_store=MEMORY")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{target}: not a mailer ledger or damaged: {exc}") from None

    @property
    def db(self) -> Any:
        """A :class:`sqlite_utils.Database` on the same connection, for ad-hoc queries and
        exports (imported on first use: `mailer status` should start fast)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn, tracer=self._tracer)
        return self._db

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one step per version, in one transaction.

        BEGIN IMMEDIATE takes the write lock before the version is read again: of several
        processes opening the same old (or new) file at once, the first migrates and the others
        wait for its commit, then find the file current. An up-to-date file costs one read.
        """
        found = self._version(self.conn)
        if found < SCHEMA_VERSION:
            with self.transaction() as c:
                found = self._version(c)  # again, under the lock: another process may have done it
                if found < SCHEMA_VERSION:
                    # Before version 2 every open re-ran version 1's IF NOT EXISTS script, and
                    # version 1 grew that way (tables, indexes): a version-1 file runs it again.
                    first = 1 if found <= 1 else found + 1
                    for version in range(first, SCHEMA_VERSION + 1):
                        for stmt in _statements(_MIGRATIONS[version]):
                            c.execute(stmt)
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                        (str(SCHEMA_VERSION),),
                    )
        if found > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger schema {found} is newer than this mailer understands "
                f"({SCHEMA_VERSION}); upgrade mailer"
            )

    @staticmethod
    def _version(c: sqlite3.Connection) -> int:
        """The file's schema version; 0 for a new (empty) file."""
        if c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return 0
        row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    # -- locking ----------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the sending lock (``<ledger>.lock``), held until :meth:`close` or process exit.

        An OS file lock (flock) is released by the kernel when the process dies, even by
        SIGKILL, so a crash never leaves a stale lock behind.

        :raises LockedError: another process holds it.
        """
        if self.path is None or self._lock_fd is not None:
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{self.path} is in use by another mailer process (pid {holder}); only one "
                "process may send from a ledger. Stop the other one (mailer run / mailer send) "
                "or use another --db."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------------

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> Ledger._Tx:
        """``with ledger.transaction():`` groups writes into one commit."""
        return Ledger._Tx(self.conn)

    # -- reading ----------------------------------------------------------------------------

    def rows(self, campaign: str, step: str) -> dict[str, Row]:
        """All rows of one step, keyed by email."""
        cur = self.conn.execute(
            f"SELECT {_ROW_COLS} FROM deliveries WHERE campaign=? AND step=?", (campaign, step)
        )
        return {r[2]: _row(r) for r in cur}

    def get(self, campaign: str, step: str, email: str) -> Row | None:
        r = self.conn.execute(
            f"SELECT {_ROW_COLS} FROM deliveries WHERE campaign=? AND step=? AND email=?",
            (campaign, step, email),
        ).fetchone()
        return _row(r) if r else None

    def steps_started(self, campaign: str) -> dict[str, datetime]:
        return {
            s: parse_iso(a)
            for s, a in self.conn.execute("SELECT step, at FROM steps_started WHERE campaign=?", (campaign,))
        }

    def summary(self, campaign: str | None = None) -> list[dict[str, Any]]:
        """Counts per (campaign, step, status), plus the earliest pending retry."""
        # The counts from the trigger-kept delivery_counts (a row per group, not per
        # delivery); the earliest retries from the (status, next_attempt) index.
        where, args = ("AND campaign=?", (campaign,)) if campaign else ("", ())
        counts = self.conn.execute(
            f"SELECT campaign, step, status, n FROM delivery_counts WHERE n > 0 {where}"
            " ORDER BY campaign, step, status",
            args,
        ).fetchall()
        retry = {
            (c, s): n
            for c, s, n in self.conn.execute(
                f"SELECT campaign, step, min(next_attempt) FROM deliveries WHERE status='deferred' {where}"
                " GROUP BY campaign, step",
                args,
            )
        }
        return [
            {
                "campaign": c,
                "step": s,
                "status": st,
                "n": n,
                "next_attempt": retry.get((c, s)) if st == "deferred" else None,
            }
            for c, s, st, n in counts
        ]

    def log(
        self,
        *,
        campaign: str | None = None,
        status: str | None = None,
        email: str | None = None,
        step: str | None = None,
        limit: int | None = None,
        columns: Sequence[str] = (),
    ) -> Iterator[dict[str, Any]]:
        """Delivery rows matching the filters, in the order they were created; only
        ``columns`` when given (reading fewer columns is ~2x faster on big ledgers)."""
        where, args = _filters(campaign=campaign, status=status, email=email, step=step)
        # Names go into the SQL text: only the table's own columns (read from the file, not a
        # copy of the schema that could drift from it).
        unknown = set(columns) - {r[1] for r in self.conn.execute("PRAGMA table_info(deliveries)")}
        if unknown:
            raise ValueError(f"no such column(s): {sorted(unknown)}")
        sql = f"SELECT {', '.join(columns) or '*'} FROM deliveries WHERE {where} ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        yield from dicts(self.conn.execute(sql, args))

    def attempts(self, delivery_id: int) -> list[dict[str, Any]]:
        return list(
            dicts(
                self.conn.execute(
                    "SELECT at, outcome, code, text FROM attempts WHERE delivery_id=? ORDER BY id",
                    (delivery_id,),
                )
            )
        )

    # -- writing ----------------------------------------------------------------------------

    def mark_step_started(self, campaign: str, step: str, now: datetime) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO steps_started (campaign, step, at) VALUES (?, ?, ?)",
            (campaign, step, iso(now)),
        )

    def record(
        self,
        campaign: str,
        items: Iterable[tuple[str, str, str, str, datetime]],
        *,
        status: str,
        reason: str,
        now: datetime,
    ) -> int:
        """Record terminal outcomes decided without sending (skipped, suppressed, failed).

        ``items`` are ``(step, event, email, name, due_at)``. Existing non-final rows are
        updated; final rows are left alone. Returns the number written.
        """
        ts = iso(now)
        n = 0
        with self.transaction() as c:
            for step, event, email, name, due in items:
                cur = c.execute(
                    "INSERT INTO deliveries (campaign, step, event, email, name, status, reason,"
                    " due_at, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (campaign, step, email) DO UPDATE SET status=excluded.status,"
                    " reason=excluded.reason, updated=excluded.updated, next_attempt=NULL"
                    " WHERE deliveries.status NOT IN ('sent','failed','skipped','suppressed')",
                    (campaign, step, event, email, name, status, reason, iso(due), ts, ts),
                )
                n += cur.rowcount
        return n

    def add_pending(
        self, campaign: str, items: Iterable[tuple[str, str, str, str, datetime]], now: datetime
    ) -> None:
        """Create ``pending`` rows ``(step, event, email, name, due_at)`` that do not exist yet."""
        ts = iso(now)
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO deliveries (campaign, step, event, email, name, status,"
                " due_at, created, updated) VALUES (?,?,?,?,?,'pending',?,?,?)",
                [(campaign, s, e, m, n, iso(d), ts, ts) for s, e, m, n, d in items],
            )

    def claim(
        self,
        campaign: str,
        items: Sequence[tuple[str, str, str, str, datetime, str, int, bool]],
        now: datetime,
    ) -> list[tuple[int, datetime, int]]:
        """Mark deliveries ``sending`` in one commit, before any of their DATA is sent.

        ``items`` are ``(step, event, email, name, due_at, message_id, sequence, has_ics)``. A row
        already ``sending`` (left by a crash) keeps its ``claimed_at``, so the re-send is
        byte-identical (same Date, DTSTAMP, SEQUENCE and Message-ID). Returns
        ``(row id, claimed_at, sequence)`` per item, in order.
        """
        ts = iso(now)
        out: list[tuple[int, datetime, int]] = []
        with self.transaction() as c:
            for step, event, email, name, due, mid, seq, has_ics in items:
                c.execute(
                    "INSERT INTO deliveries (campaign, step, event, email, name, status, due_at,"
                    " message_id, sequence, ics, claimed_at, created, updated)"
                    " VALUES (?,?,?,?,?,'sending',?,?,?,?,?,?,?)"
                    " ON CONFLICT (campaign, step, email) DO UPDATE SET status='sending',"
                    " message_id=excluded.message_id, ics=excluded.ics,"
                    " sequence=CASE WHEN deliveries.claimed_at IS NULL THEN excluded.sequence"
                    " ELSE deliveries.sequence END,"
                    " claimed_at=coalesce(deliveries.claimed_at, excluded.claimed_at),"
                    " updated=excluded.updated",
                    (
                        campaign,
                        step,
                        event,
                        email,
                        name,
                        iso(due),
                        mid,
                        seq,
                        int(has_ics),
                        ts,
                        ts,
                        ts,
                    ),
                )
                rid, claimed, seq_used = c.execute(
                    "SELECT id, claimed_at, sequence FROM deliveries WHERE campaign=? AND step=? AND email=?",
                    (campaign, step, email),
                ).fetchone()
                out.append((rid, parse_iso(claimed), seq_used))
        return out

    def release(self, ids: Iterable[int], now: datetime) -> None:
        """Give claimed rows whose DATA never started back to ``pending`` (clean stop)."""
        ts = iso(now)
        with self.transaction() as c:
            c.executemany(
                "UPDATE deliveries SET status='pending', updated=? WHERE id=? AND status='sending'",
                [(ts, i) for i in ids],
            )

    def outcomes(self, items: Sequence[Outcome]) -> None:
        """Record SMTP attempts and the rows' new states in one commit (a group commit: the
        transport waits for it before each of those connections sends its next mail)."""
        rows = []
        for o in items:
            ts = iso(o.now)
            nxt = iso(o.next_attempt) if o.next_attempt else None
            rows.append(
                (o.outcome, o.code, o.text, nxt, o.reason, o.outcome, o.outcome, ts, ts, o.delivery_id)
            )
        with self.transaction() as c:
            c.executemany(
                "UPDATE deliveries SET status=?, attempts=attempts+1, smtp_code=?, smtp_text=?,"
                " next_attempt=?, reason=coalesce(?, CASE WHEN ?='deferred' THEN reason END),"
                " sent_at=CASE WHEN ?='sent' THEN ? ELSE sent_at END, updated=? WHERE id=?",
                rows,
            )
            c.executemany(
                "INSERT INTO attempts (delivery_id, at, outcome, code, text) VALUES (?,?,?,?,?)",
                [(r[9], r[8], r[0], r[1], r[2]) for r in rows],
            )

    def _outcome(
        self,
        delivery_id: int,
        outcome: str,
        code: int | None,
        text: str,
        now: datetime,
        *,
        next_attempt: datetime | None = None,
        reason: str | None = None,
    ) -> None:
        self.outcomes([Outcome(delivery_id, outcome, code, text, now, next_attempt, reason)])

    def sent(self, delivery_id: int, code: int, text: str, now: datetime) -> None:
        """The server accepted the mail (2xx): committed before the connection's next DATA."""
        self._outcome(delivery_id, "sent", code, text, now)

    def deferred(
        self, delivery_id: int, code: int | None, text: str, now: datetime, next_attempt: datetime
    ) -> None:
        """A 4xx reply or a broken connection: try again at ``next_attempt``."""
        self._outcome(delivery_id, "deferred", code, text, now, next_attempt=next_attempt)

    def failed(
        self,
        delivery_id: int,
        code: int | None,
        text: str,
        now: datetime,
        reason: str = "refused by the server",
    ) -> None:
        """The delivery will not be retried: ``text`` is the server's reply (if any),
        ``reason`` says why in plain words."""
        self._outcome(delivery_id, "failed", code, text, now, reason=reason)

    def retry(self, campaign: str | None, step: str | None, now: datetime) -> int:
        """Failed rows become pending again (``mailer retry``). Returns how many."""
        where, args = _filters(status="failed", campaign=campaign, step=step)
        sql = f"UPDATE deliveries SET status='pending', next_attempt=NULL, updated=? WHERE {where}"
        with self.transaction() as c:
            return c.execute(sql, [iso(now), *args]).rowcount

    # -- event revisions (updates and cancellations) -------------------------------------------

    def revisions(self, campaign: str) -> dict[str, tuple[int, str, str]]:
        """Latest revision per event: ``{event: (sequence, fingerprint, snapshot_json)}``."""
        cur = self.conn.execute(
            "SELECT event, sequence, fingerprint, snapshot FROM revisions r WHERE campaign=? AND"
            " sequence=(SELECT max(sequence) FROM revisions WHERE campaign=r.campaign AND event=r.event)",
            (campaign,),
        )
        return {e: (seq, fp, snap) for e, seq, fp, snap in cur}

    def snapshots(self, campaign: str) -> dict[tuple[str, int], str]:
        """Every recorded revision's snapshot: ``{(event, sequence): json}``."""
        cur = self.conn.execute(
            "SELECT event, sequence, snapshot FROM revisions WHERE campaign=?", (campaign,)
        )
        return {(e, q): snap for e, q, snap in cur}

    def ics_recipients(self, campaign: str, event: str) -> list[tuple[str, str]]:
        """``(email, name)`` of everyone who was sent (or may have been sent) a calendar
        object for ``event`` and whose latest one was not a cancellation."""
        cur = self.conn.execute(
            "SELECT email, max(name) FROM deliveries WHERE campaign=? AND event=? AND ics=1"
            " AND status IN ('sent', 'sending') GROUP BY email ORDER BY email",
            (campaign, event),
        )
        return [(e, n or "") for e, n in cur]

    def add_revision(
        self,
        campaign: str,
        event: str,
        sequence: int,
        kind: str,
        fingerprint: str,
        snapshot: str,
        now: datetime,
        deliveries: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        """Record a revision and, in the same commit, the pending update or cancellation
        deliveries ``(step, email, name)`` it causes. An ``amend`` (nobody has the entry yet)
        replaces the revision with the same sequence."""
        ts = iso(now)
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO revisions (campaign, event, sequence, kind, fingerprint,"
                " snapshot, at) VALUES (?,?,?,?,?,?,?)",
                (campaign, event, sequence, kind, fingerprint, snapshot, ts),
            )
            c.executemany(
                "INSERT OR IGNORE INTO deliveries (campaign, step, event, email, name, status,"
                " due_at, sequence, created, updated) VALUES (?,?,?,?,?,'pending',?,?,?,?)",
                [(campaign, st, event, e, n, ts, sequence, ts, ts) for st, e, n in deliveries],
            )

    def revision_steps(self, campaign: str) -> list[tuple[str, str, int, str]]:
        """Recorded updates and cancellations, oldest first: ``(event, kind, sequence, at)``."""
        cur = self.conn.execute(
            "SELECT event, kind, sequence, at FROM revisions WHERE campaign=? AND kind IN"
            " ('update', 'cancel') ORDER BY at, sequence",
            (campaign,),
        )
        return [(e, k, q, a) for e, k, q, a in cur]

"""The delivery ledger in SQLite: deliveries, attempts, revisions, answers, suppressions, the lock.

Three ways to open it, one per kind of caller (README "The ledger"):

- :meth:`Ledger.create` (``send``, ``run``, ``demo``): makes the file only where none exists;
- :meth:`Ledger.open` (the other writers): the file must already be a mailer ledger;
- :meth:`Ledger.read` (status, log, export, the dashboard): read-only, never migrates.

Every ``sqlite3`` error leaves this module as a one-line :class:`~mailer.errors.LedgerError`.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .addresses import address_key
from .errors import LedgerError, LockedError
from .migrations import MIGRATIONS, SCHEMA_VERSION, statements
from .store import Claim, Claimed, Decided, NewRow, Outcome, RecordedRevision, Row
from .times import iso, parse_iso
from .vocab import FINAL, MAY_HAVE_ARRIVED, Attempt, Status, sql_list

__all__ = ["CURRENT_REPLY", "Ledger", "OpenMode", "ReplySource", "SCHEMA_VERSION", "dicts"]


class ReplySource(StrEnum):
    """Where an answer came from (``replies.source``, schema 6)."""

    IMIP = "imip"  #: a calendar client's iMIP REPLY, read from the organiser's inbox
    WEB = "web"  #: a button of `mailer web` (issue 14)


class OpenMode(StrEnum):
    CREATE = "create"  #: send/run/demo: create where no file exists, migrate an older schema
    WRITE = "write"  #: other writers: an existing mailer ledger, migrated
    READ = "read"  #: read-only: never writes, never migrates


#: SQL condition on ``replies AS r``: the answer was given for the event's current revision
#: (RFC 5546 2.1.5: SEQUENCE orders the versions of an event). After an update (a new time,
#: place or title: SEQUENCE + 1) earlier answers no longer count, so a reminder filtered on
#: ``rsvp`` treats those invitees as not having answered the new version. A reply without
#: SEQUENCE counts for every revision.
CURRENT_REPLY = (
    "(r.sequence IS NULL OR r.sequence >= coalesce((SELECT max(v.sequence) FROM revisions AS v"
    " WHERE v.campaign = r.campaign AND v.event = r.event), 0))"
)

#: The guard of every write that must leave a final row alone (built from the vocabulary).
NOT_FINAL = f"deliveries.status NOT IN {sql_list(FINAL)}"

_ROW_COLS = "id, step, email, status, attempts, next_attempt, claimed_at, message_id, name"

#: ``meta`` keys of a server's quota pause (issue 17): until when (ISO, UTC) and its reply.
META_PAUSED_UNTIL = "paused_until"
META_PAUSED_REPLY = "paused_reply"

#: The busy timeout: how long a write waits for another connection's transaction.
BUSY_TIMEOUT = 30.0


def dicts(cur: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    """The rows of a cursor as dicts keyed by column name."""
    cols = [d[0] for d in cur.description]
    for row in cur:
        yield dict(zip(cols, row, strict=True))


def _row(r: Sequence[Any]) -> Row:
    return Row(
        id=r[0],
        step=r[1],
        email=r[2],
        status=Status(r[3]),
        attempts=r[4],
        next_attempt=parse_iso(r[5]) if r[5] else None,
        claimed_at=parse_iso(r[6]) if r[6] else None,
        message_id=r[7],
        name=r[8] or "",
    )


def _filters(**columns: str | None) -> tuple[str, list[str]]:
    """``col=?`` clauses joined by AND for the columns given a value (``1=1`` for none).

    >>> _filters(status="failed", step=None)
    ('status=?', ['failed'])
    """
    given = {k: v for k, v in columns.items() if v is not None}
    return " AND ".join(f"{k}=?" for k in given) or "1=1", list(given.values())


# ------------------------------------------------------------------------------------------
# sqlite3 errors -> LedgerError, at this module's edge
# ------------------------------------------------------------------------------------------


def describe(exc: sqlite3.Error, path: Path | str | None) -> str:
    """A one-line message for a sqlite3 error on the ledger at ``path``, saying what to do.

    >>> e = sqlite3.OperationalError("database or disk is full")
    >>> e.sqlite_errorname = "SQLITE_FULL"
    >>> describe(e, "x.db")
    'x.db: the disk is full; free some space and run the command again (the change was rolled back)'
    """
    where = str(path) if path is not None else "ledger"
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    folder = Path(where).parent if path is not None else Path(".")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return (
            f"{where}: the ledger is locked by another program for more than {BUSY_TIMEOUT:.0f} s "
            "(a mailer sender would say so by name: this is something else, such as an open "
            "sqlite3 shell or a backup); close it and run the command again"
        )
    if name == "SQLITE_FULL" or "disk is full" in text:
        return (
            f"{where}: the disk is full; free some space and run the command again "
            "(the change was rolled back)"
        )
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return (
            f"{where}: the ledger file or its folder {folder} is read-only; mailer must be able to "
            f"write the file and create {Path(where).name}-wal and -shm next to it"
        )
    if name == "SQLITE_NOTADB" or "not a database" in text:
        return f"{where}: not a mailer ledger (not an SQLite file); check --db / ledger: in schedules.yaml"
    if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return (
            f"{where}: the ledger file is damaged; restore it from a backup (README: backing up the ledger)"
        )
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return f"{where}: cannot open the ledger ({text}); check the path and the folder's permissions"
    if name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
        return f"{where}: disk I/O error on the ledger ({text}); check the disk, then run again"
    return f"{where}: ledger error: {text}"


F = TypeVar("F", bound=Callable[..., Any])


def _mapped(fn: F) -> F:
    """Raise :class:`LedgerError` instead of any ``sqlite3.Error`` (generators too)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(self: Ledger, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise LedgerError(describe(exc, self.path)) from None

        return gen  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise LedgerError(describe(exc, self.path)) from None

    return call  # type: ignore[return-value]


def _map_all(cls: type[Ledger]) -> type[Ledger]:
    """Apply :func:`_mapped` to every public method of the class."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _mapped(value))
    return cls


def _filled(path: Path, mode: OpenMode, wait: float = 2.0) -> bool:
    """Whether an empty file at ``path`` gets content within ``wait`` seconds: another sender
    creating the ledger at this instant (SQLite makes the file, then writes its header). A
    file left empty (``touch``) is not a ledger."""
    if mode is not OpenMode.CREATE:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if path.stat().st_size > 0:
            return True
    return False


# ------------------------------------------------------------------------------------------
# The ledger
# ------------------------------------------------------------------------------------------


@_map_all
class Ledger:
    """The SQLite ledger; implements :class:`mailer.store.LedgerStore`.

    ``Ledger(target)`` takes a path, ``":memory:"`` or an open ``sqlite3.Connection``, and opens
    it in ``mode`` (default :attr:`OpenMode.CREATE`; prefer the named constructors). Writes
    commit at once (autocommit outside :meth:`transaction`), so every state change is durable
    before the caller takes its next network step. WAL mode with ``synchronous=NORMAL``: a
    commit survives a crash of this process; only a power loss may lose the last commits.
    """

    def __init__(
        self,
        target: str | Path | sqlite3.Connection,
        *,
        mode: OpenMode = OpenMode.CREATE,
        tracer: Callable[[str], None] | None = None,
    ) -> None:
        self.path: Path | None = None
        self.mode = mode
        self._lock_fd: int | None = None
        if isinstance(target, sqlite3.Connection):
            conn = target
        else:
            conn = self._connect(target, mode)
        conn.isolation_level = None  # autocommit; we open transactions explicitly
        # Answers are keyed by it (schema 4's migration and the reply methods call it in SQL).
        conn.create_function("address_key", 1, address_key, deterministic=True)
        if tracer is not None:
            conn.set_trace_callback(tracer)
        self.conn = conn
        try:
            if mode is OpenMode.READ:
                conn.execute("PRAGMA query_only=ON")
                self._check_readable()
            else:
                if self._version(conn) == 0 and self._foreign(conn):  # before WAL rewrites its header
                    raise self._not_ours(self._foreign(conn))
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA recursive_triggers=ON")  # see migrations._SCHEMA_V2
                # A write that fires the delivery_counts triggers keeps a statement journal.
                # By default it moves to a temp file once past 64 KiB and stays there for the
                # rest of the transaction (a claim batch, add_pending): ~60 us more per mail.
                conn.execute("PRAGMA temp_store=MEMORY")
                self._migrate()
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(describe(exc, self.path)) from None
        except LedgerError:
            conn.close()
            raise

    @classmethod
    def create(cls, path: str | Path) -> Ledger:
        """For ``send``/``run``/``demo``: the ledger at ``path``, made if no file exists there.

        :raises LedgerError: the file exists but is empty or not a mailer ledger.
        """
        return cls(path, mode=OpenMode.CREATE)

    @classmethod
    def open(cls, path: str | Path) -> Ledger:
        """For writers other than the senders (suppress, retry, inbox): an existing ledger.

        :raises LedgerError: no file at ``path``, or not a mailer ledger.
        """
        return cls(path, mode=OpenMode.WRITE)

    @classmethod
    def read(cls, path: str | Path) -> Ledger:
        """For readers (status, log, export, the dashboard): read-only, never migrated.

        :raises LedgerError: no file, not a mailer ledger, or another schema version.
        """
        return cls(path, mode=OpenMode.READ)

    def _connect(self, target: str | Path, mode: OpenMode) -> sqlite3.Connection:
        if str(target) == ":memory:":
            return sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.path = path = Path(target)
        if not path.parent.exists():
            raise LedgerError(
                f"{path}: folder {path.parent} does not exist; create it or set ledger: in "
                "schedules.yaml / --db to another path"
            )
        if path.is_dir():
            raise LedgerError(f"{path}: is a folder, not a ledger file; check --db / ledger:")
        exists = path.exists()
        if not exists and mode is not OpenMode.CREATE:
            raise LedgerError(
                f"{path}: no ledger here yet; nothing has been sent from it (`mailer send` or "
                "`mailer run` create it); check --db / ledger: in schedules.yaml"
            )
        if exists and path.stat().st_size == 0 and not _filled(path, mode):
            raise LedgerError(
                f"{path}: an empty file, not a mailer ledger; remove it (mailer creates the "
                "ledger itself) or point --db / ledger: elsewhere"
            )
        try:
            if mode is OpenMode.READ:
                return sqlite3.connect(
                    path.absolute().as_uri() + "?mode=ro",
                    uri=True,
                    isolation_level=None,
                    timeout=BUSY_TIMEOUT,
                    check_same_thread=False,
                )
            return sqlite3.connect(
                str(path), isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LedgerError(describe(exc, path)) from None

    # -- schema ---------------------------------------------------------------------------

    def _foreign(self, c: sqlite3.Connection) -> list[str]:
        """Tables of a file that has no mailer schema (empty for a new file)."""
        return [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]

    def _not_ours(self, tables: list[str]) -> LedgerError:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return LedgerError(
            f"{self.path or 'ledger'}: an SQLite file that is not a mailer ledger (tables: {shown}); "
            "point --db / ledger: at the campaign's ledger or at a new file"
        )

    def _check_readable(self) -> None:
        found = self._version(self.conn)
        if found == 0:
            tables = self._foreign(self.conn)
            raise self._not_ours(tables) if tables else LedgerError(f"{self.path}: not a mailer ledger")
        if found != SCHEMA_VERSION:
            raise LedgerError(self._version_message(found))

    def _version_message(self, found: int) -> str:
        if found > SCHEMA_VERSION:
            return (
                f"{self.path}: ledger is schema {found}, newer than this mailer reads "
                f"({SCHEMA_VERSION}); upgrade mailer"
            )
        return (
            f"{self.path}: ledger is schema {found}, this mailer reads {SCHEMA_VERSION}; upgrade it "
            "with `mailer send` or `mailer run` (after stopping the daemon that uses it)"
        )

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one step per version, in one transaction.

        BEGIN IMMEDIATE takes the write lock before the version is read again: of several
        processes opening the same old (or new) file at once, the first migrates and the others
        wait for its commit, then find the file current. An up-to-date file costs one read.
        """
        found = self._version(self.conn)
        if found == 0 and self._foreign(self.conn):
            raise self._not_ours(self._foreign(self.conn))
        if found < SCHEMA_VERSION:
            with self.transaction() as c:
                found = self._version(c)  # again, under the lock: another process may have done it
                if found < SCHEMA_VERSION:
                    # Before version 2 every open re-ran version 1's IF NOT EXISTS script, and
                    # version 1 grew that way (tables, indexes): a version-1 file runs it again.
                    first = 1 if found <= 1 else found + 1
                    for version in range(first, SCHEMA_VERSION + 1):
                        for stmt in statements(MIGRATIONS[version]):
                            c.execute(stmt)
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                        (str(SCHEMA_VERSION),),
                    )
        if found > SCHEMA_VERSION:
            raise LedgerError(self._version_message(found))

    @staticmethod
    def _version(c: sqlite3.Connection) -> int:
        """The file's schema version; 0 for a file without mailer's meta table."""
        if c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return 0
        row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    @property
    def schema_version(self) -> int:
        return self._version(self.conn)

    # -- locking ----------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the sending lock (``<ledger>.lock``), held until :meth:`close` or process exit.

        An OS file lock (flock) is released by the kernel when the process dies, even by
        SIGKILL, so a crash never leaves a stale lock behind.

        :raises LockedError: another process holds it.
        """
        if self.path is None or self._lock_fd is not None:
            return
        if self.mode is OpenMode.READ:
            raise LedgerError(f"{self.path}: opened read-only; a sender opens it with Ledger.create")
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"{lock_path}: cannot create the lock file: {exc.strerror}") from None
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
        """Release the lock (if held) and close the connection."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``with ledger.transaction() as c:`` groups writes into one commit.

        Transactions do not nest: opening one inside another is a programming error
        (RuntimeError), never a silent merge. A failed COMMIT rolls back and raises
        :class:`LedgerError`; so does an exception inside the block (after the rollback).
        """
        if self.conn.in_transaction:
            raise RuntimeError("Ledger.transaction() does not nest: a transaction is already open")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerError(describe(exc, self.path)) from None
        try:
            yield self.conn
        except BaseException:
            self._rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise LedgerError(describe(exc, self.path)) from None

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:  # the connection is broken; SQLite rolls back on close
                pass

    # -- reads: deliveries ------------------------------------------------------------------

    def step_rows(self, campaign: str, step: str) -> dict[str, Row]:
        """All rows of one step, keyed by email."""
        cur = self.conn.execute(
            f"SELECT {_ROW_COLS} FROM deliveries WHERE campaign=? AND step=?", (campaign, step)
        )
        return {r[2]: _row(r) for r in cur}

    def row(self, campaign: str, step: str, email: str) -> Row | None:
        """One delivery, or None."""
        r = self.conn.execute(
            f"SELECT {_ROW_COLS} FROM deliveries WHERE campaign=? AND step=? AND email=?",
            (campaign, step, email),
        ).fetchone()
        return _row(r) if r else None

    def steps_started(self, campaign: str) -> dict[str, datetime]:
        """When a pass first handled each configured step."""
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
                "SELECT campaign, step, min(next_attempt) FROM deliveries"
                f" WHERE status='{Status.DEFERRED}' {where} GROUP BY campaign, step",
                args,
            )
        }
        return [
            {
                "campaign": c,
                "step": s,
                "status": st,
                "n": n,
                "next_attempt": retry.get((c, s)) if st == Status.DEFERRED else None,
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
        yield from dicts(self._log(campaign, status, email, step, limit, columns))

    def log_tuples(
        self,
        columns: Sequence[str],
        *,
        status: str | None = None,
        email: str | None = None,
        step: str | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """As :meth:`log`, each row a tuple of ``columns`` in that order: `mailer log` and
        `mailer export` on a big ledger (a dict per row costs ~40 % more: 25,000 rows, issue 16)."""
        yield from self._log(None, status, email, step, limit, columns)

    def _log(
        self,
        campaign: str | None,
        status: str | None,
        email: str | None,
        step: str | None,
        limit: int | None,
        columns: Sequence[str],
    ) -> sqlite3.Cursor:
        where, args = _filters(campaign=campaign, status=status, email=email, step=step)
        # Names go into the SQL text: only the table's own columns (read from the file, not a
        # copy of the schema that could drift from it).
        unknown = set(columns) - {r[1] for r in self.conn.execute("PRAGMA table_info(deliveries)")}
        if unknown:
            raise ValueError(f"no such column(s): {sorted(unknown)}")
        sql = f"SELECT {', '.join(columns) or '*'} FROM deliveries WHERE {where} ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.conn.execute(sql, args)

    def attempts(self, delivery_id: int) -> list[dict[str, Any]]:
        """Every SMTP attempt of one delivery, oldest first."""
        return list(
            dicts(
                self.conn.execute(
                    "SELECT at, outcome, code, text FROM attempts WHERE delivery_id=? ORDER BY id",
                    (delivery_id,),
                )
            )
        )

    def attempt_times(self, since: datetime) -> list[tuple[datetime, str]]:
        """``(at, outcome)`` of the attempts made after ``since``, newest first (issue 17: the
        quotas count them, so a restart does not reset a day's count). Attempts are appended
        in time order, so this reads back from the newest row and stops at the first one older
        than ``since`` (no index on ``at``: schema 2 dropped it)."""
        out = []
        cutoff = iso(since)
        for at, outcome in self.conn.execute("SELECT at, outcome FROM attempts ORDER BY id DESC"):
            if at <= cutoff:
                break
            out.append((parse_iso(at), outcome))
        return out

    # -- writes: the pass, in the order it commits (see mailer/sendpass.py) -----------------

    def mark_steps_started(self, campaign: str, steps: Iterable[str], at: datetime) -> None:
        """Remember when a pass first handled each step (later passes treat new contacts as late)."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO steps_started (campaign, step, at) VALUES (?, ?, ?)",
            [(campaign, s, iso(at)) for s in steps],
        )

    def record_decided(self, campaign: str, items: Iterable[Decided], at: datetime) -> Counter[Status]:
        """Record deliveries decided without sending (skipped, suppressed, failed), in one commit.

        Existing rows that are not final are updated; final rows are left alone (the guard is
        built from :data:`mailer.vocab.FINAL`). Returns how many rows were written per status.
        """
        ts = iso(at)
        written: Counter[Status] = Counter()
        with self.transaction() as c:
            for d in items:
                if d.status not in FINAL:
                    raise ValueError(f"record_decided takes final statuses, not {d.status}")
                cur = c.execute(
                    "INSERT INTO deliveries (campaign, step, event, email, name, status, reason,"
                    " due_at, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (campaign, step, email) DO UPDATE SET status=excluded.status,"
                    " reason=excluded.reason, updated=excluded.updated, next_attempt=NULL"
                    f" WHERE {NOT_FINAL}",
                    (campaign, d.step, d.event, d.email, d.name, d.status, d.reason, iso(d.due_at), ts, ts),
                )
                written[d.status] += cur.rowcount
        return written

    def add_pending(self, campaign: str, items: Iterable[NewRow], at: datetime) -> None:
        """Create ``pending`` rows that do not exist yet (existing rows are left as they are)."""
        ts = iso(at)
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO deliveries (campaign, step, event, email, name, status,"
                " due_at, created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (campaign, r.step, r.event, r.email, r.name, Status.PENDING, iso(r.due_at), ts, ts)
                    for r in items
                ],
            )

    def claim(self, campaign: str, items: Sequence[Claim], at: datetime) -> list[Claimed | None]:
        """Mark deliveries ``sending`` in one commit, before any of their DATA is sent.

        A row already ``sending`` or ``deferred`` keeps its first ``claimed_at`` and SEQUENCE,
        so a re-send is byte-identical (same Date, DTSTAMP, SEQUENCE and Message-ID). The
        answer (``partstat``) is kept only by a row left ``sending`` (its mail may have
        reached the server: it goes again identical); a pending or deferred row never reached
        one and takes the answer known now. A row that is final is not claimed (None in its
        place): nothing may send it again.
        """
        ts = iso(at)
        at_claimed = parse_iso(ts)
        due: dict[datetime, str] = {}  # a batch is mostly one step: its due time formatted once
        out: list[Claimed | None] = []
        with self.transaction() as c:
            for it in items:
                got = c.execute(
                    "INSERT INTO deliveries (campaign, step, event, email, name, status, due_at,"
                    " message_id, sequence, ics, claimed_at, created, updated, partstat)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (campaign, step, email) DO UPDATE SET status=excluded.status,"
                    " message_id=excluded.message_id, ics=excluded.ics,"
                    " sequence=CASE WHEN deliveries.claimed_at IS NULL THEN excluded.sequence"
                    " ELSE deliveries.sequence END,"
                    f" partstat=CASE WHEN deliveries.status='{Status.SENDING}' THEN deliveries.partstat"
                    " ELSE excluded.partstat END,"
                    " claimed_at=coalesce(deliveries.claimed_at, excluded.claimed_at),"
                    f" updated=excluded.updated WHERE {NOT_FINAL}"
                    # The claimed row as it now is (one statement, not an upsert and a SELECT);
                    # no row: the WHERE kept a final row as it was.
                    " RETURNING id, claimed_at, sequence, partstat",
                    (
                        campaign,
                        it.step,
                        it.event,
                        it.email,
                        it.name,
                        Status.SENDING,
                        due.get(it.due_at) or due.setdefault(it.due_at, iso(it.due_at)),
                        it.message_id,
                        it.sequence,
                        int(it.has_ics),
                        ts,
                        ts,
                        ts,
                        it.partstat,
                    ),
                ).fetchall()
                if got:
                    rid, claimed, seq_used, partstat = got[0]
                    # Rows claimed in this commit share one time: parsed once.
                    when = at_claimed if claimed == ts else parse_iso(claimed)
                    out.append(Claimed(rid, when, seq_used, partstat))
                else:
                    out.append(None)
        return out

    def record_outcomes(self, items: Sequence[Outcome]) -> None:
        """Record SMTP attempts and the rows' new states in one commit (a group commit: the
        transport waits for it before each of those connections sends its next mail).

        SENT, DEFERRED and FAILED set the status; UNKNOWN keeps the row ``sending`` (its mail
        goes again, identical, at ``next_attempt``). Only a ``sending`` row takes an outcome.

        A deferral that is a server's quota reply (:func:`mailer.pacing.is_quota_reply`; its
        ``next_attempt`` is when sending resumes) also keeps that pause in ``meta``, in the same
        commit (issue 17): every later sender reads it with :meth:`server_pause`.
        """
        rows, attempts = [], []
        for o in items:
            status = Status.SENDING if o.attempt is Attempt.UNKNOWN else Status(o.attempt.value)
            ts = iso(o.at)
            nxt = iso(o.next_attempt) if o.next_attempt else None
            sent_at = ts if o.attempt is Attempt.SENT else None
            rows.append((status, o.code, o.text, nxt, o.reason, sent_at, ts, o.delivery_id))
            attempts.append((o.delivery_id, ts, o.attempt, o.code, o.text))
        with self.transaction() as c:
            c.executemany(
                "UPDATE deliveries SET status=?, attempts=attempts+1, smtp_code=?, smtp_text=?,"
                " next_attempt=?, reason=?, sent_at=coalesce(?, sent_at), updated=?"
                f" WHERE id=? AND status='{Status.SENDING}'",
                rows,
            )
            c.executemany(
                "INSERT INTO attempts (delivery_id, at, outcome, code, text) VALUES (?,?,?,?,?)", attempts
            )
            if any(o.attempt is Attempt.DEFERRED and o.next_attempt for o in items):
                self._keep_pause(c, items)

    def _keep_pause(self, c: sqlite3.Connection, items: Sequence[Outcome]) -> None:
        """Inside :meth:`record_outcomes`' transaction: the latest server's quota pause among
        ``items``, kept unless a longer one is kept already."""
        from .pacing import is_quota_reply

        quota = [
            o
            for o in items
            if o.attempt is Attempt.DEFERRED and o.next_attempt and is_quota_reply(o.code, o.text)
        ]
        if not quota:
            return
        last = max(quota, key=lambda o: o.next_attempt or o.at)
        assert last.next_attempt is not None
        until = last.next_attempt
        if until.microsecond:  # stored to the second: never end the pause early
            until = until.replace(microsecond=0) + timedelta(seconds=1)
        kept = c.execute("SELECT value FROM meta WHERE key=?", (META_PAUSED_UNTIL,)).fetchone()
        if kept is not None and kept[0] >= iso(until):
            return
        c.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            [(META_PAUSED_UNTIL, iso(until)), (META_PAUSED_REPLY, f"{last.code} {last.text}".strip())],
        )

    def server_pause(self) -> tuple[datetime, str] | None:
        """The server's quota pause kept in the ledger (issue 17): until when nothing may be
        sent, and the server's reply ("452 4.5.3 ..."); None when there is none. It may have
        ended already: compare with now (:meth:`clear_server_pause` removes it)."""
        kept = dict(
            self.conn.execute(
                "SELECT key, value FROM meta WHERE key IN (?, ?)", (META_PAUSED_UNTIL, META_PAUSED_REPLY)
            )
        )
        if META_PAUSED_UNTIL not in kept:
            return None
        return parse_iso(kept[META_PAUSED_UNTIL]), kept.get(META_PAUSED_REPLY, "")

    def clear_server_pause(self, now: datetime) -> bool:
        """Remove the kept server's pause if it has ended by ``now``; True when one was removed."""
        with self.transaction() as c:
            n = c.execute("DELETE FROM meta WHERE key=? AND value<=?", (META_PAUSED_UNTIL, iso(now))).rowcount
            if n:
                c.execute("DELETE FROM meta WHERE key=?", (META_PAUSED_REPLY,))
        return n > 0

    def release(self, ids: Iterable[int], at: datetime) -> None:
        """Give claimed rows that no connection took back to ``pending`` (a clean stop)."""
        ts = iso(at)
        with self.transaction() as c:
            c.executemany(
                f"UPDATE deliveries SET status='{Status.PENDING}', updated=?"
                f" WHERE id=? AND status='{Status.SENDING}'",
                [(ts, i) for i in ids],
            )

    def retry(
        self, campaign: str | None, step: str | None, at: datetime, *, status: Status = Status.FAILED
    ) -> int:
        """``mailer retry``: failed (or skipped) rows become pending, so the next pass decides
        afresh. The only way a failed or skipped row leaves its final state. Returns how many."""
        if status not in (Status.FAILED, Status.SKIPPED):
            raise ValueError(f"retry takes failed or skipped rows, not {status}")
        where, args = _filters(status=status, campaign=campaign, step=step)
        sql = (
            f"UPDATE deliveries SET status='{Status.PENDING}', next_attempt=NULL, reason=NULL, updated=?"
            f" WHERE {where}"
        )
        with self.transaction() as c:
            return c.execute(sql, [iso(at), *args]).rowcount

    # -- event revisions (updates and cancellations) -----------------------------------------

    def latest_revisions(self, campaign: str) -> dict[str, RecordedRevision]:
        """The latest revision per event (highest SEQUENCE)."""
        cur = self.conn.execute(
            "SELECT event, sequence, kind, fingerprint, snapshot, at FROM revisions r WHERE campaign=? AND"
            " sequence=(SELECT max(sequence) FROM revisions WHERE campaign=r.campaign AND event=r.event)",
            (campaign,),
        )
        return {e: RecordedRevision(e, q, k, fp, snap, parse_iso(a)) for e, q, k, fp, snap, a in cur}

    def revision_snapshots(self, campaign: str) -> dict[tuple[str, int], str]:
        """Every recorded revision's snapshot: ``{(event, sequence): json}``."""
        cur = self.conn.execute(
            "SELECT event, sequence, snapshot FROM revisions WHERE campaign=?", (campaign,)
        )
        return {(e, q): snap for e, q, snap in cur}

    def calendar_holders(self, campaign: str, event: str) -> list[tuple[str, str]]:
        """``(email, name)`` of everyone who was sent (or may have been sent) a calendar
        object for ``event``: an update or cancellation goes to each of them."""
        cur = self.conn.execute(
            "SELECT email, max(name) FROM deliveries WHERE campaign=? AND event=? AND ics=1"
            f" AND status IN {sql_list(MAY_HAVE_ARRIVED)} GROUP BY email ORDER BY email",
            (campaign, event),
        )
        return [(e, n or "") for e, n in cur]

    def record_revision(
        self, campaign: str, revision: RecordedRevision, step: str, holders: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Record a revision and, in the same commit, the pending update or cancellation
        deliveries (``step``, one per ``(email, name)`` holder) it causes. An ``amend``
        (nobody has the entry yet) replaces the revision with the same SEQUENCE."""
        ts = iso(revision.at)
        r = revision
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO revisions (campaign, event, sequence, kind, fingerprint,"
                " snapshot, at) VALUES (?,?,?,?,?,?,?)",
                (campaign, r.event, r.sequence, r.kind, r.fingerprint, r.snapshot, ts),
            )
            c.executemany(
                "INSERT OR IGNORE INTO deliveries (campaign, step, event, email, name, status,"
                " due_at, sequence, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(campaign, step, r.event, e, n, Status.PENDING, ts, r.sequence, ts, ts) for e, n in holders],
            )

    def revision_steps(self, campaign: str) -> list[RecordedRevision]:
        """Recorded updates and cancellations in SEQUENCE order per event (RFC 5546 2.1.4:
        SEQUENCE, not the time they were recorded, orders the versions of an event)."""
        cur = self.conn.execute(
            "SELECT event, sequence, kind, fingerprint, snapshot, at FROM revisions WHERE campaign=?"
            " AND kind IN ('update', 'cancel') ORDER BY event, sequence",
            (campaign,),
        )
        return [RecordedRevision(e, q, k, fp, snap, parse_iso(a)) for e, q, k, fp, snap, a in cur]

    # -- answers, bounces, the inbox and suppressions -----------------------------------------

    def suppressed(self) -> dict[str, str]:
        """Suppressed addresses (lower-cased) with their reason."""
        return dict(self.conn.execute("SELECT email, reason FROM suppressions"))

    def suppressions(self) -> list[dict[str, Any]]:
        """The suppression list, for people: address, reason, since."""
        return list(dicts(self.conn.execute("SELECT email, reason, at FROM suppressions ORDER BY email")))

    def suppress(self, email: str, reason: str, at: datetime) -> None:
        """Never mail ``email`` again. Stored lower-cased: providers treat the local part
        case-insensitively in practice, and a bounce may spell it differently."""
        self.conn.execute(
            "INSERT INTO suppressions (email, reason, at) VALUES (?,?,?)"
            " ON CONFLICT (email) DO UPDATE SET reason=excluded.reason, at=excluded.at",
            (email.lower(), reason, iso(at)),
        )

    def unsuppress(self, email: str) -> bool:
        """Allow ``email`` again; False when it was not suppressed."""
        return self.conn.execute("DELETE FROM suppressions WHERE email=?", (email.lower(),)).rowcount > 0

    def record_reply(
        self,
        campaign: str,
        event: str,
        email: str,
        partstat: str,
        at: datetime,
        message_id: str | None,
        sequence: int | None = None,
        source: ReplySource = ReplySource.IMIP,
    ) -> bool:
        """Store an attendee's answer (ACCEPTED, DECLINED, TENTATIVE) to revision ``sequence``
        of the event (None: the reply carried no SEQUENCE), under the address's
        :func:`~mailer.addresses.address_key`, with where it came from (``source``: a calendar
        client's REPLY or a button of `mailer web`; both count alike). The latest one wins,
        unless it answers an older revision than the one stored (a late mail about an earlier
        version). True when it was stored, False when an answer to a newer revision is kept."""
        cur = self.conn.execute(
            "INSERT INTO replies (campaign, event, email, partstat, at, message_id, sequence, source)"
            " VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT (campaign, event, email) DO UPDATE SET partstat=excluded.partstat,"
            " at=excluded.at, message_id=excluded.message_id, sequence=excluded.sequence,"
            " source=excluded.source"
            " WHERE excluded.sequence IS NULL OR replies.sequence IS NULL"
            " OR excluded.sequence >= replies.sequence",
            (campaign, event, address_key(email), partstat.upper(), iso(at), message_id, sequence, source),
        )
        return cur.rowcount > 0

    def reply(self, campaign: str, event: str, email: str) -> dict[str, Any] | None:
        """The answer stored for ``email`` (by its key) to ``event``: ``partstat``, ``at``,
        ``sequence``, ``source`` and ``current`` (whether it counts for the event as it is now,
        see :data:`CURRENT_REPLY`); None when there is none."""
        cur = self.conn.execute(
            f"SELECT partstat, at, sequence, source, {CURRENT_REPLY} AS current FROM replies AS r"
            " WHERE campaign=? AND event=? AND email=?",
            (campaign, event, address_key(email)),
        )
        found = next(dicts(cur), None)
        if found is not None:
            found["current"] = bool(found["current"])
        return found

    def event_sequence(self, campaign: str, event: str) -> int:
        """The SEQUENCE of the event's newest revision mailed (0 before any change): what an
        answer given now answers."""
        row = self.conn.execute(
            "SELECT max(sequence) FROM revisions WHERE campaign=? AND event=?", (campaign, event)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def is_invitee(self, campaign: str, event: str, email: str) -> bool:
        """Whether ``email``, compared by :func:`~mailer.addresses.address_key`, was sent (or
        was being sent) a calendar object for ``event``: only such an address may answer it."""
        key = address_key(email)
        exact = self.conn.execute(  # the usual case, on the (event, campaign, email) index
            "SELECT 1 FROM deliveries WHERE event=? AND campaign=? AND email IN (?, ?) AND ics=1 LIMIT 1",
            (event, campaign, email, key),
        ).fetchone()
        if exact is not None:
            return True
        # Another spelling: the event's addresses, keyed. SQLite's lower() folds ASCII only, as
        # address_key does for an ASCII address (4x faster than calling it per row).
        keyed = "lower(email)" if key.isascii() else "address_key(email)"
        return (
            self.conn.execute(
                f"SELECT 1 FROM deliveries WHERE event=? AND campaign=? AND {keyed}=? AND ics=1 LIMIT 1",
                (event, campaign, key),
            ).fetchone()
            is not None
        )

    def record_unmatched_reply(
        self,
        campaign: str,
        event: str,
        uid: str,
        attendee: str,
        sender: str | None,
        partstat: str,
        sequence: int | None,
        message_id: str,
        at: datetime,
        why: str,
    ) -> None:
        """Keep a reply that matches no invitee of its event (an alias, a forward) for staff;
        it is nobody's answer. The same message is recorded once."""
        self.conn.execute(
            "INSERT OR IGNORE INTO unmatched_replies (campaign, event, uid, attendee, sender, partstat,"
            " sequence, message_id, at, why) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (campaign, event, uid, attendee, sender, partstat.upper(), sequence, message_id, iso(at), why),
        )

    def unmatched_replies(
        self, campaign: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Replies no invitee could be matched to, newest first."""
        where, args = _filters(campaign=campaign)
        sql = (
            "SELECT campaign, event, uid, attendee, sender, partstat, sequence, message_id, at, why"
            f" FROM unmatched_replies WHERE {where} ORDER BY at DESC, id DESC"
        )
        if limit:
            sql += f" LIMIT {int(limit)}"
        return list(dicts(self.conn.execute(sql, args)))

    def unmatched_count(self, campaign: str | None = None) -> int:
        """How many replies could not be matched to an invitee."""
        where, args = _filters(campaign=campaign)
        return int(
            self.conn.execute(f"SELECT count(*) FROM unmatched_replies WHERE {where}", args).fetchone()[0]
        )

    def answers(self, campaign: str) -> dict[tuple[str, str], str]:
        """``{(event, address_key): PARTSTAT}``: the answers that count for the event as it is
        now (see :data:`CURRENT_REPLY`); look one up with the address's key."""
        cur = self.conn.execute(
            f"SELECT event, email, partstat FROM replies AS r WHERE campaign=? AND {CURRENT_REPLY}",
            (campaign,),
        )
        return {(e, m): p for e, m, p in cur}

    def reply_counts(self, campaign: str | None = None) -> list[dict[str, Any]]:
        """Answers per (campaign, event, PARTSTAT) that count for the event as it is now."""
        sql = f"SELECT campaign, event, partstat, count(*) AS n FROM replies AS r WHERE {CURRENT_REPLY}"
        args: tuple[str, ...] = ()
        if campaign:
            sql += " AND campaign=?"
            args = (campaign,)
        return list(dicts(self.conn.execute(sql + " GROUP BY campaign, event, partstat", args)))

    def returned_delivery(self, delivery_id: int | None, message_id: str | None) -> dict[str, Any] | None:
        """The delivery a DSN returns: the one its signed envelope token names (``delivery_id``),
        else the one sent with ``message_id``; ``id``, ``campaign``, ``email``, ``status``. None
        when no mail we sent matches."""
        if delivery_id is not None:
            cur = self.conn.execute(
                "SELECT id, campaign, email, status FROM deliveries WHERE id=?", (delivery_id,)
            )
        elif message_id:
            cur = self.conn.execute(
                "SELECT id, campaign, email, status FROM deliveries WHERE message_id=? LIMIT 1",
                (message_id,),
            )
        else:
            return None
        return next(dicts(cur), None)

    def record_bounce(self, delivery_id: int, email: str, code: str, text: str, at: datetime) -> int:
        """A hard bounce of delivery ``delivery_id`` (to ``email``; the inbox finds it by the DSN's
        signed envelope token or the Message-ID it returns, :meth:`returned_delivery`): it becomes
        ``bounced`` if it may have arrived (the one documented change of a final row besides
        ``retry``), and the address is suppressed. Returns rows changed."""
        ts = iso(at)
        reason = f"bounced: {code} {text}".strip()
        with self.transaction() as c:
            n = c.execute(
                f"UPDATE deliveries SET status='{Status.BOUNCED}', reason=?, updated=?"
                f" WHERE id=? AND status IN {sql_list(MAY_HAVE_ARRIVED)}",
                (reason, ts, delivery_id),
            ).rowcount
            c.execute(
                "INSERT INTO suppressions (email, reason, at) VALUES (?,?,?) ON CONFLICT (email)"
                " DO UPDATE SET reason=excluded.reason, at=excluded.at",
                (email.lower(), f"hard bounce {code}".strip(), ts),
            )
        return n

    def sent_sequence(self, campaign: str, event: str, email: str) -> int | None:
        """The highest SEQUENCE of ``event``'s calendar sent (or being sent) to ``email`` (by
        :func:`~mailer.addresses.address_key`); None when it was sent no calendar for the event."""
        key = address_key(email)
        row = self.conn.execute(
            "SELECT max(sequence) FROM deliveries WHERE event=? AND campaign=? AND email IN (?, ?) AND ics=1",
            (event, campaign, email, key),
        ).fetchone()
        if row[0] is None:
            keyed = "lower(email)" if key.isascii() else "address_key(email)"
            row = self.conn.execute(
                f"SELECT max(sequence) FROM deliveries WHERE event=? AND campaign=? AND {keyed}=? AND ics=1",
                (event, campaign, key),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def sent_to(self, message_ids: Iterable[str], email: str) -> bool:
        """Whether one of ``message_ids`` is a mail we sent to ``email`` (by address key)."""
        ids = list(dict.fromkeys(message_ids))[:50]
        if not ids:
            return False
        cur = self.conn.execute(
            f"SELECT email FROM deliveries WHERE message_id IN ({','.join('?' * len(ids))})", ids
        )
        key = address_key(email)
        return any(address_key(e) == key for (e,) in cur)

    def inbox_seen(self, message_id: str) -> bool:
        """Whether an inbox message was handled before."""
        return (
            self.conn.execute("SELECT 1 FROM inbox WHERE message_id=?", (message_id,)).fetchone() is not None
        )

    def record_inbox(self, message_id: str, kind: str, email: str | None, detail: str, at: datetime) -> None:
        """Remember a processed inbox message, so it is handled once even if flagging fails."""
        self.conn.execute(
            "INSERT OR IGNORE INTO inbox (message_id, kind, email, detail, at) VALUES (?,?,?,?,?)",
            (message_id, kind, email, detail, iso(at)),
        )

"""The ledger's schema: one step of SQL per version, applied in order (a new file runs them all)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "statements"]

SCHEMA_VERSION = 7

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

#: Version 4: answers are stored under :func:`mailer.addresses.address_key` (the ``address_key``
#: SQL function the Ledger registers on its connection), so ``Celine.Mertens@Example.BE`` and
#: ``celine.mertens@example.be`` are one invitee. Answers stored under several spellings merge
#: as :meth:`~mailer.ledger.Ledger.record_reply` would have merged them, replayed in the order
#: they arrived: the newest wins unless it answers an older SEQUENCE than the one kept. Also
#: the table of replies that match no invitee of their event (an alias, a forward): kept for
#: staff, never applied to anyone.
_SCHEMA_V4 = """
CREATE TABLE unmatched_replies (
    id INTEGER PRIMARY KEY,
    campaign TEXT NOT NULL,
    event TEXT NOT NULL,
    uid TEXT NOT NULL,
    attendee TEXT NOT NULL,
    sender TEXT,
    partstat TEXT NOT NULL,
    sequence INTEGER,
    message_id TEXT NOT NULL,
    at TEXT NOT NULL,
    why TEXT NOT NULL,
    UNIQUE (message_id, event, attendee)
);
CREATE TABLE replies_v4 (
    campaign TEXT NOT NULL,
    event TEXT NOT NULL,
    email TEXT NOT NULL,
    partstat TEXT NOT NULL,
    at TEXT NOT NULL,
    message_id TEXT,
    sequence INTEGER,
    PRIMARY KEY (campaign, event, email)
);
INSERT INTO replies_v4 (campaign, event, email, partstat, at, message_id, sequence)
    SELECT campaign, event, address_key(email), partstat, at, message_id, sequence
    FROM replies WHERE true ORDER BY at, rowid
    ON CONFLICT (campaign, event, email) DO UPDATE SET partstat=excluded.partstat,
    at=excluded.at, message_id=excluded.message_id, sequence=excluded.sequence
    WHERE excluded.sequence IS NULL OR replies_v4.sequence IS NULL
    OR excluded.sequence >= replies_v4.sequence;
DROP TABLE replies;
ALTER TABLE replies_v4 RENAME TO replies;
"""

#: Version 5: the answer (PARTSTAT) a delivery's calendar was built with (issue 13: a REQUEST
#: to someone who answered carries their answer). Kept with the claim, like ``sequence`` and
#: ``claimed_at``, so a mail whose outcome is unknown goes again byte-identical. NULL: none.
_SCHEMA_V5 = """
ALTER TABLE deliveries ADD COLUMN partstat TEXT;
"""

#: Version 6: where an answer came from (issue 14): ``imip`` (a calendar client's REPLY read
#: from the organiser's inbox) or ``web`` (a button of `mailer web`). Both count alike; the
#: newest answer wins unless it answers an older SEQUENCE (see Ledger.record_reply). Answers
#: recorded before version 6 all came by mail.
_SCHEMA_V6 = """
ALTER TABLE replies ADD COLUMN source TEXT NOT NULL DEFAULT 'imip';
"""

#: Version 7: deliveries by step (issue 16). The dashboard's step facet and its "step = x"
#: filters (with their row counts and CSV pages) read a million-row ledger through it instead
#: of a full scan that timed out. ``step`` never changes after a row is inserted, so status
#: changes (the send's hot path) never touch this index; only each new delivery adds an entry.
_SCHEMA_V7 = """
CREATE INDEX IF NOT EXISTS deliveries_by_step ON deliveries (step);
"""

#: ``{version: the SQL that brings version - 1 to it}``: a new file runs them all, in order.
MIGRATIONS: dict[int, str] = {
    1: _SCHEMA_V1,
    2: _SCHEMA_V2,
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
    5: _SCHEMA_V5,
    6: _SCHEMA_V6,
    7: _SCHEMA_V7,
}


def statements(script: str) -> Iterator[str]:
    """The statements of ``script``, each ending at a line end (a trigger body is one)."""
    stmt = ""
    for line in script.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            yield stmt.strip()
            stmt = ""
    assert not stmt.strip(), f"unterminated statement: {stmt}"

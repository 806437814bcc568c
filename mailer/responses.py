"""What comes back after sending: answers (iMIP replies), bounces, unsubscribes and the
suppression list, kept in the ledger's SQLite file (a mixin of :class:`mailer.ledger.Ledger`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from .times import iso

__all__ = ["Responses", "dicts"]


def dicts(cur: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    """The rows of a cursor as dicts keyed by column name."""
    cols = [d[0] for d in cur.description]
    for row in cur:
        yield dict(zip(cols, row, strict=True))


#: SQL condition on ``replies AS r``: the answer was given for the event's current revision
#: (RFC 5546 2.1.5: SEQUENCE orders the versions of an event). After an update (a new time,
#: place or title: SEQUENCE + 1) earlier answers no longer count, so a reminder filtered on
#: ``rsvp`` treats those invitees as not having answered the new version. A reply without
#: SEQUENCE counts for every revision.
CURRENT_REPLY = (
    "(r.sequence IS NULL OR r.sequence >= coalesce((SELECT max(v.sequence) FROM revisions AS v"
    " WHERE v.campaign = r.campaign AND v.event = r.event), 0))"
)


class Responses:
    """Ledger methods for replies, bounces, the inbox and suppressions."""

    conn: sqlite3.Connection
    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]

    def suppressed(self) -> dict[str, str]:
        """Suppressed addresses (lower-cased) with their reason."""
        return dict(self.conn.execute("SELECT email, reason FROM suppressions"))

    def suppress(self, email: str, reason: str, now: datetime) -> None:
        """Never mail ``email`` again. Stored lower-cased: providers treat the local part
        case-insensitively in practice, and a bounce may spell it differently."""
        email = email.lower()
        self.conn.execute(
            "INSERT INTO suppressions (email, reason, at) VALUES (?,?,?)"
            " ON CONFLICT (email) DO UPDATE SET reason=excluded.reason, at=excluded.at",
            (email, reason, iso(now)),
        )

    def unsuppress(self, email: str) -> bool:
        return self.conn.execute("DELETE FROM suppressions WHERE email=?", (email.lower(),)).rowcount > 0

    def record_reply(
        self,
        campaign: str,
        event: str,
        email: str,
        partstat: str,
        now: datetime,
        message_id: str | None,
        sequence: int | None = None,
    ) -> None:
        """Store an attendee's answer (ACCEPTED, DECLINED, TENTATIVE) to revision ``sequence``
        of the event (None: the reply carried no SEQUENCE). The latest one wins, unless it
        answers an older revision than the one stored (a late mail about an earlier version)."""
        self.conn.execute(
            "INSERT INTO replies (campaign, event, email, partstat, at, message_id, sequence)"
            " VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (campaign, event, email) DO UPDATE SET partstat=excluded.partstat,"
            " at=excluded.at, message_id=excluded.message_id, sequence=excluded.sequence"
            " WHERE excluded.sequence IS NULL OR replies.sequence IS NULL"
            " OR excluded.sequence >= replies.sequence",
            (campaign, event, email, partstat.upper(), iso(now), message_id, sequence),
        )

    def replies(self, campaign: str) -> dict[tuple[str, str], str]:
        """``{(event, email): PARTSTAT}``: the answers that count for the event as it is now
        (see :data:`CURRENT_REPLY`)."""
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

    def bounced(self, email: str, message_id: str | None, code: str, text: str, now: datetime) -> int:
        """A hard bounce: the delivery with ``message_id`` (or, without it, the latest sent one
        to ``email``) becomes ``bounced``; the address is suppressed. Returns rows changed."""
        ts = iso(now)
        with self.transaction() as c:
            if message_id:
                n = c.execute(
                    "UPDATE deliveries SET status='bounced', reason=?, updated=? WHERE message_id=?"
                    " AND status IN ('sent','sending')",
                    (f"bounced: {code} {text}".strip(), ts, message_id),
                ).rowcount
            else:
                n = c.execute(
                    "UPDATE deliveries SET status='bounced', reason=?, updated=? WHERE id=(SELECT id"
                    " FROM deliveries WHERE email=? AND status='sent' ORDER BY sent_at DESC LIMIT 1)",
                    (f"bounced: {code} {text}".strip(), ts, email),
                ).rowcount
            c.execute(
                "INSERT INTO suppressions (email, reason, at) VALUES (?,?,?) ON CONFLICT (email)"
                " DO UPDATE SET reason=excluded.reason, at=excluded.at",
                (email.lower(), f"hard bounce {code}".strip(), ts),
            )
        return n

    def inbox_seen(self, message_id: str) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM inbox WHERE message_id=?", (message_id,)).fetchone() is not None
        )

    def mark_inbox(self, message_id: str, kind: str, email: str | None, detail: str, now: datetime) -> None:
        """Remember a processed inbox message, so it is handled once even if flagging fails."""
        self.conn.execute(
            "INSERT OR IGNORE INTO inbox (message_id, kind, email, detail, at) VALUES (?,?,?,?,?)",
            (message_id, kind, email, detail, iso(now)),
        )

    def suppressions(self) -> list[dict[str, Any]]:
        return list(dicts(self.conn.execute("SELECT email, reason, at FROM suppressions ORDER BY email")))

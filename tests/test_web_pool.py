"""`mailer web` keeps a few ledger connections open between requests (issue 14's benchmark): an
answer must still land in the ledger file that is there now, never in one that was replaced."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from test_web import campaign, client, replies, rsvp

from mailer.ledger import Ledger


def _restore_empty_ledger(db: Path) -> None:
    """What restoring a backup does: a new file renamed over the old one (a new inode)."""
    fresh = db.with_name("restored.db")
    Ledger.create(fresh).close()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    os.replace(fresh, db)


def test_an_answer_after_the_ledger_file_is_replaced_goes_into_the_new_file(tmp_path: Path) -> None:
    cfg = campaign(tmp_path)
    db = tmp_path / "ledger.db"
    with client(cfg) as c:
        assert c.post(rsvp("ann@example.org"), data={"answer": "accepted"}).status_code == 200
        assert 'id="current"' in c.get(rsvp("ann@example.org")).text  # a pooled read connection too
        _restore_empty_ledger(db)
        r = c.post(rsvp("bob@example.org"), data={"answer": "declined"})
        assert r.status_code == 200
        page = c.get(rsvp("ann@example.org"))
    # Bob's answer is in the file that is there now; Ann's went with the old one.
    assert [(x["email"], x["partstat"], x["source"]) for x in replies(cfg)] == [
        ("bob@example.org", "DECLINED", "web")
    ]
    # and the page read the new file: Ann has no answer there any more
    assert page.status_code == 200 and 'id="current"' not in page.text


def test_many_answers_each_durable_on_few_connections(tmp_path: Path) -> None:
    """Every 200 is a committed row another connection sees at once, and the app does not keep
    more connections open than its small pool."""
    cfg = campaign(tmp_path)
    db = tmp_path / "ledger.db"
    with client(cfg) as c:
        for i, who in enumerate(["ann@example.org", "bob@example.org", "cara@example.org"] * 5):
            answer = ("accepted", "tentative", "declined")[i % 3]
            assert c.post(rsvp(who), data={"answer": answer}).status_code == 200
            other = sqlite3.connect(db)
            got = other.execute("SELECT partstat FROM replies WHERE email=?", (who,)).fetchone()
            other.close()
            assert got == (answer.upper(),)
        assert 0 < _open_files(db) <= 8


def _open_files(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # the listing's own descriptor, closed since
            pass
    return count

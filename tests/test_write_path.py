"""The send's write path on a real ledger file: what each claim and outcome costs in statements
(issue 16 target 6: the sending process is the limit), with the claim's promises kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailer.ledger import Ledger
from mailer.store import Claim, Outcome
from mailer.vocab import Attempt, Status

T0 = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)


def item(email: str, sequence: int = 0) -> Claim:
    return Claim("invite", "ev", email, email.split("@")[0], T0, f"<{email}@example.org>", sequence, True)


def traced(led: Ledger) -> list[str]:
    seen: list[str] = []
    # Statements the code runs (a trigger's own statements come as "-- TRIGGER ...": not ours).
    led.conn.set_trace_callback(
        lambda sql: None if sql.startswith("--") else seen.append(sql.split()[0].upper())
    )
    return seen


def test_a_claim_is_one_statement_a_row_and_keeps_its_promises(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        first = led.claim("c", [item("a@x.org"), item("b@x.org"), item("f@x.org")], T0)
        assert all(c is not None for c in first)
        a, b, f = (c.id for c in first if c is not None)
        led.record_outcomes([Outcome(a, Attempt.DEFERRED, 451, "later", T0, T0 + timedelta(minutes=5))])
        led.record_outcomes([Outcome(f, Attempt.SENT, 250, "ok", T0)])
        seen = traced(led)
        later = T0 + timedelta(hours=1)
        again = led.claim(
            "c", [item("a@x.org", 3), item("b@x.org", 3), item("f@x.org", 3), item("n@x.org", 3)], later
        )
        led.conn.set_trace_callback(None)
    # One transaction of upserts: no SELECT after each upsert (the upsert returns the row).
    assert seen[0] == "BEGIN" and seen[-1] == "COMMIT"
    assert set(seen[1:-1]) == {"INSERT"}
    ca, cb, cf, cn = again
    assert cf is None  # sent: final, never claimed again
    assert ca is not None and cb is not None and cn is not None
    # A row claimed before keeps its first claim time and SEQUENCE (a re-send is identical).
    assert (ca.id, ca.claimed_at, ca.sequence) == (a, T0, 0)
    assert (cb.id, cb.claimed_at, cb.sequence) == (b, T0, 0)
    assert (cn.claimed_at, cn.sequence) == (later, 3)
    with Ledger(tmp_path / "l.db") as led:
        status = dict(led.conn.execute("SELECT email, status FROM deliveries"))
    assert status == {
        "a@x.org": Status.SENDING,
        "b@x.org": Status.SENDING,
        "f@x.org": Status.SENT,
        "n@x.org": Status.SENDING,
    }


def test_outcomes_of_a_group_are_one_commit(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        got = led.claim("c", [item(f"{i}@x.org") for i in range(4)], T0)
        ids = [c.id for c in got if c is not None]
        seen = traced(led)
        led.record_outcomes([Outcome(i, Attempt.SENT, 250, "ok", T0) for i in ids])
        led.conn.set_trace_callback(None)
        rows = led.conn.execute("SELECT count(*) FROM attempts WHERE at = '2018-01-04T09:00:00Z'").fetchone()
    assert seen.count("BEGIN") == 1 and seen.count("COMMIT") == 1
    assert rows == (4,)

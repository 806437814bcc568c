"""`mailer demo`: the shipped campaign end to end, with simulated answers; every mail it
delivers passes the interop checklist and the answers change who gets the reminders."""

from __future__ import annotations

import collections
import email
import email.policy
import mailbox
from pathlib import Path

import pytest
from click.testing import CliRunner
from interop import check_message

from mailer.cli import cli
from mailer.ledger import Ledger


@pytest.mark.slow  # the whole shipped campaign, end to end
def test_demo_runs_the_whole_campaign(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "mailer inbox: 2 replies, 1 bounce" in r.output
    box = mailbox.Maildir(out / "Maildir", create=False)
    per_step: collections.Counter[str] = collections.Counter()
    with Ledger(out / "ledger.db") as led:
        rows = list(led.log())
        by_id = {row["message_id"]: row for row in rows if row["message_id"]}
        status = collections.Counter(row["status"] for row in rows)
        replies = led.answers("integratiepact-2018")
    assert f"{len(box)} mails are in" in r.output
    for key in box.keys():
        # Maildir files use the local line ending (LF); on the wire it was CRLF.
        raw = box.get_bytes(key).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        row = by_id[msg["Message-ID"]]
        per_step[row["step"]] += 1
        check_message(raw, expect_method="REQUEST" if row["step"].startswith("uitnodiging") else None)
    # every invitation went out; the bounce came back afterwards
    assert per_step["uitnodiging-infosessie"] == 8 and per_step["uitnodiging-aan-de-slag"] == 14
    assert status["bounced"] == 1 and set(replies.values()) == {"ACCEPTED", "DECLINED"}
    declined = next(e for (ev, e), p in replies.items() if p == "DECLINED")
    bounced = next(row["email"] for row in rows if row["status"] == "bounced")
    for row in rows:
        if row["step"].startswith("herinnering-aan-de-slag") and row["email"] == declined:
            assert row["status"] == "skipped" and "declined" in row["reason"]
        if row["step"].startswith("herinnering") and row["email"] == bounced:
            assert row["status"] == "suppressed"
    # everyone else got every reminder of their lists
    assert per_step["herinnering-aan-de-slag-week"] == 14 - 2
    # running the demo again starts from scratch and gives the same result
    again = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert again.exit_code == 0 and f"{len(box)} mails are in" in again.output

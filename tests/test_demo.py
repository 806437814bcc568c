"""`mailer demo`: the shipped campaign end to end; every mail it delivers passes the checklist."""

from __future__ import annotations

import collections
import email
import email.policy
import mailbox
from pathlib import Path

from click.testing import CliRunner
from interop import check_message

from mailer.cli import cli
from mailer.ledger import Ledger


def test_demo_runs_the_whole_campaign(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "66 mails are in" in r.output
    box = mailbox.Maildir(out / "Maildir", create=False)
    per_step: collections.Counter[str] = collections.Counter()
    with Ledger(out / "ledger.db") as led:
        by_id = {row["message_id"]: row for row in led.log()}
        assert {row["status"] for row in by_id.values()} == {"sent"}
    for key in box.keys():
        # Maildir files use the local line ending (LF); on the wire it was CRLF.
        raw = box.get_bytes(key).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        row = by_id[msg["Message-ID"]]
        per_step[row["step"]] += 1
        check_message(
            raw, expect_method="REQUEST" if row["step"].startswith("uitnodiging") else None
        )
    assert per_step == {
        "uitnodiging-infosessie": 8,
        "herinnering-infosessie-week": 8,
        "herinnering-infosessie-dag": 8,
        "uitnodiging-aan-de-slag": 14,
        "herinnering-aan-de-slag-week": 14,
        "herinnering-aan-de-slag-dag": 14,
    }
    # running the demo again starts from scratch and gives the same result
    r = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "66 mails are in" in r.output

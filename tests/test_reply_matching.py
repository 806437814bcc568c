"""Replies are matched the way mail systems match addresses (issue 12): an Outlook-cased answer
is the invitee's answer everywhere (inbox, ledger, rsvp audiences, status), and a reply from an
address that was not invited to that event is recorded as unmatched and shown to staff."""

from __future__ import annotations

import collections
import mailbox
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_inbox import reply_ics, reply_mail

from mailer.addresses import address_key
from mailer.cli import cli
from mailer.config import Campaign, load
from mailer.inbox import run_inbox
from mailer.ledger import Ledger
from mailer.message import message_id
from mailer.migrations import MIGRATIONS, SCHEMA_VERSION, statements
from mailer.smtpd import SmtpServer
from mailer.store import Claim, Outcome
from mailer.vocab import Attempt

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = load(ROOT / "schedules.yaml")
NOW = datetime(2018, 1, 10, 12, 0, tzinfo=UTC)
SENT_AT = datetime(2018, 1, 4, 9, 0, tzinfo=UTC)
CELINE = "celine.mertens@example.be"
OUTLOOK = "MAILTO:Celine.Mertens@Example.BE"


@pytest.mark.parametrize(
    ("spellings", "key"),
    [
        (["celine.mertens@example.be", "Celine.Mertens@Example.BE", " <CELINE.MERTENS@EXAMPLE.BE> "], CELINE),
        (["MAILTO:Celine.Mertens@Example.BE", "mailto:celine.mertens@example.be."], CELINE),
        (
            ["jan@xn--mnchen-3ya.de", "Jan@MÜNCHEN.de", "jan@münchen.de", "JAN@XN--MNCHEN-3YA.DE"],
            "jan@münchen.de",
        ),
        (["Zoë@Example.org", "zoë@example.org"], "zoë@example.org"),
    ],
)
def test_address_key_folds_what_mail_systems_fold(spellings: list[str], key: str) -> None:
    assert {address_key(s) for s in spellings} == {key}


def test_address_key_keeps_different_mailboxes_apart() -> None:
    keys = {address_key(a) for a in ("jan@example.be", "jan+news@example.be", "jan@example.nl", "jan")}
    assert len(keys) == 4
    assert address_key("not an address@@") == "not an address@@"  # never raises (used in SQL)


# --------------------------------------------------------------------------------------
# The inbox on a real Maildir and a real ledger.
# --------------------------------------------------------------------------------------


def invited(path: Path, campaign: Campaign, who: dict[str, str]) -> None:
    """A real ledger where ``{email: event}`` were each sent that event's invitation with a
    calendar, the way a pass claims and records them."""
    with Ledger.create(path) as ledger:
        for email, event in who.items():
            step = f"uitnodiging-{event}"
            mid = message_id(campaign.id, step, email, campaign.sender.domain)
            [claimed] = ledger.claim(
                campaign.id, [Claim(step, event, email, "", SENT_AT, mid, 0, True)], SENT_AT
            )
            assert claimed is not None
            ledger.record_outcomes([Outcome(claimed.id, Attempt.SENT, 250, "2.0.0 Ok", SENT_AT)])


def maildir(path: Path, *mails: bytes) -> Path:
    box = mailbox.Maildir(path, create=True)
    for raw in mails:
        box.add(raw)
    return path


def test_an_outlook_cased_answer_is_the_invitees_answer(tmp_path: Path) -> None:
    ev = CAMPAIGN.event("aan-de-slag")
    invited(tmp_path / "mailer.db", CAMPAIGN, {CELINE: ev.id})
    mail = reply_mail(reply_ics(ev.uid, OUTLOOK, "DECLINED"), "Celine Mertens <Celine.Mertens@Example.BE>")
    result = run_inbox(
        ROOT / "schedules.yaml", tmp_path / "mailer.db", maildir(tmp_path / "in", mail), {}, NOW
    )
    assert result.lines == [f"reply: {CELINE} declined aan-de-slag"]
    with Ledger.open(tmp_path / "mailer.db") as ledger:
        assert ledger.answers(CAMPAIGN.id) == {("aan-de-slag", CELINE): "DECLINED"}
        assert ledger.unmatched_replies() == []


def test_an_invitee_is_found_under_any_spelling(tmp_path: Path) -> None:
    invited(
        tmp_path / "mailer.db", CAMPAIGN, {"Jan@münchen.de": "aan-de-slag", "Zoë@Example.org": "aan-de-slag"}
    )
    with Ledger.open(tmp_path / "mailer.db") as ledger:
        for spelling in ("jan@xn--mnchen-3ya.de", "JAN@MÜNCHEN.DE", "zoë@example.org", "ZOË@EXAMPLE.ORG"):
            assert ledger.is_invitee(CAMPAIGN.id, "aan-de-slag", spelling), spelling
        assert not ledger.is_invitee(CAMPAIGN.id, "infosessie", "jan@münchen.de")  # another event
        assert not ledger.is_invitee(CAMPAIGN.id, "aan-de-slag", "jan@munchen.de")


def test_a_reply_from_someone_not_invited_is_recorded_unmatched(tmp_path: Path) -> None:
    ev = CAMPAIGN.event("aan-de-slag")
    invited(tmp_path / "mailer.db", CAMPAIGN, {CELINE: ev.id, "jan.peeters@example.org": "infosessie"})
    alias = reply_mail(
        reply_ics(ev.uid, "mailto:c.mertens@example.be", "ACCEPTED"),
        "Celine <c.mertens@example.be>",
        mid="<alias.1@outlook.example>",
    )
    other_event = reply_mail(
        reply_ics(ev.uid, "mailto:jan.peeters@example.org", "TENTATIVE"),
        "jan.peeters@example.org",
        mid="<other.1@client.example>",
    )
    forwarded = reply_mail(  # a colleague answers Celine's invitation with her attendee line
        reply_ics(ev.uid, "mailto:celine.mertens@example.be", "ACCEPTED"),
        "Colleague <colleague@example.be>",
        mid="<fwd.1@client.example>",
        in_reply_to=message_id(CAMPAIGN.id, f"uitnodiging-{ev.id}", CELINE, CAMPAIGN.sender.domain),
    )
    forged = reply_mail(  # the same without quoting our mail to her: anyone could write it
        reply_ics(ev.uid, "mailto:celine.mertens@example.be", "DECLINED"),
        "Someone <someone@example.org>",
        mid="<forged.1@client.example>",
    )
    box = maildir(tmp_path / "in", alias, other_event, forged, forwarded)
    result = run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", box, {}, NOW)
    assert result.counts["unmatched"] == 3 and result.counts["reply"] == 1
    assert "3 unmatched replies" in result.summary()
    assert any(
        ln.startswith("unmatched reply: c.mertens@example.be accepted aan-de-slag") for ln in result.lines
    )
    with Ledger.open(tmp_path / "mailer.db") as ledger:
        # Celine's own attendee line counts from whoever answers her invitation (RFC 5546 lets a
        # delegate answer); nobody else's answer is applied to anyone
        assert ledger.answers(CAMPAIGN.id) == {("aan-de-slag", CELINE): "ACCEPTED"}
        rows = {r["message_id"]: r for r in ledger.unmatched_replies()}
    assert set(rows) == {"<alias.1@outlook.example>", "<other.1@client.example>", "<forged.1@client.example>"}
    assert "quotes none of the mails we sent" in rows["<forged.1@client.example>"]["why"]
    a = rows["<alias.1@outlook.example>"]
    assert (a["campaign"], a["event"], a["uid"], a["attendee"], a["sender"], a["partstat"]) == (
        CAMPAIGN.id,
        "aan-de-slag",
        ev.uid,
        "c.mertens@example.be",
        "c.mertens@example.be",
        "ACCEPTED",
    )
    assert a["at"] == "2018-01-10T12:00:00Z" and "no invitation to aan-de-slag" in a["why"]

    # the same mailbox again: nothing recorded twice
    again = run_inbox(ROOT / "schedules.yaml", tmp_path / "mailer.db", box, {}, NOW)
    assert again.handled == 0
    with Ledger.read(tmp_path / "mailer.db") as ledger:
        assert len(ledger.unmatched_replies()) == 3

    # staff see it in `mailer status`, from a real process
    done = subprocess.run(
        [sys.executable, "-m", "mailer", "status", "--db", str(tmp_path / "mailer.db")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "3 replies could not be matched to an invitee" in done.stdout
    assert "c.mertens@example.be" in done.stdout and "Replies we could not match" in done.stdout


async def test_the_dashboard_shows_unmatched_replies_and_counts_each_invitee_once(tmp_path: Path) -> None:
    pytest.importorskip("datasette")
    from mailer.dashboard import DATABASE, create

    ev = CAMPAIGN.event("aan-de-slag")
    db = tmp_path / "mailer.db"
    invited(db, CAMPAIGN, {CELINE: ev.id})
    box = maildir(
        tmp_path / "in",
        reply_mail(reply_ics(ev.uid, OUTLOOK, "TENTATIVE"), "Celine.Mertens@Example.BE", mid="<1@o>"),
        reply_mail(reply_ics(ev.uid, "mailto:celine.mertens@example.be", "DECLINED"), CELINE, mid="<2@o>"),
        reply_mail(reply_ics(ev.uid, "mailto:c.mertens@example.be", "ACCEPTED"), "c.mertens@example.be"),
    )
    run_inbox(ROOT / "schedules.yaml", db, box, {}, NOW)
    ds = create(db, timezone="Europe/Brussels")
    rows = (await ds.client.get(f"/{DATABASE}/unmatched.json?_shape=array")).json()
    assert [(r["Answered as"], r["Answer"], r["Received"]) for r in rows] == [
        ("c.mertens@example.be", "coming", "2018-01-10 13:00:00 CET")
    ]
    assert "no invitation to aan-de-slag" in rows[0]["Why it was not matched"]
    [answers] = (await ds.client.get(f"/{DATABASE}/answers.json?_shape=array")).json()
    # two spellings of Celine: one answer; the alias's "coming" counts for nobody
    assert (answers["Event"], answers["Answers"], answers["Coming"]) == ("aan-de-slag", 1, 0)


# --------------------------------------------------------------------------------------
# A version-3 ledger: its answers are re-keyed, duplicates merged.
# --------------------------------------------------------------------------------------


def v3_file(path: Path) -> None:
    """A ledger with exactly the version-3 schema, its answers written as version 3 wrote them."""
    conn = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2, 3):
        for stmt in statements(MIGRATIONS[version]):
            conn.execute(stmt)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '3')")
    rows = [
        # (email as stored, partstat, at, sequence): the same person under several spellings
        ("Celine.Mertens@example.be", "DECLINED", "2018-01-05T09:00:00Z", 0),
        ("celine.mertens@example.be", "ACCEPTED", "2018-01-06T09:00:00Z", 0),  # newest wins
        ("Piet@example.be", "TENTATIVE", "2018-01-05T09:00:00Z", 1),
        ("piet@example.be", "ACCEPTED", "2018-01-07T09:00:00Z", 0),  # late, older revision: loses
        ("jan@xn--mnchen-3ya.de", "ACCEPTED", "2018-01-05T09:00:00Z", None),
        ("Jan@münchen.de", "DECLINED", "2018-01-08T09:00:00Z", None),
        ("els@example.be", "ACCEPTED", "2018-01-05T09:00:00Z", None),
    ]
    for i, (email, partstat, at, seq) in enumerate(rows):
        conn.execute(  # version 3's record_reply
            "INSERT INTO replies (campaign, event, email, partstat, at, message_id, sequence)"
            " VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (campaign, event, email) DO UPDATE SET partstat=excluded.partstat,"
            " at=excluded.at, message_id=excluded.message_id, sequence=excluded.sequence"
            " WHERE excluded.sequence IS NULL OR replies.sequence IS NULL"
            " OR excluded.sequence >= replies.sequence",
            ("c", "ev", email, partstat, at, f"<r{i}@x>", seq),
        )
    conn.execute(
        "INSERT INTO replies (campaign, event, email, partstat, at, message_id) VALUES (?,?,?,?,?,?)",
        ("c", "other", "Celine.Mertens@example.be", "TENTATIVE", "2018-01-05T09:00:00Z", "<o@x>"),
    )
    conn.close()


def test_a_version_3_ledger_gets_its_answers_keyed_and_merged(tmp_path: Path) -> None:
    db = tmp_path / "v3.db"
    v3_file(db)
    with pytest.raises(Exception, match="schema 3"):
        Ledger.read(db)  # a reader never migrates
    with Ledger.open(db) as ledger:
        assert ledger.schema_version == SCHEMA_VERSION
        got = {
            r[0:2]: r[2:]
            for r in ledger.conn.execute("SELECT event, email, partstat, message_id, sequence FROM replies")
        }
        assert ledger.unmatched_replies() == []
    assert got == {
        ("ev", CELINE): ("ACCEPTED", "<r1@x>", 0),
        ("ev", "piet@example.be"): ("TENTATIVE", "<r2@x>", 1),
        ("ev", "jan@münchen.de"): ("DECLINED", "<r5@x>", None),
        ("ev", "els@example.be"): ("ACCEPTED", "<r6@x>", None),
        ("other", CELINE): ("TENTATIVE", "<o@x>", None),
    }
    with Ledger.read(db) as ledger:  # now current: readable, and answers look up by key
        assert ledger.answers("c")[("ev", address_key("Celine.Mertens@Example.BE"))] == "ACCEPTED"


# --------------------------------------------------------------------------------------
# End to end: the shipped campaign, a real SMTP server, the CLI.
# --------------------------------------------------------------------------------------


def send(now: str, env: dict[str, str]) -> str:
    r = CliRunner().invoke(cli, ["send", "--now", now], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow
def test_an_outlook_cased_decline_stops_the_rsvp_reminders(
    shipped: Path, smtp_server: SmtpServer, smtp_env: dict[str, str], tmp_path: Path
) -> None:
    contacts = shipped / "contacts" / "lerend-netwerk.csv"
    text = contacts.read_text(encoding="utf-8-sig")
    contacts.write_text(
        text.rstrip("\n") + f"\n{CELINE};Céline Mertens;nl;lerend-netwerk;Stad Leuven\n", encoding="utf-8"
    )
    send("2018-01-04T10:00", smtp_env)
    assert CELINE in {m.rcpt_tos[0] for m in smtp_server.handler.received}
    uid = load(shipped / "schedules.yaml").event("aan-de-slag").uid
    box = maildir(
        tmp_path / "inbox",
        reply_mail(reply_ics(uid, OUTLOOK, "DECLINED"), "Celine Mertens <Celine.Mertens@Example.BE>"),
        reply_mail(reply_ics(uid, "mailto:cm@stad.example", "ACCEPTED"), "cm@stad.example", mid="<a@stad>"),
    )
    r = CliRunner().invoke(cli, ["inbox", "--maildir", str(box)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "1 reply, 1 unmatched reply" in r.output

    r = CliRunner().invoke(cli, ["status"], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert "1 reply could not be matched to an invitee" in r.output
    answers = r.output.split("Answers per event")[1]
    line = next(ln for ln in answers.splitlines() if "aan-de-slag" in ln)
    assert [c.strip() for c in line.strip("│ ").split("│")] == [CAMPAIGN.id, "aan-de-slag", "0", "0", "1"]

    before = len(smtp_server.handler.received)
    send("2018-01-15T09:00", smtp_env)
    got = collections.Counter(m.rcpt_tos[0] for m in smtp_server.handler.received[before:])
    assert CELINE not in got and got["zoe.vermeulen@example.org"] == 1
    with Ledger(shipped / "mailer.db") as led:
        row = next(led.log(step="herinnering-aan-de-slag-week", email=CELINE))
        assert row["status"] == "skipped" and "answered declined" in row["reason"]

"""No contact's data ever reaches another contact's mail (issue 12).

One unbalanced quote (`u2@example.org,"Unclosed,a,Org2`) used to make the CSV reader swallow every
later row into one cell: 3 of 10 contacts were mailed, exit 0, and u2's invitation carried the
addresses, names and organisations of the seven others. Now the file is unusable: `check` names
file:row and exits 1, `send` refuses and sends nothing. A property-style test throws random
hostile edits at a contact file and composes every mail the result would send.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from conftest import SIMPLE_TEMPLATES, write_campaign

from mailer.compose import Composer
from mailer.contacts import load_contacts
from mailer.smtpd import SmtpServer
from mailer.workspace import load_workspace

EVENTS = "- {id: ev, title: Launch, start: 2030-01-22 09:30, end: 2030-01-22 16:30}\n"
STEPS = "- {id: invite, event: ev, template: invite, at: 2030-01-04 10:00}\n"
TEMPLATES = {
    **SIMPLE_TEMPLATES,
    "invite/en/subject.txt": "Invitation for {{ contact.name }} ({{ contact.get('organisation', '') }})",
    "invite/en/body.txt": "Dear {{ contact.name }} of {{ contact.get('organisation', '') }} <{{ contact.email }}>\n",
}
TEN = "email,name,organisation\n" + "".join(
    f"u{i}@example.org,User{i},Org{i}\n" if i != 2 else 'u2@example.org,"Unclosed,a,Org2\n'
    for i in range(1, 11)
)


def mailer(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailer", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unbalanced_quote_is_caught_by_check_and_send_sends_nothing(
    tmp_path: Path, smtp_server: SmtpServer, smtp_env: dict[str, str]
) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, contacts=TEN, templates=TEMPLATES)
    check = mailer("check", "--config", str(cfg), cwd=tmp_path)
    assert check.returncode == 1, check.stdout + check.stderr
    out = check.stdout + check.stderr
    assert "contacts/list.csv:row 3: name: the cell in column 'name' spans lines 3-11" in out, out
    assert "quote" in out and "Traceback" not in out

    send = mailer(
        "send", "--config", str(cfg), "--now", "2030-01-04T10:00", "--force", cwd=tmp_path, env=smtp_env
    )
    assert send.returncode == 1, send.stdout + send.stderr
    assert "Nothing was sent" in send.stdout + send.stderr
    assert "Traceback" not in send.stderr
    assert smtp_server.handler.received == []


# --- random hostile files -------------------------------------------------------------------

N = 8


def person(i: int) -> tuple[str, str, str]:
    """Tokens that cannot be found inside one another: address, name, organisation."""
    return f"p{i:02d}x@example.org", f"Nm{i:02d}q", f"Og{i:02d}z"


def hostile(rng: random.Random) -> str:
    """A contact file with 1-3 edits a hand or a bad export makes: a stray or missing quote, a
    line break added or lost, a very long cell, another delimiter."""
    lines = ["email,name,organisation\n"] + [",".join(person(i)) + "\n" for i in range(N)]
    text = "".join(lines)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        edit = rng.choice(["quote", "quote", "quote", "newline", "cr", "join", "long", "delim", "quoted"])
        if edit == "quote":
            text = text[:at] + '"' + text[at:]
        elif edit == "newline":
            text = text[:at] + "\n" + text[at:]
        elif edit == "cr":
            text = text[:at] + "\r" + text[at:]
        elif edit == "join":  # two rows on one line
            nl = text.find("\n", max(at, len(lines[0])))
            if nl != -1 and nl < len(text) - 1:
                text = text[:nl] + rng.choice(["", ",", " "]) + text[nl + 1 :]
        elif edit == "long":
            text = text[:at] + "y" * rng.choice([1_200, 12_000]) + text[at:]
        elif edit == "delim":
            text = text[:at] + rng.choice([";", "\t", ","]) + text[at:]
        else:  # a cell quoted over two rows, quotes balanced
            end = text.find("\n", at)
            end = text.find("\n", end + 1) if end != -1 else -1
            if end != -1:
                text = text[:at] + '"' + text[at:end] + '"' + text[end:]
    return text


def whose(text: str, row: int | None) -> int | None:
    """The person whose token comes first on the physical line where a contact's row starts."""
    assert row is not None
    line = text.splitlines()[row - 1]
    found = [(line.find(t), i) for i in range(N) for t in person(i) if t in line]
    return min(found)[1] if found else None


def test_random_hostile_files_never_put_one_contact_in_another_contacts_mail(tmp_path: Path) -> None:
    cfg = write_campaign(tmp_path, events=EVENTS, steps=STEPS, templates=TEMPLATES)
    ws = load_workspace(cfg)
    composer = Composer(ws.campaign, ws.templates)
    step = ws.campaign.steps[0]
    event = ws.campaign.event(step.event)
    path = tmp_path / "hostile.csv"
    refused = mailed = 0
    for seed in range(400):
        text = hostile(random.Random(seed))
        path.write_text(text, encoding="utf-8")
        result = load_contacts([path], display_root=tmp_path)
        if result.errors:
            assert result.contacts == [], "an unusable file gives no contact"
            refused += 1
            continue
        for c in result.contacts:
            data = composer.compose(step, event, c, when=step.at).data
            owner = whose(text, c.row)
            for j in set(range(N)) - {owner}:
                for token in person(j)[:2]:  # the address and the name
                    assert token.encode() not in data, (
                        f"seed {seed}: {token} in the mail to {c.email}; file:\n{text}"
                    )
            mailed += 1
    assert refused > 50 and mailed > 500, (refused, mailed)  # both sides of the rule were exercised

"""The links in mails, on the produced bytes (issue 14): answer buttons, add-to-calendar links,
the .ics download, the visible unsubscribe link and the RFC 8058 headers.

Each mail is composed by mailer's Composer with the shipped templates (the bytes that would be
sent), passes tests/interop.py, and is read back with the email package (policy.default); every
URL is parsed with urllib.parse and every token verified with tokens.verify.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import re
from datetime import datetime
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import write_campaign
from interop import check_message

from mailer import tokens
from mailer.bounces import unsubscribe_token
from mailer.compose import Composer
from mailer.config import Campaign, Event, Unsubscribe, load
from mailer.contacts import Contact
from mailer.links import links_for
from mailer.planner import dynamic_step, snapshot
from mailer.templates import Templates
from mailer.vocab import EventStatus

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "templates"
SECRET = "k" * 32
WEB = "https://rsvp.example.be"
LANGUAGES = ("nl", "fr", "en")
KINDS = ("invitation", "reminder", "update", "cancel")
#: The words of the three answers in the text part, per language.
ANSWER_WORDS = {
    "nl": ("Ja, ik kom", "Misschien", "Nee, ik kom niet"),
    "fr": ("Oui, je viens", "Peut-être", "Non, je ne viens pas"),
    "en": ("Yes, I will attend", "Maybe", "No, I will not attend"),
}

EVENTS = """\
- id: timed
  title: {nl: Werkatelier, fr: Atelier, en: Workshop}
  start: 2030-06-24 09:30
  end: 2030-06-24 16:30
  location: KVS zaal Top, Arduinkaai 7, 1000 Brussel
- id: allday
  title: Infodag
  date: 2030-06-25
"""
STEPS = "".join(
    f"""\
- {{id: invite-{ev}, event: {ev}, template: uitnodiging-aan-de-slag, at: 2030-06-01 09:00, audience: {{lists: [a]}}}}
- {{id: remind-{ev}, event: {ev}, template: herinnering, at: -3d 09:00, audience: {{lists: [a]}}}}
"""
    for ev in ("timed", "allday")
)
CONTACTS = "email,name,language,lists\n" + "".join(f"{x}@example.be,{x},{x},a\n" for x in LANGUAGES)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    folder = tmp_path_factory.mktemp("mail-links")
    templates = {
        p.relative_to(SHIPPED).as_posix(): p.read_text("utf-8") for p in SHIPPED.rglob("*") if p.is_file()
    }
    cfg = write_campaign(
        folder,
        events=EVENTS,
        steps=STEPS,
        contacts=CONTACTS,
        templates=templates,
        extra=f"web: {{url: {WEB}}}\nunsubscribe: {{mailto: afmelden@example.be}}\n",
    )
    return load(cfg)


def who(lang: str) -> Contact:
    return Contact(f"{lang}@example.be", lang, lang, frozenset({"a"}))


def mailed_event(campaign: Campaign, kind: str, ev_id: str) -> Event:
    """The event as the mail of ``kind`` describes it: an update moves it to Gent."""
    event = campaign.event(ev_id)
    if kind == "update":
        return dataclasses.replace(event, location="Gent")
    if kind == "cancel":
        return dataclasses.replace(event, status=EventStatus.CANCELLED)
    return event


def compose(
    campaign: Campaign, kind: str, ev_id: str, contact: Contact, secret: str | None = SECRET
) -> bytes:
    """The bytes mailer would send for ``kind`` of ``ev_id`` to ``contact``."""
    templates = Templates(campaign.templates_dir, campaign.language)
    event = campaign.event(ev_id)
    when = datetime(2030, 6, 1, 9, tzinfo=campaign.timezone)
    if kind in ("invitation", "reminder"):
        step = campaign.step(("invite-" if kind == "invitation" else "remind-") + ev_id)
        composer = Composer(campaign, templates, unsubscribe_secret=secret)
        return composer.compose_due(step, event, contact, when=when, sequence=0).data
    after = mailed_event(campaign, kind, ev_id)
    snapshots = {(ev_id, 0): json.dumps(snapshot(event)), (ev_id, 1): json.dumps(snapshot(after))}
    composer = Composer(campaign, templates, {ev_id: (1, "", "")}, snapshots, unsubscribe_secret=secret)
    step = dynamic_step(campaign, ev_id, kind, 1, when)
    return composer.compose_due(step, after, contact, when=when, sequence=1).data


class Anchors(HTMLParser):
    """Every <a href> of an HTML body, with its text and whether it sits in a coloured cell."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str | None]] = []  # (href, text, the cell's bgcolor)
        self._cell: str | None = None
        self._href: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td":
            self._cell = a.get("bgcolor")
        elif tag == "a":
            self._href, self._text = a.get("href") or "", ""

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.found.append((self._href, " ".join(self._text.split()), self._cell))
            self._href = None
        elif tag == "td":
            self._cell = None


def read(raw: bytes, kind: str) -> tuple[EmailMessage, str, str, list[tuple[str, str, str | None]]]:
    # Reminders carry no calendar unless attach_ics says so; the others always do.
    method = {"cancel": "CANCEL", "reminder": None}.get(kind, "REQUEST")
    check_message(raw, expect_method=method, title_subject=method is not None)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text_part, html_part = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text_part is not None and html_part is not None
    text = text_part.get_content().replace("\r\n", "\n")
    html = html_part.get_content()
    parser = Anchors()
    parser.feed(html)
    return msg, text, html, parser.found


def path_token(url: str, prefix: str) -> str:
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "rsvp.example.be") and parts.path.startswith(prefix)
    return parts.path[len(prefix) :]


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("ev_id", ["timed", "allday"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_mail_carries_its_links(campaign: Campaign, kind: str, ev_id: str, lang: str) -> None:
    contact = who(lang)
    msg, text, html, anchors = read(compose(campaign, kind, ev_id, contact), kind)
    key = (campaign.id, ev_id, f"{lang}@example.be")
    hrefs = [h for h, _, _ in anchors]

    # RFC 8058: the https /u/ link first, then the mailto; one-click POST announced.
    header = str(msg["List-Unsubscribe"])
    https, mailto = re.findall(r"<([^<>]*)>", header)
    # issue 15: the mailto's subject names the recipient with the signed unsubscribe token
    assert (
        mailto
        == f"mailto:afmelden@example.be?subject=unsubscribe%20{unsubscribe_token(SECRET, campaign.id, key[2])}"
    )
    assert tokens.verify(SECRET, "unsubscribe", path_token(https, "/u/")) == (campaign.id, "*", key[2])
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # The same link, visible in the body of every mail (the footer), cancellations included.
    assert https in hrefs and https in text
    assert "mailto:afmelden@example.be" not in html  # the link replaces the mailto line

    rsvp = [(h, words, cell) for h, words, cell in anchors if urlsplit(h).path.startswith("/r/")]
    if kind == "cancel":  # nothing to answer: no buttons, no calendar links
        assert rsvp == [] and "/r/" not in text
        assert not any("calendar.google.com" in h or "/ics/" in h for h in hrefs)
        return
    # Three bulletproof buttons: a link in a table cell with its own colour, in this order.
    answers = [parse_qs(urlsplit(h).query)["answer"] for h, _, _ in rsvp]
    assert answers == [["accepted"], ["tentative"], ["declined"]]
    assert all(cell and cell.startswith("#") for _, _, cell in rsvp)
    for h, _, _ in rsvp:
        assert tokens.verify(SECRET, "rsvp", path_token(h, "/r/")) == key
    # The text part: each answer's words, then its URL.
    for words, (h, _, _) in zip(ANSWER_WORDS[lang], rsvp, strict=True):
        assert f"- {words}: {h}\n" in text
    # Add to calendar: Google, Outlook.com, Microsoft 365, Yahoo, the .ics, the feed, the page.
    links = links_for(campaign, SECRET, mailed_event(campaign, kind, ev_id), contact)
    assert links is not None
    for url in (links.google, links.outlook, links.office, links.yahoo, links.ics, links.feed, links.page):
        assert url in hrefs and url in text
    assert tokens.verify(SECRET, "ics", path_token(links.ics, "/ics/")) == key
    google = parse_qs(urlsplit(links.google).query)
    title = campaign.event(ev_id).text("title", lang)[0]
    assert google["text"] == [title]  # the reader's language
    if ev_id == "timed":
        assert google["dates"] == ["20300624T073000Z/20300624T143000Z"]
    else:
        assert google["dates"] == ["20300625/20300626"]


def test_a_resend_is_byte_identical(campaign: Campaign) -> None:
    """Links are pure functions of campaign, secret, event and contact: a re-send after a
    crash (a new Composer, a new process) gives the very same bytes."""
    for kind in KINDS:
        assert compose(campaign, kind, "timed", who("fr")) == compose(campaign, kind, "timed", who("fr"))


@pytest.mark.parametrize("lang", LANGUAGES)
def test_no_links_without_a_secret(campaign: Campaign, lang: str) -> None:
    """web.url but no secret: nothing would answer the links, so the mail has none and keeps
    the mailto unsubscribe line."""
    msg, text, html, anchors = read(
        compose(campaign, "invitation", "timed", who(lang), secret=None), "invitation"
    )
    assert msg["List-Unsubscribe"] == "<mailto:afmelden@example.be?subject=unsubscribe>"
    assert "List-Unsubscribe-Post" not in msg
    assert "rsvp.example.be" not in text and "rsvp.example.be" not in html
    assert "calendar.google.com" not in html
    assert [h for h, _, _ in anchors] == ["mailto:afmelden@example.be"]


def test_no_links_without_web_url(campaign: Campaign) -> None:
    plain = dataclasses.replace(campaign, web=None)
    msg, text, html, anchors = read(compose(plain, "reminder", "allday", who("nl")), "reminder")
    token = unsubscribe_token(SECRET, campaign.id, "nl@example.be")  # issue 15: the secret signs the mailto
    assert msg["List-Unsubscribe"] == f"<mailto:afmelden@example.be?subject=unsubscribe%20{token}>"
    assert "https://" not in text and [h for h, _, _ in anchors] == ["mailto:afmelden@example.be"]


def test_web_url_wins_over_unsubscribe_url_and_the_old_link_stays_without_it(campaign: Campaign) -> None:
    both = dataclasses.replace(
        campaign, unsubscribe=Unsubscribe(mailto="afmelden@example.be", url="https://old.example.be/u")
    )
    msg, text, _, _ = read(compose(both, "invitation", "timed", who("en")), "invitation")
    first = re.findall(r"<([^<>]*)>", str(msg["List-Unsubscribe"]))[0]
    assert first.startswith(f"{WEB}/u/") and "old.example.be" not in text
    # Only unsubscribe.url (no web.url): its signed ?t= link, in the header and the footer.
    old = dataclasses.replace(both, web=None)
    msg, text, _, _ = read(compose(old, "invitation", "timed", who("en")), "invitation")
    first = re.findall(r"<([^<>]*)>", str(msg["List-Unsubscribe"]))[0]
    assert first.startswith("https://old.example.be/u?t=") and first in text
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "/r/" not in text


def test_an_update_to_a_cancelled_event_in_a_reminder_has_no_buttons(campaign: Campaign) -> None:
    """A reminder of an event that was called off says so and offers no answer."""
    off = dataclasses.replace(
        campaign,
        events=tuple(
            dataclasses.replace(e, status=EventStatus.CANCELLED) if e.id == "timed" else e
            for e in campaign.events
        ),
    )
    _, text, _, anchors = read(compose(off, "reminder", "timed", who("nl")), "reminder")
    assert "/r/" not in text and not any("/r/" in h for h, _, _ in anchors)
    assert any("/u/" in h for h, _, _ in anchors)

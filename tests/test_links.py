"""mailer.links: each recipient's links to `mailer web` and the add-to-calendar URLs (issue 14).

Pure: no clock, no server. Every URL is read back with urllib.parse and every token with
tokens.verify, as the web service will.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import write_campaign

from mailer import tokens
from mailer.config import Campaign, Web, load
from mailer.contacts import Contact
from mailer.links import DETAILS_MAX, calendar_links, links_for

ROOT = Path(__file__).resolve().parent.parent
SECRET = "k" * 32
WEB = "https://rsvp.example.be/mailer/"


@pytest.fixture(scope="module")
def shipped() -> Campaign:
    return dataclasses.replace(load(ROOT / "schedules.yaml"), web=Web(WEB))


def query(url: str) -> dict[str, str]:
    """The query of ``url`` as one value per name (each name must occur once)."""
    raw = parse_qs(urlsplit(url).query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in raw.values()), raw
    return {k: v[0] for k, v in raw.items()}


def test_the_shipped_meeting_is_added_at_its_utc_times(shipped: Campaign) -> None:
    """22 January 2018, 09:30-16:30 in Brussels is 08:30Z-15:30Z in every service's link."""
    cal = calendar_links(shipped.event("aan-de-slag"), "nl")
    g = urlsplit(cal.google)
    assert (g.scheme, g.netloc, g.path) == ("https", "calendar.google.com", "/calendar/render")
    gq = query(cal.google)
    assert gq["action"] == "TEMPLATE"
    assert gq["dates"] == "20180122T083000Z/20180122T153000Z"
    assert gq["text"] == "Aan de slag INTEGRATIEPACT"
    assert gq["location"] == "KVS (Koninklijke Vlaamse Schouwburg) - zaal Top, Arduinkaai 7, 1000 Brussel"
    assert gq["details"].startswith("Bijeenkomst ter ondersteuning")
    for url, host in ((cal.outlook, "outlook.live.com"), (cal.office, "outlook.office.com")):
        o = urlsplit(url)
        assert (o.scheme, o.netloc, o.path) == ("https", host, "/calendar/0/action/compose")
        oq = query(url)
        assert (oq["startdt"], oq["enddt"]) == ("2018-01-22T08:30:00Z", "2018-01-22T15:30:00Z")
        assert oq["subject"] == "Aan de slag INTEGRATIEPACT" and oq["rru"] == "addevent"
        assert oq["location"] == gq["location"] and oq["body"] == gq["details"]
        assert "allday" not in oq
    y = urlsplit(cal.yahoo)
    assert (y.scheme, y.netloc, y.path) == ("https", "calendar.yahoo.com", "/")
    yq = query(cal.yahoo)
    assert yq["v"] == "60"
    assert (yq["st"], yq["et"]) == ("20180122T083000Z", "20180122T153000Z")
    assert yq["title"] == gq["text"] and yq["in_loc"] == gq["location"] and yq["desc"] == gq["details"]
    # A space is %20, never "+": Outlook on the web shows a "+" as it is.
    assert all("+" not in u and "%20" in u for u in cal)


def test_an_all_day_event_is_added_as_dates(shipped: Campaign) -> None:
    """The shipped infosessie (16 January 2018, all day, no place) in each service's convention."""
    event = shipped.event("infosessie")
    assert event.all_day
    cal = calendar_links(event, "nl")
    gq = query(cal.google)
    assert gq["dates"] == "20180116/20180117"  # the end is exclusive, as DTEND;VALUE=DATE
    assert "location" not in gq  # no place: no empty parameter
    for url in (cal.outlook, cal.office):
        oq = query(url)
        assert (oq["startdt"], oq["enddt"], oq["allday"]) == ("2018-01-16", "2018-01-17", "true")
    yq = query(cal.yahoo)
    assert (yq["st"], yq["et"], yq["dur"]) == ("20180116", "20180116", "allday")


EVENTS = """\
- id: days
  title: {nl: Opendeurdagen, fr: Portes ouvertes, en: Open days}
  description: {nl: "Kom langs & kijk rond", fr: "Passez & regardez", en: "Drop by & look #1 + 100%"}
  location: {nl: Gent, fr: Gand, en: Ghent}
  date: 2030-06-29
  end_date: 2030-07-01
- id: night
  title: "Q&A / night #2 + 100% = ?"
  start: 2030-06-24 22:00
  end: 2030-06-25 02:00
  url: https://example.be/night?a=1&b=2
- id: long
  title: Long
  description: "{long}"
  start: 2030-06-24 10:00
  end: 2030-06-24 11:00
"""
STEPS = """\
- {id: s, event: days, template: t, at: 2030-06-01 09:00}
"""


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    folder = tmp_path_factory.mktemp("links")
    events = EVENTS.replace("{long}", "woord " * 400)
    cfg = write_campaign(folder, events=events, steps=STEPS, extra=f"web: {{url: {WEB}}}\n")
    return load(cfg)


@pytest.mark.parametrize(
    ("language", "title", "location", "details"),
    [
        ("nl", "Opendeurdagen", "Gent", "Kom langs & kijk rond"),
        ("fr", "Portes ouvertes", "Gand", "Passez & regardez"),
        ("en", "Open days", "Ghent", "Drop by & look #1 + 100%"),
        ("de", "Open days", "Ghent", "Drop by & look #1 + 100%"),  # no German: the campaign's (en)
        ("nl_BE", "Opendeurdagen", "Gent", "Kom langs & kijk rond"),
    ],
)
def test_texts_are_the_readers_and_survive_encoding(
    texts: Campaign, language: str, title: str, location: str, details: str
) -> None:
    cal = calendar_links(texts.event("days"), language)
    gq, oq, yq = query(cal.google), query(cal.outlook), query(cal.yahoo)
    assert (gq["text"], gq["location"], gq["details"]) == (title, location, details)
    assert (oq["subject"], oq["location"], oq["body"]) == (title, location, details)
    assert (yq["title"], yq["in_loc"], yq["desc"]) == (title, location, details)
    # Three whole days, 29 June to 1 July: Google/Outlook end the day after, Yahoo on the last day.
    assert gq["dates"] == "20300629/20300702"
    assert (oq["startdt"], oq["enddt"]) == ("2030-06-29", "2030-07-02")
    assert (yq["st"], yq["et"]) == ("20300629", "20300701")


def test_reserved_characters_and_the_event_url_round_trip(texts: Campaign) -> None:
    cal = calendar_links(texts.event("night"), "en")
    gq = query(cal.google)
    assert gq["text"] == "Q&A / night #2 + 100% = ?"
    assert gq["details"] == "https://example.be/night?a=1&b=2"
    assert "#" not in cal.google  # a raw "#" would end the query
    # Overnight in Brussels summer time (UTC+2): 20:00Z to 00:00Z the next day.
    assert gq["dates"] == "20300624T200000Z/20300625T000000Z"
    assert (query(cal.outlook)["startdt"], query(cal.outlook)["enddt"]) == (
        "2030-06-24T20:00:00Z",
        "2030-06-25T00:00:00Z",
    )


def test_a_long_description_is_cut_at_a_word(texts: Campaign) -> None:
    cal = calendar_links(texts.event("long"), "en")
    details = query(cal.google)["details"]
    assert len(details) <= DETAILS_MAX + 2 and details.endswith("woord …")
    assert all(len(u) < 2000 for u in cal)


def test_every_web_link_carries_a_token_for_its_purpose(shipped: Campaign) -> None:
    event = shipped.event("aan-de-slag")
    who = Contact("Jan.Peeters@Example.BE", "Jan", "nl")
    links = links_for(shipped, SECRET, event, who)
    assert links is not None
    key = "jan.peeters@example.be"

    def token(url: str, prefix: str, scheme: str = "https", suffix: str = "") -> str:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (scheme, "rsvp.example.be")
        assert parts.path.startswith("/mailer" + prefix) and parts.path.endswith(suffix)
        return parts.path[len("/mailer" + prefix) : len(parts.path) - len(suffix)]

    answers = {}
    for url in (links.accept, links.maybe, links.decline):
        tok = token(url, "/r/")
        assert tokens.verify(SECRET, "rsvp", tok) == (shipped.id, "aan-de-slag", key)
        answers[query(url)["answer"]] = tok
    assert sorted(answers) == ["accepted", "declined", "tentative"]
    assert len(set(answers.values())) == 1  # one token, the answer in the query
    unsub = token(links.unsubscribe, "/u/")
    assert tokens.verify(SECRET, "unsubscribe", unsub) == (shipped.id, "*", key)
    assert tokens.verify(SECRET, "ics", token(links.ics, "/ics/")) == (shipped.id, "aan-de-slag", key)
    feed = token(links.feed, "/feed/", scheme="webcal", suffix=".ics")
    assert tokens.verify(SECRET, "feed", feed) == (shipped.id, "*", key)
    assert tokens.verify(SECRET, "event", token(links.page, "/e/")) == (shipped.id, "aan-de-slag", key)
    # A token never works for another purpose, nor with another secret.
    assert tokens.verify(SECRET, "unsubscribe", answers["accepted"]) is None
    assert tokens.verify(SECRET, "rsvp", unsub) is None
    assert tokens.verify("other" * 8, "rsvp", answers["accepted"]) is None
    # Another address gets other tokens.
    other = links_for(shipped, SECRET, event, Contact("an@example.be", "An", "nl"))
    assert other is not None and other.accept != links.accept and other.unsubscribe != links.unsubscribe
    # The calendar links are the ones for the reader's language.
    assert links.google == calendar_links(event, "nl").google


def test_links_are_a_pure_function_of_their_inputs(shipped: Campaign) -> None:
    event, who = shipped.event("aan-de-slag"), Contact("jan@example.be", "Jan", "fr")
    assert links_for(shipped, SECRET, event, who) == links_for(shipped, SECRET, event, who)


def test_no_links_without_a_secret_or_without_web_url(shipped: Campaign) -> None:
    event, who = shipped.event("aan-de-slag"), Contact("jan@example.be", "Jan", "nl")
    assert links_for(shipped, None, event, who) is None
    assert links_for(shipped, "", event, who) is None
    assert links_for(dataclasses.replace(shipped, web=None), SECRET, event, who) is None


def test_a_web_url_without_a_path_or_trailing_slash(shipped: Campaign) -> None:
    camp = dataclasses.replace(shipped, web=Web("https://rsvp.example.be"))
    links = links_for(camp, SECRET, camp.event("aan-de-slag"), Contact("jan@example.be"))
    assert links is not None
    assert links.unsubscribe.startswith("https://rsvp.example.be/u/")
    assert links.feed.startswith("webcal://rsvp.example.be/feed/") and links.feed.endswith(".ics")

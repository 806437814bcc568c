"""The calendar pages of ``mailer web`` (issue 14): a recipient's ``.ics`` download, their
subscribable calendar feed and the event page. Pure builders first, the routes at the end."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import babel
from babel.dates import format_date, format_time
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import ics, planner, tokens
from .config import Campaign, Event, Web, language_chain
from .contacts import Contact
from .ledger import Ledger
from .links import links_for
from .store import RecordedRevision
from .templates import locale_for, zone_note_text
from .vocab import Answer, EventStatus
from .workspace import Workspace

__all__ = [
    "FEED_REFRESH",
    "CalendarSite",
    "EventView",
    "calendar_file",
    "entries",
    "event_view",
    "feed_events",
    "feed_file",
    "map_url",
    "routes",
]

#: How often a subscribed client should fetch the feed again (RFC 7986 REFRESH-INTERVAL).
FEED_REFRESH = timedelta(hours=1)
_CALENDAR = "text/calendar; charset=utf-8"


class CalendarSite(Protocol):
    """What these routes need from ``mailer web``'s context (``mailer.web.WebContext``)."""

    @property
    def secret(self) -> str: ...

    def now(self) -> datetime: ...

    def workspace(self) -> Workspace: ...

    def ledger(self) -> AbstractContextManager[Ledger]: ...

    def page(
        self,
        request: Request,
        template: str,
        status: int = 200,
        *,
        language: str | None = None,
        **variables: Any,
    ) -> Response: ...

    def not_found(self, request: Request) -> Response: ...

    def contact(self, address: str) -> Contact | None: ...


# --------------------------------------------------------------------------------------
# Pure builders.
# --------------------------------------------------------------------------------------


def entries(
    campaign: Campaign,
    recorded: Mapping[str, RecordedRevision],
    has_holders: Callable[[str], bool],
    now: datetime,
) -> dict[str, ics.Entry]:
    """Every event as a published calendar shows it now: the SEQUENCE the mails about it carry.

    That is the ledger's latest revision, or the one the next pass will record when
    schedules.yaml changed since (:func:`mailer.planner.revisions`, as the sending pass decides
    it): a download made between the edit and the pass already carries the SEQUENCE of the
    update mail, never one below it. DTSTAMP is the time that revision was recorded (earlier
    than the mailed copy of the same SEQUENCE, so a client keeps the richer mailed entry,
    RFC 5546 2.1.5), or ``now`` for a revision not yet recorded.

    :param recorded: ``LedgerStore.latest_revisions``.
    :param has_holders: whether anyone was sent a calendar object for the event.
    """
    pending = {r.event: r for r in planner.revisions(campaign, recorded, has_holders)}
    out: dict[str, ics.Entry] = {}
    for ev in campaign.events:
        cancelled = ev.status is EventStatus.CANCELLED
        if ev.id in pending:
            out[ev.id] = ics.Entry(ev, pending[ev.id].sequence, cancelled, now)
        else:
            rec = recorded[ev.id]
            out[ev.id] = ics.Entry(ev, rec.sequence, cancelled, rec.at)
    return out


def feed_events(campaign: Campaign, contact: Contact | None, holds: Callable[[str], bool]) -> list[str]:
    """The ids of the events the address is invited to, in the campaign's order: those it was
    sent (or is being sent) a calendar object for (``holds``), and those a configured step's
    lists and tags give it (``contact``: its row in the contact files, None if gone)."""
    out = []
    for ev in campaign.events:
        audience = contact is not None and any(
            s.event == ev.id and s.audience.matches(contact.lists, contact.tags) for s in campaign.steps
        )
        if audience or holds(ev.id):
            out.append(ev.id)
    return out


def calendar_file(campaign: Campaign, entry: ics.Entry, *, dtstamp: datetime, language: str | None) -> bytes:
    """One event's download: ``METHOD:PUBLISH``, not ``REQUEST``.

    A download is not an iTIP message (RFC 5546 3.2.1): it carries the invitation's UID and
    current SEQUENCE, so a client that has the mailed invitation updates that entry, and one
    that has none imports a plain entry. As a REQUEST it would need the recipient as ATTENDEE
    and make Outlook and Apple Calendar offer to send a reply (an iMIP mail to the organiser)
    from a file a browser saved; the answer has its own link (``/r/<token>``) and the mailed
    REQUEST stays the meeting. A cancelled event is ``STATUS:CANCELLED``.
    """
    return ics.publish(campaign, [entry], dtstamp=dtstamp, language=language)


def feed_file(
    campaign: Campaign, feed: Sequence[ics.Entry], *, dtstamp: datetime, language: str | None, name: str
) -> bytes:
    """A subscriber's feed: every event in ``feed`` (cancelled ones too, ``STATUS:CANCELLED``,
    so the entry is marked rather than silently gone), refreshed hourly, no ATTENDEE."""
    return ics.publish(campaign, feed, dtstamp=dtstamp, language=language, name=name, refresh=FEED_REFRESH)


def map_url(location: str) -> str:
    """An OpenStreetMap search for ``location`` (no API key, no tracking by a third party).

    >>> map_url("Arduinkaai 7, 1000 Brussel")
    'https://www.openstreetmap.org/search?query=Arduinkaai%207%2C%201000%20Brussel'
    """
    return "https://www.openstreetmap.org/search?" + urlencode({"query": location}, quote_via=quote)


#: The event page's words by language (the base of the reader's language); others get English.
_WORDS: dict[str, dict[str, str]] = {
    "nl": {
        "when": "Wanneer",
        "where": "Waar",
        "map": "Op de kaart",
        "answer": "Komt u?",
        "accepted": "Ik kom",
        "tentative": "Misschien",
        "declined": "Ik kom niet",
        "calendar": "In uw agenda",
        "ics": "Agendabestand (.ics)",
        "feed": "Abonneren op al uw activiteiten",
        "cancelled": "Deze activiteit is afgelast.",
        "more": "Meer informatie",
    },
    "fr": {
        "when": "Quand",
        "where": "Où",
        "map": "Voir sur la carte",
        "answer": "Serez-vous présent·e ?",
        "accepted": "Je viens",
        "tentative": "Peut-être",
        "declined": "Je ne viens pas",
        "calendar": "Dans votre agenda",
        "ics": "Fichier agenda (.ics)",
        "feed": "S'abonner à tous vos événements",
        "cancelled": "Cet événement est annulé.",
        "more": "Plus d'informations",
    },
    "en": {
        "when": "When",
        "where": "Where",
        "map": "Show on a map",
        "answer": "Will you come?",
        "accepted": "Yes",
        "tentative": "Maybe",
        "declined": "No",
        "calendar": "Add to your calendar",
        "ics": "Calendar file (.ics)",
        "feed": "Subscribe to all your events",
        "cancelled": "This event is cancelled.",
        "more": "More information",
    },
    "de": {
        "when": "Wann",
        "where": "Wo",
        "map": "Auf der Karte",
        "answer": "Kommen Sie?",
        "accepted": "Ich komme",
        "tentative": "Vielleicht",
        "declined": "Ich komme nicht",
        "calendar": "In Ihren Kalender",
        "ics": "Kalenderdatei (.ics)",
        "feed": "Alle Ihre Termine abonnieren",
        "cancelled": "Diese Veranstaltung ist abgesagt.",
        "more": "Mehr Informationen",
    },
}
_ANSWERS = (Answer.ACCEPTED, Answer.TENTATIVE, Answer.DECLINED)


@dataclass(frozen=True)
class Link:
    label: str
    href: str


@dataclass(frozen=True)
class EventView:
    """What the event page shows one recipient (everything already in their language)."""

    lang: str  #: BCP 47, for ``<html lang>``
    words: Mapping[str, str]
    title: str
    when: str
    location: str | None
    map_url: str | None
    description: str | None
    url: str | None
    cancelled: bool
    answers: tuple[Link, ...]
    calendar: tuple[Link, ...]


def page_language(campaign: Campaign, contact: Contact | None) -> str:
    """The reader's language (their ``language`` column, else the campaign's)."""
    return (contact.language if contact and contact.language else None) or campaign.language


def _locale(language: str, campaign: Campaign) -> babel.Locale:
    for lang in (*language_chain(language, campaign.language), "en"):
        try:
            return locale_for(lang)
        except ValueError:
            continue
    return babel.Locale.parse("en_GB")


def when_words(campaign: Campaign, event: Event, contact: Contact | None, loc: babel.Locale) -> str:
    """The event's span in the reader's words: the hours in the event's zone, then (when the
    reader lives elsewhere) the event's city and their own hours, as the mails say it
    (:func:`mailer.templates.zone_note_text`)."""
    tz = campaign.timezone
    if event.all_day:
        first, last = event.start_date, event.last_date
        day1 = format_date(first, "full", locale=loc)
        return day1 if first == last else f"{day1} – {format_date(last, 'full', locale=loc)}"
    start, end = event.start.astimezone(tz), event.end.astimezone(tz)
    if start.date() == end.date():
        t1, t2 = (format_time(x, "short", locale=loc) for x in (start, end))
        text = f"{format_date(start, 'full', locale=loc)}, {t1}–{t2}"
    else:
        text = " – ".join(
            f"{format_date(x, 'full', locale=loc)}, {format_time(x, 'short', locale=loc)}"
            for x in (start, end)
        )
    reader = planner.zone_of(campaign, contact) if contact is not None else tz
    zones = contact.zones if contact is not None else frozenset()
    return text + zone_note_text(start, end, loc, reader=reader, campaign=tz, zones=zones)


def event_view(
    campaign: Campaign,
    event: Event,
    contact: Contact,
    *,
    secret: str,
    base_url: str,
) -> EventView:
    """The event page for ``contact`` (their row, or a bare :class:`Contact` of the address the
    token names when the row is gone): facts in the reader's language and zone, the answer
    links (signed ``rsvp`` tokens: the link opens a confirmation page, only its POST records),
    the ``.ics``, the feed and the add-to-calendar links (:func:`mailer.links.links_for`).
    ``base_url`` (the address the page was asked at) stands in for ``web.url`` when the
    campaign has none. Nothing about another recipient is read, so none can be shown."""
    language = page_language(campaign, contact)
    loc = _locale(language, campaign)
    bases = [lang.split("_")[0] for lang in language_chain(language, campaign.language)]
    words = next((_WORDS[b] for b in bases if b in _WORDS), _WORDS["en"])
    title, location, description = (event.text(f, language)[0] for f in ("title", "location", "description"))
    if campaign.web is None:
        campaign = replace(campaign, web=Web(base_url))
    links = links_for(campaign, secret, event, contact)
    if links is None:  # not reached: a secret and a web.url are there
        raise ValueError("event_view needs a secret")
    cancelled = event.status is EventStatus.CANCELLED
    answers = (
        ()
        if cancelled
        else (
            Link(words["accepted"], links.accept),
            Link(words["tentative"], links.maybe),
            Link(words["declined"], links.decline),
        )
    )
    calendar = (
        Link(words["ics"], links.ics),
        Link("Google Agenda" if bases[0] == "fr" else "Google Calendar", links.google),
        Link("Outlook.com", links.outlook),
        Link("Microsoft 365", links.office),
        Link("Yahoo", links.yahoo),
        Link(words["feed"], links.feed),
    )
    return EventView(
        lang=str(loc).replace("_", "-"),
        words=words,
        title=title or event.title,
        when=when_words(campaign, event, contact, loc),
        location=location,
        map_url=map_url(location) if location else None,
        description=description,
        url=event.url,
        cancelled=cancelled,
        answers=answers,
        calendar=() if cancelled else calendar,
    )


# --------------------------------------------------------------------------------------
# The routes.
# --------------------------------------------------------------------------------------


def routes(ctx: CalendarSite) -> list[Route]:
    """``/ics/<token>``, ``/feed/<token>.ics`` and ``/e/<token>`` (GET and HEAD). The handlers
    are plain functions: Starlette runs them in its thread pool, so a ledger read (SQLite,
    blocking) never stalls the event loop, and each opens its own connection in its thread."""

    def verified(request: Request, purpose: str) -> tuple[Workspace, str, str] | None:
        """The workspace, event id and address a valid token for this campaign names."""
        found = tokens.verify(ctx.secret, purpose, str(request.path_params["token"]))
        if found is None:
            return None
        ws = ctx.workspace()
        campaign, event, address = found
        if campaign != ws.campaign.id:
            return None
        if purpose == "feed":
            return (ws, event, address) if event == "*" else None
        if event not in {e.id for e in ws.campaign.events}:
            return None  # an event since removed from schedules.yaml
        return ws, event, address

    def current(ws: Workspace, led: Ledger, now: datetime) -> dict[str, ics.Entry]:
        cid = ws.campaign.id
        return entries(
            ws.campaign, led.latest_revisions(cid), lambda ev: bool(led.calendar_holders(cid, ev)), now
        )

    def calendar_response(body: bytes, filename: str | None) -> Response:
        headers = {"Cache-Control": "private, no-cache"}
        if filename:
            headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        return Response(body, media_type=_CALENDAR, headers=headers)

    def download(request: Request) -> Response:
        found = verified(request, "ics")
        if found is None:
            return ctx.not_found(request)
        ws, event, address = found
        contact = ctx.contact(address)
        now = ctx.now()
        with ctx.ledger() as led:
            entry = current(ws, led, now)[event]
        body = calendar_file(ws.campaign, entry, dtstamp=now, language=page_language(ws.campaign, contact))
        return calendar_response(body, f"{event}.ics")  # event ids are [A-Za-z0-9._-]

    def feed(request: Request) -> Response:
        found = verified(request, "feed")
        if found is None:
            return ctx.not_found(request)
        ws, _, address = found
        campaign = ws.campaign
        contact = ctx.contact(address)
        now = ctx.now()
        with ctx.ledger() as led:
            known = current(ws, led, now)
            ids = feed_events(campaign, contact, lambda ev: led.is_invitee(campaign.id, ev, address))
        body = feed_file(
            campaign,
            [known[i] for i in ids],
            dtstamp=now,
            language=page_language(campaign, contact),
            name=campaign.name,
        )
        return calendar_response(body, None)

    def page(request: Request) -> Response:
        found = verified(request, "event")
        if found is None:
            return ctx.not_found(request)
        ws, event, address = found
        contact = ctx.contact(address)
        base = str(request.base_url)
        reader = contact or Contact(email=address)
        view = event_view(ws.campaign, ws.campaign.event(event), reader, secret=ctx.secret, base_url=base)
        return ctx.page(request, "event.html", 200, language=page_language(ws.campaign, reader), view=view)

    methods = ["GET", "HEAD"]
    return [
        Route("/ics/{token}", download, methods=methods),
        Route("/feed/{token}.ics", feed, methods=methods),
        Route("/e/{token}", page, methods=methods),
    ]

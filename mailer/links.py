"""The links a mail carries to `mailer web` and to the add-to-calendar pages (pure, issue 14).

Every URL is a function of the campaign, the secret, the event and the contact only (no clock),
so a mail re-sent after a crash is byte-identical. Layout under the campaign's ``web.url``::

    /r/<token>?answer=accepted|tentative|declined   RSVP (GET: a confirmation page, POST records)
    /u/<token>                                      unsubscribe (RFC 8058 one-click POST)
    /ics/<token>                                    this event's .ics for this recipient
    webcal://host/feed/<token>.ics                  every event the address is invited to
    /e/<token>                                      the event page

The add-to-calendar links follow each service's URL template (none has an official one; see
the README): times in UTC, an all-day event as dates, texts in the reader's language.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from . import tokens
from .config import Campaign, Event
from .contacts import Contact
from .vocab import Answer

__all__ = ["DETAILS_MAX", "CalendarLinks", "Links", "calendar_links", "links_for", "web_url"]

#: The event description in an add-to-calendar link is cut at about this many characters:
#: the whole URL must stay well under the ~2,000 characters some browsers and mail apps keep.
DETAILS_MAX = 600


class CalendarLinks(NamedTuple):
    """The add-to-calendar links of one event for readers of one language."""

    google: str
    outlook: str  # Outlook.com
    office: str  # Microsoft 365 (Outlook on the web for work or school)
    yahoo: str


@dataclass(frozen=True)
class Links:
    """One recipient's links for one event (template variable ``links``)."""

    accept: str
    maybe: str
    decline: str
    unsubscribe: str
    ics: str
    feed: str
    page: str
    google: str
    outlook: str
    office: str
    yahoo: str

    def as_dict(self) -> dict[str, str]:
        """The links as the plain dict templates get (``links.accept``, ``links.google``...)."""
        return asdict(self)


def web_url(campaign: Campaign) -> str | None:
    """The campaign's ``web.url`` without a trailing slash, or None when it has none."""
    return campaign.web.base if campaign.web and campaign.web.url else None


def links_for(campaign: Campaign, secret: str | None, event: Event, contact: Contact) -> Links | None:
    """Every link of one mail about ``event`` to ``contact``, or None without a ``secret`` or
    without ``web.url`` (then a mail carries no links: nothing would answer them).

    Tokens (:func:`mailer.tokens.sign`): ``rsvp``, ``ics`` and ``event`` name the event;
    ``unsubscribe`` and ``feed`` are for the whole campaign (event ``"*"``).
    """
    base = web_url(campaign)
    if not secret or not base:
        return None

    def sign(purpose: str, event_id: str) -> str:
        return quote(tokens.sign(secret, purpose, campaign.id, event_id, contact.email), safe="")

    rsvp = sign("rsvp", event.id)
    feed_host = urlsplit(base)
    feed = f"webcal://{feed_host.netloc}{feed_host.path}/feed/{sign('feed', '*')}.ics"
    cal = calendar_links(event, contact.language)
    return Links(
        accept=f"{base}/r/{rsvp}?answer={Answer.ACCEPTED.value}",
        maybe=f"{base}/r/{rsvp}?answer={Answer.TENTATIVE.value}",
        decline=f"{base}/r/{rsvp}?answer={Answer.DECLINED.value}",
        unsubscribe=f"{base}/u/{sign('unsubscribe', '*')}",
        ics=f"{base}/ics/{sign('ics', event.id)}",
        feed=feed,
        page=f"{base}/e/{sign('event', event.id)}",
        google=cal.google,
        outlook=cal.outlook,
        office=cal.office,
        yahoo=cal.yahoo,
    )


def _details(event: Event, language: str | None) -> str:
    """The description (cut at a word near :data:`DETAILS_MAX`) and the event's URL."""
    text = " ".join((event.text("description", language)[0] or "").split())
    if len(text) > DETAILS_MAX:
        text = text[:DETAILS_MAX].rsplit(" ", 1)[0] + " …"
    return "\n\n".join(t for t in (text, event.url or "") if t)


def _query(params: dict[str, str]) -> str:
    # %20 for a space, never "+": Outlook on the web shows a "+" literally. "/" and ":" may
    # stand in a query (RFC 3986 3.4), as in the services' templates (dates=.../..., 08:30:00Z).
    return urlencode({k: v for k, v in params.items() if v}, quote_via=quote, safe="/:")


def _z(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@lru_cache(maxsize=256)  # per (event, language): the same for every reader of that language
def calendar_links(event: Event, language: str | None) -> CalendarLinks:
    """Google Calendar, Outlook.com, Microsoft 365 and Yahoo links that add ``event``, its
    texts in ``language`` (the reader's text, else the campaign language's).

    Timed events in UTC; all-day events as dates: Google and Outlook with the day after the
    last one as end (exclusive, as iCalendar's DTEND), Yahoo with the last day and
    ``dur=allday``.
    """
    title = event.text("title", language)[0] or event.title
    location = event.text("location", language)[0] or ""
    details = _details(event, language)
    first: date = event.start_date
    after: date = event.last_date + timedelta(days=1)
    if event.all_day:
        g_dates = f"{first:%Y%m%d}/{after:%Y%m%d}"
        o_times = {"startdt": first.isoformat(), "enddt": after.isoformat(), "allday": "true"}
        y_times = {"st": f"{first:%Y%m%d}", "et": f"{event.last_date:%Y%m%d}", "dur": "allday"}
    else:
        g_dates = f"{_z(event.start)}/{_z(event.end)}"
        iso = "%Y-%m-%dT%H:%M:%SZ"
        o_times = {
            "startdt": event.start.astimezone(UTC).strftime(iso),
            "enddt": event.end.astimezone(UTC).strftime(iso),
        }
        y_times = {"st": _z(event.start), "et": _z(event.end)}
    google = {"action": "TEMPLATE", "text": title, "dates": g_dates, "details": details, "location": location}
    outlook = {
        "path": "/calendar/action/compose",
        "rru": "addevent",
        "subject": title,
        **o_times,
        "body": details,
        "location": location,
    }
    yahoo = {"v": "60", "title": title, **y_times, "desc": details, "in_loc": location}
    compose = "/calendar/0/action/compose?"
    return CalendarLinks(
        google="https://calendar.google.com/calendar/render?" + _query(google),
        outlook="https://outlook.live.com" + compose + _query(outlook),
        office="https://outlook.office.com" + compose + _query(outlook),
        yahoo="https://calendar.yahoo.com/?" + _query(yahoo),
    )

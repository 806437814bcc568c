"""`mailer web`'s answer routes (issue 14): RSVP by link (``/r/<token>``) and one-click
unsubscribe (``/u/<token>``, RFC 8058).

A GET never changes anything: link scanners (Microsoft Safe Links, antivirus gateways) open
every URL in a mail, so a GET shows a page with one button and only its POST acts. No cookies,
no login, no redirect: the signed token in the path is the whole proof (:mod:`mailer.tokens`).
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import tokens, unsubscribe
from .config import Event
from .ledger import Ledger, ReplySource
from .templates import locale_for, when_text
from .vocab import Answer, EventStatus

if TYPE_CHECKING:
    from .web import WebContext

__all__ = ["ANSWERS", "Facts", "facts", "form_fields", "routes"]

log = logging.getLogger("mailer.web")

#: The answers a link may give, in the order the buttons show them.
ANSWERS = (Answer.ACCEPTED, Answer.TENTATIVE, Answer.DECLINED)
#: Why an address is suppressed after the unsubscribe link (shown by `mailer suppress list`).
UNSUBSCRIBED = "unsubscribed by link"


@dataclass(frozen=True)
class Facts:
    """What a confirmation page says about the event, in the reader's language."""

    title: str
    when: str
    location: str | None
    cancelled: bool


def facts(event: Event, language: str, reader_zone: ZoneInfo | None, campaign_zone: ZoneInfo) -> Facts:
    """The event's title, its span in words (the reader's own hours added when they live in
    another zone, as the mails do) and its place, for a page in ``language``."""
    ev = event.in_language(language)
    try:
        loc = locale_for(language)
    except ValueError:
        loc = locale_for("en")
    reader = reader_zone or campaign_zone
    if ev.all_day:
        first, last = ev.start.date(), (ev.end - timedelta(days=1)).date()
        when = when_text(first, loc, reader=reader, campaign=campaign_zone)
        if last != first:
            when += " – " + when_text(last, loc, reader=reader, campaign=campaign_zone)
    else:
        when = when_text(ev.start, loc, reader=reader, campaign=campaign_zone)
        end = when_text(ev.end, loc, reader=reader, campaign=campaign_zone, format="time")
        if ev.end.date() != ev.start.date():
            end = when_text(ev.end, loc, reader=reader, campaign=campaign_zone)
        when += " – " + end
    return Facts(ev.title, when, ev.location, ev.status is EventStatus.CANCELLED)


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a POSTed form: ``application/x-www-form-urlencoded`` or
    ``multipart/form-data`` (RFC 8058 allows both for ``List-Unsubscribe=One-Click``). The first
    value of each name; anything unreadable gives no fields.

    >>> form_fields("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click")
    {'List-Unsubscribe': 'One-Click'}
    """
    kind = content_type.partition(";")[0].strip().lower()
    if kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        out: dict[str, str] = {}
        if not msg.is_multipart():
            return out
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str) and name not in out:
                payload = part.get_payload(decode=True)
                out[name] = payload.decode("utf-8", "replace").strip() if isinstance(payload, bytes) else ""
        return out
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _answer(value: str | None) -> Answer | None:
    try:
        found = Answer((value or "").strip().lower())
    except ValueError:
        return None
    return found if found in ANSWERS else None


def routes(ctx: WebContext) -> list[Route]:
    """``/r/<token>`` (GET: the confirmation page; POST: record the answer) and ``/u/<token>``
    (GET: a page with one button; POST: suppress the address). Plain functions: Starlette runs
    them in its thread pool, so the ledger (SQLite, blocking) never stalls the event loop."""

    def rsvp_target(request: Request) -> tuple[str, str, Event] | None:
        found = tokens.verify(ctx.secret, "rsvp", str(request.path_params["token"]))
        if found is None:
            return None
        campaign_id, event_id, address = found
        c = ctx.workspace().campaign
        if campaign_id != c.id:
            return None
        try:
            event = c.event(event_id)
        except KeyError:
            return None  # an event since removed from schedules.yaml
        lang = ctx.language_for(address)
        request.scope["mailer.language"] = lang
        return lang, address, event

    def rsvp_page(
        request: Request,
        lang: str,
        address: str,
        event: Event,
        current: dict[str, Any] | None,
        *,
        chosen: Answer | None,
        **extra: Any,
    ) -> Response:
        c = ctx.workspace().campaign
        contact = ctx.contact(address)
        zone = None
        if contact is not None and contact.timezone:
            try:
                zone = ZoneInfo(contact.timezone)
            except (ValueError, KeyError):
                zone = None
        answer = Answer.from_partstat(current["partstat"]) if current and current["current"] else None
        outdated = bool(current and not current["current"])
        return ctx.page(
            request,
            "rsvp.html",
            200,
            language=lang,
            facts=facts(event, lang, zone, c.timezone),
            chosen=chosen,
            current=answer,
            outdated=outdated,
            answers=[a.value for a in ANSWERS],
            **extra,
        )

    def rsvp_get(request: Request) -> Response:
        target = rsvp_target(request)
        if target is None:
            return ctx.not_found(request)
        lang, address, event = target
        chosen = _answer(request.query_params.get("answer"))
        with ctx.ledger() as led:
            current = led.reply(ctx.workspace().campaign.id, event.id, address)
        return rsvp_page(request, lang, address, event, current, chosen=chosen, recorded=None)

    async def rsvp_post(request: Request) -> Response:
        target = rsvp_target(request)
        if target is None:
            return ctx.not_found(request)
        lang, address, event = target
        fields = form_fields(request.headers.get("content-type", ""), await request.body())
        chosen = _answer(fields.get("answer") or request.query_params.get("answer"))
        if chosen is None:
            return ctx.message(request, 400, "error_title", "bad_request", lang)
        if event.status is EventStatus.CANCELLED:
            return ctx.message(request, 409, "rsvp_title", "cancelled", lang)
        cid, now = ctx.workspace().campaign.id, ctx.now()

        def record(led: Ledger) -> tuple[bool, dict[str, Any] | None]:
            with led.transaction():
                seq = led.event_sequence(cid, event.id)
                stored = led.record_reply(
                    cid, event.id, address, chosen.partstat, now, None, seq, source=ReplySource.WEB
                )
            # Committed (durable) above; the page shows what the ledger now holds, read on the
            # same connection rather than a second one.
            return stored, led.reply(cid, event.id, address)

        def answer() -> tuple[bool, Response]:
            stored, current = ctx.write(record)
            page = rsvp_page(request, lang, address, event, current, chosen=None, recorded=chosen.value)
            return stored, page

        # One trip to the thread pool: the write, the read and the page (SQLite blocks).
        stored, page = await run_in_threadpool(answer)
        log.info("answer by link: %s %s%s", event.id, chosen.value, "" if stored else " (a newer one kept)")
        return page

    def unsubscribe_target(request: Request) -> tuple[str, str] | None:
        found = unsubscribe.verify(ctx.secret, str(request.path_params["token"]))
        if found is None or found[0] != ctx.workspace().campaign.id:
            return None
        lang = ctx.language_for(found[1])
        request.scope["mailer.language"] = lang
        return lang, found[1]

    def unsubscribe_get(request: Request) -> Response:
        target = unsubscribe_target(request)
        if target is None:
            return ctx.not_found(request)
        lang, address = target
        return ctx.page(request, "unsubscribe.html", 200, language=lang, address=address, done=False)

    async def unsubscribe_post(request: Request) -> Response:
        target = unsubscribe_target(request)
        if target is None:
            return ctx.not_found(request)
        lang, address = target
        fields = form_fields(request.headers.get("content-type", ""), await request.body())
        # RFC 8058 3.2: the POST body is List-Unsubscribe=One-Click; our page's button sends it too.
        if fields.get("List-Unsubscribe", "").strip() != "One-Click":
            return ctx.message(request, 400, "error_title", "bad_request", lang)
        now = ctx.now()

        def record(led: Ledger) -> None:
            led.suppress(address, UNSUBSCRIBED, now)

        await run_in_threadpool(ctx.write, record)
        log.info("unsubscribed by link")
        return ctx.page(request, "unsubscribe.html", 200, language=lang, address=address, done=True)

    return [
        Route("/r/{token}", rsvp_get, methods=["GET", "HEAD"]),
        Route("/r/{token}", rsvp_post, methods=["POST"]),
        Route("/u/{token}", unsubscribe_get, methods=["GET", "HEAD"]),
        Route("/u/{token}", unsubscribe_post, methods=["POST"]),
    ]

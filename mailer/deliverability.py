"""The bulk-sender rules of the big mailbox providers, as `mailer check` reports them (issue 15).

Gmail and Yahoo (since 2024) and Microsoft (since May 2025) reject or junk bulk mail that is not
authenticated, cannot be unsubscribed from in one click, or cannot be answered. :func:`rules`
is pure: it takes the campaign and the :class:`Facts` the caller gathered (volumes, renders,
the DKIM check, the SMTP settings in effect) and says, line by line, what passes and what to do.
:func:`gather` collects those facts from a loaded workspace. README "Deliverability".
"""

from __future__ import annotations

import html as htmlmod
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Literal

from .config import Campaign, Event, Step
from .contacts import Contact
from .errors import MailerError, TemplateError
from .tokens import secret_from
from .transport import is_loopback
from .workspace import Workspace

if TYPE_CHECKING:
    from .dkim import DkimLine

__all__ = ["ONE_CLICK_ABOVE", "Facts", "Rule", "daily_volume", "gather", "rules"]

#: Gmail, Yahoo and Microsoft require one-click unsubscribe (RFC 8058) from senders of more
#: than 5,000 mails a day to their users; we count every recipient of the day, wherever they are.
ONE_CLICK_ABOVE = 5000

#: Local parts that say nobody reads the mailbox (a reply, a calendar answer would be lost).
_NO_REPLY = re.compile(
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|dont[-_.]?reply|mailer-daemon|bounces?)([+-.].*)?$"
)


@dataclass(frozen=True)
class Rule:
    """One line of the section: ``level`` ok, warn (advice; the exit code is unchanged) or
    error (`mailer check` exits 1), and ``text`` with what to do."""

    name: str
    level: Literal["ok", "warn", "error"]
    text: str


@dataclass(frozen=True)
class Facts:
    """What :func:`rules` judges, gathered outside it (:func:`gather`).

    ``daily``: recipients per send day (steps on one day add up); ``dkim``: the lines of
    :func:`mailer.dkim.check_dkim` as ``(ok, text)`` (empty without ``dkim:``); ``bodies``: per
    rendered template and language, whether its text and HTML parts show the unsubscribe link
    (``(label, in_text, in_html)``); ``one_click``: the mails carry an https List-Unsubscribe
    with List-Unsubscribe-Post; ``tls`` and ``host``: the SMTP connection in effect (after the
    MAILER_SMTP_* variables); ``message_id``: one Message-ID as composed."""

    secret: bool
    daily: Mapping[date, int] = field(default_factory=dict)
    dkim: Sequence[tuple[bool, str]] = ()
    bodies: Sequence[tuple[str, bool, bool]] = ()
    one_click: bool = False
    tls: str = "starttls"
    host: str = "localhost"
    message_id: str | None = None


def daily_volume(steps: Sequence[Step], counts: Mapping[str, int]) -> dict[date, int]:
    """Recipients per day of the campaign's time zone: steps sent on the same day add up.

    >>> from datetime import datetime
    >>> s = lambda i, d: Step(i, "ev", "t", datetime(2030, 1, d, 9), "")
    >>> daily_volume([s("a", 4), s("b", 4), s("c", 5)], {"a": 3000, "b": 2500, "c": 10})
    {datetime.date(2030, 1, 4): 5500, datetime.date(2030, 1, 5): 10}
    """
    days: dict[date, int] = {}
    for s in steps:
        day = s.at.date()
        days[day] = days.get(day, 0) + counts.get(s.id, 0)
    return days


def rules(campaign: Campaign, facts: Facts) -> list[Rule]:
    """The deliverability lines for ``campaign`` given ``facts``, in the order printed."""
    return [
        _dkim(campaign, facts),
        _one_click(campaign, facts),
        _visible_link(campaign, facts),
        *_mail_unsubscribe(campaign, facts),
        _mailboxes(campaign),
        _bounces(campaign, facts),
        _tls(facts),
        _message_id(campaign, facts),
    ]


def _dkim(campaign: Campaign, facts: Facts) -> Rule:
    if facts.dkim:
        bad = [text for ok, text in facts.dkim if not ok]
        if not bad:
            return Rule("DKIM", "ok", "; ".join(text for _, text in facts.dkim))
        # A key that does not load or sign is broken configuration (`send` would refuse it); a
        # DNS record that does not match yet may still be on its way.
        level: Literal["warn", "error"] = "warn" if all(t.startswith("DKIM DNS") for t in bad) else "error"
        return Rule("DKIM", level, "; ".join(bad))
    if campaign.smtp.relay_signs:
        return Rule(
            "DKIM", "ok", "your relay signs (smtp.relay_signs: true); make sure it signs for the From domain"
        )
    return Rule(
        "DKIM",
        "warn",
        "not configured: set dkim: (mailer dkim keygen) or, if your relay signs, smtp.relay_signs: true; "
        "Gmail, Yahoo and Microsoft junk or reject bulk mail without a signature aligned with From",
    )


def _one_click(campaign: Campaign, facts: Facts) -> Rule:
    top = max(facts.daily.items(), key=lambda kv: kv[1], default=None)
    busiest = f"busiest day {top[0]:%Y-%m-%d}: {top[1]:,} recipients" if top else "no recipients"
    if facts.one_click:
        return Rule(
            "one-click unsubscribe", "ok", f"List-Unsubscribe https + List-Unsubscribe-Post ({busiest})"
        )
    what = (
        "set web.url (mailer web) or unsubscribe.url to an https address, with MAILER_WEB_SECRET, "
        "for List-Unsubscribe https + List-Unsubscribe-Post (RFC 8058)"
    )
    if top is not None and top[1] > ONE_CLICK_ABOVE:
        return Rule(
            "one-click unsubscribe",
            "error",
            f"missing, and the {busiest} (> {ONE_CLICK_ABOVE:,} a day: Gmail and Yahoo reject such mail "
            f"without it); {what}",
        )
    return Rule(
        "one-click unsubscribe", "ok", f"not required ({busiest}, at most {ONE_CLICK_ABOVE:,}); {what}"
    )


def _visible_link(campaign: Campaign, facts: Facts) -> Rule:
    unsub = campaign.unsubscribe
    if campaign.web is None and (unsub is None or not (unsub.url or unsub.mailto)):
        return Rule(
            "unsubscribe link in the body",
            "warn",
            "no unsubscribe configured: set web.url or unsubscribe.url (or unsubscribe.mailto) and put "
            "{{ campaign.unsubscribe_url }} in every template",
        )
    missing = [
        f"{label} ({'text and HTML' if not (t or h) else 'text' if not t else 'HTML'})"
        for label, t, h in facts.bodies
        if not (t and h)
    ]
    if missing:
        return Rule(
            "unsubscribe link in the body",
            "warn",
            f"not visible in {', '.join(missing)}: put {{{{ campaign.unsubscribe_url }}}} (or the "
            "unsubscribe address) in the footer of both parts",
        )
    return Rule(
        "unsubscribe link in the body", "ok", f"in every body ({len(facts.bodies)} template/language pairs)"
    )


def _mail_unsubscribe(campaign: Campaign, facts: Facts) -> list[Rule]:
    unsub = campaign.unsubscribe
    if unsub is None or not unsub.mailto:
        return []
    if facts.secret:
        return [Rule("unsubscribe by mail", "ok", f"mailto:{unsub.mailto} with a signed token per recipient")]
    return [
        Rule(
            "unsubscribe by mail",
            "warn",
            f"mailto:{unsub.mailto} carries no token without MAILER_WEB_SECRET: an unsubscribe mail "
            "cannot be tied to a recipient, so it cannot be trusted; set MAILER_WEB_SECRET",
        )
    ]


def _mailboxes(campaign: Campaign) -> Rule:
    s = campaign.sender
    roles = [("From", s.address), ("Reply-To", s.reply_to), ("organizer", s.organizer)]
    dead = [
        f"{name} {addr}" for name, addr in roles if addr and _NO_REPLY.match(addr.rpartition("@")[0].lower())
    ]
    if s.organizer == s.address and dead and dead[-1].startswith("organizer"):
        dead[-1] += " (the organizer defaults to From)"
    if dead:
        return Rule(
            "addresses that receive",
            "warn",
            f"{', '.join(dead)} looks like nobody reads it: replies and calendar answers (they go to "
            "the organizer) would be lost, and providers want senders that can be answered; use a "
            "mailbox someone reads",
        )
    return Rule(
        "addresses that receive",
        "ok",
        f"From {s.address}, Reply-To {s.reply_to or '(From)'}, organizer {s.organizer} (calendar "
        "answers go there): make sure each mailbox exists",
    )


def _bounces(campaign: Campaign, facts: Facts) -> Rule:
    bounces = campaign.sender.bounces
    if bounces is None:
        return Rule("envelope sender", "ok", f"{campaign.sender.address} (sender.bounces is off)")
    if not facts.secret:
        return Rule(
            "envelope sender",
            "error",
            "sender.bounces is set but MAILER_WEB_SECRET is not: set it, or leave sender.bounces out",
        )
    local, _, domain = bounces.rpartition("@")
    return Rule("envelope sender", "ok", f"{local}+TOKEN@{domain}, one per delivery (sender.bounces)")


def _tls(facts: Facts) -> Rule:
    if facts.tls == "none" and not is_loopback(facts.host):
        return Rule(
            "TLS",
            "warn",
            f"off to {facts.host} (smtp.tls: none): mail and login cross the network in clear text; "
            "use smtp.tls: starttls or tls",
        )
    where = "a local relay" if facts.tls == "none" else facts.host
    return Rule("TLS", "ok", f"{facts.tls} to {where}")


def _message_id(campaign: Campaign, facts: Facts) -> Rule:
    if facts.message_id is None:
        return Rule("Message-ID", "ok", "no mail to compose")
    right = facts.message_id.strip("<>").rpartition("@")[2].lower()
    domain = campaign.sender.domain.lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    if right == domain:
        return Rule("Message-ID", "ok", f"in the From domain ({facts.message_id})")
    return Rule("Message-ID", "warn", f"{facts.message_id} is not in the From domain {domain}")


# --------------------------------------------------------------------------------------
# Gathering the facts (renders mails; reads the DKIM key)
# --------------------------------------------------------------------------------------


def gather(
    ws: Workspace, environ: Mapping[str, str], *, dkim: Sequence[DkimLine] | None = None, dns: bool = False
) -> Facts:
    """The :class:`Facts` of a loaded workspace: the audiences, one render per template and
    language, the DKIM check (``dkim``: the lines of :func:`mailer.dkim.check_dkim` when the
    caller has them, else it is run, with ``dns`` its lookup) and the SMTP settings as
    ``environ`` makes them."""
    from .compose import Composer
    from .dkim import check_dkim
    from .gate import PLACEHOLDER_SECRET, revision_groups, step_groups
    from .transport import TransportSettings
    from .unsubscribe import link

    c = ws.campaign
    secret = secret_from(environ)
    audiences = {s.id: ws.audience(s) for s in c.steps}
    sign = secret or PLACEHOLDER_SECRET  # the link's shape when check runs without one
    composer = Composer(c, ws.templates, unsubscribe_secret=sign)
    unsub = c.unsubscribe
    one_click = False
    bodies: list[tuple[str, bool, bool]] = []
    seen: set[tuple[str, str]] = set()
    message_id = None
    # The first mail of each template and language, in the order of the mails (each step's
    # audience, then the updates and cancellations): one pass over each audience's languages.
    mails: list[tuple[Step, Event, Contact, dict[str, object] | None]] = []
    for g in step_groups(ws) + revision_groups(ws):
        if message_id is None and g.contacts:
            message_id = composer.message_id(g.step, g.contacts[0].email)
        languages: set[str | None] = set()
        for ct in g.contacts:
            if ct.language not in languages:
                languages.add(ct.language)
                mails.append((g.step, g.event, ct, g.extra))
    for step, event, contact, extra in mails:
        key = (step.template, contact.language or c.language)
        if key in seen:
            continue
        seen.add(key)
        # Rendered as Composer.compose does (a placeholder secret without one: the link's
        # place in the template is what counts here; without a secret the mails carry none).
        found = composer.links_for(event, contact)
        url = found.unsubscribe if found else None
        if url is None and unsub is not None and unsub.url:
            url = link(unsub.url, sign, c.id, contact.email)
        one_click = one_click or bool(secret and url and url.startswith("https://"))
        try:
            r = composer.render(step, event, contact, extra=extra, unsub_url=url, found=found)
        except TemplateError:
            continue  # the render gate reports it
        bodies.append(
            (f"{step.template}/{r.language}", *_shows(r.text, r.html, url, unsub.mailto if unsub else None))
        )
    try:
        settings = TransportSettings.from_config(c.smtp, environ)
        tls, host = settings.tls, settings.host
    except MailerError:
        tls, host = c.smtp.tls, environ.get("MAILER_SMTP_HOST") or c.smtp.host
    return Facts(
        secret=secret is not None,
        daily=daily_volume(c.steps, {sid: len(a) for sid, a in audiences.items()}),
        dkim=[(line.ok, line.text) for line in (check_dkim(c, environ, dns=dns) if dkim is None else dkim)],
        bodies=bodies,
        one_click=one_click,
        tls=tls,
        host=host,
        message_id=message_id,
    )


def _shows(text: str, html: str, url: str | None, mailto: str | None) -> tuple[bool, bool]:
    """Whether the text and the HTML part show the unsubscribe link (or, without one, the
    unsubscribe address)."""
    needles = [n for n in (url, mailto) if n]
    return (
        any(n in text for n in needles),
        any(n in html or htmlmod.escape(n) in html for n in needles),
    )

"""The render gate: every mail a pass will send (and every mail `check` can foresee) is rendered
before anything is sent, so a template error holds a whole step back instead of half-sending it.

Two entry points, both pure (they render; they never write, connect or read the clock):

* :func:`gate_due`, a stage of :class:`~mailer.runner.SendPass`: the due mails of a pass, each
  rendered with the variables its delivery will use (:meth:`Composer.render_due`). A step with
  one mail that does not render is held; the others go.
* :func:`check_workspace`, for `mailer check` and the daemon's reload: every mail of every
  configured step for its audience, and the ``update`` and ``cancel`` templates for every
  recipient of a calendar entry, whether or not an event changed.

Not every mail is rendered: one per *shape* of recipient (:mod:`mailer.shapes`, issue 16):
the mails of one step (and SEQUENCE) whose recipients share the language, time zone, CSV
columns and every value (or result of a test on values) the template does more with than write
it out take the same path through the template and raise the same problems, so the first of
them is rendered for all. A problem names that first recipient and counts all of the shape's
mails, exactly as rendering each mail would. Only the templates are rendered (no calendar, no
MIME), about a tenth of what composing a mail costs (README "The render gate").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from . import planner
from .compose import Composer
from .config import Event, Step
from .contacts import Contact
from .errors import ConfigError, Problem, TemplateError
from .planner import Due
from .shapes import Shapes
from .templates import contact_vars, context
from .vocab import EventStatus, StepKind
from .workspace import Workspace

__all__ = ["Mail", "check_workspace", "gate_due", "revision_mails", "shape_of"]

#: Renders the placeholder links when `check` has no MAILER_UNSUBSCRIBE_SECRET (the link's
#: shape, not its signature, is what a template sees).
_PLACEHOLDER_SECRET = "mailer-check-placeholder"


@dataclass(frozen=True)
class Mail:
    """One mail to render: ``extra`` holds the variables of an update or cancellation."""

    step: Step
    event: Event
    contact: Contact
    extra: dict[str, object] | None = None
    label: str = ""  # how problems name the step: its id, or "update of <event>"


@dataclass
class _Found:
    problem: Problem  # as the templates reported it: the template's file and line
    contact: Contact  # the first recipient it failed for
    count: int = 1


def _render(composer: Composer, mail: Mail, sequence: int | None) -> list[Problem]:
    try:
        if sequence is not None:
            composer.render_due(mail.step, mail.event, mail.contact, sequence=sequence)
        else:
            composer.render(mail.step, mail.event, mail.contact, extra=mail.extra)
    except TemplateError as exc:
        return exc.problems
    return []


def shape_of(composer: Composer, shapes: Shapes, mail: Mail, index: int) -> Hashable:
    """What decides how ``mail`` renders (:mod:`mailer.shapes`): two mails of one step with the
    same shape raise the same problems. ``index`` tells apart the mails of a template that
    makes every recipient its own shape. Never raises: a template that is missing or cannot be
    read gets a shape per recipient (rendering reports it)."""
    contact = mail.contact
    template = mail.step.template
    lang = shapes.templates.language_for(template, contact.language)
    base = (
        mail.label,
        template,
        lang,
        contact.language,
        contact.timezone,
        tuple(contact.fields),
        contact.zones,
    )
    if lang is None:
        return (*base, index)
    analysis = shapes.analysis(template, lang)
    if analysis.exact:
        return (*base, index)
    if not analysis.keys:
        return base
    cache: dict[str, Any] = {}

    def roots(name: str) -> Any:
        if name not in cache:
            if name == "contact":
                cache[name] = contact_vars(composer.campaign, contact)
            elif name == "links":
                found = composer.links_for(mail.event, contact)
                cache[name] = found.as_dict() if found is not None else None
            else:  # campaign, with the signed unsubscribe link, as Composer.render puts it in
                base = shapes.campaigns.get(contact.zones)
                if base is None:
                    base = shapes.campaigns[contact.zones] = context(
                        composer.campaign, mail.event, mail.step, contact
                    )["campaign"]
                found = composer.links_for(mail.event, contact)
                unsub_url = found.unsubscribe if found else composer._unsubscribe_url(contact)
                cache[name] = base if unsub_url is None else {**base, "unsubscribe_url": unsub_url}
        return cache[name]

    return (*base, analysis.shape(roots))


def composer_context(composer: Composer, mail: Mail) -> dict[str, Any]:
    """``links`` and ``campaign`` of the variables :meth:`Composer.render` gives ``mail``."""
    ctx = context(composer.campaign, mail.event, mail.step, mail.contact)
    found = composer.links_for(mail.event, mail.contact)
    if found is not None:
        ctx["links"] = found.as_dict()
    unsub_url = found.unsubscribe if found else composer._unsubscribe_url(mail.contact)
    if unsub_url is not None:
        ctx["campaign"] = {**ctx["campaign"], "unsubscribe_url": unsub_url}
    return ctx


def gate_due(composer: Composer, due: Sequence[Due]) -> tuple[list[Due], list[Problem]]:
    """Render every mail in ``due`` as the delivery will compose it (the SEQUENCE a claim now
    carries). Returns the mails of the steps that render completely, in order, and one problem
    per distinct template problem of each held step (the template's file and line, how many of
    the step's mails it fails, and the first recipient it fails for)."""
    found: dict[str, dict[str, _Found]] = {}
    total: dict[str, int] = {}
    shapes = Shapes(composer.templates)
    groups: dict[Hashable, tuple[Due, list[int]]] = {}  # first mail of each shape, and how many
    for i, d in enumerate(due):
        sid = d.step.id
        total[sid] = total.get(sid, 0) + 1
        seq = composer.sequence(d.event.id)
        key = (sid, seq, shape_of(composer, shapes, Mail(d.step, d.event, d.contact), i))
        if key in groups:
            groups[key][1][0] += 1
        else:
            groups[key] = (d, [1])
    for d, (count,) in groups.values():
        mail = Mail(d.step, d.event, d.contact)
        for p in _render(composer, mail, composer.sequence(d.event.id)):
            seen = found.setdefault(d.step.id, {})
            line = str(p)
            if line in seen:
                seen[line].count += count
            else:
                seen[line] = _Found(p, d.contact, count)
    if not found:
        return list(due), []
    problems = [
        dataclasses.replace(
            f.problem,
            message=(
                f"step {sid}: {f.problem.message} ({f.count} of its {total[sid]} mail(s); "
                f"the first to {f.contact.email}" + (f", {f.contact.source}" if f.contact.file else "") + ")"
            ),
            step=sid,
        )
        for sid, seen in found.items()
        for f in seen.values()
    ]
    return [d for d in due if d.step.id not in found], problems


def revision_mails(ws: Workspace) -> list[Mail]:
    """An update and a cancellation of every event that has a calendar (a step with
    ``attach_ics``), to every recipient of one, as if the event changed now: the update lists
    every significant field as changed (so a ``{% for c in changes %}`` body runs), the
    cancellation the status. Templates that do not exist are left out (the workspace warns)."""
    c = ws.campaign
    holders: dict[str, dict[str, Contact]] = {}
    last: dict[str, Step] = {}
    for step in c.steps:
        if not step.attach_ics:
            continue
        who = holders.setdefault(step.event, {})
        for contact in ws.audience(step):
            who.setdefault(contact.email, contact)
        if step.event not in last or step.at > last[step.event].at:
            last[step.event] = step
    out: list[Mail] = []
    for event_id, who in holders.items():
        event, at = c.event(event_id), last[event_id].at
        snap = planner.snapshot(event)
        now = {d["field"]: d["after"] for d in planner.changes({}, snap)}
        for kind, name in ((StepKind.UPDATE, c.update_template), (StepKind.CANCEL, c.cancel_template)):
            if not ws.templates.languages(name):
                continue
            step = planner.dynamic_step(c, event_id, kind, 1, at)
            if kind is StepKind.UPDATE:
                ev = event
                changes = [
                    {"field": k, "before": now.get(k), "after": now.get(k)}
                    for k in planner.SIGNIFICANT
                    if k != "status"
                ]
            else:
                ev = dataclasses.replace(event, status=EventStatus.CANCELLED)
                changes = [{"field": "status", "before": event.status, "after": EventStatus.CANCELLED}]
            extra: dict[str, object] = {"changes": changes, "sequence": 1}
            label = f"{kind} of {event_id}"
            out += [Mail(step, ev, contact, extra, label) for contact in who.values()]
    return out


def check_workspace(
    ws: Workspace,
    *,
    unsubscribe_secret: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Problem]:
    """Render every mail `check` can foresee: each configured step for its audience, and the
    update and cancellation of every event with a calendar for each of its recipients
    (:func:`revision_mails`), each in the recipient's language.

    Returns the problems rendering finds (not ``ws.problems``: those come with the workspace),
    one per distinct template problem, named by the first recipient it fails for (contact file
    and row) and the template's file and line. A template or language with a blocking problem
    in ``ws`` is not rendered again. The daemon refuses a reload when any is an error.

    :param unsubscribe_secret: signs the unsubscribe links as sending would; when the campaign
        has ``unsubscribe.url`` and there is none, that is one problem and the mails are still
        rendered (with a placeholder link).
    :param progress: called with (mails rendered, mails to render) as it goes.
    """
    c = ws.campaign
    problems: list[Problem] = []
    try:
        composer = Composer(c, ws.templates, unsubscribe_secret=unsubscribe_secret)
    except ConfigError as exc:
        problems += exc.problems
        composer = Composer(c, ws.templates, unsubscribe_secret=_PLACEHOLDER_SECRET)
    # A template (or one language of it) with a blocking problem is already reported; rendering
    # it for every recipient would only repeat that. Decided on the problems' fields, never on
    # their text (issue 11 item 7).
    broken = {(p.template, p.language) for p in ws.blocking if p.template is not None}
    mails: list[Mail] = [
        Mail(step, c.event(step.event), contact, None, step.id)
        for step in c.steps
        for contact in ws.audience(step)
    ]
    mails += revision_mails(ws)
    # One render per shape (mailer.shapes), in the order of each shape's first mail: the
    # problems, and the recipient each names, are those of rendering every mail in order.
    shapes = Shapes(ws.templates)
    firsts: dict[Hashable, Mail] = {}
    for i, mail in enumerate(mails, 1):
        firsts.setdefault(shape_of(composer, shapes, mail, i), mail)
        if progress is not None and i % 1000 == 0:
            progress(i // 2, len(mails))
    seen: set[str] = set()
    reps = list(firsts.values())
    for i, mail in enumerate(reps, 1):
        template = mail.step.template
        lang = ws.templates.language_for(template, mail.contact.language)
        skip = (template, None) in broken or lang is None or (template, lang) in broken
        for p in [] if skip else _render(composer, mail, None):
            line = str(p).lstrip(": ")
            if line in seen:  # one report per distinct template problem
                continue
            seen.add(line)
            problems.append(
                Problem(
                    mail.contact.file,
                    f"{'step ' * (mail.label == mail.step.id)}{mail.label}: {line}",
                    row=mail.contact.row,
                    step=mail.step.id if mail.label == mail.step.id else None,
                    template=template,
                    language=p.language,
                )
            )
        if progress is not None and (i % 100 == 0 or i == len(reps)):
            progress(len(mails) // 2 + len(mails) * i // (2 * len(reps)), len(mails))
    return problems

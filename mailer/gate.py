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

from . import planner, unsubscribe
from .compose import Composer
from .config import Event, Step
from .contacts import Contact
from .errors import ConfigError, Problem, TemplateError
from .links import Links, web_url
from .planner import Due
from .shapes import Shapes
from .templates import contact_vars, context
from .vocab import EventStatus, StepKind
from .workspace import Workspace

__all__ = [
    "PLACEHOLDER_SECRET",
    "Group",
    "Mail",
    "check_workspace",
    "gate_due",
    "revision_groups",
    "revision_mails",
    "shape_of",
    "step_groups",
]

#: Renders the placeholder links when `check` has no MAILER_UNSUBSCRIBE_SECRET (the link's
#: shape, not its signature, is what a template sees).
PLACEHOLDER_SECRET = "mailer-check-placeholder"


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
    try:  # the links (mailer.links) are not built by the templates: their errors are no TemplateError
        _links_of(composer, mail.event, mail.contact)
    except (ValueError, UnicodeError) as exc:
        return [Problem("", f"the signed links cannot be made: {exc}")]
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


def _links_of(composer: Composer, event: Event, contact: Contact) -> tuple[dict[str, str] | None, str | None]:
    """``links`` and ``campaign.unsubscribe_url`` as :meth:`Composer.render` sets them (the
    latter None where the campaign's own value stays).

    :raises ValueError: or UnicodeError, where :mod:`mailer.links` cannot sign them."""
    found = composer.links_for(event, contact)
    return (
        found.as_dict() if found is not None else None,
        found.unsubscribe if found else composer._unsubscribe_url(contact),
    )


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


@dataclass(frozen=True)
class Group:
    """The mails of one step (or of one event's update or cancellation) to ``contacts``, in
    order: what :func:`revision_mails` and :func:`check_workspace` walk without a
    :class:`Mail` per recipient."""

    label: str
    step: Step
    event: Event
    extra: dict[str, object] | None
    contacts: Sequence[Contact]


def step_groups(ws: Workspace) -> list[Group]:
    """Every configured step for its audience, in order."""
    c = ws.campaign
    return [Group(step.id, step, c.event(step.event), None, ws.audience(step)) for step in c.steps]


def revision_groups(ws: Workspace) -> list[Group]:
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
    out: list[Group] = []
    for event_id, who in holders.items():
        event, at = c.event(event_id), last[event_id].at
        snap = planner.snapshot(event)
        now = {d["field"]: d["after"] for d in planner.changes({}, snap)}
        contacts = list(who.values())
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
            out.append(Group(f"{kind} of {event_id}", step, ev, extra, contacts))
    return out


def revision_mails(ws: Workspace) -> list[Mail]:
    """The mails of :func:`revision_groups`, one by one."""
    return [Mail(g.step, g.event, c, g.extra, g.label) for g in revision_groups(ws) for c in g.contacts]


def _signed(composer: Composer) -> tuple[bool, bool]:
    """Whether the recipients get ``links`` signed for them, and whether their
    ``campaign.unsubscribe_url`` is signed for them (the ``/u/`` link of ``links``, or
    ``unsubscribe.url`` with a token); otherwise both are the same for every recipient."""
    c = composer.campaign
    links = bool(composer._secret) and web_url(c) is not None
    unsub = c.unsubscribe
    return links, links or bool(composer._secret and unsub and unsub.url)


#: Stands for a per-recipient link where only its truth (and that it is a text) counts
#: (:meth:`Analysis.link_keys`): every signed link is a non-empty text.
_SOME_LINK = "https://mailer-check.invalid/link"
_SOME_LINKS = {f.name: _SOME_LINK for f in dataclasses.fields(Links)}


class _Classes:
    """Recipients that a template renders alike.

    A shape (:func:`shape_of`) is the label, template and language folder, the contact's
    language, time zone, zones and CSV columns, and the results of the template's keys.

    Keys that read no ``contact`` variable (:meth:`Analysis.split`) and no value of a link
    signed per recipient (:meth:`Analysis.link_keys`) are the same for every recipient with
    the same zones, so they are left out. Each contact's *class* is its language, time zone,
    zones, CSV columns and the results of every other key that reads a ``contact`` variable
    and no link's value, in any template of the campaign, each distinct expression computed
    once per contact (the per-recipient links by a stand-in: those keys take their truth
    only). A mail's key is its label, template and language folder and the part of its
    contact's class that the template's keys read, made once per class and template; plus,
    where the template has keys that read a link's value, their results for this mail,
    computed with its real links. That is exactly its shape. A template (language) that makes
    every recipient its own shape keys on the contact itself."""

    def __init__(self, composer: Composer, shapes: Shapes, templates: Sequence[str]) -> None:
        self.composer, self.shapes = composer, shapes
        self.links, self.unsub = _signed(composer)
        self.classes: dict[Hashable, int] = {}
        self.sigs: list[tuple[tuple[Hashable, ...], tuple[Hashable, ...]]] = []  # class -> (tail, results)
        self.class_of: dict[int, int] = {}  # id(contact) -> its class
        self.each: dict[tuple[str, str | None], bool] = {}  # (template, contact language)
        self.evaluators: list[Callable[[Callable[[str], Any]], Hashable]] = []
        self.positions: dict[tuple[str, str], tuple[int, ...]] = {}  # its keys' places in results
        #: (template, language folder) -> evaluators of its keys that read a link's value
        self.linked: dict[tuple[str, str], list[Callable[[Callable[[str], Any]], Hashable]]] = {}
        self.keyed: dict[str, dict[int, int]] = {}  # template -> class -> shape
        self.ids: dict[Hashable, int] = {}  # shape (but the label) -> its number
        ids: dict[Hashable, int] = {}
        for template in dict.fromkeys(templates):
            for lang in shapes.templates.languages(template):
                analysis = shapes.analysis(template, lang)
                split = None if analysis.exact else analysis.split()
                linked = analysis.link_keys() if split is not None and self.unsub else ()
                if linked:
                    self.linked[template, lang] = [analysis.evaluator(i) for i in linked]
                places = []
                for i in split[1] if split else ():
                    if i in linked:
                        continue
                    eid = analysis.expr_id(i)
                    if eid not in ids:
                        ids[eid] = len(self.evaluators)
                        self.evaluators.append(analysis.evaluator(i))
                    places.append(ids[eid])
                self.positions[template, lang] = tuple(places)

    def each_of(self, template: str, language: str | None) -> bool:
        """Whether ``template`` makes each contact of ``language`` its own shape."""
        each = self.each.get((template, language))
        if each is None:
            lang = self.shapes.templates.language_for(template, language)
            analysis = None if lang is None else self.shapes.analysis(template, lang)
            each = self.each[template, language] = analysis is not None and (
                analysis.exact or analysis.split() is None
            )
        return each

    def firsts(self, group: Group) -> dict[Hashable, Contact]:
        """The first contact of ``group`` of each shape, in order, by shape (a number for
        the template's part of a class, with the results of the keys that read a link's
        value where it has such keys; the contact itself where each is its own shape)."""
        template = group.step.template
        each_of: dict[str | None, bool] = {}
        linked_of: dict[str | None, list[Callable[[Callable[[str], Any]], Hashable]] | None] = {}
        class_of, classify, ids = self.class_of, self._classify, self.ids
        keyed = self.keyed.setdefault(template, {})
        found: dict[Hashable, Contact] = {}
        for contact in group.contacts:
            each = each_of.get(contact.language)
            if each is None:
                each = each_of[contact.language] = self.each_of(template, contact.language)
                lang = self.shapes.templates.language_for(template, contact.language)
                linked_of[contact.language] = None if lang is None else self.linked.get((template, lang))
            if each:
                found[("each", id(contact))] = contact
                continue
            cid = class_of.get(id(contact))
            if cid is None:
                cid = class_of[id(contact)] = classify(group, contact)
            shape: Hashable = keyed.get(cid)
            if shape is None:
                shape = keyed[cid] = ids.setdefault(self._project(template, cid), len(ids))
            linked = linked_of[contact.language]
            if linked:
                shape = (shape, self._linked(linked, group, contact))
            if shape not in found:
                found[shape] = contact
        return found

    def _linked(
        self, linked: list[Callable[[Callable[[str], Any]], Hashable]], group: Group, contact: Contact
    ) -> Hashable:
        """The results of the keys that read a link's value, for ``contact``'s mail of
        ``group``, with its real links (its own shape where they cannot be made: rendering
        reports that)."""
        try:
            links, unsub_url = _links_of(self.composer, group.event, contact)
        except (ValueError, UnicodeError):
            return ("each", id(contact))
        cv = contact_vars(self.composer.campaign, contact)
        base = self._campaign(group, contact)
        camp = base if unsub_url is None else {**base, "unsubscribe_url": unsub_url}

        def roots(name: str) -> Any:
            return cv if name == "contact" else links if name == "links" else camp

        return tuple([f(roots) for f in linked])

    def _campaign(self, group: Group, contact: Contact) -> dict[str, Any]:
        """``campaign`` of the template variables, as :func:`context` makes it."""
        base = self.shapes.campaigns.get(contact.zones)
        if base is None:  # the same for every step and event (mailer.templates.context)
            base = self.shapes.campaigns[contact.zones] = context(
                self.composer.campaign, group.event, group.step, contact
            )["campaign"]
        return base

    def _project(self, template: str, cid: int) -> Hashable:
        tail, results = self.sigs[cid]
        lang = self.shapes.templates.language_for(template, tail[0])  # type: ignore[arg-type]
        if lang is None:
            return (template, None, tail)
        return (template, lang, tail, tuple([results[p] for p in self.positions.get((template, lang), ())]))

    def _classify(self, group: Group, contact: Contact) -> int:
        cv = contact_vars(self.composer.campaign, contact)
        links = _SOME_LINKS if self.links else None
        camp = self._campaign(group, contact)
        if self.unsub:  # a stand-in: the keys computed here take only its truth
            camp = {**camp, "unsubscribe_url": _SOME_LINK}

        def roots(name: str) -> Any:
            return cv if name == "contact" else links if name == "links" else camp

        tail = (contact.language, contact.timezone, tuple(contact.fields), contact.zones)
        results = tuple([f(roots) for f in self.evaluators])
        cid = self.classes.setdefault((tail, results), len(self.classes))
        if cid == len(self.sigs):
            self.sigs.append((tail, results))
        return cid


def _unsignable(composer: Composer, groups: Sequence[Group]) -> list[Problem]:
    """One problem per distinct reason a recipient's links cannot be signed, naming the
    first recipient (contact file and row) and how many.

    What :mod:`mailer.links` builds for a recipient depends on the campaign, the secret, the
    event, the recipient's language (the add-to-calendar links, cached per event and
    language: built for the first mail of every shape, which :func:`_render` checks) and the
    address, through the tokens. Every token of an address (:func:`mailer.tokens.sign`) signs
    the same :func:`~mailer.addresses.address_key` with the same checks, so signing one
    (the unsubscribe token, in every recipient's links) for every address finds every
    address that no link can be made for. Contact lists only hold addresses that
    email-validator accepts (no NUL, no unpaired surrogate), so none is expected: about 7 µs
    an address, to stay sure."""
    secret, campaign_id = composer._secret, composer.campaign.id
    if not secret:
        return []
    found: dict[str, list[Any]] = {}  # message -> [first contact, how many]
    seen: set[int] = set()
    for g in groups:
        for contact in g.contacts:
            if id(contact) in seen:
                continue
            seen.add(id(contact))
            try:
                unsubscribe.token(secret, campaign_id, contact.email)
            except (ValueError, UnicodeError) as exc:
                found.setdefault(str(exc), [contact, 0])[1] += 1
    out = [
        Problem(
            first.file,
            f"the signed links of {first.email} cannot be made: {message} ({count} recipient(s) "
            "like it); correct the address",
            row=first.row,
        )
        for message, (first, count) in found.items()
    ]
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
        composer = Composer(c, ws.templates, unsubscribe_secret=PLACEHOLDER_SECRET)
    # A template (or one language of it) with a blocking problem is already reported; rendering
    # it for every recipient would only repeat that. Decided on the problems' fields, never on
    # their text (issue 11 item 7).
    broken = {(p.template, p.language) for p in ws.blocking if p.template is not None}
    # One render per shape (mailer.shapes), in the order of each shape's first mail: the
    # problems, and the recipient each names, are those of rendering every mail in order.
    groups = step_groups(ws) + revision_groups(ws)
    total = sum(len(g.contacts) for g in groups)
    shapes = Shapes(ws.templates)
    firsts: dict[Hashable, Mail] = {}
    done = 0
    classes = _Classes(composer, shapes, [g.step.template for g in groups])
    for g in groups:  # labels differ between groups: a shape of one group is its own
        for shape, contact in classes.firsts(g).items():
            firsts[g.label, shape] = Mail(g.step, g.event, contact, g.extra, g.label)
        done += len(g.contacts)
        if progress is not None:
            progress(done // 2, total)
    if classes.unsub:
        problems += _unsignable(composer, groups)
    mails_count = total
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
            progress(mails_count // 2 + mails_count * i // (2 * len(reps)), mails_count)
    return problems

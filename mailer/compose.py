"""From a due delivery to the exact bytes sent: render, calendar, MIME (pure, cached per step)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from . import bounces, ics, message, unsubscribe
from .addresses import address_key
from .config import Campaign, Event, Step
from .contacts import Contact
from .errors import ConfigError, MailerError, Problem
from .links import Links, links_for
from .planner import changes as planner_changes
from .stencil import Stencils, enabled_by_env
from .templates import Rendered, Templates, context
from .vocab import StepKind

if TYPE_CHECKING:
    from .dkim import Signer

__all__ = ["Composed", "Composer", "compose_batch", "init_worker"]


@dataclass(frozen=True)
class Composed:
    message_id: str
    recipient: str
    subject: str
    data: bytes


class Composer:
    """Builds mails; the per-event calendar prototype is built once and reused for every
    recipient (issue "Throughput": the email package and icalendar are the slow parts)."""

    def __init__(
        self,
        campaign: Campaign,
        templates: Templates,
        revisions: Mapping[str, tuple[int, str, str]] | None = None,
        snapshots: Mapping[tuple[str, int], str] | None = None,
        *,
        unsubscribe_secret: str | None = None,
        answers: Mapping[tuple[str, str], str] | None = None,
        signer: Signer | None = None,
        stencil: bool | None = None,
    ) -> None:
        """:param revisions: the ledger's latest revision per event (for SEQUENCE).
        :param snapshots: every revision's snapshot (for the ``changes`` of an update).
        :param answers: the ledger's answers, ``{(event, address_key): PARTSTAT}``
            (``Ledger.answers``): :meth:`answer` reads them when a delivery is claimed.
        :param unsubscribe_secret: signs the recipients' links (:mod:`mailer.links`) when the
            campaign has ``web.url``, else the one-click link of ``unsubscribe.url``
            (:func:`mailer.tokens.secret_from`: MAILER_WEB_SECRET, else MAILER_UNSUBSCRIBE_SECRET).
        :param signer: adds the DKIM signatures (``dkim:``, :func:`mailer.dkim.load_signer`).
        :param stencil: render through :class:`mailer.stencil.Stencils` (the same bytes, about
            a third of the CPU); None: unless ``MAILER_STENCIL=off``.
        :raises ConfigError: ``unsubscribe.url`` is set but there is no secret."""
        unsub = campaign.unsubscribe
        if unsub is not None and unsub.url and not unsubscribe_secret:
            raise ConfigError(
                [
                    Problem(
                        str(campaign.config_path.name),
                        "unsubscribe.url is set but MAILER_WEB_SECRET (or MAILER_UNSUBSCRIBE_SECRET) is not; "
                        "set it to a long "
                        "random string (the links are signed with it)",
                        field="unsubscribe.url",
                    )
                ]
            )
        self._secret = unsubscribe_secret
        self.signer = signer
        self.campaign = campaign
        self.templates = templates
        self._seq = {ev: rev[0] for ev, rev in (revisions or {}).items()}
        self._snapshots = dict(snapshots or {})
        self._answers = answers or {}
        self._protos: dict[tuple[str, str, int, datetime, str | None], ics.Prototype] = {}
        if stencil is None:
            stencil = enabled_by_env()
        self.stencils = Stencils(templates) if stencil else None

    def sequence(self, event_id: str) -> int:
        """The SEQUENCE every calendar object for this event carries now."""
        return self._seq.get(event_id, 0)

    def answer(self, event_id: str, email: str) -> str | None:
        """The answer the ledger knows from ``email`` for the event as it is now (``ACCEPTED``,
        ``TENTATIVE``, ``DECLINED``), or None: what a REQUEST to them carries (issue 13). An
        answer to an earlier SEQUENCE does not count (``Ledger.answers``): after an update the
        attendee is asked again. Read when the delivery is claimed and kept with the claim."""
        partstat = self._answers.get((event_id, address_key(email)))
        return partstat if partstat in ("ACCEPTED", "TENTATIVE", "DECLINED") else None

    @staticmethod
    def has_ics(step: Step) -> bool:
        return step.attach_ics or step.kind.revises

    def compose_due(
        self,
        step: Step,
        event: Event,
        contact: Contact,
        *,
        when: datetime,
        sequence: int,
        partstat: str | None = None,
    ) -> Composed:
        """Compose a planned delivery: invitations and reminders as configured, updates with
        the list of changes, cancellations with METHOD:CANCEL (RFC 5546 3.2.5). ``when``,
        ``sequence`` and ``partstat`` are the claim's (:class:`~mailer.store.Claimed`)."""
        return self.compose(
            step,
            event,
            contact,
            when=when,
            sequence=sequence,
            partstat=partstat,
            method="CANCEL" if step.kind is StepKind.CANCEL else "REQUEST",
            extra=self._revision_extra(step, event, sequence),
        )

    def render_due(self, step: Step, event: Event, contact: Contact, *, sequence: int) -> Rendered:
        """The templates of :meth:`compose_due`, rendered with the very same variables, and
        nothing else built (no calendar, no MIME): what the render gate checks.

        :raises TemplateError: the template fails for this contact.
        """
        return self.render(step, event, contact, extra=self._revision_extra(step, event, sequence))

    def _revision_extra(self, step: Step, event: Event, sequence: int) -> dict[str, object] | None:
        """``changes`` and ``sequence`` for an update or cancellation (None for other steps)."""
        if not step.kind.revises:
            return None
        before = self._snapshots.get((event.id, sequence - 1))
        after = self._snapshots.get((event.id, sequence))
        return {
            "changes": planner_changes(json.loads(before), json.loads(after)) if before and after else [],
            "sequence": sequence,
        }

    def message_id(self, step: Step, email: str) -> str:
        """Keyed with the secret when there is one (:func:`mailer.message.message_id`)."""
        return message.message_id(self.campaign.id, step.id, email, self.campaign.sender.domain, self._secret)

    def prototype(
        self,
        event: Event,
        method: Literal["REQUEST", "CANCEL"],
        sequence: int,
        dtstamp: datetime,
        language: str | None = None,
    ) -> ics.Prototype:
        """The calendar object of ``event`` minus the attendee: one per (event, method,
        sequence, dtstamp, reader's language), never one per recipient (issue 13)."""
        key = (event.id, method, sequence, dtstamp, language)
        proto = self._protos.get(key)
        if proto is None:
            if len(self._protos) > 256:  # dtstamps change per claim batch; keep this bounded
                self._protos.clear()
            proto = ics.prototype(
                self.campaign, event, method=method, sequence=sequence, dtstamp=dtstamp, language=language
            )
            self._protos[key] = proto
        return proto

    def compose(
        self,
        step: Step,
        event: Event,
        contact: Contact,
        *,
        when: datetime,
        sequence: int = 0,
        method: Literal["REQUEST", "CANCEL"] = "REQUEST",
        template: str | None = None,
        extra: dict[str, object] | None = None,
        partstat: str | None = None,
    ) -> Composed:
        """The complete message for ``contact``. ``when`` is the Date header and DTSTAMP: the
        time the delivery was claimed, so that a re-send after a crash is byte-identical.
        ``partstat``: the recipient's answer, which a REQUEST carries (see :meth:`answer`).

        :raises TemplateError: the template fails for this contact.
        """
        found = self.links_for(event, contact)
        unsub_url = found.unsubscribe if found else self._unsubscribe_url(contact)
        rendered = self.render(
            step, event, contact, template=template, extra=extra, unsub_url=unsub_url, found=found
        )
        payload = None
        if self.has_ics(step):
            proto = self.prototype(event, method, sequence, when, contact.language)
            payload = proto.for_attendee(contact.email, contact.name, partstat)
        mid = self.message_id(step, contact.email)
        data = message.build(
            campaign=self.campaign,
            to_email=contact.email,
            to_name=contact.name,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            language=rendered.language,
            message_id=mid,
            date=when,
            ics=payload,
            method=method,
            unsubscribe_url=unsub_url,
            unsubscribe_token=self._mailto_token(contact),
        )
        if self.signer is not None:
            data = self.signer.sign(data, when)  # t= is `when`: a re-send is byte-identical
        return Composed(mid, contact.email, rendered.subject, data)

    def render(
        self,
        step: Step,
        event: Event,
        contact: Contact,
        *,
        template: str | None = None,
        extra: Mapping[str, object] | None = None,
        unsub_url: str | None = None,
        found: Links | None = None,
    ) -> Rendered:
        """The subject and bodies of :meth:`compose` for ``contact``: the one place the
        template variables are put together, so the render gate checks what is sent.

        :raises TemplateError: the template fails for this contact.
        """
        ctx = context(self.campaign, event, step, contact)
        if found is None:
            found = self.links_for(event, contact)
        if found is not None:
            ctx["links"] = found.as_dict()
        if unsub_url is None:
            unsub_url = found.unsubscribe if found else self._unsubscribe_url(contact)
        if unsub_url is not None:
            ctx["campaign"] = {**ctx["campaign"], "unsubscribe_url": unsub_url}
        if extra:
            ctx.update(extra)
        if self.stencils is not None:
            return self.stencils.render(template or step.template, contact.language, ctx)
        return self.templates.render(template or step.template, contact.language, ctx)

    def links_for(self, event: Event, contact: Contact) -> Links | None:
        """The recipient's links to `mailer web` and the calendars (None without ``web.url`` or
        without a secret): the ``/u/<token>`` link then replaces ``unsubscribe.url``'s."""
        return links_for(self.campaign, self._secret, event, contact)

    def _mailto_token(self, contact: Contact) -> str | None:
        """The token of the ``mailto:`` unsubscribe for ``contact`` (None without
        ``unsubscribe.mailto`` or a secret: the mailto then carries none, as before issue 15)."""
        unsub = self.campaign.unsubscribe
        if not (self._secret and unsub and unsub.mailto):
            return None
        return bounces.unsubscribe_token(self._secret, self.campaign.id, contact.email)

    def _unsubscribe_url(self, contact: Contact) -> str | None:
        """The signed one-click link for ``contact`` (None without ``unsubscribe.url``)."""
        unsub = self.campaign.unsubscribe
        if not (self._secret and unsub and unsub.url):
            return None
        return unsubscribe.link(unsub.url, self._secret, self.campaign.id, contact.email)


# --------------------------------------------------------------------------------------
# A composing worker process: large passes render and build mails on the second core while
# the main process talks SMTP and writes the ledger (issue "Throughput").
# --------------------------------------------------------------------------------------

_WORKER: Composer | None = None

#: ``(step, event, contact, claimed_at, sequence, partstat)``: one mail to compose, with what
#: its claim fixed (:class:`~mailer.store.Claimed`).
Job = tuple[Step, Event, Contact, datetime, int, str | None]


def init_worker(
    campaign: Campaign,
    revisions: Mapping[str, tuple[int, str, str]],
    snapshots: Mapping[tuple[str, int], str],
    unsubscribe_secret: str | None,
    parent_pid: int | None = None,
    signer: Signer | None = None,
) -> None:
    """Process-pool initializer: the worker's own Composer, templates compiled once.

    The worker dies with the sending process (``parent_pid``): it must never outlive it,
    holding its stdout (``$(mailer send)`` would never return) and its memory.
    """
    global _WORKER
    if parent_pid is not None:
        _die_with(parent_pid)
    _WORKER = Composer(
        campaign,
        Templates(campaign.templates_dir, campaign.language),
        revisions,
        snapshots,
        unsubscribe_secret=unsubscribe_secret,
        signer=signer,
    )


def _die_with(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid`` has gone.

    The worker is a child of multiprocessing's forkserver, not of the sender; the forkserver
    exits when the sender dies, so: on Linux the kernel kills us when our parent (the
    forkserver) ends (PR_SET_PDEATHSIG); everywhere a watchdog thread checks once a second
    that the forkserver is still our parent and the sender still exists.
    """
    import os
    import signal
    import sys
    import threading
    import time

    forkserver = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread does it
            pass
        if os.getppid() != forkserver:  # the parent died before prctl took effect
            os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pragma: no cover - pid reused by another user's process
                os._exit(1)
            if os.getppid() != forkserver:
                os._exit(1)

    threading.Thread(target=watch, name="mailer-worker-watchdog", daemon=True).start()


def compose_batch(jobs: list[Job], composer: Composer | None = None) -> list[tuple[bytes, int] | str]:
    """Compose each job: the DATA payload and size of its message (:func:`message.data_payload`,
    ready for the transport), or the error text of a mail that cannot be built. Runs in the
    worker (``composer`` None) or inline; both give the same bytes."""
    comp = composer or _WORKER
    assert comp is not None, "init_worker() was not called"
    out: list[tuple[bytes, int] | str] = []
    for step, event, contact, when, seq, partstat in jobs:
        try:
            composed = comp.compose_due(step, event, contact, when=when, sequence=seq, partstat=partstat)
            out.append(message.data_payload(composed.data))
        except MailerError as exc:
            out.append(str(exc))
    return out

"""The schedules.yaml schema (pydantic): types, ranges and unknown keys rejected everywhere."""

from __future__ import annotations

import re
from typing import Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .times import parse_duration
from .urls import http_url
from .vocab import Answer, EventStatus, StepKind

__all__ = ["CampaignModel", "EventModel", "StepModel"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _email(value: str) -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid address: {exc}") from None


class _SenderModel(_Model):
    from_: str = Field(alias="from")
    name: str = ""
    reply_to: str | None = None
    organizer: str | None = None
    organizer_name: str | None = None
    #: The envelope sender per delivery (VERP, issue 15): ``bounces+TOKEN@domain``; README "Deliverability".
    bounces: str | None = None

    _check_from = field_validator("from_")(lambda cls, v: _email(v))
    _check_reply = field_validator("reply_to", "organizer", "bounces")(
        lambda cls, v: None if v is None else _email(v)
    )

    @field_validator("name", "organizer_name")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and ("\n" in v or "\r" in v):
            raise ValueError("must be on one line")
        return v


#: A language key of a per-language text: ``nl``, ``fr``, ``nl_BE`` (``nl-BE`` is accepted).
_LANGUAGE_KEY = r"^[A-Za-z]{2,3}(?:[_-][A-Za-z]{2})?$"


def _texts(value: str | dict[str, str] | None) -> str | dict[str, str] | None:
    """A plain text, or one text per language (issue 13): keys are languages, values not empty."""
    if not isinstance(value, dict):
        return value
    if not value:
        raise ValueError("give a text, or one per language ({nl: ..., fr: ...}), not an empty mapping")
    for key, text in value.items():
        if not re.fullmatch(_LANGUAGE_KEY, key):
            raise ValueError(f"{key!r} is not a language; write e.g. nl, fr, en or nl_BE")
        if not text:
            raise ValueError(f"the {key} text is empty")
    return value


class EventModel(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    #: title, location and description: one text for everyone, or one per language (issue 13).
    title: str | dict[str, str] = Field(min_length=1)
    start: str | None = None
    end: str | None = None
    date: str | None = None
    end_date: str | None = None
    location: str | dict[str, str] | None = None
    description: str | dict[str, str] | None = None
    url: str | None = None
    status: EventStatus = EventStatus.CONFIRMED
    uid: str | None = None
    #: TRANSP (issue 13): all-day and multi-day events show as free unless ``busy: true``.
    busy: bool | None = None

    _check_url = field_validator("url")(lambda cls, v: None if v is None else http_url(v))

    _check_texts = field_validator("title", "location", "description")(lambda cls, v: _texts(v))


class _AudienceModel(_Model):
    lists: list[str] = []
    tags: list[str] = []
    rsvp: list[Answer] = []


class StepModel(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    event: str
    template: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    at: str
    kind: StepKind | None = None
    audience: _AudienceModel = _AudienceModel()
    attach_ics: bool | None = None

    @field_validator("kind")
    @classmethod
    def _configurable(cls, v: StepKind | None) -> StepKind | None:
        if v is not None and v.revises:
            raise ValueError(
                f"kind {v.value!r} is not configured: mailer sends updates and cancellations itself "
                "when an event changes; use invitation or reminder"
            )
        return v


class _SmtpModel(_Model):
    host: str = "localhost"
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["starttls", "tls", "none"] = "starttls"
    ca_file: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    connections: int = Field(default=2, ge=1, le=64)
    rate: str | float | None = None
    per_hour: int | None = Field(default=None, ge=1)
    #: Issue 17: at most this many mails in any 24 hours, counted from the ledger's attempts.
    per_day: int | None = Field(default=None, ge=1)
    local_hostname: str | None = None
    #: With ``tls: none``, a login (MAILER_SMTP_USER) to a host other than loopback is refused
    #: unless this is true: the password would cross the network in clear text.
    allow_plaintext_login: bool = False
    #: The relay DKIM-signs for us (issue 15): `mailer check` then does not warn that DKIM is off.
    relay_signs: bool = False

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | float | None) -> float | None:
        if v is None:
            return None
        if isinstance(v, int | float):
            value = float(v)
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*", v)
            if not m:
                raise ValueError(f"{v!r} is not a rate; write e.g. 10/s or 300/min")
            value = float(m.group(1)) / (60.0 if m.group(2).startswith("m") else 1.0)
        if value <= 0:
            raise ValueError("rate must be above zero")
        return value


class _DeliveryModel(_Model):
    late_after: str = "1d"
    late_contacts: bool = True
    retry_base: str = "1m"
    retry_max: str = "1h"
    max_attempts: int = Field(default=10, ge=1)
    #: Issue 17: send hours ("08:00-20:00") and days ([mon, tue, ...]), in each recipient's zone.
    window: str | None = None
    days: list[str] | None = None

    @field_validator("late_after", "retry_base", "retry_max")
    @classmethod
    def _dur(cls, v: str) -> str:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _window(self) -> _DeliveryModel:
        from .pacing import Window

        if self.days is not None and self.window is None:
            raise ValueError("days needs a window too; write e.g. window: 08:00-20:00")
        if self.window is not None:
            Window.parse(self.window, self.days)
        return self


class _UnsubscribeModel(_Model):
    mailto: str | None = None
    url: str | None = Field(default=None, pattern=r"^https://\S+$")

    _check_mailto = field_validator("mailto")(lambda cls, v: None if v is None else _email(v))


class _WebModel(_Model):
    #: Where `mailer web` is reached (behind an HTTPS reverse proxy); links in mails start here.
    #: http:// is for a test or a local try; recipients' links go through HTTPS.
    url: str

    @field_validator("url")
    @classmethod
    def _base(cls, v: str) -> str:
        url = http_url(v)
        if "?" in url or "#" in url:
            raise ValueError("the web service's address takes no ?query or #fragment; give https://host/path")
        return url


class _DkimModel(_Model):
    """``dkim:``: sign every mail (README "DKIM"; mailer/dkim.py)."""

    selector: str = Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*$")
    domain: str | None = None  # default: the From domain
    key_file: str | None = None  # relative to schedules.yaml; else MAILER_DKIM_KEY[_FILE]
    ed25519_selector: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*$"
    )
    ed25519_key_file: str | None = None


class CampaignModel(_Model):
    campaign: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    name: str | None = None
    timezone: str
    language: str = Field(default="en", pattern=r"^[a-z]{2,3}(?:[_-][A-Za-z]{2})?$")
    sender: _SenderModel
    events: list[EventModel] = Field(min_length=1)
    steps: list[StepModel] = Field(min_length=1)
    contacts: list[str] = Field(min_length=1)
    templates: str = "templates"
    ledger: str = Field(default="mailer.db", min_length=1)
    smtp: _SmtpModel = _SmtpModel()
    delivery: _DeliveryModel = _DeliveryModel()
    unsubscribe: _UnsubscribeModel | None = None
    web: _WebModel | None = None
    dkim: _DkimModel | None = None
    update_template: str = Field(default="update", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cancel_template: str = Field(default="cancel", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @field_validator("contacts", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

"""Reusable checks that a mail and its calendar satisfy /work/shared/interop-checklist.md."""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import icalendar
import vobject

__all__ = ["CalendarSummary", "check_calendar", "check_message", "parse_calendar", "unfold"]

# Use from any test (tests/ is on sys.path under pytest's default import mode):
#     from interop import check_message
#     msg = check_message(raw_bytes)                        # an invitation (REQUEST)
#     msg = check_message(raw_bytes, expect_method="CANCEL")
#     msg = check_message(raw_bytes, expect_method=None)    # a mail without calendar
# Failures are AssertionErrors whose message starts with the checklist item, e.g. "[13]".

# Headers build() writes; anything else in a header block is a sign of injection.
KNOWN_HEADERS = frozenset(
    h.lower()
    for h in (
        "From To Subject Date Message-ID Reply-To MIME-Version Content-Language Auto-Submitted "
        "List-Unsubscribe List-Unsubscribe-Post Content-Type Content-Transfer-Encoding"
    ).split()
)
CORE_HEADERS = ("From", "To", "Date", "Message-ID", "Subject", "MIME-Version")  # item 15
_TEXT_OK = re.compile(r"(?:[^\\;,]|\\[\\;,nN])*")  # RFC 5545 3.3.11
_LOCAL_DT = re.compile(r"\d{8}T\d{6}")
_UTC_DT = re.compile(r"\d{8}T\d{6}Z")
_OFFSET = re.compile(r"[+-]\d{4}(\d{2})?")
_RRULE = re.compile(r"FREQ=YEARLY;BYMONTH=(1[0-2]|[1-9]);BYDAY=(-1|[1-4])(SU|MO|TU|WE|TH|FR|SA)")
# RFC 3986 characters only, every "%" starting an escape: what a URI (URL property) may hold.
_URI = re.compile(r"https?://(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_ANSWERS = ("NEEDS-ACTION", "ACCEPTED", "TENTATIVE", "DECLINED")


# --------------------------------------------------------------------------------------
# A small, strict iCalendar reader (independent of mailer.ics).
# --------------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    props: list[tuple[str, dict[str, list[str]], str]] = field(default_factory=list)
    children: list[Component] = field(default_factory=list)

    def all(self, name: str) -> list[tuple[str, dict[str, list[str]], str]]:
        return [p for p in self.props if p[0] == name]

    def one(self, name: str, where: str) -> tuple[str, dict[str, list[str]], str]:
        found = self.all(name)
        assert len(found) == 1, f"{where}: expected exactly one {name} in {self.name}, found {len(found)}"
        return found[0]

    def sub(self, name: str) -> list[Component]:
        return [c for c in self.children if c.name == name]


def unfold(ics: bytes) -> list[str]:
    """Content lines of a calendar: CRLF + one space/tab joins lines (RFC 5545 3.1)."""
    text = re.sub(rb"\r\n[ \t]", b"", ics).decode("utf-8")
    assert text.endswith("\r\n"), "[1] calendar must end with CRLF"
    return text[:-2].split("\r\n")


def parse_line(line: str) -> tuple[str, dict[str, list[str]], str]:
    """``NAME;P=v;Q="x,y":value`` -> (NAME, {P: [v], Q: ["x,y"]}, value), strict on quoting."""
    m = re.match(r"[A-Za-z0-9-]+", line)
    assert m, f"[10] bad content line {line!r}"
    name, i, params = m.group(0).upper(), m.end(), {}
    while i < len(line) and line[i] == ";":
        pm = re.match(r";([A-Za-z0-9-]+)=", line[i:])
        assert pm, f"[10] bad parameter in {line!r}"
        key, i, values = pm.group(1).upper(), i + pm.end(), []
        while True:
            if line[i : i + 1] == '"':
                end = line.index('"', i + 1)  # quoted-string: no DQUOTE inside (RFC 5545 3.1)
                values.append(line[i + 1 : end])
                i = end + 1
            else:
                vm = re.match(r'[^";:,]*', line[i:])
                assert vm is not None
                values.append(vm.group(0))
                i += vm.end()
            if line[i : i + 1] != ",":
                break
            i += 1
        params[key] = values
    assert line[i : i + 1] == ":", f"[10] parameter value with : ; or , not quoted in {line!r}"
    return name, params, line[i + 1 :]


def parse_calendar(ics: bytes) -> Component:
    """The component tree of a calendar (strict BEGIN/END nesting)."""
    stack = [Component("ROOT")]
    for line in unfold(ics):
        name, params, value = parse_line(line)
        if name == "BEGIN":
            comp = Component(value.upper())
            stack[-1].children.append(comp)
            stack.append(comp)
        elif name == "END":
            assert stack[-1].name == value.upper(), f"END:{value} closes {stack[-1].name}"
            stack.pop()
        else:
            stack[-1].props.append((name, params, value))
    assert len(stack) == 1, f"unclosed component {stack[-1].name}"
    root = stack[0]
    assert [c.name for c in root.children] == ["VCALENDAR"], "one VCALENDAR per file"
    return root.children[0]


def _unescape(value: str, what: str) -> str:
    assert _TEXT_OK.fullmatch(value), f"[10] {what} has an unescaped ; , or \\: {value!r}"
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def _mailto(value: str, what: str) -> str:
    assert value.lower().startswith("mailto:"), f"[9] {what} must be a mailto: URI, got {value!r}"
    return value[7:]


# --------------------------------------------------------------------------------------
# The calendar: items 1-11 plus three independent readers.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalendarSummary:
    """What the readers agreed on: UTC instants for timed events, dates for all-day ones."""

    uid: str
    summary: str
    location: str | None
    start: datetime | date
    end: datetime | date
    method: str
    sequence: int
    organizer: str
    attendees: tuple[str, ...]
    #: The recipient's PARTSTAT and RSVP as every reader reads them (issue 13).
    partstat: str = "NEEDS-ACTION"
    rsvp: bool = True
    transp: str = "OPAQUE"
    url: str | None = None


def _instant(value: Any) -> datetime | date:
    if isinstance(value, datetime):
        assert value.tzinfo is not None, "[8] a reader returned a floating time"
        return value.astimezone(UTC)
    assert isinstance(value, date)
    return value


def _rename_tzids(lines: list[str], vtz: dict[str, str]) -> bytes:
    """Give each VTIMEZONE a private TZID so readers must use its rules, not their own
    zone database (icalendar maps IANA names to zoneinfo; vobject caches by TZID)."""
    out = []
    for line in lines:
        for old, new in vtz.items():
            if line == f"TZID:{old}":
                line = f"TZID:{new}"
            line = line.replace(f";TZID={old}:", f";TZID={new}:")
            line = line.replace(f';TZID="{old}":', f";TZID={new}:")
        out.append(line)
    return ("\r\n".join(out) + "\r\n").encode()


def _read(ics: bytes, reader: str) -> tuple[str, str, str | None, Any, Any, tuple[Any, ...]]:
    """UID, SUMMARY, LOCATION, start, end and (ATTENDEE, PARTSTAT, RSVP, TRANSP, URL)."""
    if reader == "icalendar":
        ev: Any = icalendar.Calendar.from_ical(ics).walk("VEVENT")[0]
        loc = ev.get("LOCATION")
        att = ev["ATTENDEE"]
        url = ev.get("URL")
        return (
            str(ev["UID"]),
            str(ev["SUMMARY"]),
            None if loc is None else str(loc),
            ev["DTSTART"].dt,
            ev["DTEND"].dt,
            (
                str(att),
                str(att.params.get("PARTSTAT")),
                str(att.params.get("RSVP")),
                str(ev.get("TRANSP")),
                None if url is None else str(url),
            ),
        )
    vev = vobject.readOne(ics.decode("utf-8")).vevent
    loc = vev.location.value if hasattr(vev, "location") else None
    params = vev.attendee.params
    extra = (
        vev.attendee.value,
        params.get("PARTSTAT", [None])[0],
        params.get("RSVP", [None])[0],
        vev.transp.value if hasattr(vev, "transp") else "None",
        vev.url.value if hasattr(vev, "url") else None,
    )
    return vev.uid.value, vev.summary.value, loc, vev.dtstart.value, vev.dtend.value, extra


def check_calendar(
    ics: bytes,
    expect_method: str = "REQUEST",
    *,
    attendee: str | None = None,
    allow_organizer_attendee: bool = False,
    partstat: str | None = None,
    busy: bool | None = None,
) -> CalendarSummary:
    """Assert checklist items 1-11 on raw calendar bytes and that icalendar and vobject agree.

    Issue 13: the recipient's PARTSTAT is NEEDS-ACTION with RSVP=TRUE, or an answer
    (ACCEPTED, TENTATIVE, DECLINED) with RSVP=FALSE (``partstat``: the one expected); TRANSP is
    TRANSPARENT for all-day events and those of 24 hours or more, OPAQUE for others, unless
    ``busy`` says otherwise; a URL is an absolute http(s) URI in RFC 3986 characters.

    Readers: icalendar on the bytes as sent (it maps IANA TZIDs to zoneinfo), then icalendar
    and vobject on a copy whose TZIDs are renamed to a name unique to the VTIMEZONE's text,
    so both must use our VTIMEZONE rules (both readers also cache zones by TZID for the
    whole process, which a shared name would defeat). All three must give the same UTC
    start and end (or the same dates), UID, SUMMARY and LOCATION.

    :param attendee: if given, the ATTENDEE address that must be present (the recipient).
    :param allow_organizer_attendee: accept an ATTENDEE equal to the ORGANIZER (the
        documented case of inviting the organizer's own mailbox).
    :returns: what the readers agreed on (UTC start/end or dates, UID, ...).
    """
    assert isinstance(ics, bytes), "calendar must be bytes"
    # [1] CRLF only; [2] folding at 75 octets, never inside a UTF-8 character.
    assert b"\n" not in ics.replace(b"\r\n", b""), "[1] bare LF in calendar"
    assert b"\r" not in ics.replace(b"\r\n", b""), "[1] bare CR in calendar"
    assert ics.endswith(b"\r\n"), "[1] calendar must end with CRLF"
    for n, phys in enumerate(ics[:-2].split(b"\r\n"), 1):
        assert len(phys) <= 75, f"[2] physical line {n} is {len(phys)} octets > 75: {phys!r}"
        try:
            phys.decode("utf-8")
        except UnicodeDecodeError:
            raise AssertionError(f"[2] line {n} splits a UTF-8 character: {phys!r}") from None
        assert phys and not phys.startswith(b"\t"), f"[2] line {n}: empty or tab-folded"
    lines = unfold(ics)
    cal = parse_calendar(ics)

    # [3] one PRODID, VERSION:2.0, METHOD upper-case and as expected.
    cal.one("PRODID", "[3]")
    assert cal.one("VERSION", "[3]")[2] == "2.0", "[3] VERSION must be 2.0"
    method = cal.one("METHOD", "[3]")[2]
    assert method == method.upper(), f"[3] METHOD must be upper case: {method!r}"
    assert method == expect_method, f"[3] METHOD:{method}, expected {expect_method}"
    for p in cal.all("CALSCALE"):
        assert p[2] == "GREGORIAN", f"[3] CALSCALE:{p[2]}"
    events = cal.sub("VEVENT")
    assert len(events) == 1, f"one VEVENT per invitation, found {len(events)}"
    ev = events[0]

    # [4]-[7] UID, DTSTAMP in UTC, SEQUENCE, required properties, DTEND not DURATION.
    uid = _unescape(ev.one("UID", "[4]")[2], "UID")
    assert uid.strip(), "[4] empty UID"
    assert _UTC_DT.fullmatch(ev.one("DTSTAMP", "[5]")[2]), "[5] DTSTAMP must be UTC (...Z)"
    seq = ev.one("SEQUENCE", "[6]")[2]
    assert seq.isdigit(), f"[6] SEQUENCE must be an integer >= 0: {seq!r}"
    sequence = int(seq)
    summary = _unescape(ev.one("SUMMARY", "[7]")[2], "SUMMARY")
    for p in ev.all("DESCRIPTION"):
        _unescape(p[2], "DESCRIPTION")
    locs = [_unescape(p[2], "LOCATION") for p in ev.all("LOCATION")]
    assert len(locs) <= 1, "[7] at most one LOCATION"
    location = locs[0] if locs else None
    assert not ev.all("DURATION"), "[7] use DTEND, not DURATION"
    _, sp, sv = ev.one("DTSTART", "[7]")
    _, ep, evalue = ev.one("DTEND", "[7]")

    # [8] never floating: DATE, UTC, or TZID with a matching VTIMEZONE (RRULE, never RDATE).
    vtz = {_unescape(z.one("TZID", "[8]")[2], "TZID"): z for z in cal.sub("VTIMEZONE")}
    all_day = sp.get("VALUE") == ["DATE"]
    for what, params, value in (("DTSTART", sp, sv), ("DTEND", ep, evalue)):
        if all_day:
            assert params.get("VALUE") == ["DATE"], f"[7] {what} must be VALUE=DATE too"
            assert re.fullmatch(r"\d{8}", value), f"[7] {what};VALUE=DATE:{value}"
        elif "TZID" in params:
            assert _LOCAL_DT.fullmatch(value), f"[8] {what} with TZID must be local: {value}"
            assert params["TZID"][0] in vtz, f"[8] {what} TZID={params['TZID'][0]} has no VTIMEZONE"
        else:
            assert _UTC_DT.fullmatch(value), f"[8] {what}:{value} is floating (no TZID, no Z)"
    for name, z in vtz.items():
        obs = z.sub("STANDARD") + z.sub("DAYLIGHT")
        assert obs, f"[8] VTIMEZONE {name} has no STANDARD/DAYLIGHT"
        for o in obs:
            assert not o.all("RDATE"), f"[8] VTIMEZONE {name} uses RDATE (Outlook rejects it)"
            assert _LOCAL_DT.fullmatch(o.one("DTSTART", "[8]")[2]), f"[8] {name}: DTSTART local"
            for key in ("TZOFFSETFROM", "TZOFFSETTO"):
                assert _OFFSET.fullmatch(o.one(key, "[8]")[2]), f"[8] {name}: bad {key}"
            for r in o.all("RRULE"):
                assert _RRULE.fullmatch(r[2]), f"[8] {name}: RRULE {r[2]!r} not FREQ=YEARLY;BYMONTH;BYDAY"

    # [9] ORGANIZER and ATTENDEE mailto:, recipient with RSVP and NEEDS-ACTION.
    _, op, ov = ev.one("ORGANIZER", "[9]")
    organizer = _mailto(ov, "ORGANIZER")
    atts = ev.all("ATTENDEE")
    assert atts, "[7] at least one ATTENDEE"
    addresses = []
    assert len(atts) == 1, f"[9] one ATTENDEE per mail (the recipient), found {len(atts)}"
    for _, ap, av in atts:
        addr = _mailto(av, "ATTENDEE")
        addresses.append(addr)
        got = (ap.get("PARTSTAT") or [""])[0]
        assert got in _ANSWERS, f"[9] ATTENDEE {addr} PARTSTAT={got}"
        if method == "CANCEL":
            assert got == "NEEDS-ACTION", f"[9] ATTENDEE {addr} in a CANCEL: PARTSTAT={got}"
        if got == "NEEDS-ACTION":
            assert ap.get("RSVP") == ["TRUE"], f"[9] ATTENDEE {addr} needs RSVP=TRUE"
        else:  # issue 13: someone who answered is not asked again
            assert ap.get("RSVP") == ["FALSE"], f"[9] ATTENDEE {addr} answered {got}: RSVP=FALSE"
        if partstat is not None:
            assert got == partstat, f"[9] ATTENDEE {addr} PARTSTAT={got}, the ledger knows {partstat}"
        if not allow_organizer_attendee:
            assert addr.lower() != organizer.lower(), f"[9] the recipient {addr} is the ORGANIZER"
        for pp in (ap, op):
            assert all(len(v) == 1 for v in pp.values()), "[10] a parameter split on a comma"
    if attendee is not None:
        assert attendee.lower() in (a.lower() for a in addresses), (
            f"[9] recipient {attendee} is not an ATTENDEE ({addresses})"
        )

    # TRANSP (issue 13): all-day and multi-day events leave the attendee free unless busy.
    transp = ev.one("TRANSP", "[13.4]")[2]
    # URL (issue 13): absolute http(s), percent-encoded.
    urls = [p[2] for p in ev.all("URL")]
    assert len(urls) <= 1, "[13.5] at most one URL"
    for u in urls:
        assert _URI.fullmatch(u), f"[13.5] URL {u!r} is not an absolute http(s) URI in RFC 3986 characters"

    # [11] VALARM; [6] CANCEL rules.
    alarms = ev.sub("VALARM")
    for a in alarms:
        action = a.one("ACTION", "[11]")[2]
        a.one("TRIGGER", "[11]")
        if action == "DISPLAY":
            a.one("DESCRIPTION", "[11]")
    status = [p[2] for p in ev.all("STATUS")]
    if method == "CANCEL":
        assert status == ["CANCELLED"], f"[6] CANCEL needs STATUS:CANCELLED, got {status}"
        assert sequence >= 1, "[6] CANCEL must carry a raised SEQUENCE (>= 1)"
        assert not alarms, "[6] CANCEL must not carry a VALARM"
    else:
        assert status in ([], ["CONFIRMED"], ["TENTATIVE"]), f"[6] REQUEST with STATUS {status}"

    # Independent readers. icalendar reads the file as sent (IANA TZIDs -> zoneinfo); both
    # readers then read it with private TZIDs, which forces them to use our VTIMEZONE.
    private = {
        n: "X-CHECK-" + hashlib.sha1("\n".join(lines).encode() + n.encode()).hexdigest()[:16] for n in vtz
    }
    variants = [
        ("icalendar", ics),
        ("icalendar", _rename_tzids(lines, private)),
        ("vobject", _rename_tzids(lines, private)),
    ]
    readings = []
    for reader, data in variants:
        try:
            read = _read(data, reader)
        except Exception as exc:  # noqa: BLE001 - report which reader failed
            raise AssertionError(f"{reader} cannot read the calendar: {exc!r}") from exc
        readings.append((reader, read[:3], _instant(read[3]), _instant(read[4]), read[5]))
    first = readings[0]
    raw = (uid, summary, location)
    assert first[1] == raw, f"icalendar reads UID/SUMMARY/LOCATION {first[1]}, raw {raw}"
    rsvp_raw = atts[0][1].get("RSVP", [""])[0]
    want = (atts[0][2], atts[0][1]["PARTSTAT"][0], rsvp_raw, transp, urls[0] if urls else None)
    for who, *_, extra in readings:
        assert tuple(str(x).upper() if i == 2 else x for i, x in enumerate(extra)) == want, (
            f"{who} reads ATTENDEE/PARTSTAT/RSVP/TRANSP/URL {extra}, raw {want}"
        )
    for who, texts, start, end, _ in readings[1:]:
        assert texts == first[1], f"{who} reads UID/SUMMARY/LOCATION {texts}, icalendar {first[1]}"
        assert (start, end) == (first[2], first[3]), (
            f"{who} (via our VTIMEZONE) reads {start} - {end}, icalendar (zoneinfo) {first[2]} - {first[3]}"
        )
        assert type(start) is type(first[2]), f"{who}: all-day vs timed disagreement"
    assert first[3] > first[2], "[7] DTEND must be after DTSTART"
    long = isinstance(first[2], datetime) and first[3] - first[2] >= timedelta(hours=24)
    free = (all_day or long) if busy is None else not busy
    assert transp == ("TRANSPARENT" if free else "OPAQUE"), (
        f"[13.4] TRANSP:{transp} for an event {'all-day' if all_day else first[3] - first[2]} long (busy: {busy})"
    )
    return CalendarSummary(
        uid,
        summary,
        location,
        first[2],
        first[3],
        method,
        sequence,
        organizer,
        tuple(addresses),
        atts[0][1]["PARTSTAT"][0],
        rsvp_raw == "TRUE",
        transp,
        urls[0] if urls else None,
    )


# --------------------------------------------------------------------------------------
# The mail: items 12-18, then the calendar.
# --------------------------------------------------------------------------------------


def _header_block(raw: bytes, allow: frozenset[str]) -> dict[str, int]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    counts: dict[str, int] = {}
    for n, line in enumerate(head.split(b"\r\n"), 1):
        if line[:1] in (b" ", b"\t"):
            assert line.strip(), f"[16] header line {n} is whitespace only"
            continue
        m = re.match(rb"([!-9;-~]+):", line)
        assert m, f"[16] header line {n} is neither a header nor a continuation: {line!r}"
        name = m.group(1).decode().lower()
        assert name in allow, f"[16] unexpected header {name!r} (injection?): {line!r}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def check_message(
    raw: bytes,
    *,
    expect_method: str | None = "REQUEST",
    allow_headers: tuple[str, ...] = (),
    allow_organizer_attendee: bool = False,
    from_domain: str | None = None,
    partstat: str | None = None,
    busy: bool | None = None,
    title_subject: bool = False,
) -> EmailMessage:
    """Assert every checklist item on a complete message as sent (bytes, CRLF).

    :param expect_method: ``REQUEST`` or ``CANCEL`` for mails with an invitation, ``None``
        for mails without a calendar (then the tree is just multipart/alternative).
    :param allow_headers: extra top-level header names a caller adds (e.g. DKIM-Signature).
    :param allow_organizer_attendee: see :func:`check_calendar`.
    :param from_domain: if given, From must be on this domain (SPF/DKIM, item 15).
    :param partstat, busy: see :func:`check_calendar`.
    :param title_subject: the Subject must start with the event's title (SUMMARY), as
        Outlook/Exchange title the calendar entry after the Subject (issue 13).

    Issue 13, always: the recipient is spelled one way in ``To:`` and ATTENDEE, with an
    A-label domain unless the local part is not ASCII.
    :returns: the message parsed with ``policy.default``.
    """
    assert isinstance(raw, bytes), "message must be bytes"
    # [14] wire format: CRLF everywhere, no line over 998 octets, final CRLF for DATA.
    assert b"\n" not in raw.replace(b"\r\n", b""), "[14] bare LF on the wire"
    assert b"\r" not in raw.replace(b"\r\n", b""), "[14] bare CR on the wire"
    assert raw.endswith(b"\r\n"), "message must end with CRLF"
    for n, line in enumerate(raw.split(b"\r\n"), 1):
        assert len(line) <= 998, f"[14] wire line {n} is {len(line)} octets > 998"
    allow = KNOWN_HEADERS | {h.lower() for h in allow_headers}
    counts = _header_block(raw, allow)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, f"parser defects: {msg.defects}"

    # [15] exactly one of each core header; [16] no data line breaks; [18] Auto-Submitted.
    for h in CORE_HEADERS:
        assert counts.get(h.lower()) == 1, f"[15] need exactly one {h}, found {counts.get(h.lower(), 0)}"
    for h, n in counts.items():
        assert n == 1, f"[15] header {h} appears {n} times"
    for h, v in msg.items():
        assert "\r" not in str(v) and "\n" not in str(v), f"[16] {h} carries a line break: {v!r}"
    for h in ("bcc", "cc"):
        assert h not in counts, f"[16] {h} header present"
    assert len(msg["From"].addresses) == 1, "[15] From must be one address"
    if from_domain is not None:
        got = msg["From"].addresses[0].domain.lower()
        assert got == from_domain.lower(), f"[15] From is on {got}, not {from_domain}"
    assert len(msg["To"].addresses) == 1, "[15] To must be one address"
    mid = str(msg["Message-ID"])
    assert mid.isascii() and re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", mid), f"[15] Message-ID {mid!r}"
    assert msg["Date"].datetime is not None and msg["Date"].datetime.tzinfo, "[15] Date"
    assert str(msg["MIME-Version"]) == "1.0", "[15] MIME-Version: 1.0"
    assert str(msg["Auto-Submitted"]) == "auto-generated", "[18] Auto-Submitted: auto-generated"

    # [17] List-Unsubscribe with one-click POST when there is an https link (RFC 8058).
    if "List-Unsubscribe" in msg:
        links = re.findall(r"<([^<>]*)>", str(msg["List-Unsubscribe"]))
        assert links and all(u.startswith(("mailto:", "https://")) for u in links), (
            f"[17] List-Unsubscribe links {links}"
        )
        https = any(u.startswith("https://") for u in links)
        post = msg.get("List-Unsubscribe-Post")
        if https:
            assert str(post) == "List-Unsubscribe=One-Click", "[17] https link needs one-click POST"
        else:
            assert post is None, "[17] List-Unsubscribe-Post without an https link"
    else:
        assert "List-Unsubscribe-Post" not in msg, "[17] List-Unsubscribe-Post alone"

    # [12]-[14] MIME tree, order, encodings; [13] identical calendar copies; [3] METHOD.
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    for p in leaves:
        payload = p.get_payload(decode=True)
        assert isinstance(payload, bytes)
        cte = p.get("Content-Transfer-Encoding", "7bit").lower()
        if not payload.isascii():
            assert cte in ("base64", "quoted-printable"), f"[14] non-ASCII {p.get_content_type()} as {cte}"
        if p.get_content_maintype() == "text":
            assert (p.get_content_charset() or "").lower() == "utf-8", "text parts must be utf-8"
            payload.decode("utf-8")

    def tree(p: EmailMessage) -> tuple[str, list[Any]]:
        return p.get_content_type(), [tree(c) for c in p.iter_parts()]  # type: ignore[arg-type]

    body: list[tuple[str, list[Any]]] = [("text/plain", []), ("text/html", [])]
    if expect_method is None:
        assert tree(msg) == ("multipart/alternative", body), f"[12] tree {tree(msg)}"
        return msg
    want = (
        "multipart/mixed",
        [("multipart/alternative", [*body, ("text/calendar", [])]), ("application/ics", [])],
    )
    assert tree(msg) == want, f"[12] MIME tree {tree(msg)}, expected {want}"
    alt, att = list(msg.iter_parts())
    inline = list(alt.iter_parts())[2]
    assert inline.get_param("method") == expect_method, (
        f"[3] text/calendar method={inline.get_param('method')}, expected {expect_method}"
    )
    assert str(inline.get_param("charset")).lower() == "utf-8", "text/calendar charset=UTF-8"
    assert inline.get_content_disposition() in (None, "inline"), "[12] text/calendar is inline"
    assert att.get_content_disposition() == "attachment", "application/ics is an attachment"
    assert str(att.get_filename()).endswith(".ics"), f"attachment filename {att.get_filename()}"
    assert str(att.get_param("name")).endswith(".ics"), "application/ics needs name=*.ics"
    ics = inline.get_payload(decode=True)
    assert isinstance(ics, bytes)
    assert att.get_payload(decode=True) == ics, "[13] the two calendar copies differ"
    to = msg["To"].addresses[0].addr_spec
    # A raw UTF-8 address (RFC 6532, SMTPUTF8) comes out of the parser surrogate-escaped.
    to = to.encode("utf-8", "surrogateescape").decode("utf-8")
    org_self = allow_organizer_attendee
    cal = check_calendar(
        ics, expect_method, attendee=to, allow_organizer_attendee=org_self, partstat=partstat, busy=busy
    )
    # Issue 13: one spelling of the recipient in the whole mail and its calendar.
    local, _, domain = to.rpartition("@")
    assert cal.attendees == (to,), f"[13.2] To: <{to}> but ATTENDEE {cal.attendees}"
    if local.isascii():
        assert domain.isascii(), f"[13.2] To: <{to}>: an ASCII local part goes with the A-label domain"
    if title_subject:
        subject = str(msg["Subject"])
        assert subject.startswith(cal.summary), (
            f"[13.6] Subject {subject!r} does not start with {cal.summary!r}"
        )
    return msg

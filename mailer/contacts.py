"""Contact lists: reading CSV files into validated, normalised, de-duplicated contacts."""

from __future__ import annotations

import codecs
import csv
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

from email_validator import EmailNotValidError, validate_email

from .csvcells import unprotect_row
from .errors import ContactsError, HasProblems, Problem, display_path
from .times import zone

__all__ = ["Contact", "ContactList", "InvalidContact", "load_contacts", "normalise_address"]


@dataclass(frozen=True, slots=True)  # slots: no __dict__ per contact (memory at 1,000,000)
class Contact:
    """One recipient. ``email`` is normalised (email-validator); ``fields`` holds every other
    CSV column (template variables), keys lower-cased with spaces turned into ``_``."""

    email: str
    name: str = ""
    language: str | None = None
    lists: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    fields: Mapping[str, str] = field(default_factory=dict)
    file: str = ""  # "contacts/partners.csv", as problems name it
    row: int | None = None  # the physical line the record starts on (the header is line 1)
    #: The contact's IANA time zone (``timezone`` column), None for the campaign's.
    timezone: str | None = None
    #: Every zone the contact files name (shared by all contacts): a mail names the event's
    #: zone when some contacts live elsewhere (see templates' ``when`` filter).
    zones: frozenset[str] = frozenset()

    @property
    def source(self) -> str:
        """Where the contact comes from, for people: ``contacts/partners.csv:row 4``."""
        return f"{self.file}:row {self.row}" if self.row is not None else self.file


@dataclass(frozen=True)
class InvalidContact:
    """A row whose address cannot be mailed. It is left out of sending and recorded in the
    ledger as ``invalid`` (with ``reason``) in every step whose lists/tags would include it, so
    staff see who was never invited and why. ``email`` is the address as written, trimmed."""

    email: str
    name: str
    reason: str
    lists: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()


@dataclass
class ContactList(HasProblems):
    """What loading gives: the usable contacts (sorted by email), the rows whose address cannot
    be used (:class:`InvalidContact`, in file order) and every problem found."""

    contacts: list[Contact]
    problems: list[Problem]
    invalid: list[InvalidContact] = field(default_factory=list)


# Header names (trimmed, lower-cased, inner whitespace collapsed) -> the column's role.
# Dutch and French aliases because the lists come from Flemish and Brussels spreadsheets.
_EMAIL_NAMES = ("email", "e-mail", "mail", "email address", "emailadres", "e-mailadres")
_ROLES: dict[str, str] = {
    **dict.fromkeys(_EMAIL_NAMES, "email"),
    **dict.fromkeys(("name", "naam", "nom", "full name"), "name"),
    **dict.fromkeys(("language", "lang", "taal", "langue"), "language"),
    **dict.fromkeys(("timezone", "time zone", "tz", "tijdzone", "fuseau horaire"), "timezone"),
    "lists": "lists",
    "tags": "tags",
}
_Severity = Literal["error", "warning"]
_EMPTY = "the file is empty; it needs a header row with an 'email' column and a row per contact"
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")  # as newline="" splits
_DELIMITERS = (",", ";", "\t")  # Excel in Belgium writes ';' (comma is the decimal sign)
_LABEL_SPLIT = re.compile(r"[;,|]")
_LANGUAGE = re.compile(r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{2}))?")  # as config.py's `language:`
_KEY_SEPARATORS = re.compile(r"[\s-]+")
# Anything that could end a mail header line (CR, LF, VT, FF, NEL, U+2028/9) or is invisible.
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n\x0b\x0c\x85\u2028\u2029]+[ \t]*")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")  # C0 (not tab) and DEL
_NAME_CONTROLS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")  # tab too: names go in headers
# The part of email-validator's syntax it accepts unchanged (RFC 5322 dot-atom), see _address.
_ATEXT = r"a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_ROLE_MAILBOXES = frozenset(  # RFC 2142 names email-validator lower-cases
    "info marketing sales support abuse noc security postmaster hostmaster usenet news "
    "webmaster www uucp ftp".split()
)

#: Longest cell, in characters, in the email, name, language, lists and tags columns, and in any
#: other column. A longer cell is the sign of rows read into one cell (an unclosed quote): the
#: whole file is refused rather than one contact's mail carrying the others' data (issue 12).
MAX_ROLE_CHARS = 1_000
MAX_CELL_CHARS = 10_000
#: Most lines one cell may span (a postal address fits). email, name, language, lists and tags
#: may not span lines at all, and no cell may have an email address on a line after its first.
MAX_CELL_LINES = 5
_BREAK = re.compile(r"\r\n|\r|\n")  # as newline="" splits records
_ADDRESS_LIKE = re.compile(r"[^\s@,;\"'<>()]+@[^\s@,;\"'<>()]+\.[^\s@,;\"'<>()]+")
_QUOTE_HINT = (
    'a quote (") opened in this row and not closed reads the next rows into one cell, and '
    "their data would go into this contact's mail"
)


class _Unusable(Exception):
    """The file cannot be read safely: one error at ``row``, and none of its rows is used."""

    def __init__(self, row: int, message: str, column: str = "") -> None:
        super().__init__(message)
        self.row, self.message, self.column = row, message, column


def load_contacts(paths: Iterable[Path], *, display_root: Path | None = None) -> ContactList:
    """Read contact CSV files into one de-duplicated list, sorted by email address.

    Never raises for bad data: a file that cannot be used at all gives one error and is
    skipped, a bad row gives an error and is skipped, and anything repaired on the way
    (encoding, line breaks in names, duplicates, odd languages) gives a warning. Problem
    locations look like ``contacts/partners.csv:row 4`` (the physical line of the record's
    first line; the header is line 1), with paths relative to ``display_root`` when given.
    """
    problems: list[Problem] = []
    by_email: dict[str, Contact] = {}
    invalid: dict[str, InvalidContact] = {}
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.resolve() in seen:  # the same file twice would only produce duplicate warnings
            continue
        seen.add(path.resolve())
        where = str(path) if display_root is None else display_path(path, display_root)
        text = _read_text(path, where, problems)
        if text is not None:
            kept = dict(by_email), dict(invalid)
            try:
                _parse(text, where, by_email, problems, invalid)
            except _Unusable as exc:  # none of the file's rows is used, not even those before
                problems.append(Problem(where, exc.message, exc.column, row=exc.row))
                by_email.clear()
                by_email.update(kept[0])
                invalid.clear()
                invalid.update(kept[1])
    contacts = sorted(by_email.values(), key=lambda c: c.email)
    zones = frozenset(c.timezone for c in contacts if c.timezone)
    if zones:  # only with a timezone column: the other files stay as fast as before
        contacts = [replace(c, zones=zones) for c in contacts]
    return ContactList(contacts, problems, list(invalid.values()))


def _read_text(path: Path, where: str, problems: list[Problem]) -> str | None:
    """The file's text, or None after reporting why it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(where, "file not found; check contacts: in schedules.yaml"))
        return None
    except OSError as exc:
        problems.append(Problem(where, f"cannot read the file ({exc.strerror or exc})"))
        return None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode text" export is UTF-16 with a BOM (and tab-separated).
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in data:
        problems.append(
            Problem(
                where,
                "contains NUL bytes, so it is not a CSV text file; "
                "export the sheet as 'CSV UTF-8' and use that file",
            )
        )
        return None
    try:
        return data.decode("utf-8-sig")  # "CSV UTF-8" from Excel starts with a BOM
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")  # plain "CSV" from Excel on Windows in Western Europe
    except UnicodeDecodeError:
        problems.append(Problem(where, "is neither UTF-8 nor Windows-1252 text; save it as UTF-8"))
        return None
    problems.append(
        Problem(where, "read as Windows-1252; save it as UTF-8 to silence this", severity="warning")
    )
    return text


def _parse(
    text: str,
    where: str,
    by_email: dict[str, Contact],
    problems: list[Problem],
    invalid: dict[str, InvalidContact],
) -> None:
    def report(row_no: int, message: str, fld: str = "", severity: _Severity = "warning") -> None:
        problems.append(Problem(where, message, fld, severity, row=row_no))

    # Counted on the header line rather than csv.Sniffer, which guesses unreliably from a single
    # line and gives up on a one-column file. Ties go to the comma.
    header_line = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = max(_DELIMITERS, key=header_line.count)
    # Lines are handed to csv lazily: io.StringIO would keep a 4-bytes-per-character copy of
    # the whole file (33 MB for 100,000 contacts; bench/README.md, finding 4).
    lines = (m.group(0) for m in _LINE.finditer(text))
    reader = csv.reader(lines, delimiter=delimiter, strict=False)
    line = 0  # physical lines consumed so far; the next record starts on the line after
    try:
        header: list[str] = []
        while not any(c.strip() for c in header):  # leading blank lines are not the header
            header, line = next(reader), reader.line_num
        # unprotect_row: `mailer export` writes a cell that starts with = + - @ (a formula to a
        # spreadsheet) as '=...; the value read back is the one exported (issue 12).
        header = unprotect_row(header)
        roles, fields, unnamed = _columns(header, line, report)
        if "email" not in roles:
            found = ", ".join(repr(c.strip()) for c in header if c.strip())
            hint = " The first line looks like data: add a header row above it." * ("@" in found)
            problems.append(
                Problem(
                    where,
                    f"no email column (found columns: {found}); name the "
                    f"column with the addresses 'email' (also accepted: "
                    f"{', '.join(_EMAIL_NAMES[1:])}).{hint}",
                )
            )
            return
        ncols, count = len(header), 0
        i_email, i_name, i_lang = roles["email"], roles.get("name"), roles.get("language")
        i_lists, i_tags, i_tz = roles.get("lists"), roles.get("tags"), roles.get("timezone")
        one_line = frozenset(roles.values())  # email, name, language, lists, tags
        for row in reader:
            row_no, line = line + 1, reader.line_num
            row = unprotect_row(row)
            if line > row_no or len(row) > ncols or max(map(len, row), default=0) > MAX_ROLE_CHARS:
                _check_cells(row, header, one_line, i_email, row_no, line)
            if len(row) != ncols:
                if len(row) > ncols and any(c.strip() for c in row[ncols:]):
                    report(
                        row_no,
                        f"{len(row)} cells but the header has {ncols} columns; extra "
                        f"cells ignored (a value with {delimiter!r} in it not quoted?)",
                    )
                row = row[:ncols] + [""] * (ncols - len(row))
            if unnamed and any(row[i].strip() for i in unnamed):
                unnamed = []  # say it once per file
                report(row_no, "a column without a header name has values; they are ignored")
            raw = row[i_email].strip()
            if not raw:
                if any(c.strip() for c in row):  # blank lines and Excel's ';;;;' rows are fine
                    report(row_no, "no email address; row skipped", "email")
                continue
            try:
                email = _address(raw)
            except EmailNotValidError as exc:
                # A warning, not an error: this one person cannot be mailed whatever happens,
                # and the rest of the list can. The ledger records them as invalid (issue 12).
                why = f"{raw!r} is not a usable email address ({str(exc).rstrip('.')})"
                report(row_no, f"{why}; left out, recorded as invalid", "email")
                invalid.setdefault(
                    raw,
                    InvalidContact(
                        raw,
                        _clean(row[i_name]) if i_name is not None else "",
                        f"{where}:row {row_no}: {why}; fix the row",
                        _labels(row[i_lists]) if i_lists is not None else frozenset(),
                        _labels(row[i_tags]) if i_tags is not None else frozenset(),
                    ),
                )
                continue
            name = row[i_name].strip() if i_name is not None else ""
            if _NAME_CONTROLS.search(name):
                # The name goes into the To: header, where a line break could inject headers.
                name = _LINE_BREAKS.sub(" ", name.replace("\t", " "))
                name = _NAME_CONTROLS.sub("", name).strip()
                report(
                    row_no,
                    f"name contained line breaks or control characters; replaced by spaces: {name!r}",
                    "name",
                )
            language = None
            if i_lang is not None and (lang_raw := row[i_lang].strip()):
                language = _language(lang_raw)
                if language is None:
                    report(
                        row_no,
                        f"{lang_raw!r} is not a language code like nl or nl_BE; the "
                        "campaign language is used",
                        "language",
                    )
            lists = _labels(row[i_lists]) if i_lists is not None else _NO_LABELS
            tags = _labels(row[i_tags]) if i_tags is not None else _NO_LABELS
            values = {key: _clean(row[i]) for i, key in fields}
            tz_name = None
            if i_tz is not None and (tz_raw := row[i_tz].strip()):
                tz_name = _timezone(tz_raw)
                if tz_name is None:
                    report(
                        row_no,
                        f"{tz_raw!r} is not a time zone; write an IANA name such as "
                        "America/New_York; the campaign time zone is used",
                        "timezone",
                    )
            contact = Contact(email, name, language, lists, tags, values, where, row_no, tz_name)
            count += 1
            # Mailbox providers treat the local part case-insensitively in practice, so
            # Jan@example.be and jan@example.be are one person and must get one mail.
            first = by_email.get(email.lower())
            by_email[email.lower()] = contact if first is None else _merge(first, contact)
            if first is not None:
                report(
                    row_no,
                    f"{email} is also at {first.source}; merged into that one (lists "
                    "and tags combined, first name, language and values kept)",
                    "email",
                )
        if count == 0 and not any(p.file == where and p.row is not None for p in problems):
            problems.append(Problem(where, "has a header row but no contacts", severity="warning"))
    except StopIteration:  # nothing but blank lines and delimiters
        problems.append(Problem(where, _EMPTY))
    except csv.Error as exc:  # e.g. "field larger than field limit (131072)"
        raise _Unusable(
            line + 1,
            f"cannot read the CSV from this row on ({exc}; the reader takes cells of at most "
            f"{csv.field_size_limit():,} characters): {_QUOTE_HINT}; close or remove "
            "the quote; no contact of this file is used until then",
        ) from None


def _check_cells(
    row: list[str], header: list[str], one_line: frozenset[int], email: int, first: int, last: int
) -> None:
    """Refuse a record that shows the signs of other rows read into it.

    :param email: the email column; ``one_line``: the columns that may not span lines.
    :param first: the record's first physical line; ``last`` its last.
    :raises _Unusable: a one-line column spans lines, a cell is too long or spans too many lines,
        a later line of a cell holds an email address (a swallowed row), or a row with more
        cells than the header has an address outside its email column (two rows on one line).
    """
    for i, cell in enumerate(row):
        column = " ".join(header[i].split()) if i < len(header) else ""
        name = repr(column) if column else f"number {i + 1}"
        if len(row) > len(header) and i != email and _ADDRESS_LIKE.search(cell):
            raise _Unusable(
                first,
                f"this row has {len(row)} cells for {len(header)} columns and an email address in "
                f"column {name}: two rows on one line (a line break lost)? Their data would go "
                "into one contact's mail; put each contact on its own line; no contact of this "
                "file is used until then",
                column,
            )
        limit = MAX_ROLE_CHARS if i in one_line else MAX_CELL_CHARS
        if len(cell) > limit:
            raise _Unusable(
                first,
                f"the cell in column {name} is {len(cell):,} characters long (at most {limit:,}): "
                f"{_QUOTE_HINT}; close or remove the quote, or shorten the cell; no contact of "
                "this file is used until then",
                column,
            )
        if last == first or not _BREAK.search(cell):
            continue
        lines = _BREAK.split(cell)
        why = ""
        if i in one_line:
            why = f"column {name} must be one line"
        elif len(lines) > MAX_CELL_LINES:
            why = f"{len(lines)} lines, at most {MAX_CELL_LINES}"
        elif any(_ADDRESS_LIKE.search(x) for x in lines[1:]):
            why = "an email address on a line after the first"
        if why:
            raise _Unusable(
                first,
                f"the cell in column {name} spans lines {first}-{last} ({why}): {_QUOTE_HINT}; "
                "close or remove the quote; no contact of this file is used until then",
                column,
            )


def _columns(
    header: list[str], line: int, warn: Callable[..., None]
) -> tuple[dict[str, int], list[tuple[int, str]], list[int]]:
    """Header cells -> roles (email, name, ...), template-variable fields, unnamed columns."""
    roles: dict[str, int] = {}
    fields: list[tuple[int, str]] = []
    unnamed: list[int] = []
    keys: set[str] = set()
    for i, cell in enumerate(header):
        title = " ".join(cell.split()).lower()
        if not title:
            unnamed.append(i)
            continue
        role = _ROLES.get(title) or _ROLES.get(title.replace("_", " "))  # email_address too
        key = role or _KEY_SEPARATORS.sub("_", title)
        if key in keys or key in roles:
            warn(line, f"column {cell.strip()!r} appears twice (as {key!r}); the later is ignored")
            continue
        if role:
            roles[role] = i
            continue
        if not key.isidentifier():
            warn(
                line,
                f"column {cell.strip()!r} gives the template variable {key!r}, which is "
                "not a valid name; rename the column to letters, digits and _ to use it",
            )
        keys.add(key)
        fields.append((i, key))
    return roles, fields, unnamed


@lru_cache(maxsize=65536)
def _domain(domain: str) -> tuple[str, int] | None:
    """email-validator's normalised form of a domain and its longest length in bytes (as IDNA
    ASCII or as UTF-8), or None if the library rejects it."""
    try:
        v = validate_email(f"x@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    return v.domain.lower(), max(len(v.ascii_domain), len(v.domain.encode()))


def _address(raw: str) -> str:
    """The normalised address, as ``validate_email(raw).normalized`` with a lower-case domain.

    Checking the domain costs most of validate_email's ~45 µs and contact lists share few
    domains, so a plain ASCII local part with a known-good domain is put together here
    (that is exactly what the library would return) and everything else goes to the library.
    """
    local, _, domain = raw.rpartition("@")
    if len(raw) < 200 and _DOT_ATOM.fullmatch(local) and local.lower() not in _ROLE_MAILBOXES:
        checked = _domain(domain)
        if checked is not None and len(local) + checked[1] < 200:
            return f"{local}@{checked[0]}"
    v = validate_email(raw, check_deliverability=False)
    return f"{v.local_part}@{v.domain.lower()}"


def normalise_address(raw: str) -> str:
    """An address in the form the ledger stores it (as contact lists are loaded).

    :raises ContactsError: not a valid address.
    """
    try:
        return _address(raw.strip())
    except EmailNotValidError as exc:
        # Not from a file: the address leads the message.
        raise ContactsError([Problem("", f"{raw}: not a valid address: {exc}")]) from None


@lru_cache(maxsize=1024)
def _language(raw: str) -> str | None:
    """``nl``, ``NL``, ``nl-BE``, ``nl_be`` -> ``nl`` / ``nl_BE``; None if not a language code."""
    m = _LANGUAGE.fullmatch(raw)
    if not m:
        return None
    return f"{m[1].lower()}_{m[2].upper()}" if m[2] else m[1].lower()


@lru_cache(maxsize=1024)
def _timezone(raw: str) -> str | None:
    """``America/New_York`` (any case) -> its IANA key; None if no such zone."""
    tz = zone(raw) or zone(_zone_keys().get(raw.lower(), ""))
    return tz.key if tz is not None else None


@lru_cache(maxsize=1)
def _zone_keys() -> dict[str, str]:
    return {key.lower(): key for key in zoneinfo.available_timezones()}


#: One empty set for every contact without lists or tags (``frozenset()`` makes a new 216-byte
#: object each time).
_NO_LABELS: frozenset[str] = frozenset()


@lru_cache(maxsize=4096)
def _labels(cell: str) -> frozenset[str]:
    """List or tag names from one cell: split on ; , or |, trimmed, lower-cased, empty dropped.
    Cached: contacts with the same cell share one set (a list's members mostly have the same
    few), ~270 bytes a contact less (issue 16: memory at 1,000,000 recipients)."""
    return frozenset(s for part in _LABEL_SPLIT.split(_clean(cell)) if (s := part.strip().lower()))


def _clean(value: str) -> str:
    """Trim a field value; line breaks become a space and other control characters (but tab)
    go, so that no value can carry a line break into a header or a NUL into the program."""
    value = value.strip()
    if _CONTROLS.search(value):
        value = _CONTROLS.sub("", _LINE_BREAKS.sub(" ", value))
    return value


def _merge(first: Contact, later: Contact) -> Contact:
    """``later`` folded into ``first``: lists and tags unioned, first non-empty values kept."""
    fields = dict(first.fields)
    for key, value in later.fields.items():
        if value and not fields.get(key):
            fields[key] = value
    return replace(
        first,
        name=first.name or later.name,
        language=first.language or later.language,
        timezone=first.timezone or later.timezone,
        lists=first.lists | later.lists,
        tags=first.tags | later.tags,
        fields=fields,
    )

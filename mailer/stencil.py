"""Render once per shape, fill per recipient (issue 16 target 6: composing costs two thirds Jinja).

Most of what differs between the recipients of one step is only *written* into the mail:
``{{ contact.name }}``, ``href="{{ links.accept }}"``, ``{{ campaign.unsubscribe_url }}``.
:mod:`mailer.shapes` (made for ``mailer check``) classifies every use of a per-recipient value
(``contact``, ``links``, ``campaign``) in a template and every file it extends, includes or
imports: plain output, a decision (whose result it lists as a key) or anything else (the
field's whole value is a key). A :class:`Stencils` renders a template once per *stencil key*
with each per-recipient text replaced by a sentinel, then writes every recipient's mail by
putting their texts where the sentinels came out, escaped as the template escaped the sentinel.

Which values are replaced (per mail): every non-empty ``str`` of ``contact`` (except
``timezone``, read by the date filters and the changes of an update), of ``links`` and
``campaign.unsubscribe_url``, unless the analysis lists that field's value as a key. Non-empty
strings are all true, as the sentinels are, so a plain truth test (``{% if links.accept %}``)
goes the same way; every other decision is checked per mail: the analysis' keys are computed
with the real values and with the sentinels, and the mail is rendered in full when they differ
(``',' in contact.name`` for "Peeters, Jan").

The stencil key is everything else the render reads: the template, the reader's language and
the whole template context with the sentinels in place of the replaced texts (values of types
that print exactly as their frozen form says only; any other value: a full render).

Guards, so that a stencil can never write anything but what the full render writes:

* a template the analysis cannot classify (``exact``): full render, always;
* a stencil is rendered twice, with two sentinel alphabets of different lengths and
  characters; both must come out as the same fixed texts with the same slots, every sentinel
  either untouched (a text template, ``str``) or escaped once (``markupsafe.escape``, an
  autoescaped HTML file), and no other private-use character of either alphabet anywhere (a
  value printed as a ``repr``, escaped twice, filtered, measured or cut would differ between
  the two renders); else that key renders in full;
* any exception while making a stencil: that key renders in full (the full render raises the
  real error, with its file and line);
* a template whose stencils are rarely reused (a key per recipient) stops using them.

The subject's whitespace is collapsed after filling (:func:`mailer.templates.finish`), as a
full render does. ``MAILER_STENCIL=off`` (or ``Composer(stencil=False)``) turns it all off.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Hashable, Mapping
from enum import Enum
from typing import Any

from markupsafe import escape

from .shapes import Shapes
from .templates import Rendered, Templates, finish

__all__ = ["Stencils", "enabled_by_env"]

#: At most this many texts replaced in one mail (the alphabet has 256 slot characters).
MAX_SLOTS = 256
_A = tuple(f"\ue000{chr(0xE100 + i)}&\ue001" for i in range(MAX_SLOTS))
_B = tuple(f"\uf000{chr(0xF100 + i)}&<'\uf001" for i in range(MAX_SLOTS))
_PARSE_A = re.compile("\ue000([\ue100-\ue1ff])(&|&amp;)\ue001")
_PARSE_B = re.compile("\uf000([\uf100-\uf1ff])(&<'|&amp;&lt;&#39;)\uf001")
_RAW = {"A": ("&", _PARSE_A, 0xE100), "B": ("&<'", _PARSE_B, 0xF100)}
_STRAY = re.compile("[\ue000-\ue1ff\uf000-\uf1ff]")
#: A stencil: per part, its fixed texts and between them the slots (value index, escaped).
Stencil = tuple[tuple[tuple[str, ...], tuple[tuple[int, bool], ...]], ...]
#: After this many stencils made for one template, it keeps using them only when each is
#: reused on average this many times.
_TRIAL, _REUSE = 32, 4
_CACHE_MAX = 4096


class _Unkeyable(Exception):
    """A value whose printed form its frozen form does not pin down."""


def enabled_by_env() -> bool:
    """False when ``MAILER_STENCIL`` is ``off``/``0``/``no``/``false`` (the safety valve)."""
    return os.environ.get("MAILER_STENCIL", "").strip().lower() not in ("off", "0", "no", "false")


_SCALARS = (type(None), bool, int, float)
_TIMES = (dt.datetime, dt.date, dt.time, dt.timedelta)


def _freeze(value: Any) -> Hashable:
    t = type(value)
    if t is str:
        return value  # type: ignore[no-any-return]
    if t is dict:
        items = []
        for k, v in value.items():
            if type(k) is not str:
                raise _Unkeyable
            items.append((k, _freeze(v)))
        return (dict, tuple(items))
    if t is list or t is tuple:
        return (t, tuple(_freeze(v) for v in value))
    if t in _SCALARS:
        return (t, value)
    if t in _TIMES:  # the repr names the zone (its key) and fold: two equal instants may print apart
        return (t, repr(value))
    if isinstance(value, Enum) and isinstance(value.value, str | int):
        return (t, value.name, value.value)
    raise _Unkeyable


def _allowed(root: str, key: str) -> bool:
    if root == "contact":
        return key != "timezone"
    return root == "links" or key == "unsubscribe_url"


def _field(node: Any) -> tuple[str, str] | None:
    """(root, key) of ``contact.x``, ``contact['x']`` or ``contact.get('x', ...)``."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
        return node.node.name, node.attr
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.node.name, node.arg.value
    if (
        isinstance(node, nodes.Call)
        and isinstance(node.node, nodes.Getattr)
        and node.node.attr == "get"
        and isinstance(node.node.node, nodes.Name)
        and node.args
        and isinstance(node.args[0], nodes.Const)
        and isinstance(node.args[0].value, str)
    ):
        return node.node.node.name, node.args[0].value
    return None


def _parse(text: str, alphabet: str) -> tuple[tuple[str, ...], tuple[tuple[int, bool], ...]] | None:
    """The fixed texts and slots of one rendered part; None when a stray character shows."""
    raw, pattern, base = _RAW[alphabet]
    texts: list[str] = []
    slots: list[tuple[int, bool]] = []
    at = 0
    for m in pattern.finditer(text):
        texts.append(text[at : m.start()])
        slots.append((ord(m[1]) - base, m[2] != raw))
        at = m.end()
    texts.append(text[at:])
    if any(_STRAY.search(t) for t in texts):
        return None
    return tuple(texts), tuple(slots)


class Stencils:
    """:meth:`Templates.render` through stencils (see the module docstring)."""

    def __init__(self, templates: Templates) -> None:
        self.templates = templates
        self.shapes = Shapes(templates)
        self._cache: dict[Hashable, Stencil | None] = {}
        self._keyed: dict[tuple[str, str], frozenset[tuple[str, str]] | None] = {}
        self._made: dict[tuple[str, str], list[int]] = {}  # [stencils made, mails filled]
        #: How many mails were filled from a stencil and how many rendered in full.
        self.filled = 0
        self.full = 0

    def _fields_keyed(self, name: str, lang: str) -> frozenset[tuple[str, str]] | None:
        """The fields whose values the analysis keys on (never replaced); None: no stencil."""
        key = (name, lang)
        if key not in self._keyed:
            analysis = self.shapes.analysis(name, lang)
            keyed: set[tuple[str, str]] | None = set()
            if analysis.exact:
                keyed = None
            else:
                for how, node in analysis.keys:
                    if how == "field":
                        found = _field(node)
                        if found is None:
                            keyed = None
                            break
                        keyed.add(found)  # type: ignore[union-attr]
            self._keyed[key] = None if keyed is None else frozenset(keyed)
        return self._keyed[key]

    def render(self, name: str, language: str | None, context: Mapping[str, Any]) -> Rendered:
        """What :meth:`Templates.render` gives, from a stencil when one fits."""
        out = self._stencilled(name, language, context)
        if out is None:
            self.full += 1
            return self.templates.render(name, language, context)
        self.filled += 1
        return out

    def _stencilled(self, name: str, language: str | None, context: Mapping[str, Any]) -> Rendered | None:
        lang = self.templates.language_for(name, language)
        if lang is None:
            return None
        made = self._made.setdefault((name, lang), [0, 0])
        if made[0] >= _TRIAL and made[1] < _REUSE * made[0]:
            return None  # stencils of this template are rarely reused: not worth making
        keyed = self._fields_keyed(name, lang)
        if keyed is None:
            return None
        values: list[str] = []
        where: list[tuple[str, str]] = []  # (root, key) of each replaced text
        sub = dict(context)
        for root in ("contact", "links", "campaign"):
            d = context.get(root)
            if type(d) is not dict:
                continue
            copy: dict[str, Any] | None = None
            for k, v in d.items():
                if type(v) is str and v and _allowed(root, k) and (root, k) not in keyed:
                    if len(values) >= MAX_SLOTS:
                        return None
                    if copy is None:
                        copy = dict(d)
                    copy[k] = _A[len(values)]
                    values.append(v)
                    where.append((root, k))
            if copy is not None:
                sub[root] = copy
        if not values:
            return None
        analysis = self.shapes.analysis(name, lang)
        if analysis.keys and analysis.shape(context.get) != analysis.shape(sub.get):
            return None  # a decision goes another way with the sentinels
        try:
            key: Hashable = (name, language, _freeze(sub))
        except _Unkeyable:
            return None
        if key in self._cache:
            stencil = self._cache[key]
        else:
            stencil = self._make(name, language, sub, where)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = stencil
            made[0] += 1
        if stencil is None:
            return None
        made[1] += 1
        parts = []
        for texts, slots in stencil:
            pieces = [texts[0]]
            for (i, escaped), text in zip(slots, texts[1:], strict=True):
                v = values[i]
                pieces.append(escape(v) if escaped else v)
                pieces.append(text)
            parts.append("".join(pieces))
        return finish((parts[0], parts[1], parts[2]), lang)

    def _make(
        self, name: str, language: str | None, sub: Mapping[str, Any], where: list[tuple[str, str]]
    ) -> Stencil | None:
        """The stencil of the context ``sub`` (sentinels of alphabet A at the fields ``where``);
        None when the two renders (alphabets A and B) do not agree exactly or rendering fails.
        The fields are swapped by place, never by value: a real value may look like a sentinel."""
        n = len(where)
        other = dict(sub)
        for root in {r for r, _ in where}:
            other[root] = dict(sub[root])
        for i, (root, k) in enumerate(where):
            other[root][k] = _B[i]
        try:
            a, lang_a = self.templates.render_parts(name, language, sub)
            b, lang_b = self.templates.render_parts(name, language, other)
        except Exception:  # noqa: BLE001 - the full render reports it
            return None
        out = []
        for part_a, part_b in zip(a, b, strict=True):
            pa, pb = _parse(part_a, "A"), _parse(part_b, "B")
            if pa is None or pa != pb or lang_a != lang_b or any(i >= n for i, _ in pa[1]):
                return None
            out.append(pa)
        return tuple(out)

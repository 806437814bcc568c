"""Which recipients' mails render alike: the "shape" of a recipient for one template (issue 16).

The render gate and `mailer check` must find every problem any recipient's mail would raise,
but rendering 600,000 mails one by one takes minutes. Two recipients of one step whose mails
take the same path through the template, with the same values wherever a value can change what
happens, raise the same problems (or none). So each template is rendered once per distinct
shape of recipient, and the problems found are those of every recipient of that shape.

What varies between the recipients of a step is ``contact`` (the CSV row), ``links`` (signed
per recipient) and ``campaign.unsubscribe_url`` (signed per recipient). The template's syntax
trees (every file it extends, includes or imports) are read, and each use of one of those is
classified, conservatively:

* **plain output** (``{{ contact.name }}``, or joined with ``~`` or picked by ``a if t else b``
  and then output, outside any macro, call, filter or set block): a text is written as it is;
  nothing can fail on its value, so the value is not part of the shape;
* **a decision** (``{% if x %}``, ``a or b``, ``not x``, ``',' in contact.name``,
  ``x is none``) on an expression built only of such values and constants: the expression's
  result (its truth, or the comparison's value) is part of the shape, not the value itself;
* a ``{% set v = ... %}`` of such a value makes ``v`` one too (when every ``set`` of ``v``
  assigns the same expression); its uses are classified the same way;
* **anything else** (a filter, a call, a method, a loop over it, an argument of a macro, an
  attribute of it, arithmetic): the values of every field it reads are part of the shape;
* ``contact`` as a whole passed to ``when``, ``zone_note``, ``in_zone`` or ``zone_name`` (they
  read its ``timezone`` only); anywhere else the recipient is its own shape (no saving, never
  a miss), as is every recipient of a template whose files are named by an expression.

With links signed per recipient (``web.url`` or ``unsubscribe.url`` and a secret), a link is
such a value too: written out, it is not part of the shape; where a key takes only its truth
(every signed link is a non-empty text) the key's result is the same for every recipient;
where a key reads its value (:meth:`Analysis.link_keys`) the key is computed per mail with
the real links (:mod:`mailer.gate`).

Always part of the shape: the template and language folder, the recipient's ``language`` (the
event's texts and the changes of an update are in it), ``timezone``, the names of the CSV
columns the row has (a missing one is an undefined variable) and whether links are made.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import nodes

from .templates import Templates

__all__ = ["Analysis", "Shapes"]

#: The variables that differ between the recipients of one step.
ROOTS = frozenset({"contact", "links", "campaign"})
#: Filters that read nothing of a contact passed to them but its ``timezone`` (mailer.templates).
_ZONE_FILTERS = frozenset({"when", "zone_note", "in_zone", "zone_name"})
#: A value written inside one of these is not written as is: the block's text is used as a value.
_CAPTURING = (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.AssignBlock)
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "lteq": operator.le,
    "gt": operator.gt,
    "gteq": operator.ge,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
_TESTS = frozenset({"defined", "undefined", "none", "string"})

Roots = Callable[[str], Any]


class _Missing(Exception):
    """A field the row does not have (StrictUndefined while rendering)."""


@dataclass
class Analysis:
    """What of a recipient decides how one template in one language renders.

    ``exact``: every recipient is its own shape. ``keys``: the expressions whose results (or
    the fields whose values) are part of the shape."""

    exact: bool = False
    keys: list[tuple[str, nodes.Node]] = field(default_factory=list)
    aliases: dict[str, nodes.Expr] = field(default_factory=dict)
    _fns: list[tuple[str, nodes.Node, Callable[[Roots], Any]]] | None = None
    _split: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    _links: tuple[int, ...] | None = None

    def _compile(self, node: nodes.Node) -> Callable[[Roots], Any]:
        """:meth:`_eval` of ``node`` as a function; the common shapes without the dispatch."""
        acc = _access(node)
        if acc is not None:
            root, key, get, default = acc

            return lambda roots: _read(roots(root), key, get, default)
        if isinstance(node, nodes.Name) and node.name in self.aliases:
            return self._compile(self.aliases[node.name])
        if isinstance(node, nodes.Name):
            name = node.name
            return lambda roots: roots(name)
        if isinstance(node, nodes.Const):
            const = node.value
            return lambda roots: const
        if isinstance(node, nodes.Compare) and len(node.ops) == 1:
            left, right, op = (
                self._compile(node.expr),
                self._compile(node.ops[0].expr),
                _COMPARE[node.ops[0].op],
            )
            return lambda roots: op(left(roots), right(roots))
        if isinstance(node, nodes.Or):
            a, b = self._compile(node.left), self._compile(node.right)
            return lambda roots: a(roots) or b(roots)
        if isinstance(node, nodes.And):
            a, b = self._compile(node.left), self._compile(node.right)
            return lambda roots: a(roots) and b(roots)
        if isinstance(node, nodes.Not):
            a = self._compile(node.node)
            return lambda roots: not a(roots)
        if isinstance(node, nodes.CondExpr) and node.expr2 is not None:
            test, yes, no = self._compile(node.test), self._compile(node.expr1), self._compile(node.expr2)
            return lambda roots: yes(roots) if test(roots) else no(roots)
        return lambda roots: self._eval(node, roots)

    def split(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The indices of the keys that read no ``contact`` variable (their results depend on
        ``links`` and ``campaign`` only) and of the others; None when a key reads the whole
        ``contact`` (no two recipients are then known to be alike). With ``links`` and
        ``campaign`` the same for every recipient (no signed link), the first keys' results
        are the same for all of them: :func:`mailer.gate.check_workspace` computes them once."""
        if self._split is None:
            fixed: list[int] = []
            varying: list[int] = []
            for i, (_, node) in enumerate(self.keys):
                reads = self._contact_reads(node)
                if reads is None:
                    return None
                (varying if reads else fixed).append(i)
            self._split = (tuple(fixed), tuple(varying))
        return self._split

    def link_keys(self) -> tuple[int, ...]:
        """The indices of the keys whose results depend on the *values* of the per-recipient
        links (``links.accept``, ``links['ics']``, ``campaign.unsubscribe_url``, ``links`` or
        ``campaign`` as a whole), not only on whether there are links.

        When links are signed per recipient (:mod:`mailer.links`), every link is a non-empty
        text (a URL that starts with the campaign's ``web.url``, ``webcal://`` or a calendar
        service's address; the ``unsubscribe.url`` with ``t=<token>`` added), and ``links`` is
        a dict with the same keys for every recipient. So where a key only takes the *truth*
        of a link (``{% if links.accept %}``, ``not campaign.unsubscribe_url``, ``a if
        campaign.unsubscribe_url else b``, the operands of ``and``/``or`` in such a test) or
        asks ``is defined``, ``is none`` or ``is string`` of it, its result is the same for
        every recipient whatever the link says: a stand-in link gives it exactly. Any other
        use (a comparison, ``in``, ``~`` in a test, a filter, the value itself) is listed
        here: :func:`mailer.gate.check_workspace` computes those keys per mail with the real
        links."""
        if self._links is None:
            self._links = tuple(
                i
                for i, (how, node) in enumerate(self.keys)
                if self._reads_link(node, how == "truth", frozenset())
            )
        return self._links

    def _reads_link(self, node: nodes.Node, truth: bool, seen: frozenset[str]) -> bool:  # noqa: PLR0911
        """Whether the result of ``node`` (its truth only, when ``truth``) depends on the value
        of a per-recipient link (see :meth:`link_keys`)."""
        acc = _access(node)
        if acc is not None:
            return _is_link(acc[0], acc[1]) and not truth
        if isinstance(node, nodes.Name):
            if node.name in self.aliases and node.name not in seen:
                return self._reads_link(self.aliases[node.name], truth, seen | {node.name})
            return node.name in ("links", "campaign") and not truth
        if isinstance(node, nodes.Const):
            return False
        if isinstance(node, nodes.Not):
            return self._reads_link(node.node, True, seen)
        if isinstance(node, nodes.And | nodes.Or):
            return self._reads_link(node.left, truth, seen) or self._reads_link(node.right, truth, seen)
        if isinstance(node, nodes.CondExpr):
            return (
                self._reads_link(node.test, True, seen)
                or self._reads_link(node.expr1, truth, seen)
                or (node.expr2 is not None and self._reads_link(node.expr2, truth, seen))
            )
        if isinstance(node, nodes.Test) and node.name in _TESTS and not node.args and not node.kwargs:
            inner = node.node
            bare = _access(inner) is not None or (
                isinstance(inner, nodes.Name) and inner.name in ("links", "campaign")
            )
            return not bare and self._reads_link(inner, False, seen)
        # a comparison, a concatenation, a tuple, anything else: every operand's value counts
        return any(self._reads_link(child, False, seen) for child in node.iter_child_nodes())

    def expr_id(self, i: int) -> Hashable:
        """Equal for two keys (of this or another analysis) that are the same expression with
        the same ``{% set %}`` aliases: their results for one recipient are equal too."""
        how, node = self.keys[i]
        used: dict[str, str] = {}
        todo = [node]
        while todo:
            n = todo.pop()
            if isinstance(n, nodes.Name) and n.name in self.aliases and n.name not in used:
                used[n.name] = repr(self.aliases[n.name])
                todo.append(self.aliases[n.name])
            todo += list(n.iter_child_nodes())
        return (how, repr(node), tuple(sorted(used.items())))

    def evaluator(self, i: int) -> Callable[[Roots], Hashable]:
        """The result of the key at ``i`` for one recipient, as :meth:`shape` gives it."""
        if self._fns is None:
            self.shape(lambda name: None, ())
        assert self._fns is not None
        how, node, fn = self._fns[i]
        truth = how == "truth"

        def result(roots: Roots) -> Hashable:
            try:
                value = fn(roots)
            except _Missing:
                return ("missing",)
            except Exception:  # noqa: BLE001 - as in shape()
                return self.shape(roots, (i,))[0]
            return bool(value) if truth else _frozen(value)

        return result

    def _contact_reads(self, node: nodes.Node) -> bool | None:
        """Whether ``node`` reads a ``contact`` variable; None: the whole ``contact``."""
        found = False
        todo: list[tuple[nodes.Node, frozenset[str]]] = [(node, frozenset())]
        while todo:
            n, seen = todo.pop()
            acc = _access(n)
            if acc is not None:
                found |= acc[0] == "contact"
                continue
            if isinstance(n, nodes.Name):
                if n.name == "contact":
                    return None
                if n.name in self.aliases and n.name not in seen:
                    todo.append((self.aliases[n.name], seen | {n.name}))
                continue
            todo += [(child, seen) for child in n.iter_child_nodes()]
        return found

    def shape(self, roots: Roots, which: tuple[int, ...] | None = None) -> tuple[Hashable, ...]:
        """The results of the keys (of those at the indices ``which``) for one recipient."""
        if self._fns is None:  # each expression compiled once into a Python function
            self._fns = [(how, node, self._compile(node)) for how, node in self.keys]
        out: list[Hashable] = []
        for how, node, fn in self._fns if which is None else [self._fns[i] for i in which]:
            try:
                value: Any = fn(roots)
                out.append(bool(value) if how == "truth" else _frozen(value))
            except _Missing:
                out.append(("missing",))
            except Exception:  # noqa: BLE001 - the mail will fail too: key on the values themselves
                out.append(
                    ("raises", tuple(_frozen(self._field_value(f, roots)) for f in self._fields(node)))
                )
        return tuple(out)

    # -- evaluation of the closed expressions (the subset :func:`_closed` admits) --------------

    def _field_value(self, node: nodes.Node, roots: Roots) -> Any:
        try:
            return self._eval(node, roots)
        except Exception:  # noqa: BLE001
            return ("missing",)

    def _fields(self, node: nodes.Node) -> Iterator[nodes.Node]:
        if _access(node) is not None:
            yield node
            return
        if isinstance(node, nodes.Name) and node.name in self.aliases:
            yield from self._fields(self.aliases[node.name])
            return
        for child in node.iter_child_nodes():
            yield from self._fields(child)

    def _eval(self, node: nodes.Node, roots: Roots) -> Any:  # noqa: PLR0911, PLR0912
        acc = _access(node)
        if acc is not None:
            root, key, get, default = acc
            return _read(roots(root), key, get, default)
        if isinstance(node, nodes.Const):
            return node.value
        if isinstance(node, nodes.Name):
            if node.name in self.aliases:
                return self._eval(self.aliases[node.name], roots)
            return roots(node.name)
        if isinstance(node, nodes.Tuple):
            return tuple(self._eval(x, roots) for x in node.items)
        if isinstance(node, nodes.List):
            return [self._eval(x, roots) for x in node.items]
        if isinstance(node, nodes.Not):
            return not self._eval(node.node, roots)
        if isinstance(node, nodes.And):
            left = self._eval(node.left, roots)
            return self._eval(node.right, roots) if left else left
        if isinstance(node, nodes.Or):
            left = self._eval(node.left, roots)
            return left if left else self._eval(node.right, roots)
        if isinstance(node, nodes.CondExpr):
            assert node.expr2 is not None
            return self._eval(node.expr1 if self._eval(node.test, roots) else node.expr2, roots)
        if isinstance(node, nodes.Concat):
            return "".join(str(self._eval(x, roots)) for x in node.nodes)
        if isinstance(node, nodes.Compare):
            left = self._eval(node.expr, roots)
            for op in node.ops:
                right = self._eval(op.expr, roots)
                if not _COMPARE[op.op](left, right):
                    return False
                left = right
            return True
        if isinstance(node, nodes.Test):
            if node.name in ("defined", "undefined"):
                try:
                    self._eval(node.node, roots)
                    found = True
                except _Missing:
                    found = False
                return found if node.name == "defined" else not found
            value = self._eval(node.node, roots)
            return value is None if node.name == "none" else isinstance(value, str)
        raise AssertionError(f"not a closed expression: {node!r}")  # pragma: no cover


def _frozen(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("unhashable", repr(value))
    return (type(value).__name__, value)


def _is_link(root: str, key: str) -> bool:
    """Whether ``root.key`` is a link signed per recipient (when links are)."""
    return root == "links" or (root == "campaign" and key == "unsubscribe_url")


def _read(value: Any, key: str, get: bool, default: Any) -> Any:
    """What an :func:`_access` of ``value`` gives: ``value.get(key, default)`` for a get, else
    ``value[key]``; :class:`_Missing` where the template would meet an undefined value."""
    if type(value) is not dict:
        raise _Missing
    if get:
        return value.get(key, default)
    if key not in value:
        raise _Missing
    return value[key]


def _access(node: nodes.Node) -> tuple[str, str, bool, Any] | None:
    """``contact.x``, ``contact['x']``, ``contact.get('x')`` or ``contact.get('x', 'y')``:
    (root, key, is a get, its default); None for anything else."""
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name in ROOTS:
        return node.node.name, node.attr, False, None
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name in ROOTS
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.node.name, node.arg.value, False, None
    if (
        isinstance(node, nodes.Call)
        and isinstance(node.node, nodes.Getattr)
        and node.node.attr == "get"
        and isinstance(node.node.node, nodes.Name)
        and node.node.node.name in ROOTS
        and not node.kwargs
        and node.dyn_args is None
        and node.dyn_kwargs is None
        and 1 <= len(node.args) <= 2
        and all(isinstance(a, nodes.Const) for a in node.args)
        and isinstance(node.args[0], nodes.Const)
        and isinstance(node.args[0].value, str)
    ):
        default = (
            node.args[1].value if len(node.args) == 2 and isinstance(node.args[1], nodes.Const) else None
        )
        return node.node.node.name, node.args[0].value, True, default
    return None


class _Analyser:
    def __init__(self, trees: list[nodes.Template]) -> None:
        self.parent: dict[int, nodes.Node] = {}
        self.capturing: set[int] = set()  # ids of nodes inside a macro, call, filter or set block
        self.names: dict[str, list[nodes.Name]] = {}
        self.assigns: dict[str, list[nodes.Node]] = {}
        self.result = Analysis()
        self.done_aliases: set[str] = set()
        uses_self = False
        for tree in trees:
            for node, inside in self._walk(tree, None, False):
                if isinstance(node, nodes.Name) and node.ctx == "load":
                    self.names.setdefault(node.name, []).append(node)
                    uses_self |= node.name in ("self", "super")
                if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
                    self.assigns.setdefault(node.target.name, []).append(node.node)
                if isinstance(node, nodes.Include | nodes.Import | nodes.FromImport) and inside:
                    self.result.exact = True  # its output would be captured in another file
        if uses_self:  # a block's text can be used as a value (self.title()|length)
            self.result.exact = True

    def _walk(
        self, node: nodes.Node, parent: nodes.Node | None, inside: bool
    ) -> Iterator[tuple[nodes.Node, bool]]:
        if parent is not None:
            self.parent[id(node)] = parent
        if inside:
            self.capturing.add(id(node))
        yield node, inside
        inner = inside or isinstance(node, _CAPTURING)
        for child in node.iter_child_nodes():
            yield from self._walk(child, node, inner)

    def run(self) -> Analysis:
        if self.result.exact:
            return self.result
        for root in sorted(ROOTS):
            for name in self.names.get(root, []):
                self._root(name)
                if self.result.exact:
                    return self.result
        unique: list[tuple[str, nodes.Node]] = []
        for key in self.result.keys:  # the same test in body.txt and body.html: once
            if key not in unique:
                unique.append(key)
        self.result.keys = unique
        return self.result

    def _root(self, name: nodes.Name) -> None:
        p = self.parent.get(id(name))
        if isinstance(p, nodes.Getattr) and p.attr == "get":
            call = self.parent.get(id(p))
            if isinstance(call, nodes.Call) and call.node is p and _access(call) is not None:
                self._use(call)
                return
        if isinstance(p, nodes.Getattr | nodes.Getitem) and _access(p) is not None:
            self._use(p)
            return
        if name.name == "contact" and isinstance(p, nodes.Filter) and p.name in _ZONE_FILTERS:
            if not p.kwargs and p.dyn_args is None and p.dyn_kwargs is None:
                return  # reads the timezone only, which is part of every shape
        self._use(name)

    def _use(self, t: nodes.Node) -> None:  # noqa: PLR0911
        """Classify one use of a value that differs between recipients."""
        p = self.parent.get(id(t))
        if isinstance(p, nodes.Output):
            if id(p) not in self.capturing:
                return
        elif isinstance(p, nodes.Concat):
            return self._use(p)
        elif isinstance(p, nodes.CondExpr):
            if p.test is t:
                return self._truth(t)
            return self._use(p)
        elif isinstance(p, nodes.And | nodes.Or):
            if p.left is t:
                self._truth(t)
            return self._use(p)
        elif isinstance(p, nodes.Not) or (isinstance(p, nodes.If) and p.test is t):
            return self._truth(t)
        elif isinstance(p, nodes.Operand):
            compare = self.parent.get(id(p))
            return self._value(compare, t)
        elif isinstance(p, nodes.Compare) or (isinstance(p, nodes.Test) and p.node is t):
            return self._value(p, t)
        elif isinstance(p, nodes.Assign) and p.node is t and isinstance(p.target, nodes.Name):
            return self._alias(p.target.name, t)
        self._full(t)

    def _truth(self, t: nodes.Node) -> None:
        """The truth of ``t`` decides what happens: it becomes part of the shape."""
        if self._closed(t):
            if not any(how == "truth" and node is t for how, node in self.result.keys):
                self.result.keys.append(("truth", t))
        elif isinstance(t, nodes.And | nodes.Or | nodes.Not):
            # ``links and event.status != 'cancelled'``: the truth of each operand that differs
            # between recipients decides it (the others are the same for every recipient).
            for operand in (t.node,) if isinstance(t, nodes.Not) else (t.left, t.right):
                if any(True for _ in self._reads(operand, set())):
                    self._truth(operand)
        else:
            self._full(t)

    def _value(self, p: nodes.Node | None, t: nodes.Node) -> None:
        if p is not None and self._closed(p):
            self.result.keys.append(("value", p))
        else:
            self._full(t)

    def _alias(self, name: str, t: nodes.Node) -> None:
        defs = self.assigns.get(name, [])
        if not defs or any(d != defs[0] for d in defs) or not isinstance(t, nodes.Expr):
            return self._full(t)
        if name in self.done_aliases:
            return None
        self.done_aliases.add(name)
        self.result.aliases[name] = t
        for load in self.names.get(name, []):
            self._use(load)
        return None

    def _full(self, t: nodes.Node) -> None:
        """Every field ``t`` reads is part of the shape; a whole root read: every recipient."""
        for node in self._reads(t, set()):
            if node is None:
                self.result.exact = True
                return
            self.result.keys.append(("field", node))

    def _reads(self, t: nodes.Node, seen: set[str]) -> Iterator[nodes.Node | None]:
        if _access(t) is not None:
            yield t
            return
        if isinstance(t, nodes.Name):
            if t.name in ROOTS:
                yield None
            elif t.name in self.result.aliases and t.name not in seen:
                yield from self._reads(self.result.aliases[t.name], seen | {t.name})
            return
        for child in t.iter_child_nodes():
            yield from self._reads(child, seen)

    def _closed(self, t: nodes.Node, seen: frozenset[str] = frozenset()) -> bool:  # noqa: PLR0911
        """Built of constants and per-recipient values only, with operations that
        :meth:`Analysis._eval` computes exactly as Jinja does."""
        if _access(t) is not None or isinstance(t, nodes.Const):
            return True
        if isinstance(t, nodes.Name):
            if t.name in ROOTS:
                return True
            alias = self.result.aliases.get(t.name)
            return alias is not None and t.name not in seen and self._closed(alias, seen | {t.name})
        if isinstance(t, nodes.Tuple | nodes.List):
            return all(self._closed(x, seen) for x in t.items)
        if isinstance(t, nodes.Not):
            return self._closed(t.node, seen)
        if isinstance(t, nodes.And | nodes.Or):
            return self._closed(t.left, seen) and self._closed(t.right, seen)
        if isinstance(t, nodes.CondExpr):
            return t.expr2 is not None and all(self._closed(x, seen) for x in (t.test, t.expr1, t.expr2))
        if isinstance(t, nodes.Concat):
            return all(self._closed(x, seen) for x in t.nodes)
        if isinstance(t, nodes.Compare):
            return all(o.op in _COMPARE and self._closed(o.expr, seen) for o in t.ops) and self._closed(
                t.expr, seen
            )
        if isinstance(t, nodes.Test):
            return (
                t.name in _TESTS
                and not t.args
                and not t.kwargs
                and t.dyn_args is None
                and t.dyn_kwargs is None
                and self._closed(t.node, seen)
            )
        return False


class Shapes:
    """The :class:`Analysis` of each template and language folder, made once."""

    def __init__(self, templates: Templates) -> None:
        self.templates = templates
        self._done: dict[tuple[str, str], Analysis] = {}
        #: ``campaign`` of the template variables by the contacts' zones (all else is the
        #: campaign's; the signed unsubscribe link is set per recipient).
        self.campaigns: dict[frozenset[str], dict[str, Any]] = {}

    def analysis(self, name: str, lang: str) -> Analysis:
        key = (name, lang)
        if key not in self._done:
            trees = self.templates.parsed(name, lang)
            self._done[key] = Analysis(exact=True) if trees is None else _Analyser(trees).run()
        return self._done[key]

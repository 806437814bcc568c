"""Facets of the deliveries table by campaign, step and status read from ``delivery_counts``
(issue 16, target 5).

Datasette counts a column facet with ``SELECT col, count(*) FROM (the filtered table) GROUP BY
col``: a scan of a million index entries per facet on a large ledger (0.07-0.4 s each; with
two or three on a page it missed 0.5 s). The ledger's triggers already keep
``delivery_counts`` (campaign, step, status, n) exact for every insert, update and delete
(schema 2), so when a facet is on one of those columns and the page is filtered only by
equality on those columns, the same numbers are one small GROUP BY over a few dozen rows.
Anything else (another column, another filter, ``_where``, ``_search``, ``_next`` pages, other
tables or databases) is left to Datasette's own column facet, unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["COUNTED", "SAFE_ARGS", "counted_filters", "facet_class"]

#: The deliveries columns ``delivery_counts`` counts by.
COUNTED = ("campaign", "step", "status")
#: Query-string arguments that change how a page looks, not which rows it counts.
SAFE_ARGS = frozenset(
    {
        "_facet",
        "_facet_size",
        "_size",
        "_sort",
        "_sort_desc",
        "_col",
        "_nocol",
        "_labels",
        "_nolabels",
        "_shape",
        "_json",
        "_nocount",
        "_nofacet",
        "_nosuggest",
        "_trace",
        "_dl",
        "_stream",
    }
)


def counted_filters(pairs: list[tuple[str, str]]) -> dict[str, str] | None:
    """The page's row filters as ``{column: value}`` when each is an equality on a
    :data:`COUNTED` column, given at most once; None when any argument filters otherwise.

    >>> counted_filters([("status", "failed"), ("_facet", "step")])
    {'status': 'failed'}
    >>> counted_filters([("step__exact", "invite")])
    {'step': 'invite'}
    >>> [counted_filters(p) for p in ([("event", "x")], [("status__in", "a,b")], [("_where", "1")],
    ...     [("status", "sent"), ("status", "failed")], [("_next", "5")])]
    [None, None, None, None, None]
    """
    out: dict[str, str] = {}
    for key, value in pairs:
        if key.startswith("_") and "__" not in key:
            if key not in SAFE_ARGS:
                return None
            continue
        column = key.removesuffix("__exact")
        if column not in COUNTED or column in out:
            return None
        out[column] = value
    return out


@lru_cache(maxsize=1)
def facet_class() -> type[Any]:
    """Datasette's ``ColumnFacet`` reading ``delivery_counts`` where it can (made on first use:
    Datasette is an optional dependency)."""
    from datasette.facets import ColumnFacet
    from datasette.utils import path_with_added_args, path_with_removed_args

    from .dashboard import DATABASE

    class CountsFacet(ColumnFacet):  # type: ignore[misc]
        """A column facet; for campaign, step and status of deliveries, from the counts."""

        _only: list[dict[str, Any]] | None = None

        def get_configs(self) -> list[dict[str, Any]]:
            configs: list[dict[str, Any]] = super().get_configs()
            return configs if self._only is None else self._only

        async def facet_results(self) -> tuple[list[dict[str, Any]], list[str]]:
            configs = self.get_configs()
            pairs = self.get_querystring_pairs()
            where = (
                counted_filters(pairs) if self.database == DATABASE and self.table == "deliveries" else None
            )
            mine = [c for c in configs if where is not None and _column(c) in COUNTED]
            theirs = [c for c in configs if c not in mine]
            by_name: dict[str, list[dict[str, Any]]] = {}
            timed_out: list[str] = []
            if theirs:
                self._only = theirs
                try:
                    results, timed_out = await super().facet_results()
                finally:
                    self._only = None
                for r in results:
                    by_name.setdefault(r["name"], []).append(r)
            size = self.get_facet_size()
            for config in mine:
                assert where is not None
                column = _column(config)
                terms = " AND ".join(f"{c} = ?" for c in where) or "1"
                rows = await self.ds.execute(
                    self.database,
                    f"SELECT {column} AS value, sum(n) AS count FROM delivery_counts WHERE {terms}"
                    f" GROUP BY {column} HAVING sum(n) > 0 ORDER BY count DESC, value LIMIT {size + 1}",
                    list(where.values()),
                    truncate=False,
                    custom_time_limit=self.ds.setting("facet_time_limit_ms"),
                )
                values = []
                for row in rows.rows[:size]:
                    selected = (column, str(row["value"])) in pairs
                    path = (
                        path_with_removed_args(self.request, {column: str(row["value"])})
                        if selected
                        else path_with_added_args(self.request, {column: row["value"]})
                    )
                    values.append(
                        {
                            "value": row["value"],
                            "label": row["value"],
                            "count": row["count"],
                            "toggle_url": self.ds.absolute_url(self.request, self.ds.urls.path(path)),
                            "selected": selected,
                        }
                    )
                by_name.setdefault(column, []).append(
                    {
                        "name": column,
                        "type": self.type,
                        "hideable": config["source"] != "metadata",
                        "toggle_url": self.ds.urls.path(
                            path_with_removed_args(self.request, {"_facet": column})
                        ),
                        "results": values,
                        "truncated": len(rows.rows) > size,
                    }
                )
            # in the order the metadata and the request name them, as Datasette shows them
            ordered = [by_name[n].pop(0) for n in map(_column, configs) if by_name.get(n)]
            return ordered, timed_out

    return CountsFacet


def _column(config: dict[str, Any]) -> str:
    inner = config["config"]
    return str(inner.get("column") or inner["simple"])

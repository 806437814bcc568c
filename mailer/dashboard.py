"""The staff dashboard: the delivery ledger served read-only in a browser through Datasette."""

from __future__ import annotations

import ipaddress
import os
import socket
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from markupsafe import Markup, escape

from . import dashboard_csv, staff_inbox
from . import dashboard_events as events
from .addresses import address_key
from .dashboard_guard import HOSTS_ENV, CsvCells, HostNames, is_csv_request
from .errors import MailerError
from .ledger import CURRENT_REPLY, Ledger

if TYPE_CHECKING:  # datasette is the optional extra mailer[dashboard]
    from datasette.app import Datasette

__all__ = [
    "ACCOUNT",
    "DATABASE",
    "EVENTS_PATH",
    "INBOX_PATH",
    "INSTALL_HINT",
    "MAX_ROWS",
    "PASSWORD_ENV",
    "Plan",
    "build_metadata",
    "create",
    "is_loopback",
    "local_time",
    "serve",
]

#: The name the ledger has in dashboard URLs (``/ledger/summary``), whatever its file name.
DATABASE = "ledger"
#: The staff's event pages: the list (also the home page) and ``/-/events/<campaign>/<event>``.
EVENTS_PATH = "/-/events"
#: The staff's list of mails the inbox could not match or read (issue 15).
INBOX_PATH = "/-/inbox"
Plan = events.Plan
#: Environment variable holding the password hash (``datasette hash-password`` prints one).
PASSWORD_ENV = "MAILER_DASHBOARD_PASSWORD_HASH"
#: The user name to log in with when a password is set.
ACCOUNT = "staff"
#: Rows a page (and a canned query's CSV) shows; the table CSV with _stream=on has them all.
MAX_ROWS = 1000
#: How to get the optional dependencies (Datasette and its password plugin).
INSTALL_HINT = "pip install 'mailer[dashboard]'"
_PLUGIN = "mailer-dashboard"
#: UTC text columns shown in local time on table pages (CSV and JSON keep them as stored).
_TIME_COLUMNS: dict[str, frozenset[str]] = {
    "deliveries": frozenset({"next_attempt", "due_at", "claimed_at", "sent_at", "created", "updated"}),
    "attempts": frozenset({"at"}),
    "suppressions": frozenset({"at"}),
    "revisions": frozenset({"at"}),
    "replies": frozenset({"at"}),
    "unmatched_replies": frozenset({"at"}),
}


def local_time(ts: str | None, tz: ZoneInfo) -> str | None:
    """A stored UTC timestamp as local time in ``tz``; anything else is returned unchanged.

    >>> local_time("2018-01-04T08:00:00Z", ZoneInfo("Europe/Brussels"))
    '2018-01-04 09:00:00 CET'
    >>> local_time("2018-07-04T08:00:00Z", ZoneInfo("Europe/Brussels"))
    '2018-07-04 10:00:00 CEST'
    >>> local_time(None, ZoneInfo("UTC")) is None
    True
    >>> local_time("yesterday", ZoneInfo("UTC"))
    'yesterday'
    """
    if not isinstance(ts, str) or len(ts) != 20 or ts[10] != "T" or ts[19] != "Z":
        return ts
    return _local_time(ts, tz)


@lru_cache(maxsize=4096)
def _local_time(ts: str, tz: ZoneInfo) -> str:
    # fromisoformat is C code, about 30 times faster than strptime: a canned query may
    # convert a thousand rows per page (sends in one batch share their second: the cache).
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise MailerError(
            f"unknown time zone {timezone!r}; use an IANA name such as Europe/Brussels"
        ) from None


def build_metadata(timezone: str) -> dict[str, Any]:
    """The Datasette metadata (titles, descriptions, hidden tables, canned queries) with the
    time zone named in the texts and passed to the ``local_time`` SQL function.

    :raises MailerError: ``timezone`` is not an IANA name.
    """
    _zone(timezone)
    text = resources.files("mailer").joinpath("dashboard_metadata.yaml").read_text("utf-8")
    metadata: dict[str, Any] = _fill(
        yaml.safe_load(text),
        {"{timezone}": timezone, "{max_rows}": str(MAX_ROWS)},
        # Into SQL go only our own constants, never a value a user typed.
        {"{current_reply}": CURRENT_REPLY},
    )
    metadata["plugins"] = {_PLUGIN: {"timezone": timezone}}
    return metadata


def _fill(node: Any, values: dict[str, str], sql_values: dict[str, str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, sql_values, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, sql_values) for v in node]
    if isinstance(node, str):
        for placeholder, value in (sql_values if key == "sql" else values).items():
            safe = str(escape(value)) if key.endswith("_html") else value
            node = node.replace(placeholder, safe)
    return node


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost).

    >>> [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "example.org")]
    [True, True, True, False, False]
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_ledger(db: Path, metadata: dict[str, Any] | None = None) -> None:
    """Refuse a missing file, a file that is not a mailer ledger, or a ledger of another schema
    version, opening it read-only: looking never migrates it (issue 11 item 3: a look from a
    newer install would stop the older daemon that writes it). With ``metadata``, also refuse
    titles for tables or columns the ledger does not have (see :func:`metadata_drift`)."""
    if not db.exists():
        raise MailerError(f"{db}: no ledger yet; nothing has been sent (run `mailer send` or `mailer run`)")
    with Ledger.read(db) as ledger:
        drift = metadata_drift(ledger.conn, metadata) if metadata is not None else []
    if drift:
        raise MailerError(f"{db}: the dashboard's metadata does not match this ledger: {'; '.join(drift)}")


def metadata_drift(conn: sqlite3.Connection, metadata: dict[str, Any]) -> list[str]:
    """Tables and columns the metadata describes that the ledger lacks, read with sqlite-utils'
    introspection (``Database.table_names``, ``Table.columns_dict``): the labels staff see must
    name real columns, or Datasette shows them silently nowhere."""
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    names = set(db.table_names())
    out = []
    for table, spec in metadata.get("databases", {}).get(DATABASE, {}).get("tables", {}).items():
        if table not in names:
            out.append(f"no table {table!r}")
            continue
        missing = set((spec or {}).get("columns", {})) - set(db[table].columns_dict)
        out.extend(f"no column {table}.{c}" for c in sorted(missing))
    return out


# -- the Datasette plugin: hook functions, marked with datasette's hookimpl on first use ------


def _timezone(datasette: Any) -> ZoneInfo:
    # Read once per Datasette: plugin_config() walks the whole plugin config (the plan of every
    # step included) for $env secrets on each call, and render_cell asks for every time cell
    # shown (600 a deliveries page: a quarter of its time, issue 16).
    tz: ZoneInfo | None = getattr(datasette, "_mailer_timezone", None)
    if tz is None:
        config = datasette.plugin_config(_PLUGIN) or {}
        tz = datasette._mailer_timezone = _zone(config.get("timezone", "UTC"))
    return tz


def prepare_connection(conn: sqlite3.Connection, database: str, datasette: Any) -> None:
    """Register ``local_time(ts)``; make every connection to the ledger query-only."""
    conn.create_function("local_time", 1, partial(local_time, tz=_timezone(datasette)), deterministic=True)
    conn.create_function("address_key", 1, address_key, deterministic=True)  # as the Ledger does
    if database == DATABASE:
        # Datasette already opens the file with mode=ro; this also covers the write
        # connection a third-party plugin could ask for (Database.execute_write).
        conn.execute("PRAGMA query_only = 1")


def render_cell(
    row: Any, value: Any, column: str, table: str | None, database: str, datasette: Any
) -> Markup | None:
    """On table pages, show stored UTC times in the campaign's time zone (UTC on hover)."""
    if database != DATABASE or table is None or column not in _TIME_COLUMNS.get(table, ()):
        return None
    shown = local_time(value, _timezone(datasette))
    if shown is None or shown == value:
        return None
    return Markup('<span title="{} UTC, as stored">{}</span>').format(value, shown)


def extra_body_script(
    template: str,
    database: str | None,
    table: str | None,
    columns: Any,
    view_name: str,
    request: Any,
    datasette: Any,
) -> str | None:
    """Name browser tabs after the page heading: Datasette's own tab title for a canned
    query is its SQL."""
    if template not in ("query.html", "table.html", "database.html") or (
        template == "query.html" and view_name != "table"  # arbitrary SQL keeps its title
    ):
        return None
    return (
        "(function () { var h = document.querySelector('h1');"
        " if (h) { document.title = h.textContent.replace('\\u{1F512}', '').trim()"
        " + ' \\u2013 mailer delivery log'; } })();"
    )


def register_routes(datasette: Any) -> list[tuple[str, Callable[..., Any]]]:
    """``/`` opens the events page; ``/-/events`` lists the events (and takes the picker's
    ``?event=campaign/event``), ``/-/events/<campaign>/<event>`` answers the four questions."""

    async def home(datasette: Any) -> Any:
        from datasette.utils.asgi import Response

        return Response.redirect(datasette.urls.path(EVENTS_PATH))

    return [
        (r"^/$", home),
        (rf"^{dashboard_csv.PATH}$", _deliveries_csv),
        (rf"^{EVENTS_PATH}$", _events_page),
        (rf"^{INBOX_PATH}$", _inbox_page),
        (rf"^{EVENTS_PATH}/(?P<campaign>[^/]+)/(?P<event>[^/]+)$", _event_page),
    ]


# -- the event pages (the queries and charts: mailer/dashboard_events.py) ----------------------


def _plan(datasette: Any) -> events.Plan:
    config = datasette.plugin_config(_PLUGIN) or {}
    return events.Plan.from_json(config.get("plan") or {})


def _event_url(datasette: Any, campaign: str, event: str) -> str:
    from urllib.parse import quote

    return str(datasette.urls.path(f"{EVENTS_PATH}/{quote(campaign, safe='')}/{quote(event, safe='')}"))


async def _check_allowed(datasette: Any, request: Any) -> None:
    """The ledger's own pages' permission: with a password, visitors who are not logged in are
    sent to the login page (see forbidden())."""
    await datasette.ensure_permissions(request.actor, [("view-database", DATABASE), "view-instance"])


async def _render(datasette: Any, request: Any, template: str, context: dict[str, Any]) -> Any:
    from datasette.utils.asgi import Response

    context |= {
        "database": DATABASE,
        "timezone": _timezone(datasette).key,
        "events_url": datasette.urls.path(EVENTS_PATH),
        "inbox_url": datasette.urls.path(INBOX_PATH),
        "event_url": partial(_event_url, datasette),
        "status_colours": {str(k): v for k, v in events.STATUS_COLOURS.items()},
        "answer_colours": events.ANSWER_COLOURS,
    }
    return Response.html(await datasette.render_template(template, context, request=request))


async def _events_page(datasette: Any, request: Any) -> Any:
    """The events to choose from, the answers per event and every step's progress."""
    from datasette.utils.asgi import Response

    await _check_allowed(datasette, request)
    choice = request.args.get("event", "")
    if choice.count("/") == 1:  # the picker (a GET form: no JavaScript)
        return Response.redirect(_event_url(datasette, *choice.split("/")))
    plan, tz = _plan(datasette), _timezone(datasette)
    db = datasette.get_database(DATABASE)
    overview = await db.execute_fn(lambda conn: events.overview(conn, plan, tz))
    inbox_total, inbox_kinds = await db.execute_fn(staff_inbox.counts)
    scale = overview.answer_scale

    def answers_bar(e: events.EventSummary) -> Markup:
        return events.bar(
            [(w, e.answers.get(w, 0), c) for w, c in events.ANSWER_COLOURS.items()],
            label=f"{e.event}: ",
            scale=scale,
            empty="no answer yet",
        )

    return await _render(
        datasette,
        request,
        "mailer_events.html",
        {
            "overview": overview,
            "answers_bar": answers_bar,
            "inbox_line": staff_inbox.describe(inbox_kinds),
            "inbox_total": inbox_total,
        },
    )


async def _inbox_page(datasette: Any, request: Any) -> Any:
    """Inbox: what needs a person. The mails the inbox recorded as unmatched (a reply, bounce
    or unsubscribe tied to no mail we sent: it changed nothing) or skipped (unreadable, left
    unflagged in the mailbox), newest first, with a count per kind."""
    await _check_allowed(datasette, request)
    db = datasette.get_database(DATABASE)
    tz = _timezone(datasette)

    def read(conn: sqlite3.Connection) -> tuple[int, Any, list[staff_inbox.InboxRow]]:
        total, per = staff_inbox.counts(conn)
        return total, per, staff_inbox.newest(conn, MAX_ROWS)

    total, per, rows = await db.execute_fn(read)
    context = {
        "total": total,
        "kinds": [(k, labels, per[k]) for k, labels in staff_inbox.KINDS.items() if per[k]],
        "rows": [(r, local_time(r.at, tz), staff_inbox.kinds_of(r.kind)) for r in rows],
        "labels": staff_inbox.KINDS,
        "max_rows": MAX_ROWS,
    }
    return await _render(datasette, request, "mailer_inbox.html", context)


async def _event_page(datasette: Any, request: Any) -> Any:
    """Who is coming, who has not answered, who was not reached and why, what is still to come."""
    from datasette.utils.asgi import NotFound

    await _check_allowed(datasette, request)
    campaign, event = request.url_vars["campaign"], request.url_vars["event"]
    plan, tz = _plan(datasette), _timezone(datasette)
    db = datasette.get_database(DATABASE)
    now = datetime.now(UTC)

    def read(conn: sqlite3.Connection) -> tuple[events.EventReport | None, list[events.EventSummary]]:
        return events.event_report(conn, plan, tz, campaign, event, now), events.event_choices(conn, plan, tz)

    report, choices = await db.execute_fn(read)
    if report is None:
        raise NotFound(f"No event {event!r} in campaign {campaign!r}: choose one on {EVENTS_PATH}")
    return await _render(datasette, request, "mailer_event.html", {"r": report, "choices": choices})


async def _deliveries_csv(datasette: Any, request: Any) -> Any:
    """Deliveries as CSV, streamed from one query (see mailer/dashboard_csv.py)."""
    from datasette.utils.asgi import AsgiStream, Response

    await _check_allowed(datasette, request)
    try:
        query = dashboard_csv.Query.from_args({k: request.args.getlist(k) for k in request.args})
    except dashboard_csv.BadFilter as exc:
        return Response.text(f"400: {exc}\n", status=400)
    path = Path(datasette.get_database(DATABASE).path)
    headers = (
        {"content-disposition": 'attachment; filename="deliveries.csv"'} if request.args.get("_dl") else {}
    )

    async def stream(writer: Any) -> None:
        await dashboard_csv.stream_rows(path, query, writer.write)

    return AsgiStream(stream, headers=headers, content_type="text/csv; charset=utf-8")


def forbidden(datasette: Any, request: Any, message: str) -> Any:
    """Send visitors who are not logged in to the login page, when a password is set."""
    if request is None or request.actor is not None:
        return None
    if not (datasette.plugin_config("datasette-auth-passwords") or {}):
        return None
    from datasette.utils.asgi import Response

    return Response.redirect(datasette.urls.path("/-/login"))


#: The only paths that take a POST: logging in and out (datasette-auth-passwords, Datasette).
_POST_PATHS = frozenset({"/-/login", "/-/logout"})


def asgi_wrapper(datasette: Any) -> Callable[[Any], Any]:
    """Refuse a request for another Host name (400), and every request that is not a read (405)
    except logging in and out; protect the cells of CSV downloads.

    The Host check stops DNS rebinding: a web page whose name was made to resolve to 127.0.0.1
    would otherwise read the dashboard as its own site (issue 12). Datasette 0.65 has no write
    API, but a plugin installed next to it could add one (and Datasette 1.0 has one); this keeps
    the dashboard read-only at the HTTP level too. A CSV cell that starts with = + - @ tab or CR
    gets a leading ' so that a spreadsheet shows it instead of running it (mailer/csvcells.py).
    """
    hosts = HostNames.from_json((datasette.plugin_config(_PLUGIN) or {}).get("hosts"))

    def wrap(app: Any) -> Any:
        async def read_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                host = [v for k, v in scope.get("headers", []) if k == b"host"]
                if len(host) != 1 or not hosts.allows(host[0].decode("latin-1")):
                    shown = host[0].decode("latin-1")[:80] if len(host) == 1 else "(none)"
                    body = (
                        f"400: Host {shown} refused: this dashboard answers only to {hosts.describe()} "
                        f"(DNS rebinding protection; more names: {HOSTS_ENV})\n"
                    ).encode()
                    headers = [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"x-content-type-options", b"nosniff"),
                    ]
                    await send({"type": "http.response.start", "status": 400, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
                if is_csv_request(scope):
                    send = CsvCells(send)
            if (
                scope["type"] == "http"
                and scope["method"] not in ("GET", "HEAD", "OPTIONS")
                and scope["path"] not in _POST_PATHS
            ):
                headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD")]
                await send({"type": "http.response.start", "status": 405, "headers": headers})
                body = b"405: the mailer dashboard is read-only\n"
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        return read_only

    return wrap


def register_facet_classes() -> Any:
    """Put :mod:`mailer.dashboard_facets`' column facet in place of Datasette's: the same
    counts, for campaign, step and status of deliveries read from ``delivery_counts`` instead of
    a scan of the ledger (issue 16). A hook wrapper around every plugin's facet classes."""
    from datasette.facets import ColumnFacet

    from .dashboard_facets import facet_class

    outcome = yield
    ours = facet_class()
    outcome.force_result([[ours if c is ColumnFacet else c for c in found] for found in outcome.get_result()])


_HOOKS = (prepare_connection, render_cell, extra_body_script, register_routes, forbidden, asgi_wrapper)


def _register() -> None:
    try:
        from datasette import hookimpl
        from datasette.plugins import pm
    except ImportError:
        raise MailerError(f"the dashboard needs Datasette: {INSTALL_HINT}") from None
    if pm.get_plugin(_PLUGIN) is None:
        for hook in _HOOKS:
            hookimpl(hook)
        hookimpl(hookwrapper=True)(register_facet_classes)
        pm.register(sys.modules[__name__], name=_PLUGIN)


# -- building and serving ---------------------------------------------------------------------


def create(
    db: str | Path,
    *,
    allow_sql: bool = False,
    timezone: str = "UTC",
    password_hash: str | None = None,
    plan: events.Plan | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> Datasette:
    """A Datasette over ``db`` (opened read-only, named ``ledger``) with our metadata.

    ``plan`` (``Plan.of(campaign)``) gives the event pages the campaign's events and configured
    steps, so they can show steps whose time has not come; without it they show the ledger alone.
    It answers only to the Host names of ``host`` and ``port`` as served (loopback's by default;
    port None: any port), plus those in MAILER_DASHBOARD_HOSTS: a guard against DNS rebinding.

    Arbitrary SQL (Datasette's ``execute-sql``) is denied unless ``allow_sql``; even then
    Datasette accepts only SELECT statements and the connection is read-only. With
    ``password_hash`` every page needs the ``staff`` login (datasette-auth-passwords).

    :raises MailerError: datasette is not installed, the ledger is missing or unreadable.
    """
    _register()
    from datasette.app import Datasette
    from datasette.database import Database

    db = Path(db)
    metadata = build_metadata(timezone)
    _check_ledger(db, metadata)
    if not allow_sql:
        metadata["allow_sql"] = False
    if plan is not None:
        metadata["plugins"][_PLUGIN]["plan"] = plan.to_json()
    # The Host names it answers to (``host`` and ``port`` as served; port None: any port).
    names = HostNames.serving(host, port, os.environ.get(HOSTS_ENV, "").split(","))
    metadata["plugins"][_PLUGIN]["hosts"] = names.to_json()
    if password_hash:
        try:
            import datasette_auth_passwords  # noqa: F401  (registers the login page)
        except ImportError:
            raise MailerError(f"a password needs datasette-auth-passwords: {INSTALL_HINT}") from None
        # Kept in the environment, not the metadata: Datasette shows {"$env": ...} as is on
        # /-/metadata, never the value.
        os.environ[PASSWORD_ENV] = password_hash
        metadata["allow"] = {"id": ACCOUNT}
        metadata["plugins"]["datasette-auth-passwords"] = {f"{ACCOUNT}_password_hash": {"$env": PASSWORD_ENV}}
    _quiet_tracebacks()
    ds = Datasette(
        memory=False,
        metadata=metadata,
        template_dir=str(resources.files("mailer").joinpath("dashboard_templates")),
        settings={
            "default_allow_sql": allow_sql,
            "allow_download": False,
            "max_returned_rows": MAX_ROWS,
            "sql_time_limit_ms": 3000,
            "facet_time_limit_ms": 500,
            # Suggesting facets runs a query per column: seconds on a large ledger.
            "suggest_facets": False,
        },
    )
    # Datasette adds an in-memory database when given no files; staff need only the ledger.
    ds.remove_database("_memory")
    # is_mutable=True means "may change under us" (the daemon keeps writing): Datasette then
    # opens it with mode=ro and reads the WAL, where immutable=1 would ignore fresh commits.
    ds.add_database(Database(ds, path=str(db), is_mutable=True), name=DATABASE)
    return ds


def _quiet_tracebacks() -> None:
    # With rich installed (a mailer dependency) Datasette prints every 403/404 as a full
    # traceback with local variables, the request's cookies included. Errors still show
    # in the browser; the terminal stays readable.
    try:
        from datasette import handle_exception
    except ImportError:  # pragma: no cover - other Datasette layouts
        return
    if hasattr(handle_exception, "rich"):
        handle_exception.rich = None


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise MailerError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another with --port"
            ) from None


def serve(
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8001,
    allow_sql: bool = False,
    timezone: str = "UTC",
    password_hash: str | None = None,
    *,
    log: Callable[[str], None] = print,
    plan: events.Plan | None = None,
) -> None:
    """Serve the dashboard until interrupted.

    Listens on loopback unless ``host`` says otherwise; any other address needs
    ``password_hash`` (from ``datasette hash-password``), since the log lists every
    recipient's address.

    :raises MailerError: a non-loopback host without a password, the port is taken, or as
        :func:`create`.
    """
    if not is_loopback(host) and not password_hash:
        raise MailerError(
            f"--host {host} would show the delivery log (every recipient's address) to other "
            f"machines, so it needs a password: run `datasette hash-password`, set {PASSWORD_ENV} "
            f"to the hash it prints, and log in as {ACCOUNT!r}. Without --host the dashboard "
            "listens on 127.0.0.1 only."
        )
    ds = create(
        db,
        allow_sql=allow_sql,
        timezone=timezone,
        password_hash=password_hash,
        plan=plan,
        host=host,
        port=port,
    )
    _check_port(host, port)
    import uvicorn

    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    log(f"Dashboard of {db} (read-only): http://{shown}:{port}{EVENTS_PATH}")
    if password_hash:
        log(f"Log in as {ACCOUNT!r} with the password whose hash is in {PASSWORD_ENV}.")
    if not is_loopback(host):
        log(
            "This is plain HTTP: from other machines, reach it through an HTTPS proxy so the "
            "password and the addresses are not sent in clear."
        )
    log("Press Ctrl-C to stop.")
    uvicorn.run(ds.app(), host=host.strip("[]"), port=port, log_level="warning", lifespan="on")

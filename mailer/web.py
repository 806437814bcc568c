"""`mailer web` (issue 14): the public ASGI app recipients reach from the links in their mails.

Starlette on uvicorn, behind an HTTPS reverse proxy at the campaign's ``web.url``. This module
owns the app, :class:`WebContext` (what every route module is given), the security layer (the
headers on every response, the body limit, the per-IP limit on POSTs) and the error pages.
The RSVP and unsubscribe routes are in :mod:`mailer.web_answers`; the calendar downloads, the
feed and the event page in :mod:`mailer.web_calendar`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .addresses import address_key
from .clock import Clock, SystemClock
from .contacts import Contact
from .errors import LedgerError, MailerError
from .ledger import Ledger, OpenMode
from .web_texts import page_language, texts
from .workspace import Workspace, load_workspace

__all__ = ["BODY_LIMIT", "POSTS_PER_MINUTE", "SECURITY_HEADERS", "Busy", "WebContext", "create_app", "serve"]

log = logging.getLogger("mailer.web")
T = TypeVar("T")

#: Bytes a request body may have: the forms carry one field (RFC 8058's is 26 bytes).
BODY_LIMIT = 4096
#: POSTs one client address may make per minute; beyond, 429 (answers are rare: a person
#: answers a few times, a script hammering tokens is stopped).
POSTS_PER_MINUTE = 30

#: On every response, errors included. No inline script or style anywhere (CSP without
#: 'unsafe-inline'); the token in the URL must not leak to another site (Referrer-Policy);
#: no page may be framed (clickjacking the one button); pages hold a person's answer: never cached.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
}

#: A write that finds the ledger busy (the daemon committing a batch) waits this long per
#: attempt, then tries again after a short sleep: an answer is never lost to a busy ledger.
BUSY_WAIT = 1.0
ATTEMPTS = 5
#: How often the campaign's files are checked for edits (the daemon reloads them too).
RELOAD_EVERY = 2.0
#: Open ledger connections kept between requests, per kind (read, write).
POOL_SIZE = 4

_TEMPLATES = Path(__file__).with_name("web_templates")


class Busy(MailerError):
    """The ledger stayed busy through every attempt: the page says to try again (503)."""


def _busy(exc: LedgerError) -> bool:
    """Whether a LedgerError is SQLite's "database is locked" (the ledger's edge keeps the
    sqlite3 error as the context of the one it raises)."""
    inner = exc.__context__
    if isinstance(inner, sqlite3.OperationalError):
        name = getattr(inner, "sqlite_errorname", "") or ""
        return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(inner)
    return False


class WebContext:
    """What every route is given: the campaign (reloaded when its files change), the ledger,
    the signing secret, the clock, and :meth:`page` to render a page in the reader's language."""

    def __init__(
        self,
        config_path: Path,
        ledger_path: Path,
        *,
        secret: str,
        clock: Clock,
        workspace: Workspace,
        busy_wait: float = BUSY_WAIT,
        attempts: int = ATTEMPTS,
    ) -> None:
        self.config_path = config_path
        self.ledger_path = ledger_path
        self.secret = secret
        self.clock = clock
        self.busy_wait = busy_wait
        self.attempts = attempts
        self._ws = workspace
        self._stamp = self._files_stamp(workspace)
        self._checked = time.monotonic()
        self._by_key = {address_key(c.email): c for c in workspace.contacts}
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._pools: dict[OpenMode, list[Ledger]] = {OpenMode.READ: [], OpenMode.WRITE: []}
        self._opened: dict[int, tuple[tuple[int, int] | None, int]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- the campaign ------------------------------------------------------------------------

    @staticmethod
    def _files_stamp(ws: Workspace) -> tuple[tuple[str, float], ...]:
        out = []
        for f in ws.files:
            try:
                out.append((str(f), f.stat().st_mtime))
            except OSError:
                out.append((str(f), -1.0))
        return tuple(out)

    def workspace(self) -> Workspace:
        """The campaign, its contacts and templates; reloaded when a file changed (checked
        every few seconds). A reload that fails keeps the last good one and logs why."""
        if time.monotonic() - self._checked < RELOAD_EVERY:
            return self._ws
        with self._lock:
            if time.monotonic() - self._checked < RELOAD_EVERY:
                return self._ws
            self._checked = time.monotonic()
            if self._files_stamp(self._ws) != self._stamp:
                try:
                    ws = load_workspace(self.config_path)
                except MailerError as exc:
                    log.error(
                        "schedules.yaml changed but cannot be used (keeping the last good one): %s", exc
                    )
                else:
                    self._ws, self._stamp = ws, self._files_stamp(ws)
                    self._by_key = {address_key(c.email): c for c in ws.contacts}
        return self._ws

    def contact(self, address: str) -> Contact | None:
        """The contact with this address (any spelling), None when no contact file has it."""
        self.workspace()
        return self._by_key.get(address_key(address))

    def language_for(self, address: str | None) -> str:
        """The page language for ``address``: the contact's, else the campaign's (nl/fr/en)."""
        contact = self.contact(address) if address else None
        return page_language(contact.language if contact else None, self.workspace().campaign.language)

    def now(self) -> datetime:
        return self.clock()

    # -- the ledger --------------------------------------------------------------------------

    def _connect(self, mode: OpenMode) -> Ledger:
        try:
            if mode is OpenMode.READ:
                uri = self.ledger_path.absolute().as_uri() + "?mode=ro"
                conn = sqlite3.connect(
                    uri, uri=True, timeout=self.busy_wait, isolation_level=None, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(
                    self.ledger_path, timeout=self.busy_wait, isolation_level=None, check_same_thread=False
                )
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.ledger_path}: {exc}") from None
        return Ledger(conn, mode=mode)

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = self.ledger_path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _checkout(self, mode: OpenMode) -> Ledger:
        """An open connection of ``mode`` from the pool, or a new one. Opening one (connect, the
        pragmas, the schema check) costs more than the answer it stores, so a few stay open
        between requests. A pooled one is used again only while it is still on the same file
        (not replaced by a restore) with the same schema (not migrated by a newer `mailer send`);
        otherwise it is closed and a new one opened, which checks the file again."""
        pool = self._pools[mode]
        with self._pool_lock:
            led = pool.pop() if pool else None
        if led is not None:
            try:
                fresh = self._file_id() == self._opened[id(led)][0] and (
                    led.conn.execute("PRAGMA schema_version").fetchone()[0] == self._opened[id(led)][1]
                )
            except sqlite3.Error:
                fresh = False
            if fresh:
                return led
            self._discard(led)
        file_id = self._file_id()
        led = self._connect(mode)
        try:
            cookie = led.conn.execute("PRAGMA schema_version").fetchone()[0]
        except sqlite3.Error as exc:
            led.close()
            raise LedgerError(f"{self.ledger_path}: {exc}") from None
        self._opened[id(led)] = (file_id, cookie)
        return led

    def _checkin(self, led: Ledger, mode: OpenMode) -> None:
        if led.conn.in_transaction:  # never keep a connection with an open transaction
            self._discard(led)
            return
        with self._pool_lock:
            if len(self._pools[mode]) < POOL_SIZE:
                self._pools[mode].append(led)
                return
        self._discard(led)

    def _discard(self, led: Ledger) -> None:
        self._opened.pop(id(led), None)
        try:
            led.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        """Close the pooled connections (the app's shutdown)."""
        with self._pool_lock:
            leds = [led for pool in self._pools.values() for led in pool]
            for pool in self._pools.values():
                pool.clear()
        for led in leds:
            self._discard(led)

    @contextmanager
    def ledger(self) -> Iterator[Ledger]:
        """A read-only connection to the ledger (never the sender's lock), from a small pool."""
        led = self._checkout(OpenMode.READ)
        try:
            yield led
        except BaseException:
            self._discard(led)
            raise
        self._checkin(led, OpenMode.READ)

    def write(self, fn: Callable[[Ledger], T]) -> T:
        """``fn`` on a writing connection (from a small pool), retried while the ledger is busy.
        ``fn`` commits before it returns (``with led.transaction():``): the answer is on disk
        before the response says so.

        :raises Busy: still busy after every attempt (the answer was not stored; say so).
        """
        for attempt in range(1, self.attempts + 1):
            try:
                led = self._checkout(OpenMode.WRITE)
                try:
                    result = fn(led)
                except BaseException:
                    self._discard(led)
                    raise
                self._checkin(led, OpenMode.WRITE)
                return result
            except LedgerError as exc:
                if not _busy(exc):
                    raise
                log.warning("ledger busy (attempt %d of %d)", attempt, self.attempts)
                if attempt < self.attempts:
                    time.sleep(0.05 * attempt)
        raise Busy(f"{self.ledger_path}: busy through {self.attempts} attempts")

    # -- pages -------------------------------------------------------------------------------

    def page(self, request: Request, template: str, status: int = 200, **variables: Any) -> Response:
        """``web_templates/<template>`` with ``variables`` and ``t`` (the words of the pages),
        ``lang``, ``campaign``, ``static`` (the stylesheet's URL). A ``language`` variable picks
        the page language (nl/fr/en; default: the campaign's)."""
        language = variables.pop("language", None)
        ws = self.workspace()
        lang = language or page_language(None, ws.campaign.language)
        web = ws.campaign.web
        prefix = request.scope.get("root_path", "") or ""
        if web is not None:
            prefix = urlsplit(web.url).path.rstrip("/")
        body = self.env.get_template(template).render(
            t=texts(lang),
            lang=lang,
            campaign=ws.campaign,
            static=f"{prefix}/static/web.css",
            **variables,
        )
        return HTMLResponse(body, status_code=status)

    def message(
        self, request: Request, status: int, title: str, text: str, language: str | None = None
    ) -> Response:
        """A plain page: a title and one sentence (the error pages)."""
        lang = language or page_language(None, self.workspace().campaign.language)
        words = texts(lang)
        return self.page(request, "message.html", status, language=lang, title=words[title], text=words[text])

    def not_found(self, request: Request) -> Response:
        """The plain 404 page in the campaign's language: a bad, forged or other-purpose token
        looks exactly like an unknown address (nothing to learn from it)."""
        return self.message(request, 404, "not_found_title", "not_found")


# ------------------------------------------------------------------------------------------
# The security layer
# ------------------------------------------------------------------------------------------


class _PostLimit:
    """At most ``per_minute`` POSTs per client address in any 60 s (a sliding window)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget idle clients; memory stays bounded
                self._seen = {k: v for k, v in self._seen.items() if v and now - v[-1] < 60}
            times = self._seen.setdefault(client, deque())
            while times and now - times[0] >= 60:
                times.popleft()
            if len(times) >= self.per_minute:
                return False
            times.append(now)
            return True


class _Guard:
    """ASGI middleware: security headers on every response; POSTs rate-limited per client
    address; request bodies cut at ``body_limit`` (a Content-Length above it is refused
    before reading, a longer stream stops at the limit)."""

    def __init__(self, app: ASGIApp, ctx: WebContext, body_limit: int, limit: _PostLimit) -> None:
        self.app, self.ctx, self.body_limit, self.limit = app, ctx, body_limit, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = _with_security(message.get("headers", []))
            await send(message)

        if scope["method"] == "POST":
            client = (scope.get("client") or ("?", 0))[0]
            request = Request(scope)
            if not self.limit.allow(client):
                page = self.ctx.message(request, 429, "error_title", "too_many")
                page.headers["Retry-After"] = "60"
                await page(scope, receive, send_secure)
                return
            length = request.headers.get("content-length", "0")
            if not length.isdigit() or int(length) > self.body_limit:
                await self.ctx.message(request, 413, "error_title", "too_large")(scope, receive, send_secure)
                return
            receive = self._limited(receive)
        await self.app(scope, receive, send_secure)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.body_limit:
                    raise HTTPException(413)
            return message

        return limited


def _with_security(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    names = {k.lower().encode() for k in SECURITY_HEADERS}
    kept = [(k, v) for k, v in headers if k.lower() not in names]
    return kept + [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


# ------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------


def _stylesheet(request: Request) -> Response:
    return Response((_TEMPLATES / "web.css").read_bytes(), media_type="text/css; charset=utf-8")


def _health(request: Request) -> Response:
    return Response("ok\n", media_type="text/plain")


def create_app(
    config_path: Path,
    db_path: Path | None,
    *,
    secret: str,
    clock: Clock | None = None,
    body_limit: int = BODY_LIMIT,
    posts_per_minute: int = POSTS_PER_MINUTE,
    busy_wait: float = BUSY_WAIT,
    workspace: Workspace | None = None,
) -> Starlette:
    """The `mailer web` app for the campaign at ``config_path``, writing to its ledger (or
    ``db_path``). ``workspace``: the campaign already loaded (`mailer demo` gives its own, with a
    ``web.url`` the shipped schedules.yaml does not have); by default loaded from ``config_path``.

    :raises MailerError: no secret, no ``web.url``, or no ledger yet (one line each, saying
        what to do); ConfigError when schedules.yaml is invalid.
    """
    from . import web_answers

    if not secret or not secret.strip():
        raise MailerError(
            "mailer web needs a secret to sign and check links: set MAILER_WEB_SECRET to a long "
            "random string (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
            "the same one `mailer run` uses"
        )
    ws = workspace if workspace is not None else load_workspace(config_path)
    c = ws.campaign
    if c.web is None:
        raise MailerError(
            f"{ws.campaign.config_path.name}: no web: url; add `web: {{url: https://...}}` with the "
            "address your HTTPS reverse proxy serves mailer web at"
        )
    path = db_path or c.ledger
    if not path.is_file():
        raise MailerError(
            f"{path}: no ledger here yet; mailer web answers the mails `mailer send` / `mailer run` "
            "sent from it (check --db / ledger: in schedules.yaml)"
        )
    Ledger.open(path).close()  # a mailer ledger, brought to this schema before any request
    ctx = WebContext(
        config_path, path, secret=secret, clock=clock or SystemClock(), workspace=ws, busy_wait=busy_wait
    )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        if code == 404:
            return ctx.not_found(request)
        if code == 413:
            return ctx.message(request, 413, "error_title", "too_large")
        if code in (400, 405):
            return ctx.message(request, code, "error_title", "bad_request")
        return ctx.message(request, code, "error_title", "error")

    async def on_busy(request: Request, exc: Exception) -> Response:
        log.error("an answer could not be stored: %s", exc)
        page = ctx.message(request, 503, "error_title", "busy", _page_language(ctx, request))
        page.headers["Retry-After"] = "60"
        return page

    async def on_error(request: Request, exc: Exception) -> Response:
        # Runs outside the middleware (Starlette's outermost layer): add the headers here.
        log.error("error on %s %s: %r", request.method, request.url.path.rpartition("/")[0], exc)
        try:
            page = ctx.message(request, 500, "error_title", "error")
        except Exception:  # the page itself failed (templates gone): still no traceback
            page = HTMLResponse("<!doctype html><title>Error</title><p>Error</p>", status_code=500)
        for k, v in SECURITY_HEADERS.items():
            page.headers[k] = v
        return page

    routes: list[Any] = [
        *web_answers.routes(ctx),
        Route("/static/web.css", _stylesheet, methods=["GET", "HEAD"]),
        Route("/healthz", _health, methods=["GET", "HEAD"]),
    ]
    try:
        from . import web_calendar
    except ImportError:  # pragma: no cover - built alongside; absent in a partial checkout
        pass
    else:
        routes[:0] = web_calendar.routes(ctx)
    limit = _PostLimit(posts_per_minute)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        ctx.close()  # the pooled ledger connections

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: on_http_error, Busy: on_busy, Exception: on_error},
    )
    app.add_middleware(_Guard, ctx=ctx, body_limit=body_limit, limit=limit)
    app.state.ctx = ctx
    return app


def _page_language(ctx: WebContext, request: Request) -> str | None:
    """The language of the token's reader, for an error after the token was checked."""
    lang = request.scope.get("mailer.language")
    return lang if isinstance(lang, str) else None


def serve(
    config_path: Path,
    db_path: Path | None,
    *,
    host: str,
    port: int,
    environ: Mapping[str, str],
    log_line: Callable[[str], None] = print,
) -> None:
    """Run the app on uvicorn until SIGTERM/Ctrl-C.

    :raises MailerError: see :func:`create_app`.
    """
    import uvicorn

    from .tokens import secret_from

    secret = secret_from(environ)
    if secret is None:
        raise MailerError(
            "mailer web needs MAILER_WEB_SECRET (or the older MAILER_UNSUBSCRIBE_SECRET): the links in "
            "mails are signed with it; set it to the secret `mailer run` uses"
        )
    app = create_app(config_path, db_path, secret=secret)
    ctx: WebContext = app.state.ctx
    web = ctx.workspace().campaign.web
    log_line(f"mailer web: http://{host}:{port} for {web.url if web else '?'} (ledger {ctx.ledger_path})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # No access log: every path holds a recipient's token. Proxy headers are trusted from the
    # local reverse proxy only (FORWARDED_ALLOW_IPS, default 127.0.0.1), so the POST limit
    # counts the real client, not the proxy.
    uvicorn.run(app, host=host, port=port, access_log=False, proxy_headers=True, log_level="info")

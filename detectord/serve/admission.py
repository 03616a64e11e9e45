"""Who gets a connection and a request slot: header and body read deadlines, caps on open
connections and concurrent requests (503 with Retry-After beyond them, which Prometheus retries),
and accept errors logged once per interval instead of once per attempt.

Slow clients cannot starve Prometheus's writes: at the connection cap the connection that has
waited longest without finishing its request is closed to make room, so a client that sends its
request in milliseconds always gets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger(__name__)

# Descriptors kept free for what is not a client connection: the state snapshot, the model's
# files, outbound sessions to Alertmanager and Prometheus, logs.
FD_RESERVE = 64
# Connections asyncio accepts in one go before any is closed to make room (the listen backlog).
ACCEPT_BURST = 128
RETRY_AFTER_S = 5
SWEEP_INTERVAL_S = 0.5
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0
_ACCEPT_ERROR = "socket.accept() out of system resource"
# Requests that must answer while the daemon is busy (probes, as Prometheus keeps them open).
UNCAPPED_PATHS = frozenset({"/-/healthy", "/-/ready"})


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_concurrent_requests: int
    max_body_bytes_in_flight: int
    read_header_timeout: float
    read_body_timeout: float


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("detectord_http_connections", "Open client connections.", registry=registry)
        self.max_open = Gauge(
            "detectord_http_connections_max",
            "The cap on open client connections (web.max_connections, lowered to fit the open-files limit).",
            registry=registry,
        )
        self.closed = Counter(
            "detectord_http_connections_closed_total",
            "Client connections closed by detectord before their request was read, by reason "
            "(header_timeout, body_timeout, evicted: the longest-waiting one, closed to make room at the cap).",
            ["reason"],
            registry=registry,
        )
        self.refused = Counter(
            "detectord_http_requests_refused_total",
            "Requests answered 503 with Retry-After because detectord was at a cap (connections, concurrent_requests).",
            ["reason"],
            registry=registry,
        )
        self.accept_errors = Counter(
            "detectord_http_accept_errors_total",
            "Failed accept() calls (out of file descriptors or memory); the listener pauses for a second after each.",
            registry=registry,
        )


def fd_limit() -> int:
    """The soft open-files limit of this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(configured: int) -> int:
    """`configured`, lowered so that client connections can never use up the open-files limit."""
    fits = max(fd_limit() - FD_RESERVE - ACCEPT_BURST, 16)
    if configured > fits:
        log.warning(
            "web.max_connections lowered to fit the open-files limit (raise LimitNOFILE / ulimit -n)",
            configured=configured,
            cap=fits,
            open_files_limit=fd_limit(),
        )
    return min(configured, fits)


class _Conn:
    """What admission knows of one connection."""

    __slots__ = ("body_bytes", "handler", "reading_since", "refuse", "waiting_since")

    def __init__(self, handler: RequestHandler, now: float) -> None:
        self.handler = handler
        # Since when it has owed us a request's headers (None: it is in a request, or idle
        # between requests with nothing sent yet).
        self.waiting_since: float | None = now
        # Since when a handler has been reading its body (None: not reading).
        self.reading_since: float | None = None
        # Accepted over the cap with nobody to make room: its request gets a 503.
        self.refuse = False
        # The declared body bytes of its request in flight.
        self.body_bytes = 0

    def stalled_since(self) -> float | None:
        if self.reading_since is not None:
            return self.reading_since
        return self.waiting_since


class _Tracked(asyncio.Protocol):
    """The protocol asyncio talks to: aiohttp's handler, with the bytes of each new request
    starting its header deadline and the connection forgotten when it goes."""

    __slots__ = ("conn", "conns", "handler")

    def __init__(self, handler: RequestHandler, conn: _Conn, conns: dict[RequestHandler, _Conn]) -> None:
        self.handler, self.conn, self.conns = handler, conn, conns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        c = self.conn
        if c.waiting_since is None and c.reading_since is None and not self.handler._request_in_progress:
            c.waiting_since = time.monotonic()
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.pop(self.handler, None)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class Admission:
    """One per listener: `factory` wraps aiohttp's protocol factory, `middleware` caps requests,
    `reading` bounds a body read, `run` closes connections past their deadlines."""

    def __init__(self, limits: Limits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self.metrics = AdmissionMetrics(registry)
        self.metrics.max_open.set(limits.max_connections)
        self.in_flight = 0
        # Declared body bytes of the requests in flight; a connection closed to make room gives
        # its share back at once (its handler's own accounting follows when it notices).
        self.body_bytes = 0
        self._conns: dict[RequestHandler, _Conn] = {}
        self._accept_errors_unlogged = 0
        self._accept_errors_logged_at = 0.0

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """aiohttp's protocol factory, with every connection tracked and the cap applied."""

        def make() -> asyncio.Protocol:
            handler = server()
            conn = _Conn(handler, time.monotonic())
            if len(self._conns) >= self.limits.max_connections and not self._make_room():
                conn.refuse = True
            self._conns[handler] = conn
            return _Tracked(handler, conn, self._conns)

        return make

    def _make_room(self, *, reading_only: bool = False) -> bool:
        """Close the connection that has waited longest without finishing its request (or, for a
        request slot, its body)."""
        stalest: _Conn | None = None
        stalest_since = 0.0
        for c in list(self._conns.values()):
            since = c.reading_since if reading_only else c.stalled_since()
            if since is None or c.handler.transport is None:
                continue
            if stalest is None or since < stalest_since:
                stalest, stalest_since = c, since
        if stalest is None:
            return False
        self._close(stalest, "evicted")
        return True

    def _close(self, conn: _Conn, reason: str) -> None:
        conn.waiting_since = conn.reading_since = None
        self.body_bytes -= conn.body_bytes
        conn.body_bytes = 0
        self.metrics.closed.labels(reason).inc()
        conn.handler.force_close()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self._conns.get(request.protocol)
        if conn is not None:
            conn.waiting_since = None
        if request.path in UNCAPPED_PATHS:
            return await handler(request)
        if conn is not None and conn.refuse:
            conn.refuse = False
            return self._busy("connections")
        if self.in_flight >= self.limits.max_concurrent_requests and not self._make_room(reading_only=True):
            return self._busy("concurrent_requests")
        size = request.content_length or 0
        while self.body_bytes and self.body_bytes + size > self.limits.max_body_bytes_in_flight:
            if not self._make_room(reading_only=True):
                return self._busy("body_bytes")
        self.in_flight += 1
        self.body_bytes += size
        if conn is not None:
            conn.body_bytes = size
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if conn is None:
                self.body_bytes -= size
            else:
                self.body_bytes -= conn.body_bytes  # 0 if it was closed to make room
                conn.reading_since = conn.waiting_since = None
                conn.body_bytes = 0

    def _busy(self, reason: str) -> web.Response:
        self.metrics.refused.labels(reason).inc()
        return web.Response(
            status=503,
            text=f"detectord is at its cap on {reason.replace('_', ' ')}; retry later\n",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @contextlib.asynccontextmanager
    async def reading(self, request: web.Request) -> AsyncIterator[None]:
        """Bound the reading of a request's body by `read_body_timeout` (then 408)."""
        conn = self._conns.get(request.protocol)
        if conn is not None:
            conn.reading_since = time.monotonic()
        try:
            async with asyncio.timeout(self.limits.read_body_timeout):
                yield
        except (ConnectionError, RuntimeError):
            if request.protocol.transport is not None:
                raise
            # Gone (closed to make room, or by the client): nobody reads the answer, and aiohttp
            # would log a traceback for every one of them.
            raise web.HTTPBadRequest(text="connection closed before the body arrived\n") from None
        except TimeoutError:
            self.metrics.closed.labels("body_timeout").inc()
            raise web.HTTPRequestTimeout(
                text=f"request body not received within {self.limits.read_body_timeout:g}s\n",
                headers={"Connection": "close"},
            ) from None
        finally:
            if conn is not None:
                conn.reading_since = None

    async def run(self) -> None:
        """Close connections past their header deadline; keep the gauge current."""
        header_timeout = self.limits.read_header_timeout
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            open_ = 0
            for conn in list(self._conns.values()):
                if conn.handler.transport is None:
                    continue
                open_ += 1
                if conn.waiting_since is not None and now - conn.waiting_since > header_timeout:
                    self._close(conn, "header_timeout")
            self.metrics.open.set(open_)

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: failed accepts are counted and logged once per interval
        (asyncio would log each, with a traceback, as often as the listener retries)."""
        if not str(context.get("message", "")).startswith(_ACCEPT_ERROR):
            loop.default_exception_handler(context)
            return
        self.metrics.accept_errors.inc()
        self._accept_errors_unlogged += 1
        now = time.monotonic()
        if now - self._accept_errors_logged_at >= ACCEPT_ERROR_LOG_INTERVAL_S:
            exc = context.get("exception")
            log.error(
                "cannot accept connections (raise LimitNOFILE / ulimit -n, or lower web.max_connections)",
                error=str(exc) if exc is not None else None,
                failures=self._accept_errors_unlogged,
                open_files_limit=fd_limit(),
            )
            self._accept_errors_unlogged = 0
            self._accept_errors_logged_at = now


class Site(web.TCPSite):
    """aiohttp's TCP site, its connections made through `Admission.factory`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, admission: Admission, **kw: Any) -> None:
        super().__init__(runner, host, port, reuse_address=True, backlog=ACCEPT_BURST, **kw)
        self.admission = admission

    async def start(self) -> None:
        await super(web.TCPSite, self).start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.admission.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

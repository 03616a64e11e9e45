"""The daemon's HTTP endpoints: remote write, `/metrics` and the lifecycle endpoints here, the
JSON API (`api`) and the pages (`pages`) beside. Handlers read the `Server` from the application
and never do CPU work on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from detectord.errors import DetectordError, RemoteWriteError
from detectord.ingest import intake
from detectord.ingest.remote_write import Version
from detectord.serve import api, pages
from detectord.serve.appkeys import SERVER_KEY
from detectord.serve.webconfig import Unauthorized, san_allowed

if TYPE_CHECKING:
    from detectord.serve.server import Server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Open without credentials, as Prometheus's: a liveness probe has none.
OPEN_PATHS = frozenset({"/-/healthy"})


def application(srv: Server) -> web.Application:
    # Content-Encoding is ours to judge (only snappy is allowed): aiohttp must not inflate gzip bodies.
    app = web.Application(
        client_max_size=srv.cfg.web.max_body_size + 1,
        handler_args={"auto_decompress": False},
        # The admission cap first: requests past it cost no bcrypt; then --web.config.file's guard.
        middlewares=[*([srv.admission.middleware] if srv.admission is not None else []), guard],
    )
    app[SERVER_KEY] = srv
    app.on_response_prepare.append(_add_headers)
    app.router.add_post("/api/v1/write", handle_write)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/-/healthy", handle_healthy)
    app.router.add_get("/-/ready", handle_ready)
    app.router.add_post("/-/reload", handle_reload)
    app.router.add_put("/-/reload", handle_reload)
    app.router.add_get("/api/v1/status", api.handle_status)
    app.router.add_get("/api/v1/instances", api.handle_instances)
    app.router.add_get("/api/v1/instances/{key}", api.handle_instance)
    app.router.add_get("/api/v1/scores", api.handle_scores)
    app.router.add_get("/model/card", api.handle_model_card)
    app.router.add_get("/", pages.handle_index)
    app.router.add_get("/instances/{key}", pages.handle_instance_page)
    app.router.add_get("/ui/{name}", pages.handle_ui)
    return app


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """--web.config.file's rate limit, client certificate SANs and basic auth, before any handler."""
    security = request.app[SERVER_KEY].web_security
    if request.path in OPEN_PATHS:
        return await handler(request)
    cfg = security.config
    if security.limiter is not None and not security.limiter.allow():
        security.unauthorized.labels("rate_limited").inc()
        return web.Response(status=429, text="Too Many Requests\n")
    sans = cfg.tls_server_config.client_allowed_sans
    peercert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    if sans is not None and not san_allowed(peercert, sans):
        security.unauthorized.labels("client_san").inc()
        return web.Response(status=403, text="client certificate has no allowed subject alternative name\n")
    if cfg.basic_auth_users:
        try:
            await security.auth.check(cfg.basic_auth_users, request.headers.get("Authorization"))
        except Unauthorized as exc:
            security.unauthorized.labels(exc.reason).inc()
            return web.Response(status=401, text="Unauthorized\n", headers={"WWW-Authenticate": "Basic"})
    return await handler(request)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(request.app[SERVER_KEY].web_security.config.http_server_config.headers)


async def handle_write(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER_KEY]
    m = srv.metrics
    version: Version | None = None
    try:
        web_cfg = srv.cfg.web
        limits = intake.Limits(web_cfg.max_body_size, web_cfg.max_decoded_body_size)
        if srv.admission is None:
            version, body = await intake.read_request(request, limits)
        else:
            async with srv.admission.reading(request):
                version, body = await intake.read_request(request, limits)
        if not srv.ready or srv.ingestor is None:
            raise RemoteWriteError(503, f"not ready: {srv.phase}")
        m.request_bytes.labels(version).inc(len(body))
        result = await srv.ingestor.write(body, version)
    except RemoteWriteError as exc:
        exc.version = exc.version or version
        m.requests.labels(str(exc.status), exc.version or "unknown").inc()
        if exc.status in (400, 413):
            m.rejected.labels(f"http_{exc.status}").inc()
        if 400 <= exc.status < 500:
            m.count_refused_request(exc.status, getattr(exc, "kind", None))
        return intake.refused(exc)
    written = intake.Written(result.samples_written, result.histograms_written, result.exemplars_written)
    m.count_refused_series(result.refused)
    response = intake.accepted(version, written, result.error)
    m.requests.labels(str(response.status), version).inc()
    return response


async def handle_metrics(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    if srv.pipeline is not None:
        srv.metrics.queue_depth.set(srv.pipeline.worker.depth())
    # Rendering tens of thousands of per-instance series is CPU work: not on the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, srv.metrics_text)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_healthy(request: web.Request) -> web.Response:
    return web.Response(text="detectord is Healthy.\n")


async def handle_ready(request: web.Request) -> web.Response:
    if request.app[SERVER_KEY].ready:
        return web.Response(text="detectord is Ready.\n")
    return web.Response(status=503, text=f"detectord is not ready: {request.app[SERVER_KEY].phase}.\n")


async def handle_reload(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    if not srv.enable_lifecycle:
        return web.Response(status=403, text="Lifecycle API is not enabled.\n")
    if _cross_origin(request):
        # A page in an operator's browser must not be able to make the daemon reload.
        return web.Response(status=403, text="cross-origin request refused\n")
    try:
        await srv.reload("http")
    except DetectordError as exc:
        return web.Response(status=500, text=f"failed to reload config: {exc}\n")
    return web.Response(text="reloaded\n")


def _cross_origin(request: web.Request) -> bool:
    """A browser's request from another site: its Origin names another host than the one asked."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()

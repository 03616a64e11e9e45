"""The daemon: HTTP endpoints, the ingest → inference → alert pipeline, and its lifecycle.

`Server.startup()` loads the model and starts the worker, notifier and listener in order;
`Server.run()` waits for a signal; `Server.shutdown()` stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from detectord import __version__
from detectord.alerting.states import AlertmanagerNotifier, AlertStates
from detectord.config import Config, listen_host_port, load_config, step_seconds
from detectord.errors import ConfigError, DetectordError, ModelError, RemoteWriteError
from detectord.ingest.features import FEATURE_NAMES, InstanceKey
from detectord.serve.inference import InferenceWorker, ScoreResult, bucket_sizes, warm_up
from detectord.ingest.pipeline import Ingestor
from detectord.serve.metrics import DaemonMetrics
from detectord.serve.model_loader import LoadedModel, load_model
from detectord.ingest.remote_write import check_encoding, declared_length, protocol_of

log = structlog.get_logger(__name__)

SERVER_KEY: web.AppKey[Server] = web.AppKey("server")

_V2_HEADERS = ("X-Prometheus-Remote-Write-Samples-Written", "X-Prometheus-Remote-Write-Histograms-Written",
               "X-Prometheus-Remote-Write-Exemplars-Written")


@dataclass
class _Pipeline:
    """Everything that depends on the loaded model; replaced whole on a reload that changes it."""

    model: LoadedModel
    worker: InferenceWorker


class Server:
    def __init__(self, cfg: Config, *, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry, cfg.ingest.instance_labels)
        self.ready = False
        self.should_exit = asyncio.Event()
        self._force_exit = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0
        self._reload_lock = asyncio.Lock()
        self.pipeline: _Pipeline | None = None
        self.ingestor: Ingestor | None = None
        self.alerts: AlertStates | None = None
        self.notifier: AlertmanagerNotifier | None = None
        self._runner: web.AppRunner | None = None
        self._exit_stack = contextlib.AsyncExitStack()
        self.port: int = 0
        self.step_s = 0.0
        self.history: dict[InstanceKey, deque[tuple[int, float]]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, load_model, cfg.model)
        self.step_s = step_seconds(cfg, model.step_seconds)
        if abs(self.step_s - model.step_seconds) > 1e-9:
            log.warning("step differs from the model's", step=self.step_s, model_step=model.step_seconds)
        worker = self._new_worker(model, loop)
        await loop.run_in_executor(None, worker.warm_up)
        worker.start()
        self.pipeline = _Pipeline(model, worker)
        self.ingestor = Ingestor(
            step_ms=int(round(self.step_s * 1000)), instance_labels=cfg.ingest.instance_labels,
            window=model.window, inputs=model.inputs, max_instances=cfg.ingest.max_instances,
            max_gap_steps=cfg.ingest.max_gap_steps, max_decoded=cfg.web.max_decoded_body_size,
            max_future_s=cfg.ingest.max_future, worker=worker, metrics=self.metrics)
        self.ingestor.update_instance_gauges()
        self._publish_model(model)
        self.alerts = AlertStates(cfg.alerting, model_name=model.name, external_url=self.external_url())
        self.notifier = await self._exit_stack.enter_async_context(
            AlertmanagerNotifier(cfg.alerting, registry=self.registry, external_url=self.external_url()))

        # Content-Encoding is ours to judge (only snappy is allowed): aiohttp must not inflate gzip bodies.
        app = web.Application(client_max_size=cfg.web.max_body_size + 1,
                              handler_args={"auto_decompress": False})
        app[SERVER_KEY] = self
        app.router.add_post("/api/v1/write", handle_write)
        app.router.add_get("/metrics", handle_metrics)
        app.router.add_get("/-/healthy", handle_healthy)
        app.router.add_get("/-/ready", handle_ready)
        app.router.add_post("/-/reload", handle_reload)
        app.router.add_put("/-/reload", handle_reload)
        app.router.add_get("/api/v1/instances", handle_instances)
        app.router.add_get("/api/v1/scores", handle_scores)
        app.router.add_get("/", handle_index)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.web.shutdown_timeout)
        await self._runner.setup()
        host, port = listen_host_port(cfg)
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        _freeze_heap()
        self.ready = True
        self.metrics.ready.set(1)
        self._spawn(self._evict_loop())
        log.info("detectord started", version=__version__, listen=f"{host}:{self.port}", model=model.name,
                 model_version=model.version, window=model.window, step=self.step_s)

    async def run(self) -> None:
        self.install_signal_handlers()
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        log.info("shutting down")
        self.ready = False
        self.metrics.ready.set(0)
        # Stop accepting; requests already in flight finish (aiohttp waits up to shutdown_timeout).
        if self._runner is not None:
            await self._runner.cleanup()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self.ingestor is not None:
            await loop.run_in_executor(None, self.ingestor.close)
        if self.pipeline is not None:
            await loop.run_in_executor(None, self.pipeline.worker.stop, self.cfg.web.shutdown_timeout)
        await asyncio.sleep(0)  # deliver scores the worker handed back while stopping
        if self.notifier is not None:
            await self.notifier.flush(self.cfg.web.shutdown_timeout)
        await self._exit_stack.aclose()
        log.info("stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP")))

    def _on_exit_signal(self) -> None:
        if self.should_exit.is_set():
            # A second signal: the operator does not want to wait.
            log.warning("forced exit")
            os._exit(1)
        self.should_exit.set()

    def _spawn(self, coro: Any) -> None:
        # Keep a hard reference so the task is not garbage-collected while it runs.
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def external_url(self) -> str:
        if self.cfg.web.external_url:
            return self.cfg.web.external_url.rstrip("/")
        host, port = listen_host_port(self.cfg)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.port or port}"

    # ---- model, worker and reload -----------------------------------------------------------

    def _new_worker(self, model: LoadedModel, loop: asyncio.AbstractEventLoop) -> InferenceWorker:
        inf = self.cfg.inference
        return InferenceWorker(
            model.detector, window=model.window, nfeatures=len(model.features), max_batch=inf.max_batch,
            max_wait=inf.max_wait, queue_size=inf.queue_size, deliver=self.on_scores, loop=loop,
            metrics=self.metrics)

    def _publish_model(self, model: LoadedModel) -> None:
        self.metrics.threshold.set(model.threshold)
        self.metrics.model_info.info({
            "name": model.name, "version": model.version, "kind": model.kind, "trained_at": model.trained_at,
            "features": ",".join(model.features), "window": str(model.window),
            "step_seconds": f"{model.step_seconds:g}", "path": str(model.path)})

    async def reload(self, trigger: str) -> None:
        """Load config and model anew; if either is broken, keep running the old ones."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            path = self.config_path
            try:
                if path is None:
                    raise ConfigError("--config.file", "no config file to reload (started without one)")
                cfg = await loop.run_in_executor(None, load_config, path)
                if self.listen_override:
                    from detectord.config import with_listen_address
                    cfg = with_listen_address(cfg, self.listen_override)
                self._check_reloadable(cfg)
                model = await loop.run_in_executor(None, load_model, cfg.model)
                if abs(step_seconds(cfg, model.step_seconds) - self.step_s) > 1e-9:
                    raise ConfigError("ingest.step", "the step cannot change on reload; restart detectord")
                assert self.pipeline is not None and self.ingestor is not None
                await loop.run_in_executor(
                    None, warm_up, model.detector, bucket_sizes(cfg.inference.max_batch), model.window,
                    len(model.features))
            except DetectordError as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error("reload refused; still running the previous config and model", trigger=trigger,
                          error=str(exc))
                raise
            old = self.pipeline
            same_shape = (model.window == old.model.window and model.features == old.model.features
                          and model.inputs == old.model.inputs)
            if same_shape and cfg.inference == self.cfg.inference:
                old.worker.swap(model.detector)
                self.pipeline = _Pipeline(model, old.worker)
            else:
                worker = self._new_worker(model, loop)
                worker.start()
                self.pipeline = _Pipeline(model, worker)
                self.ingestor.worker = worker
                if not same_shape:
                    await self.ingestor.call(self.ingestor.reset_windows, model.window, model.inputs)
                await loop.run_in_executor(None, old.worker.stop, 5.0)
            if cfg.alerting != self.cfg.alerting or model.name != old.model.name:
                assert self.alerts is not None and self.notifier is not None
                self.alerts = self.alerts.reconfigured(cfg.alerting, model_name=model.name)
                if cfg.alerting != self.cfg.alerting:
                    await self.notifier.flush(2.0)
                    await self._exit_stack.aclose()
                    self._exit_stack = contextlib.AsyncExitStack()
                    self.notifier = await self._exit_stack.enter_async_context(
                        AlertmanagerNotifier(cfg.alerting, registry=self.registry,
                                             external_url=self.external_url()))
                    self.notifier.submit(self.alerts.firing())
            self.cfg = cfg
            self._publish_model(model)
            # The old model is garbage now; collect it once (a short pause) and freeze the new one.
            gc.unfreeze()
            await loop.run_in_executor(None, _freeze_heap)
            self.metrics.reloads.labels("success").inc()
            log.info("reloaded", trigger=trigger, model=model.name, model_version=model.version)

    config_path: str | None = None
    listen_override: str | None = None

    def _check_reloadable(self, cfg: Config) -> None:
        if cfg.ingest.instance_labels != self.cfg.ingest.instance_labels:
            raise ConfigError("ingest.instance_labels", "cannot change on reload; restart detectord")
        if cfg.web.listen_address != self.cfg.web.listen_address:
            raise ConfigError("web.listen_address", "cannot change on reload; restart detectord")

    # ---- scores to alerts ------------------------------------------------------------------

    def on_scores(self, results: list[ScoreResult]) -> None:
        """Called on the event loop with each scored batch."""
        if self.pipeline is None or self.alerts is None or self.notifier is None:
            return
        model = self.pipeline.model
        features = model.features
        k = self.cfg.alerting.top_features
        m = self.metrics
        threshold = model.threshold
        changed = []
        keep = self.cfg.inference.score_history
        for r in results:
            key = r.instance
            m.score.labels(*key).set(r.score)
            if keep:
                hist = self.history.get(key)
                if hist is None:
                    hist = self.history[key] = deque(maxlen=keep)
                hist.append((r.step_ts_ms, r.score))
            anomalous = r.score > 1.0
            m.anomaly.labels(*key).set(1.0 if anomalous else 0.0)
            dev = np.nan_to_num(r.feature_deviation, nan=0.0)
            order = np.argsort(-np.abs(dev))[:k]
            top = [(features[i], float(dev[i]), float(r.latest[i])) for i in order]
            labels = dict(zip(self.cfg.ingest.instance_labels, key))
            was_firing = self.alerts.is_firing(key)
            changed.extend(self.alerts.observe(key, labels, r.step_ts_ms / 1000.0, r.score, threshold, top,
                                               r.looks_like))
            if self.alerts.is_firing(key):
                if not was_firing:
                    m.clear_features(key, features)
                for name, d, v in top:
                    m.feature_value.labels(*key, name).set(v)
                    m.feature_deviation.labels(*key, name).set(d)
            elif was_firing:
                m.clear_features(key, features)
        if changed:
            self.notifier.submit(changed)
        for state, n in self.alerts.counts().items():
            m.alerts.labels(state).set(n)

    async def _evict_loop(self) -> None:
        ttl = float(self.cfg.ingest.instance_ttl)
        while True:
            await asyncio.sleep(max(0.05, min(ttl / 10, 30.0)))
            assert self.ingestor is not None and self.alerts is not None and self.notifier is not None
            gone: list[InstanceKey] = await self.ingestor.call(  # type: ignore[assignment]
                self.ingestor.evict_idle, time.monotonic() - ttl)
            if not gone:
                continue
            resolved = []
            for key in gone:
                self.history.pop(key, None)
                resolved.extend(self.alerts.forget(key))
                self.metrics.forget_instance(key, FEATURE_NAMES)
            if resolved:
                self.notifier.submit(resolved)
            log.info("instances evicted", count=len(gone))


def _freeze_heap() -> None:
    """Move everything allocated so far (TensorFlow, Keras, the model: ~10^5 objects) out of the
    cyclic GC's reach. Otherwise every full collection scans them all, holding the GIL for
    ~0.2 s, and the event loop stalls whichever thread triggered it."""
    gc.collect()
    gc.freeze()


# ---- HTTP handlers ---------------------------------------------------------------------------


def _v2_headers(version: str, samples: int = 0, histograms: int = 0, exemplars: int = 0) -> dict[str, str]:
    if version != "2.0":
        return {}
    return dict(zip(_V2_HEADERS, (str(samples), str(histograms), str(exemplars))))


async def handle_write(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER_KEY]
    m = srv.metrics
    version = "unknown"
    try:
        version = protocol_of(request.headers.get("Content-Type"))
        check_encoding(request.headers.get("Content-Encoding"))
        limit = srv.cfg.web.max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise RemoteWriteError(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RemoteWriteError(413, f"body exceeds the limit of {limit} bytes") from None
        if len(body) > limit:
            raise RemoteWriteError(413, f"body of {len(body)} bytes exceeds the limit of {limit} bytes")
        if not srv.ready or srv.ingestor is None:
            raise RemoteWriteError(503, "not ready: the model is loading")
        if body and declared_length(body) > srv.cfg.web.max_decoded_body_size:
            raise RemoteWriteError(413, f"declared decompressed length {declared_length(body)} exceeds the limit "
                                        f"of {srv.cfg.web.max_decoded_body_size} bytes")
        m.request_bytes.labels(version).inc(len(body))
        result = await srv.ingestor.write(body, version)
    except RemoteWriteError as exc:
        m.requests.labels(str(exc.status), version).inc()
        if exc.status in (400, 413):
            m.rejected.labels(f"http_{exc.status}").inc()
        return web.Response(status=exc.status, text=exc.reason + "\n", headers=_v2_headers(version))
    headers = _v2_headers(version, result.samples_written, result.histograms_written, result.exemplars_written)
    if result.error is not None:
        m.requests.labels("400", version).inc()
        return web.Response(status=400, text=f"some series were refused: {result.error}\n", headers=headers)
    m.requests.labels("204", version).inc()
    return web.Response(status=204, headers=headers)


async def handle_metrics(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    if srv.pipeline is not None:
        srv.metrics.queue_depth.set(srv.pipeline.worker.depth())
    # Rendering tens of thousands of per-instance series is CPU work: not on the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, srv.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_healthy(request: web.Request) -> web.Response:
    return web.Response(text="detectord is Healthy.\n")


async def handle_ready(request: web.Request) -> web.Response:
    if request.app[SERVER_KEY].ready:
        return web.Response(text="detectord is Ready.\n")
    return web.Response(status=503, text="detectord is not ready: the model is loading.\n")


async def handle_reload(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    try:
        await srv.reload("http")
    except DetectordError as exc:
        return web.Response(status=500, text=f"failed to reload config: {exc}\n")
    return web.Response(text="reloaded\n")


async def handle_instances(request: web.Request) -> web.Response:
    """JSON view of tracked instances: warming or scored, latest score, alert state."""
    srv = request.app[SERVER_KEY]
    if srv.ingestor is None or srv.alerts is None:
        return web.json_response({"status": "error", "error": "not ready"}, status=503)
    ing = srv.ingestor
    keys: list[InstanceKey] = await ing.call(ing.extractor.instance_keys)  # type: ignore[assignment]
    want = request.query.get("instance")
    names = srv.cfg.ingest.instance_labels
    out = []
    for key in keys:
        labels = dict(zip(names, key))
        if want is not None and want not in key:
            continue
        out.append({"labels": labels, "warming": ing.is_warming(key), "alert": srv.alerts.state_of(key)})
    return web.json_response({"status": "success", "data": out})


async def handle_scores(request: web.Request) -> web.Response:
    """The latest scores of each instance (or of those whose label values include ?instance=),
    oldest first, as [step timestamp in ms, score] pairs."""
    srv = request.app[SERVER_KEY]
    want = request.query.get("instance")
    names = srv.cfg.ingest.instance_labels
    out = [{"labels": dict(zip(names, key)), "scores": [[t, s] for t, s in hist]}
           for key, hist in list(srv.history.items()) if want is None or want in key]
    return web.json_response({"status": "success", "data": out})


async def handle_index(request: web.Request) -> web.Response:
    return web.Response(text=f"detectord {__version__}: POST remote-write to /api/v1/write; see /metrics, "
                             "/api/v1/instances, /api/v1/scores, /-/ready.\n")


async def serve(cfg: Config, *, config_path: str | None, listen_override: str | None) -> int:
    srv = Server(cfg)
    srv.config_path = config_path
    srv.listen_override = listen_override
    try:
        await srv.startup()
    except (ModelError, ConfigError) as exc:
        log.error("cannot start", error=str(exc))
        await srv.shutdown()
        return 2 if isinstance(exc, ConfigError) else 1
    try:
        await srv.run()
    finally:
        await srv.shutdown()
    return 0

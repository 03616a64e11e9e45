"""The daemon's lifecycle: `startup()` opens each stage in the order data needs them (alert
delivery, the score sink, the inference worker, the ingest thread, background tasks, the HTTP
listener), `run()` waits for a signal, `shutdown()` closes them in reverse order within one
`web.shutdown_timeout`. SIGHUP and `/-/reload` swap config and model without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from detectord import __version__, logs
from detectord.alerting.notifier import AlertmanagerNotifier
from detectord.config import (
    AlertingConfig,
    Config,
    InferenceConfig,
    listen_host_port,
    load_config,
    step_seconds,
    with_listen_address,
)
from detectord.detectors import Detector, backend, load_model
from detectord.errors import ConfigError, DetectordError, ModelError
from detectord.ingest.features import InstanceKey
from detectord.ingest.liveness import LivenessEvent
from detectord.ingest.pipeline import Ingestor
from detectord.ingest.remote_write import WriteLimits
from detectord.serve import admission, snapshots
from detectord.serve.backfill import backfill
from detectord.serve.backfill import matchers as backfill_matchers
from detectord.serve.exports import InstanceExports
from detectord.serve.http import application
from detectord.serve.hugepages import use_huge_pages
from detectord.serve.inference import InferenceWorker, bucket_sizes, warm_up
from detectord.serve.metrics import DaemonMetrics
from detectord.serve.sink import ScoreSink
from detectord.serve.state import StateKeeper
from detectord.serve.systemd import Systemd
from detectord.serve.webconfig import WebSecurity

log = structlog.get_logger(__name__)

# In-flight requests may take this share of the shutdown budget; the rest is for the scores still
# queued and the alert flush.
HTTP_DRAIN_SHARE = 0.5
# Every stage gets at least this long, however little of the budget is left.
MIN_STAGE_S = 0.05


@dataclass
class _Pipeline:
    """Everything that depends on the loaded model; replaced whole on a reload that changes it."""

    model: Detector
    worker: InferenceWorker


class _Deadline:
    """One budget for the whole shutdown: each stage gets what the stages before it left."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.at - time.monotonic(), MIN_STAGE_S)


class Server:
    """The daemon: one per process, driven as `startup()`, `run()`, `shutdown()`.

    Its stages are held in an exit stack, entered in startup and left in reverse; `pipeline`
    (model and worker), `ingestor`, `sink` and `notifier` are the live ones, replaced by a reload.
    Signal handlers only set flags; a second SIGTERM or SIGINT exits at once.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        listen_override: str | None = None,
        enable_lifecycle: bool = False,
        web_config_file: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.listen_override = listen_override
        # POST /-/reload answers 403 without --web.enable-lifecycle, as Prometheus's does.
        self.enable_lifecycle = enable_lifecycle
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry, cfg.ingest.instance_labels)
        inf = cfg.inference
        # Not on the registry: /metrics renders them straight to text (see metrics_text).
        self.exports = InstanceExports(
            lambda: self.sink, cfg.ingest.instance_labels, inf.export_instances, inf.export_top
        )
        # --web.config.file: TLS, basic auth and headers for every endpoint; a bad file is a ConfigError here.
        self.web_security = WebSecurity(web_config_file, self.registry)
        self.ready = False
        # Set once ready: only a daemon that restored (or had nothing to restore) writes a
        # snapshot, so one that failed at start never replaces a good snapshot with an empty one.
        self.ready_once = False
        # What start-up is doing (for /-/ready while not ready).
        self.phase = "loading the model"
        self.systemd = Systemd()
        self.state: StateKeeper | None = None
        self.should_exit = asyncio.Event()
        self.pipeline: _Pipeline | None = None
        self.ingestor: Ingestor | None = None
        self.sink: ScoreSink | None = None
        self.notifier: AlertmanagerNotifier | None = None
        self.admission: admission.Admission | None = None
        self.port: int = 0
        self.step_s = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()
        self._deadline = _Deadline(float(cfg.web.shutdown_timeout))

    # ---- lifecycle -------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg, stack = self.cfg, self._stack
        loop = asyncio.get_running_loop()
        if cfg.ingest.huge_pages:
            why_not = use_huge_pages()
            if why_not is None:
                log.info("object memory in transparent huge pages")
            else:
                log.info("object memory in plain pages", why=why_not)
        self._enter("loading the model")
        if cfg.state.dir:
            await loop.run_in_executor(None, _cache_compiled, Path(cfg.state.dir) / "compiled")
        with logs.backend_noise_held():
            model = await loop.run_in_executor(None, load_model, cfg.model, cfg.ingest.step)
        self.step_s = step_seconds(cfg, model.step_seconds)
        if abs(self.step_s - model.step_seconds) > 1e-9:
            log.warning(
                "running a model at a step it was not made for (model.any_step)",
                step=self.step_s,
                model_step=model.step_seconds,
            )

        # Alert delivery opens first and closes last, once the final scores have reached it.
        self.notifier = await _open_notifier(cfg.alerting, self.registry, self.external_url())
        stack.push_async_callback(self._stop_alert_delivery)
        self.sink = ScoreSink(
            model,
            cfg.alerting,
            instance_labels=cfg.ingest.instance_labels,
            metrics=self.metrics,
            notifier=self.notifier,
            external_url=self.external_url(),
            history=cfg.inference.score_history,
        )

        # Left after the worker has delivered its last scores, before alert delivery stops.
        self.state = StateKeeper(
            cfg.state, fingerprint=self._fingerprint(model), model=_model_meta(model), metrics=self.metrics
        )
        stack.push_async_callback(self._save_state)

        worker = self._new_worker(model, cfg.inference, loop)
        with logs.backend_noise_held():
            await loop.run_in_executor(None, worker.warm_up)
        worker.start()
        self.pipeline = _Pipeline(model, worker)
        stack.push_async_callback(self._stop_worker)

        self.ingestor = Ingestor(
            step_ms=round(self.step_s * 1000),
            instance_labels=cfg.ingest.instance_labels,
            window=model.window,
            inputs=model.inputs,
            max_instances=cfg.ingest.max_instances,
            label_cache_bytes=cfg.ingest.label_cache_size,
            max_gap_steps=cfg.ingest.max_gap_steps,
            max_decoded=cfg.web.max_decoded_body_size,
            max_future_s=cfg.ingest.max_future,
            worker=worker,
            metrics=self.metrics,
            stale_after_s=self.stale_after_s(),
            failed_scrapes=cfg.ingest.failed_scrapes,
            crash_loop_restarts=cfg.ingest.crash_loop_restarts,
            crash_loop_within_s=float(cfg.ingest.crash_loop_within),
            on_liveness=lambda events: loop.call_soon_threadsafe(self._deliver_liveness, events),
            limits=WriteLimits.of(cfg.web),
        )
        self.ingestor.update_instance_gauges()
        stack.push_async_callback(self._close_ingestor)
        self._publish_model(model)

        stack.push_async_callback(self._cancel_tasks)
        self._spawn(self._evict_loop())
        self._spawn(self._stale_loop())

        if cfg.backfill.url:
            backfill_matchers(cfg.backfill)  # a bad selector is a config error, before listening

        self.admission = admission.Admission(
            admission.Limits(
                max_connections=admission.connection_cap(cfg.web.max_connections),
                max_concurrent_requests=cfg.web.max_concurrent_requests,
                max_body_bytes_in_flight=cfg.web.max_body_bytes_in_flight,
                read_header_timeout=float(cfg.web.read_header_timeout),
                read_body_timeout=float(cfg.web.read_body_timeout),
            ),
            self.registry,
        )
        loop.set_exception_handler(self.admission.exception_handler)
        self._spawn(self.admission.run())
        runner = web.AppRunner(
            application(self), access_log=None, shutdown_timeout=float(cfg.web.shutdown_timeout) * HTTP_DRAIN_SHARE
        )
        await runner.setup()
        # Leaving it stops accepting; requests in flight finish within the runner's shutdown_timeout.
        stack.push_async_callback(runner.cleanup)
        host, port = listen_host_port(cfg)
        # The SSLContext lives as long as the listener; reloads swap what it serves (webconfig.ListeningContext).
        await admission.Site(runner, host, port, self.admission, ssl_context=self.web_security.ssl_context).start()
        self.port = int(runner.addresses[0][1])
        if self.web_security.path is not None:
            self._spawn(self.web_security.watch())

        # Listening (healthy) but not ready: remote writes are answered 503 and retried by
        # Prometheus until every known instance has its state back.
        self._enter("restoring state")
        await self.state.restore(self.ingestor, self.sink)
        if cfg.backfill.url:
            self._enter("backfilling from Prometheus")
            await backfill(cfg.backfill, self.ingestor, self.metrics)
        if self.state.enabled:
            self._spawn(self.state.run(self.ingestor, self.sink))

        _freeze_heap()
        self.phase = "ready"
        self.ready = self.ready_once = True
        self.metrics.ready.set(1)
        self.systemd.ready(self.status())
        self._spawn(self.systemd.run(self.status))
        log.info(
            "detectord started",
            version=__version__,
            listen=f"{host}:{self.port}",
            tls=self.web_security.ssl_context is not None,
            basic_auth=bool(self.web_security.config.basic_auth_users),
            model=model.name,
            model_version=model.version,
            window=model.window,
            step=self.step_s,
        )

    async def run(self) -> None:
        self.install_signal_handlers()
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Close every stage in reverse order, within `web.shutdown_timeout` in all."""
        log.info("shutting down", budget_seconds=float(self.cfg.web.shutdown_timeout))
        self.ready = False
        self.phase = "shutting down"
        self.metrics.ready.set(0)
        self.systemd.stopping()
        self._deadline = _Deadline(float(self.cfg.web.shutdown_timeout))
        await self._stack.aclose()
        self.systemd.close()
        log.info("stopped")

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.systemd.notify(f"STATUS={phase}")

    def status(self) -> str:
        """One line on what detectord is doing: systemd's STATUS= (`systemctl status detectord`)."""
        if self.ingestor is None or self.pipeline is None:
            return self.phase
        n = self.ingestor.instance_counts
        model = self.pipeline.model
        return (
            f"{self.phase}: {sum(n.values())} instances tracked ({n['scoring']} scoring, {n['warming']} warming, "
            f"{n['down']} down); model {model.name} {model.version} at {self.step_s:g}s"
        )

    async def _cancel_tasks(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _close_ingestor(self) -> None:
        if self.ingestor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.ingestor.close)

    async def _stop_worker(self) -> None:
        if self.pipeline is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pipeline.worker.stop, self._deadline.left())
        await asyncio.sleep(0)  # deliver the scores the worker handed back while stopping

    async def _save_state(self) -> None:
        if self.state is None:
            return
        if self.state.enabled and self.ingestor is not None and self.sink is not None and self.ready_once:
            await self.state.final_snapshot(self.ingestor, self.sink)
        await asyncio.get_running_loop().run_in_executor(None, self.state.close)

    async def _stop_alert_delivery(self) -> None:
        if self.notifier is not None:
            await _close_notifier(self.notifier, self._deadline.left())

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_quietly("SIGHUP")))

    def _on_exit_signal(self) -> None:
        if self.should_exit.is_set():
            # A second signal: the operator does not want to wait. Say what is lost first.
            log.warning("forced exit")
            if self.notifier is not None:
                self.notifier.report_undelivered()
            os._exit(1)
        self.should_exit.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        # Keep a hard reference so the task is not garbage-collected while it runs.
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def metrics_text(self) -> bytes:
        """/metrics: the registry's metrics, then the per-instance series (serve.exports)."""
        return generate_latest(self.registry) + self.exports.text()

    def external_url(self) -> str:
        if self.cfg.web.external_url:
            return self.cfg.web.external_url.rstrip("/")
        host, port = listen_host_port(self.cfg)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        scheme = "https" if self.web_security.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port or port}"

    # ---- model, worker and reload -----------------------------------------------------------

    def _new_worker(self, model: Detector, inf: InferenceConfig, loop: asyncio.AbstractEventLoop) -> InferenceWorker:
        assert self.sink is not None
        return InferenceWorker(
            model,
            window=model.window,
            nfeatures=model.nfeatures,
            max_batch=inf.max_batch,
            max_wait=inf.max_wait,
            queue_size=inf.queue_size,
            deliver=self.sink.deliver,
            loop=loop,
            metrics=self.metrics,
        )

    def _fingerprint(self, model: Detector) -> dict[str, Any]:
        return snapshots.fingerprint(
            features=model.features,
            window=model.window,
            step_s=self.step_s,
            inputs=model.inputs,
            instance_labels=self.cfg.ingest.instance_labels,
        )

    def _publish_model(self, model: Detector) -> None:
        self.metrics.threshold.set(model.threshold)
        self.metrics.model_info.info(
            {
                "name": model.name,
                "version": model.version,
                "kind": model.kind,
                "trained_at": model.trained_at,
                "features": ",".join(model.features),
                "window": str(model.window),
                "step_seconds": f"{model.step_seconds:g}",
                "path": str(model.path),
            }
        )

    async def _reload_quietly(self, trigger: str) -> None:
        self.systemd.reloading()
        try:
            with contextlib.suppress(DetectordError):  # reload() has logged and counted it
                await self.reload(trigger)
        finally:
            self.systemd.ready(self.status())

    async def reload(self, trigger: str) -> None:
        """Load the web config, config and model anew; whichever is broken, keep running the old one."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            web_error: ConfigError | None = None
            try:
                await self.web_security.reload(trigger)
            except ConfigError as exc:  # logged and counted; the rest still reloads
                web_error = exc
            try:
                if self.config_path is None:
                    raise ConfigError("--config.file", "no config file to reload (started without one)")
                cfg = await loop.run_in_executor(None, load_config, self.config_path)
                if self.listen_override:
                    cfg = with_listen_address(cfg, self.listen_override)
                self._check_reloadable(cfg)
                model = await loop.run_in_executor(None, load_model, cfg.model, cfg.ingest.step)
                if abs(step_seconds(cfg, model.step_seconds) - self.step_s) > 1e-9:
                    raise ConfigError("ingest.step", "the step cannot change on reload; restart detectord")
                await loop.run_in_executor(
                    None, warm_up, model, bucket_sizes(cfg.inference.max_batch), model.window, model.nfeatures
                )
            except DetectordError as exc:
                self.metrics.reloads.labels("failure").inc()
                self.metrics.last_reload_successful.set(0)
                log.error(
                    "reload refused; still running the previous config and model", trigger=trigger, error=str(exc)
                )
                raise
            assert self.pipeline is not None and self.ingestor is not None and self.sink is not None
            old = self.pipeline
            same_shape = (
                model.window == old.model.window
                and model.features == old.model.features
                and model.inputs == old.model.inputs
            )
            if same_shape and cfg.inference == self.cfg.inference:
                old.worker.swap(model)
                self.pipeline = _Pipeline(model, old.worker)
            else:
                worker = self._new_worker(model, cfg.inference, loop)
                worker.start()
                self.pipeline = _Pipeline(model, worker)
                self.ingestor.worker = worker
                if not same_shape:
                    await self.ingestor.call(self.ingestor.reset_windows, model.window, model.inputs)
                await loop.run_in_executor(None, old.worker.stop, 5.0)
            if cfg.alerting != self.cfg.alerting:
                assert self.notifier is not None
                await _close_notifier(self.notifier, 2.0)
                self.notifier = await _open_notifier(cfg.alerting, self.registry, self.external_url())
            assert self.notifier is not None
            self.sink.use(model, cfg.alerting, self.notifier, history=cfg.inference.score_history)
            self.exports.export, self.exports.top = cfg.inference.export_instances, cfg.inference.export_top
            self.cfg = cfg
            # Plain values the ingest thread reads at its next write.
            self.ingestor.liveness.stale_after_s = self.stale_after_s()
            self.ingestor.liveness.failed_scrapes = cfg.ingest.failed_scrapes
            self.ingestor.crash_loops.restarts = cfg.ingest.crash_loop_restarts
            self.ingestor.crash_loops.within_s = float(cfg.ingest.crash_loop_within)
            await self.ingestor.call(setattr, self.ingestor.extractor.labels, "limits", WriteLimits.of(cfg.web))
            self._publish_model(model)
            assert self.state is not None
            self.state.use(self._fingerprint(model), _model_meta(model))
            # The old model is garbage now; collect it once (a short pause) and freeze the new one.
            gc.unfreeze()
            await loop.run_in_executor(None, _freeze_heap)
            self.metrics.reloads.labels("success").inc()
            self.metrics.last_reload_successful.set(1)
            self.metrics.last_reload_success_time.set_to_current_time()
            log.info("reloaded", trigger=trigger, model=model.name, model_version=model.version)
            if web_error is not None:
                raise web_error

    def _check_reloadable(self, cfg: Config) -> None:
        if cfg.ingest.instance_labels != self.cfg.ingest.instance_labels:
            raise ConfigError("ingest.instance_labels", "cannot change on reload; restart detectord")
        if cfg.web.listen_address != self.cfg.web.listen_address:
            raise ConfigError("web.listen_address", "cannot change on reload; restart detectord")
        if cfg.ingest.huge_pages != self.cfg.ingest.huge_pages:
            # The arenas' allocator is the process's for good once installed.
            raise ConfigError("ingest.huge_pages", "cannot change on reload; restart detectord")

    def stale_after_s(self) -> float:
        if self.cfg.ingest.stale_after is not None:
            return float(self.cfg.ingest.stale_after)
        return max(120.0, 3 * self.step_s)

    def _deliver_liveness(self, events: list[LivenessEvent]) -> None:
        if self.sink is not None:
            self.sink.liveness(events)

    async def _stale_loop(self) -> None:
        # Every step: an instance that went quiet alerts within a step of stale_after.
        while True:
            await asyncio.sleep(max(0.5, self.step_s))
            assert self.ingestor is not None
            await self.ingestor.call(self.ingestor.check_stale)

    async def _evict_loop(self) -> None:
        ttl = float(self.cfg.ingest.instance_ttl)
        while True:
            await asyncio.sleep(max(0.05, min(ttl / 10, 30.0)))
            assert self.ingestor is not None and self.sink is not None
            gone: list[InstanceKey] = await self.ingestor.call(self.ingestor.evict_idle, time.monotonic() - ttl)
            if gone:
                self.sink.forget(gone)
                log.info("instances evicted", count=len(gone))


async def _open_notifier(cfg: AlertingConfig, registry: CollectorRegistry, external_url: str) -> AlertmanagerNotifier:
    notifier = AlertmanagerNotifier(cfg, registry=registry, external_url=external_url)
    await notifier.__aenter__()
    return notifier


async def _close_notifier(notifier: AlertmanagerNotifier, flush_timeout: float) -> None:
    await notifier.flush(flush_timeout)
    await notifier.__aexit__(None, None, None)


def _model_meta(model: Detector) -> dict[str, str]:
    return {"name": model.name, "version": model.version, "kind": model.kind}


def _cache_compiled(directory: Path) -> None:
    try:
        backend.choose()
    except ModelError:
        return  # load_model says so, with the rest of what is wrong
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot keep compiled models; every start compiles them", dir=str(directory), error=str(exc))
        return
    backend.cache_compiled(directory)


def _freeze_heap() -> None:
    """Move everything allocated so far (TensorFlow, Keras, the model: ~10^5 objects) out of the
    cyclic GC's reach. Otherwise every full collection scans them all, holding the GIL for
    ~0.2 s, and the event loop stalls whichever thread triggered it."""
    gc.collect()
    gc.freeze()


async def serve(
    cfg: Config,
    *,
    config_path: str | None,
    listen_override: str | None,
    enable_lifecycle: bool = False,
    web_config_file: str | None = None,
) -> int:
    try:
        srv = Server(
            cfg,
            config_path=config_path,
            listen_override=listen_override,
            enable_lifecycle=enable_lifecycle,
            web_config_file=web_config_file,
        )
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        return 2
    try:
        await srv.startup()
    except (ModelError, ConfigError, OSError) as exc:
        # OSError: the listen address is taken or not ours. Shut down what started (the inference
        # worker, alert delivery) so the process exits with one line, not a traceback.
        log.error("cannot start", error=str(exc))
        await srv.shutdown()
        return 2 if isinstance(exc, ConfigError) else 1
    try:
        await srv.run()
    finally:
        await srv.shutdown()
    return 0

"""Delivery of alerts to every configured Alertmanager: a bounded queue, a sender and an HTTP
session (its own `http_config`) per Alertmanager, re-sends of firing and resolved alerts, retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from weakref import WeakKeyDictionary

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectord import http_client
from detectord.alerting.states import Alert, LabelsKey
from detectord.config import AlertingConfig, AlertmanagerConfig
from detectord.errors import ConfigError

log = structlog.get_logger(__name__)

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        am = ["alertmanager"]
        self.sent = Counter("detectord_alerts_sent_total", "Alerts Alertmanager accepted.", am, registry=registry)
        self.failures = Counter(
            "detectord_alert_send_failures_total",
            "Alerts in posts to Alertmanager that failed, by reason (connection, tls, timeout, credentials "
            "(a password or token file unreadable), tls_config (certificates unloadable), http_<code>); "
            "all but 4xx answers are retried.",
            [*am, "reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "detectord_alerts_dropped_total",
            "Alerts given up on, by reason: queue_full (oldest dropped while Alertmanager was unreachable) or "
            "rejected (a 4xx answer, 401 and 403 included).",
            [*am, "reason"],
            registry=registry,
        )
        self.queue_length = Gauge(
            "detectord_notification_queue_length", "Alerts waiting to be sent to Alertmanager.", am, registry=registry
        )
        self.latency = Histogram(
            "detectord_notification_latency_seconds",
            "Time of one post to Alertmanager, failed ones included.",
            am,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


# A notifier is replaced on reload; its successor keeps counting on the same series.
_METRICS: WeakKeyDictionary[CollectorRegistry, _NotifierMetrics] = WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _NotifierMetrics:
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = _NotifierMetrics(registry)
    return m


@dataclass(slots=True)
class _Tracked:
    alert: Alert
    next_send: float  # monotonic
    expires: float | None = None  # monotonic; set once the alert is resolved


class AlertmanagerNotifier:
    """Posts alerts to every configured Alertmanager, each independently.

    `submit` is synchronous and never blocks. Each Alertmanager has a bounded queue holding the
    newest state of each alert and a task that sends it in batches, retrying failures with
    jittered exponential backoff. Firing alerts are re-sent every `resend_interval`, resolved ones
    for `resolved_resend_for`.
    """

    def __init__(
        self,
        cfg: AlertingConfig,
        *,
        registry: CollectorRegistry,
        external_url: str,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(f"backoff must satisfy 0 < min_backoff <= max_backoff, got {min_backoff}, {max_backoff}")
        self.cfg = cfg
        self.external_url = external_url.rstrip("/")
        self.metrics = _metrics_for(registry)
        self._targets = [
            _Target(am, f"alerting.alertmanagers[{i}]", self, min_backoff, max_backoff)
            for i, am in enumerate(cfg.alertmanagers)
        ]
        self._active: dict[LabelsKey, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AlertmanagerNotifier:
        """Open each Alertmanager's session and start sending. One whose certificates cannot be
        loaded is logged and tried again at each send (never raises: a reload has already closed
        the previous notifier when it opens this one)."""
        for t in self._targets:
            with contextlib.suppress(ConfigError):
                t.open()
        for t in self._targets:
            self._spawn(t.run(), f"alertmanager {t.url}")
        if self._targets:
            self._spawn(self._resend_loop(), "alert resends")
        log.info("alert notifier started", alertmanagers=[t.url for t in self._targets])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.report_undelivered()
        for t in self._targets:
            with contextlib.suppress(KeyError):
                self.metrics.queue_length.remove(t.url)
        await asyncio.gather(*(t.close() for t in self._targets))

    def report_undelivered(self) -> None:
        """Log, per Alertmanager, the alerts still queued or in flight (they are lost on exit)."""
        for t in self._targets:
            undelivered = len(t.queue) + len(t.in_flight)
            if undelivered:
                log.warning("alerts not delivered", alertmanager=t.url, count=undelivered)

    def submit(self, alerts: Iterable[Alert]) -> None:
        """Queue alerts that changed state for every Alertmanager; returns at once."""
        if not self._targets:
            return
        batch = list(alerts)
        if not batch:
            return
        now = time.monotonic()
        for a in batch:
            expires = now + self.cfg.resolved_resend_for if a.resolved else None
            self._active[a.key] = _Tracked(a, now + self.cfg.resend_interval, expires)
        for t in self._targets:
            t.enqueue(batch)

    def resolved_resending(self) -> list[tuple[Alert, float]]:
        """Resolved alerts still being re-sent, with the seconds of re-sending left."""
        now = time.monotonic()
        return [
            (tr.alert, tr.expires - now)
            for tr in self._active.values()
            if tr.alert.resolved and tr.expires is not None and tr.expires > now
        ]

    def resume_resolved(self, alerts: Iterable[tuple[Alert, float]]) -> None:
        """After a restart: send resolved alerts again, each for the re-sending time it had left."""
        batch = [(a, left) for a, left in alerts if a.resolved and left > 0 and a.key not in self._active]
        self.submit(a for a, _ in batch)
        now = time.monotonic()
        for a, left in batch:
            tr = self._active.get(a.key)
            if tr is not None:
                tr.expires = now + min(left, self.cfg.resolved_resend_for)

    def queued(self) -> dict[str, int]:
        """Alerts not yet delivered (queued or in flight) per Alertmanager URL."""
        return {t.url: len(t.queue) + len(t.in_flight) for t in self._targets}

    async def flush(self, timeout: float) -> None:
        """Try to deliver everything queued within `timeout` seconds, then return (for shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout
        await asyncio.gather(*(t.drain(deadline) for t in self._targets))

    def _spawn(self, coro: Any, name: str) -> None:
        # Keep a hard reference so the task is not garbage-collected while it runs.
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("alert delivery task failed", task=task.get_name(), exc_info=task.exception())

    async def _resend_loop(self) -> None:
        interval = float(self.cfg.resend_interval)
        # Waking for every alert's own due time could mean thousands of wake-ups per interval.
        min_sleep = interval / 20
        while True:
            now = time.monotonic()
            due: list[Alert] = []
            wake = now + interval
            for key, tr in list(self._active.items()):
                if tr.alert.resolved:
                    if tr.expires is None:  # resolved in place without being submitted
                        tr.expires = now + self.cfg.resolved_resend_for
                    if now >= tr.expires:
                        del self._active[key]
                        continue
                if now >= tr.next_send:
                    due.append(tr.alert)
                    tr.next_send = now + interval
                wake = min(wake, tr.next_send)
            if due:
                for t in self._targets:
                    t.enqueue(due)
            await asyncio.sleep(max(wake - time.monotonic(), min_sleep))


_Outcome = Literal["ok", "retry", "rejected"]


class _Target:
    """One Alertmanager: its queue, its sender task's state and its backoff."""

    def __init__(
        self, am: AlertmanagerConfig, key: str, owner: AlertmanagerNotifier, min_backoff: float, max_backoff: float
    ) -> None:
        self.config, self.key = am, key
        # Names the Alertmanager in metrics and logs; never holds a secret (config refuses them).
        self.url = am.url.rstrip("/") + am.path_prefix.rstrip("/")
        self.endpoint = f"{self.url}/api/v2/alerts"
        self.timeout = aiohttp.ClientTimeout(total=float(am.timeout))
        self._session: aiohttp.ClientSession | None = None
        self._tls_broken = False
        self.owner = owner
        self.capacity = owner.cfg.queue_capacity
        self.max_batch = owner.cfg.max_batch
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff
        # Keyed by label set, so a newer state of an alert replaces the queued one in its place.
        self.queue: OrderedDict[LabelsKey, Alert] = OrderedDict()
        self.in_flight: list[Alert] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_now = asyncio.Event()
        self._failed_attempts = 0
        self._failing_since = 0.0
        m = owner.metrics
        self._sent = m.sent.labels(self.url)
        self._latency = m.latency.labels(self.url)
        self._queue_length = m.queue_length.labels(self.url)
        self._queue_length.set(0)
        # Both reasons from the start: a rule or a panel on them reads 0, not "no data", until one happens.
        for reason in ("queue_full", "rejected"):
            m.dropped.labels(self.url, reason)

    def open(self) -> aiohttp.ClientSession:
        """This Alertmanager's session, made now if not yet; ConfigError if its certificates
        (tls_config) cannot be loaded, logged once until they can."""
        if self._session is None:
            try:
                self._session = http_client.session(
                    self.config.http_config,
                    f"{self.key}.http_config",
                    url=self.config.url,
                    timeout=float(self.config.timeout),
                )
            except ConfigError as exc:
                if not self._tls_broken:
                    log.error("cannot load certificates; alerts wait", alertmanager=self.url, error=str(exc))
                self._tls_broken = True
                raise
            self._tls_broken = False
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def enqueue(self, alerts: Iterable[Alert]) -> None:
        for a in alerts:
            self.queue[a.key] = a
        self._trim()
        self._idle.clear()
        self._wake.set()

    def _requeue(self, batch: list[Alert]) -> None:
        for a in reversed(batch):
            if a.key not in self.queue:  # else a newer state arrived while this batch was in flight
                self.queue[a.key] = a
                self.queue.move_to_end(a.key, last=False)
        self._trim()

    def _trim(self) -> None:
        over = len(self.queue) - self.capacity
        if over > 0:
            for _ in range(over):
                self.queue.popitem(last=False)
            self.owner.metrics.dropped.labels(self.url, "queue_full").inc(over)
            log.warning(
                "alert queue full; oldest alerts dropped", alertmanager=self.url, dropped=over, capacity=self.capacity
            )
        self._queue_length.set(len(self.queue))

    async def run(self) -> None:
        while True:
            if not self.queue:
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = [self.queue.popitem(last=False)[1] for _ in range(min(self.max_batch, len(self.queue)))]
            self._queue_length.set(len(self.queue))
            self.in_flight = batch
            outcome = await self._post(batch)
            self.in_flight = []
            if outcome == "retry":
                self._requeue(batch)
                await self._sleep_backoff()
            else:
                self.backoff = self.min_backoff

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self._idle.is_set():
            return
        self.backoff = self.min_backoff
        self._retry_now.set()
        try:
            await asyncio.wait_for(self._idle.wait(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            log.warning("alerts still queued at the end of the flush", alertmanager=self.url, count=len(self.queue))

    async def _sleep_backoff(self) -> None:
        delay = random.uniform(self.backoff / 2, self.backoff)
        self.backoff = min(self.backoff * 2, self.max_backoff)
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), delay)

    async def _post(self, batch: list[Alert]) -> _Outcome:
        owner = self.owner
        now = time.time()
        payload = [a.to_api(now, owner.cfg.resend_interval) for a in batch]
        if owner.external_url:
            for p in payload:
                p.setdefault("generatorURL", owner.external_url)
        start = time.monotonic()
        status, body = 0, b""
        reason = ""
        try:
            session = self.open()
            async with session.post(self.endpoint, json=payload, timeout=self.timeout) as resp:
                status = resp.status
                body = await resp.read()
        except TimeoutError:
            reason = "timeout"
        except ConfigError as exc:
            reason, body = "tls_config", exc.reason.encode()
        except http_client.CredentialsError as exc:
            reason, body = "credentials", str(exc).encode()
        except http_client.RedirectNotFollowed as exc:
            status, body = exc.status, exc.message.encode()
        except aiohttp.ClientSSLError as exc:
            reason, body = "tls", str(exc).encode()
        except aiohttp.ClientConnectionError as exc:
            reason, body = "connection", str(exc).encode()
        except aiohttp.ClientError as exc:
            reason, body = "error", f"{type(exc).__name__}: {exc}".encode()
        finally:
            self._latency.observe(time.monotonic() - start)
        if reason == "" and 200 <= status < 300:
            self._sent.inc(len(batch))
            if self._failed_attempts:
                log.info(
                    "alertmanager reachable again",
                    alertmanager=self.url,
                    failed_attempts=self._failed_attempts,
                    down_for=round(time.monotonic() - self._failing_since, 3),
                )
                self._failed_attempts = 0
            return "ok"
        reason = reason or f"http_{status}"
        owner.metrics.failures.labels(self.url, reason).inc(len(batch))
        detail = _error_detail(body)
        if 400 <= status < 500 and status not in (408, 429):
            owner.metrics.dropped.labels(self.url, "rejected").inc(len(batch))
            log.error(
                "alertmanager refused alerts; not retrying",
                alertmanager=self.url,
                status=status,
                reason=detail,
                alerts=len(batch),
            )
            return "rejected"
        if self._failed_attempts == 0:
            self._failing_since = start
            log.warning(
                "cannot send alerts; retrying", alertmanager=self.url, reason=reason, detail=detail, alerts=len(batch)
            )
        else:
            log.debug(
                "cannot send alerts; retrying",
                alertmanager=self.url,
                reason=reason,
                detail=detail,
                attempt=self._failed_attempts + 1,
            )
        self._failed_attempts += 1
        return "retry"


def _error_detail(body: bytes, limit: int = 500) -> str:
    """Alertmanager's reason: a JSON string, or an object with `message`, or plain text."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text[:limit]
    if isinstance(parsed, dict):
        parsed = parsed.get("message", text)
    return (parsed if isinstance(parsed, str) else text)[:limit]

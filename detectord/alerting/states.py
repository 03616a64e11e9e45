"""Alert states per CoreDNS instance, and their delivery to every configured Alertmanager.

`AlertStates` turns scored steps into Prometheus-style alert states without any I/O;
`AlertmanagerNotifier` posts firing and resolved alerts, re-sends them, and retries failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote
from weakref import WeakKeyDictionary

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectord.config import AlertingConfig, AlertmanagerConfig

log = structlog.get_logger(__name__)

ALERTNAME = "CoreDNSAnomaly"
# How far ahead a firing alert's endsAt lies, in resend intervals (as Prometheus does).
ENDS_AT_RESENDS = 4
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0

AlertState = Literal["inactive", "pending", "firing"]
InstanceKey = tuple[str, ...]
LabelsKey = tuple[tuple[str, str], ...]
TopFeatures = Sequence[tuple[str, float, float]]


# ---- alert states ----------------------------------------------------------------------------


@dataclass(eq=False)
class Alert:
    """One alert as Alertmanager sees it. A firing alert is updated in place while it fires."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float  # data time (seconds) of the step the alert began firing at
    score: float
    threshold: float
    generator_url: str = ""
    resolved_at: float | None = None
    key: LabelsKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = tuple(sorted(self.labels.items()))

    @property
    def resolved(self) -> bool:
        return self.resolved_at is not None

    def to_api(self, now: float, resend_interval: float) -> dict[str, Any]:
        """The Alertmanager v2 `PostableAlert` for this alert, sent at wall time `now`."""
        if self.resolved_at is not None:
            ends_at = self.resolved_at
        else:
            ends_at = now + ENDS_AT_RESENDS * resend_interval
        # Alertmanager refuses an alert that ends before it starts (clock skew between data and wall time).
        ends_at = max(ends_at, self.starts_at)
        out: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(ends_at),
        }
        if self.generator_url:
            out["generatorURL"] = self.generator_url
        return out


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Resemblance:
    """The incident class an alert names: the one its anomalous steps resembled most often so far
    (ties go to the latest). A window that has just turned anomalous is mostly healthy rows and
    its class is a guess; the tally settles within a few steps."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._best: str | None = None

    def add(self, name: str | None) -> str | None:
        """Count one anomalous step's class; None (a model that names none) names nothing."""
        if not name:
            return None
        n = self._counts[name] = self._counts.get(name, 0) + 1
        if self._best is None or n >= self._counts[self._best]:
            self._best = name
        return self._best


@dataclass(slots=True)
class _Track:
    """An instance whose alert is pending or firing."""

    labels: dict[str, str]
    active_at: float
    last_ts: float
    alert: Alert | None = None  # set while firing
    keep_firing_since: float | None = None
    resemblance: Resemblance = field(default_factory=Resemblance)


class AlertStates:
    """Per-instance alert state machine, driven once per scored step with the step's data time.

    inactive → pending at the first anomalous step (score > 1); pending → firing once anomalous
    for `for`; a normal step while pending → inactive; firing → resolved after `keep_firing_for`
    of normal steps. Warming instances must not be observed.
    """

    def __init__(self, cfg: AlertingConfig, *, model_name: str, external_url: str) -> None:
        self.cfg = cfg
        self.model_name = model_name
        self.external_url = external_url.rstrip("/")
        self._tracks: dict[InstanceKey, _Track] = {}
        # Firing alerts whose identity changed on reconfiguration; returned, resolved, by the next call.
        self._retired: list[Alert] = []

    def observe(self, instance: InstanceKey, labels: Mapping[str, str], step_ts: float, score: float,
                threshold: float, top_features: TopFeatures, looks_like: str | None = None) -> list[Alert]:
        """Advance `instance` by one step; return the alerts that began firing or resolved."""
        changed, self._retired = self._retired, []
        anomalous = score > 1.0
        tr = self._tracks.get(instance)
        if tr is None:
            if not anomalous:
                return changed
            tr = self._tracks[instance] = _Track(dict(labels), active_at=step_ts, last_ts=step_ts)
        tr.last_ts = step_ts
        if anomalous:
            looks_like = tr.resemblance.add(looks_like)
        if tr.alert is None:
            if not anomalous:
                del self._tracks[instance]
            elif step_ts - tr.active_at >= self.cfg.for_:
                tr.alert = self._new_alert(tr.labels, step_ts, score, threshold, top_features, looks_like)
                changed.append(tr.alert)
            return changed
        if anomalous:
            tr.keep_firing_since = None
            self._describe(tr.alert, score, threshold, top_features, looks_like)
            return changed
        if tr.keep_firing_since is None:
            tr.keep_firing_since = step_ts
        if step_ts - tr.keep_firing_since >= self.cfg.keep_firing_for:
            tr.alert.resolved_at = max(step_ts, tr.alert.starts_at)
            changed.append(tr.alert)
            del self._tracks[instance]
        return changed

    def forget(self, instance: InstanceKey) -> list[Alert]:
        """Drop an evicted instance; its firing alert resolves at the last step it was seen."""
        changed, self._retired = self._retired, []
        tr = self._tracks.pop(instance, None)
        if tr is not None and tr.alert is not None:
            tr.alert.resolved_at = max(tr.last_ts, tr.alert.starts_at)
            changed.append(tr.alert)
        return changed

    def firing(self) -> list[Alert]:
        return [tr.alert for tr in self._tracks.values() if tr.alert is not None]

    def is_firing(self, instance: InstanceKey) -> bool:
        tr = self._tracks.get(instance)
        return tr is not None and tr.alert is not None

    def state_of(self, instance: InstanceKey) -> AlertState:
        tr = self._tracks.get(instance)
        if tr is None:
            return "inactive"
        return "firing" if tr.alert is not None else "pending"

    def counts(self) -> dict[AlertState, int]:
        """Instances by alert state, for a gauge (inactive ones are not tracked and not counted)."""
        firing = sum(1 for tr in self._tracks.values() if tr.alert is not None)
        return {"pending": len(self._tracks) - firing, "firing": firing}

    def reconfigured(self, cfg: AlertingConfig, *, model_name: str) -> AlertStates:
        """The same states under a new config or model; alerts whose labels change are replaced.

        The old alert of each replaced one resolves and is returned by the next `observe` or `forget`.
        """
        new = AlertStates(cfg, model_name=model_name, external_url=self.external_url)
        new._retired = list(self._retired)
        for instance, tr in self._tracks.items():
            old = tr.alert
            # Another model's classes are not this one's.
            moved = _Track(tr.labels, tr.active_at, tr.last_ts, None, tr.keep_firing_since,
                           tr.resemblance if model_name == self.model_name else Resemblance())
            if old is not None:
                alert = new._new_alert(tr.labels, old.starts_at, old.score, old.threshold, ())
                if alert.key == old.key:
                    old.annotations["summary"] = alert.annotations["summary"]
                    alert = old
                else:
                    alert.annotations["description"] = old.annotations.get("description", "")
                    old.resolved_at = max(tr.last_ts, old.starts_at)
                    new._retired.append(old)
                moved.alert = alert
            new._tracks[instance] = moved
        return new

    def _new_alert(self, instance_labels: Mapping[str, str], starts_at: float, score: float, threshold: float,
                   top_features: TopFeatures, looks_like: str | None = None) -> Alert:
        # Identity labels first: configured extras may add labels but never merge two instances' alerts.
        labels = {"alertname": ALERTNAME, **instance_labels}
        labels.setdefault("severity", self.cfg.severity)
        labels.setdefault("model", self.model_name)
        for name, value in self.cfg.labels.items():
            labels.setdefault(name, value)
        alert = Alert(labels=labels, annotations={"summary": _summary(instance_labels)}, starts_at=starts_at,
                      score=score, threshold=threshold, generator_url=self._generator_url(instance_labels))
        self._describe(alert, score, threshold, top_features, looks_like)
        return alert

    def _describe(self, alert: Alert, score: float, threshold: float, top_features: TopFeatures,
                  looks_like: str | None = None) -> None:
        alert.score, alert.threshold = score, threshold
        top = ", ".join(f"{name} {dev:+.1f}σ ({_num(value)})"
                        for name, dev, value in top_features[: self.cfg.top_features])
        text = f"Anomaly score {score:.2f} (above 1 is anomalous; model threshold {threshold:g})."
        if looks_like:
            text += f" Looks like {looks_like.replace('_', ' ')}."
        if top:
            text += f" Top contributing features: {top}."
        alert.annotations.update(description=text, score=f"{score:.4g}", threshold=f"{threshold:g}")
        if looks_like:
            alert.annotations["looks_like"] = looks_like
        else:
            alert.annotations.pop("looks_like", None)

    def _generator_url(self, instance_labels: Mapping[str, str]) -> str:
        if not self.external_url:
            return ""
        name = instance_labels.get("instance") or next(iter(instance_labels.values()), "")
        return f"{self.external_url}/api/v1/instances?instance={quote(name, safe='')}"


def _summary(labels: Mapping[str, str]) -> str:
    name = labels.get("instance")
    rest = [f"{k} {v}" for k, v in labels.items() if k != "instance"]
    if name is None:
        return f"CoreDNS {', '.join(rest)} is behaving anomalously"
    where = f" ({', '.join(rest)})" if rest else ""
    return f"CoreDNS {name}{where} is behaving anomalously"


def _num(v: float) -> str:
    """Three significant digits, without an exponent for everyday magnitudes."""
    if not math.isfinite(v):
        return str(v)
    if v == 0 or not 1e-3 <= abs(v) < 1e6:
        return f"{v:.3g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---- delivery to Alertmanager ----------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        am = ["alertmanager"]
        self.sent = Counter(
            "detectord_alerts_sent_total", "Alerts Alertmanager accepted.", am, registry=registry)
        self.failures = Counter(
            "detectord_alert_send_failures_total",
            "Alerts in posts to Alertmanager that failed, by reason (connection, timeout, http_<code>); "
            "all but 4xx answers are retried.", [*am, "reason"], registry=registry)
        self.dropped = Counter(
            "detectord_alerts_dropped_total",
            "Alerts given up on, by reason: queue_full (oldest dropped while Alertmanager was unreachable) or "
            "rejected (a 4xx answer).", [*am, "reason"], registry=registry)
        self.queue_length = Gauge(
            "detectord_notification_queue_length", "Alerts waiting to be sent to Alertmanager.", am,
            registry=registry)
        self.latency = Histogram(
            "detectord_notification_latency_seconds", "Time of one post to Alertmanager, failed ones included.",
            am, buckets=_LATENCY_BUCKETS, registry=registry)


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

    def __init__(self, cfg: AlertingConfig, *, registry: CollectorRegistry,
                 session: aiohttp.ClientSession | None = None, external_url: str,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(f"backoff must satisfy 0 < min_backoff <= max_backoff, got {min_backoff}, {max_backoff}")
        self.cfg = cfg
        self.external_url = external_url.rstrip("/")
        self.metrics = _metrics_for(registry)
        self._session = session
        self._own_session = session is None
        self._targets = [_Target(am, self, min_backoff, max_backoff) for am in cfg.alertmanagers]
        self._active: dict[LabelsKey, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AlertmanagerNotifier used outside `async with`")
        return self._session

    async def __aenter__(self) -> AlertmanagerNotifier:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        for t in self._targets:
            self._spawn(t.run(), f"alertmanager {t.url}")
        if self._targets:
            self._spawn(self._resend_loop(), "alert resends")
        log.info("alert notifier started", alertmanagers=[t.url for t in self._targets])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for t in self._targets:
            undelivered = len(t.queue) + len(t.in_flight)
            if undelivered:
                log.warning("alerts not delivered", alertmanager=t.url, count=undelivered)
            with contextlib.suppress(KeyError):
                self.metrics.queue_length.remove(t.url)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

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

    def __init__(self, am: AlertmanagerConfig, owner: AlertmanagerNotifier, min_backoff: float,
                 max_backoff: float) -> None:
        self.url = am.url.rstrip("/")
        self.endpoint = f"{self.url}/api/v2/alerts"
        self.timeout = aiohttp.ClientTimeout(total=float(am.timeout))
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
            log.warning("alert queue full; oldest alerts dropped", alertmanager=self.url, dropped=over,
                        capacity=self.capacity)
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
            log.warning("alerts still queued at the end of the flush", alertmanager=self.url,
                        count=len(self.queue))

    async def _sleep_backoff(self) -> None:
        delay = random.uniform(self.backoff / 2, self.backoff)
        self.backoff = min(self.backoff * 2, self.max_backoff)
        self._retry_now.clear()
        try:
            await asyncio.wait_for(self._retry_now.wait(), delay)
        except TimeoutError:
            pass

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
            async with owner.session.post(self.endpoint, json=payload, timeout=self.timeout) as resp:
                status = resp.status
                body = await resp.read()
        except TimeoutError:
            reason = "timeout"
        except aiohttp.ClientConnectionError as exc:
            reason, body = "connection", str(exc).encode()
        except aiohttp.ClientError as exc:
            reason, body = "error", f"{type(exc).__name__}: {exc}".encode()
        finally:
            self._latency.observe(time.monotonic() - start)
        if reason == "" and 200 <= status < 300:
            self._sent.inc(len(batch))
            if self._failed_attempts:
                log.info("alertmanager reachable again", alertmanager=self.url, failed_attempts=self._failed_attempts,
                         down_for=round(time.monotonic() - self._failing_since, 3))
                self._failed_attempts = 0
            return "ok"
        reason = reason or f"http_{status}"
        owner.metrics.failures.labels(self.url, reason).inc(len(batch))
        detail = _error_detail(body)
        if 400 <= status < 500 and status not in (408, 429):
            owner.metrics.dropped.labels(self.url, "rejected").inc(len(batch))
            log.error("alertmanager refused alerts; not retrying", alertmanager=self.url, status=status,
                      reason=detail, alerts=len(batch))
            return "rejected"
        if self._failed_attempts == 0:
            self._failing_since = start
            log.warning("cannot send alerts; retrying", alertmanager=self.url, reason=reason, detail=detail,
                        alerts=len(batch))
        else:
            log.debug("cannot send alerts; retrying", alertmanager=self.url, reason=reason, detail=detail,
                      attempt=self._failed_attempts + 1)
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

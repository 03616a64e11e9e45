"""detectord's own metrics (served on /metrics): requests, inference, scores, alerts and the model,
beside the ingest path's (`ingest.metrics`). Alert delivery metrics live with the notifier, on the
same registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detectord.ingest.metrics import LATENCY_BUCKETS, IngestMetrics

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Scores are in threshold units: 1 is the threshold.
SCORE_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# A step should be scored within a few seconds of its last sample at any scrape interval.
STEP_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_STATUS_REASONS = {413: "too_large", 415: "unsupported_media_type"}


class BatchHistogram(Collector):
    """A histogram without labels observed a whole batch at a time: one numpy pass instead of a
    Histogram.observe (a lock and a bucket search) per value, which cost the inference worker
    about a microsecond a window. Exposed like a prometheus_client Histogram."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.array(sorted(buckets), dtype=np.float64)
        self._les = [*(floatToGoString(b) for b in self._bounds.tolist()), "+Inf"]  # type: ignore[no-untyped-call]
        self._counts = np.zeros(len(self._les), dtype=np.int64)  # the last: above every bound
        self._sum = 0.0
        self._created = time.time()
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Count `values` (seconds, scores: any floats; NaN goes to +Inf) in their buckets."""
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return
        # A value equal to a bound belongs to that bound's bucket (le), as in Histogram.observe.
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(self._les, cumulative, strict=True)), total, timestamp=None)
        family.add_sample(self.name + "_created", {}, self._created)
        yield family


class DaemonMetrics(IngestMetrics):
    """Every metric of the daemon, on one registry; the inference worker and the ingest thread
    update theirs from their own threads (prometheus_client is thread-safe)."""

    def __init__(self, registry: CollectorRegistry, instance_labels: Sequence[str]) -> None:
        super().__init__(registry)
        self.instance_labels = tuple(instance_labels)
        self.requests = Counter(
            "detectord_remote_write_requests_total",
            "Remote-write requests by HTTP status and protocol.",
            ["code", "protocol"],
            registry=registry,
        )
        self.rejected_requests = Counter(
            "detectord_remote_write_rejected_requests_total",
            "Remote-write requests refused whole (4xx), by reason: malformed, wrong_message (a body that is "
            "not the message its Content-Type names), series_limit, too_large, unsupported_media_type, "
            "bad_request.",
            ["reason"],
            registry=registry,
        )
        self.rejected_series = Counter(
            "detectord_remote_write_rejected_series_total",
            "Series refused in remote-write requests whose other series were taken (answered 400), by "
            "reason: labels, label_limit, label_name_length, label_value_length, histogram, no_samples, future.",
            ["reason"],
            registry=registry,
        )
        self.request_bytes = Counter(
            "detectord_remote_write_bytes_total",
            "Compressed remote-write body bytes received.",
            ["protocol"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "detectord_inference_batch_size",
            "Windows scored per inference batch.",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "detectord_inference_batch_seconds",
            "Time of one batched forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.step_delay = BatchHistogram(
            "detectord_step_score_delay_seconds",
            "Seconds from the arrival of the remote-write request that completed an instance's step "
            "to that step's score: queueing on the ingest thread, features, and inference.",
            STEP_DELAY_BUCKETS,
            registry,
        )
        self.windows_scored = Counter(
            "detectord_windows_scored_total", "Windows scored by the model.", registry=registry
        )
        self.windows_dropped = Counter(
            "detectord_windows_dropped_total",
            "Full windows not scored, by reason (queue_full, inference_error).",
            ["reason"],
            registry=registry,
        )
        for reason in ("queue_full", "inference_error"):
            self.windows_dropped.labels(reason)
        self.queue_depth = Gauge(
            "detectord_inference_queue_depth", "Windows waiting for the inference worker.", registry=registry
        )
        self.score_distribution = BatchHistogram(
            "detectord_anomaly_score_distribution",
            "Scores of every window scored, the fleet's together (a heatmap of the fleet); > 1 is anomalous.",
            SCORE_BUCKETS,
            registry,
        )
        self.alerts = Gauge(
            "detectord_alerts",
            "Instances whose CoreDNSAnomaly alert is pending or firing.",
            ["state"],
            registry=registry,
        )
        self.threshold = Gauge(
            "detectord_model_threshold", "The model's anomaly threshold in raw model units.", registry=registry
        )
        self.model_info = Info("detectord_model", "The model being served.", registry=registry)
        self.reloads = Counter(
            "detectord_reloads_total", "Config and model reloads by result.", ["result"], registry=registry
        )
        # As Prometheus's prometheus_config_last_reload_successful: 1 after the start's load.
        self.last_reload_successful = Gauge(
            "detectord_config_last_reload_successful",
            "1 when the last config and model reload succeeded (or none was tried since the start).",
            registry=registry,
        )
        self.last_reload_successful.set(1)
        self.last_reload_success_time = Gauge(
            "detectord_config_last_reload_success_timestamp_seconds",
            "When the config and model were last loaded successfully (the start counts).",
            registry=registry,
        )
        self.last_reload_success_time.set_to_current_time()
        self.ready = Gauge("detectord_ready", "1 when the model is loaded and warmed up.", registry=registry)
        self.snapshots = Counter(
            "detectord_state_snapshots_total", "State snapshots written, by result.", ["result"], registry=registry
        )
        self.snapshot_bytes = Gauge(
            "detectord_state_snapshot_bytes", "Size of the latest state snapshot written.", registry=registry
        )
        self.snapshot_seconds = Gauge(
            "detectord_state_snapshot_duration_seconds",
            "Time the latest state snapshot took: its instances read in slices between writes, then encoded "
            "and written to disk.",
            registry=registry,
        )
        self.snapshot_seconds_total = Counter(
            "detectord_state_snapshot_seconds_total",
            "Time spent on state snapshots, written or not; its rate is the share of the daemon's time they "
            "take (at most about a fifth: each waits four times as long as the last took).",
            registry=registry,
        )
        self.snapshot_last_success = Gauge(
            "detectord_state_snapshot_last_success_timestamp_seconds",
            "When the latest state snapshot was written.",
            registry=registry,
        )
        self.restored = Counter(
            "detectord_state_restored_total",
            "What was restored from a state snapshot at start: instances and alerts.",
            ["what"],
            registry=registry,
        )
        self.restore_refused = Counter(
            "detectord_state_restore_refused_total",
            "State snapshots not restored at start, by reason (unreadable, corrupt, truncated, version, model, "
            "too_old); the daemon starts clean.",
            ["reason"],
            registry=registry,
        )
        self.backfills = Counter(
            "detectord_backfill_total",
            "Start-up backfills from Prometheus's remote-read API, by result (success, failure, timeout).",
            ["result"],
            registry=registry,
        )
        self.backfill_samples = Counter(
            "detectord_backfill_samples_total", "Samples read back from Prometheus at start.", registry=registry
        )
        self.backfill_seconds = Gauge(
            "detectord_backfill_duration_seconds", "Time the start-up backfill took.", registry=registry
        )

    def count_refused_request(self, status: int, kind: str | None) -> None:
        """A remote-write request refused whole: by its `kind`, or what its status says."""
        self.rejected_requests.labels(kind or _STATUS_REASONS.get(status, "bad_request")).inc()

    def count_refused_series(self, series: Mapping[str, int]) -> None:
        for reason, n in series.items():
            self.rejected_series.labels(reason).inc(n)

    # InferenceMetrics, called from the inference thread.
    def observe_batch(self, size: int, padded: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.windows_scored.inc(size)

    def observe_step_delays(self, seconds: np.ndarray) -> None:
        self.step_delay.observe_many(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def count_dropped(self, reason: str, n: int) -> None:
        self.windows_dropped.labels(reason).inc(n)

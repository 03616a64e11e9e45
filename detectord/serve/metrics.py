"""detectord's own metrics (served on /metrics): ingestion, instances, inference and scores.

Alert delivery metrics live with the notifier in alerting.py, on the same registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from detectord.ingest.features import IngestStats, InstanceKey

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry, instance_labels: Sequence[str]) -> None:
        self.instance_labels = tuple(instance_labels)
        il = list(self.instance_labels)
        self.samples = Counter(
            "detectord_samples_total",
            "Remote-write samples by outcome: accepted, ignored (not read by any feature), duplicate "
            "(re-sent), stale (stale markers), non_finite, instance_limit, late, rejected (invalid series).",
            ["outcome"], registry=registry)
        self.rejected = Counter(
            "detectord_samples_rejected_total", "Samples in series refused as invalid, by reason.",
            ["reason"], registry=registry)
        self.requests = Counter(
            "detectord_remote_write_requests_total", "Remote-write requests by HTTP status and protocol.",
            ["code", "protocol"], registry=registry)
        self.request_bytes = Counter(
            "detectord_remote_write_bytes_total", "Compressed remote-write body bytes received.",
            ["protocol"], registry=registry)
        self.decode_seconds = Histogram(
            "detectord_remote_write_decode_seconds",
            "Time to decompress, decode and ingest one remote-write request.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.ignored_other = Counter(
            "detectord_ignored_total",
            "Parts of remote-write requests not used: native histograms, exemplars, metadata.",
            ["kind"], registry=registry)
        self.instances = Gauge(
            "detectord_instances", "CoreDNS instances tracked, by state (warming or scoring).",
            ["state"], registry=registry)
        self.instances_evicted = Counter(
            "detectord_instances_evicted_total", "Instances forgotten after instance_ttl without samples.",
            registry=registry)
        self.gap_rows = Counter(
            "detectord_gap_steps_total",
            "Steps without samples (missed scrapes) filled by holding the instance's last row.",
            registry=registry)
        self.window_restarts = Counter(
            "detectord_window_restarts_total",
            "Windows started over after a gap longer than ingest.max_gap_steps.", registry=registry)
        self.batch_size = Histogram(
            "detectord_inference_batch_size", "Windows scored per inference batch.",
            buckets=_SIZE_BUCKETS, registry=registry)
        self.batch_seconds = Histogram(
            "detectord_inference_batch_seconds", "Time of one batched forward pass.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.windows_scored = Counter(
            "detectord_windows_scored_total", "Windows scored by the model.", registry=registry)
        self.windows_dropped = Counter(
            "detectord_windows_dropped_total",
            "Full windows not scored, by reason (queue_full, inference_error).", ["reason"], registry=registry)
        self.queue_depth = Gauge(
            "detectord_inference_queue_depth", "Windows waiting for the inference worker.", registry=registry)
        self.score = Gauge(
            "detectord_anomaly_score", "Latest anomaly score per instance; > 1 is anomalous.", il,
            registry=registry)
        self.anomaly = Gauge(
            "detectord_anomaly", "1 while the instance's latest score is above the threshold, else 0.", il,
            registry=registry)
        self.feature_value = Gauge(
            "detectord_feature_value",
            "Current value of the top contributing features of instances whose alert is firing.",
            [*il, "feature"], registry=registry)
        self.feature_deviation = Gauge(
            "detectord_feature_deviation",
            "Deviation (standard units) of the top contributing features of firing instances.",
            [*il, "feature"], registry=registry)
        self.alerts = Gauge(
            "detectord_alerts", "Instances whose CoreDNSAnomaly alert is pending or firing.", ["state"],
            registry=registry)
        self.threshold = Gauge(
            "detectord_model_threshold", "The model's anomaly threshold in raw model units.", registry=registry)
        self.model_info = Info("detectord_model", "The model being served.", registry=registry)
        self.reloads = Counter(
            "detectord_reloads_total", "Config and model reloads by result.", ["result"], registry=registry)
        self.ready = Gauge("detectord_ready", "1 when the model is loaded and warmed up.", registry=registry)

    def count_ingest(self, stats: IngestStats) -> None:
        for outcome in ("accepted", "ignored", "duplicate", "stale", "non_finite", "instance_limit", "late"):
            n = getattr(stats, outcome)
            if n:
                self.samples.labels(outcome).inc(n)

    # InferenceMetrics, called from the inference thread.
    def observe_batch(self, size: int, padded: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.windows_scored.inc(size)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def count_dropped(self, reason: str, n: int) -> None:
        self.windows_dropped.labels(reason).inc(n)

    def forget_instance(self, key: InstanceKey, features: Sequence[str]) -> None:
        for g in (self.score, self.anomaly):
            try:
                g.remove(*key)
            except KeyError:
                pass
        self.clear_features(key, features)

    def clear_features(self, key: InstanceKey, features: Sequence[str]) -> None:
        for g in (self.feature_value, self.feature_deviation):
            for f in features:
                try:
                    g.remove(*key, f)
                except KeyError:
                    pass

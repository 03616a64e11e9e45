"""The ingest path's own metrics: samples by outcome, rejects, decode time, instances, gaps.

Created on the daemon's registry when serving (`serve.metrics.DaemonMetrics` adds the rest) and
on a throwaway one when a recording is scored offline.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectord.ingest.features import IngestStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter(
            "detectord_samples_total",
            "Remote-write samples by outcome: accepted, ignored (not read by any feature), duplicate "
            "(re-sent), stale (stale markers), non_finite, instance_limit, late, rejected (invalid series).",
            ["outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "detectord_samples_rejected_total",
            "Samples in series refused as invalid, by reason.",
            ["reason"],
            registry=registry,
        )
        self.decode_seconds = Histogram(
            "detectord_remote_write_decode_seconds",
            "Time to decompress, decode and ingest one remote-write request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ignored_other = Counter(
            "detectord_ignored_total",
            "Parts of remote-write requests not used: native histograms, exemplars, metadata.",
            ["kind"],
            registry=registry,
        )
        self.instances = Gauge(
            "detectord_instances",
            "CoreDNS instances tracked, by state: warming, scoring, or down (scrapes failing, or no data).",
            ["state"],
            registry=registry,
        )
        self.instances_refused = Gauge(
            "detectord_instances_refused",
            "Distinct instances whose samples were refused because ingest.max_instances are tracked, "
            "seen within instance_ttl.",
            registry=registry,
        )
        self.instances_evicted = Counter(
            "detectord_instances_evicted_total",
            "Instances forgotten after instance_ttl without samples.",
            registry=registry,
        )
        self.gap_rows = Counter(
            "detectord_gap_steps_total",
            "Steps without samples (missed scrapes) filled by holding the instance's last row.",
            registry=registry,
        )
        self.window_restarts = Counter(
            "detectord_window_restarts_total",
            "Windows started over after a gap longer than ingest.max_gap_steps.",
            registry=registry,
        )

        self.memory_given_back = Counter(
            "detectord_memory_given_back_bytes",
            "Resident bytes handed back to the system (glibc's malloc_trim) after instances expired "
            "or the process grew: heap freed in bulk that the C library would otherwise keep.",
            registry=registry,
        )

        self.label_cache_bytes = Gauge(
            "detectord_label_cache_bytes",
            "Estimated bytes of the label cache's series seen lately, bounded by ingest.label_cache_size "
            "(the series of tracked instances are kept apart, whatever the bound).",
            registry=registry,
        )
        self.label_cache_series = Gauge(
            "detectord_label_cache_series", "Distinct series the label cache holds.", registry=registry
        )
        self.label_cache_forgotten = Counter(
            "detectord_label_cache_forgotten_total",
            "Label cache entries let go: not seen for ingest.instance_ttl (idle), or to stay within "
            "ingest.label_cache_size (size).",
            ["reason"],
            registry=registry,
        )

    def count_ingest(self, stats: IngestStats) -> None:
        for outcome in ("accepted", "ignored", "duplicate", "stale", "non_finite", "instance_limit", "late"):
            n = getattr(stats, outcome)
            if n:
                self.samples.labels(outcome).inc(n)

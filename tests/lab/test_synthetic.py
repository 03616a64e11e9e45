"""The synthetic CoreDNS fleet: deterministic, shaped like Prometheus 2.42 remote-write, realistic counters."""

from __future__ import annotations

import itertools
import math
import struct
from collections import defaultdict

import numpy as np
import pytest

from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest.features import FEATURE_NAMES, extract
from lab.synthetic import MAX_SAMPLES_PER_SEND, STALE_NAN_BITS, TIME_BUCKETS, SyntheticFleet, generate

IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


def scrapes(fleet: SyntheticFleet, n: int) -> list[list[pb1.WriteRequest]]:
    return [[pb1.WriteRequest.FromString(p) for p in fleet.scrape_payloads()] for _ in range(n)]


def is_counter(name: str) -> bool:
    return name.endswith(("_total", "_count", "_sum", "_bucket"))


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a, b, c = SyntheticFleet(5, seed=7), SyntheticFleet(5, seed=7), SyntheticFleet(5, seed=8)
    for _ in range(3):
        pa, pb, pc = a.scrape_payloads(), b.scrape_payloads(), c.scrape_payloads()
        assert pa == pb
        assert pa != pc


def test_write_requests_are_shaped_like_prometheus_2_42_sends_them() -> None:
    fleet = SyntheticFleet(12, seed=1, scrape_interval_s=15)
    msgs = [m for batch in scrapes(fleet, 2) for m in batch]
    assert len(msgs) > 2
    per_instance: dict[str, set[str]] = defaultdict(set)
    for m in msgs:
        assert 0 < len(m.timeseries) <= MAX_SAMPLES_PER_SEND
        for ts in m.timeseries:
            assert len(ts.samples) == 1
            names = [lb.name for lb in ts.labels]
            assert names == sorted(names) and len(set(names)) == len(names)
            assert names[0] == "__name__"
            assert all(lb.value for lb in ts.labels), "an empty label value means no label"
            labels = {lb.name: lb.value for lb in ts.labels}
            assert labels["job"] == "coredns"
            per_instance[labels["instance"]].add(labels["__name__"])
    assert sorted(per_instance) == sorted(fleet.instances)
    wanted = {
        "coredns_dns_requests_total",
        "coredns_dns_responses_total",
        "coredns_dns_request_duration_seconds_bucket",
        "coredns_dns_request_duration_seconds_count",
        "coredns_cache_requests_total",
        "coredns_cache_hits_total",
        "coredns_cache_misses_total",
        "coredns_cache_entries",
        "coredns_proxy_request_duration_seconds_bucket",
        "coredns_proxy_request_duration_seconds_count",
        "coredns_forward_max_concurrent_rejects_total",
        "coredns_panics_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "go_goroutines",
        "coredns_build_info",
        "go_gc_duration_seconds",
        "up",
    }
    for seen in per_instance.values():
        assert wanted <= seen


def test_smaller_messages_on_request_and_request_duration_buckets_are_timebuckets() -> None:
    fleet = SyntheticFleet(2, seed=2)
    payloads = fleet.scrape_payloads(max_samples=37)
    msgs = [pb1.WriteRequest.FromString(p) for p in payloads]
    assert all(len(m.timeseries) <= 37 for m in msgs[:-1]) and len(msgs[-1].timeseries) <= 37
    les = {
        lb.value
        for m in msgs
        for ts in m.timeseries
        for lb in ts.labels
        if lb.name == "le" and ts.labels[0].value == "coredns_dns_request_duration_seconds_bucket"
    }
    assert les == {repr(b) for b in TIME_BUCKETS} | {"+Inf"}


def test_in_prometheus_order_the_same_samples_come_in_runs_of_one_instance_a_shard_a_request() -> None:
    """`shards`: the order Prometheus's remote-write queue sends a scrape in (targets' series
    together, spread over the shards by series), against one kind of series at a time. Restarts
    make series go stale and come back, so the sets of series change between scrapes."""
    max_samples = 300

    def series(payloads: list[bytes]) -> list[list[tuple[tuple[tuple[str, str], ...], int, bytes]]]:
        return [
            [
                (tuple((lb.name, lb.value) for lb in ts.labels), ts.samples[0].timestamp, ts.SerializeToString())
                for ts in pb1.WriteRequest.FromString(p).timeseries
            ]
            for p in payloads
        ]

    def runs(requests: list[list[tuple[tuple[tuple[str, str], ...], int, bytes]]]) -> float:
        lengths = [len(list(g)) for r in requests for _, g in itertools.groupby(dict(s[0])["instance"] for s in r)]
        return sum(lengths) / len(lengths)

    for shards, fewest, most in ((1, 100, 175), (4, 25, 50), (16, 5, 15)):
        by_kind = SyntheticFleet(50, seed=3, restarts_per_hour=60.0)
        sharded = SyntheticFleet(50, seed=3, restarts_per_hour=60.0)
        for _ in range(4):
            a, b = series(by_kind.scrape_payloads(max_samples)), series(sharded.scrape_payloads(max_samples, shards))
            assert sorted(s for r in a for s in r) == sorted(s for r in b for s in r)
            assert runs(a) == 1.0 and fewest <= runs(b) <= most, (shards, runs(b))
            assert all(0 < len(r) <= max_samples for r in b)
            # A request holds one shard's series: each instance in it once, in one run.
            for r in b:
                insts = [dict(s[0])["instance"] for s in r]
                assert len({k for k, _ in itertools.groupby(insts)}) == len(list(itertools.groupby(insts)))
    with pytest.raises(ValueError, match="shards must be >= 0"):
        SyntheticFleet(2).scrape_payloads(shards=-1)


def test_counters_only_fall_at_injected_restarts() -> None:
    fleet = SyntheticFleet(6, seed=3, scrape_interval_s=15, restarts_per_hour=30.0)
    last: dict[tuple[tuple[str, str], ...], tuple[int, float]] = {}
    falls = 0
    stale = 0
    for batch in scrapes(fleet, 120):
        for m in batch:
            for ts in m.timeseries:
                labels = tuple((lb.name, lb.value) for lb in ts.labels)
                s = ts.samples[0]
                if struct.pack("<d", s.value) == struct.pack("<Q", STALE_NAN_BITS):
                    stale += 1
                    continue
                assert math.isfinite(s.value)
                name = labels[0][1]
                if not is_counter(name):
                    continue
                prev = last.get(labels)
                last[labels] = (s.timestamp, s.value)
                if prev is None or s.value >= prev[1]:
                    continue
                falls += 1
                inst = dict(labels)["instance"]
                assert any(
                    r.instance == ("coredns", inst) and prev[0] < r.ts_ms <= s.timestamp for r in fleet.restarts
                ), f"{labels} fell from {prev[1]} to {s.value} without a restart"
    assert fleet.restarts, "the test needs restarts to happen"
    assert falls > 0
    assert stale > 0, "a failed scrape marks the series it had as stale"


def test_histogram_buckets_are_cumulative() -> None:
    fleet = SyntheticFleet(3, seed=4)
    by_series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    for m in scrapes(fleet, 1)[0]:
        for ts in m.timeseries:
            labels = dict((lb.name, lb.value) for lb in ts.labels)
            if labels["__name__"].endswith("_bucket"):
                le = float(labels.pop("le"))
                by_series[tuple(sorted(labels.items()))].append((le, ts.samples[0].value))
    assert by_series
    for buckets in by_series.values():
        counts = [c for _, c in sorted(buckets)]
        assert counts == sorted(counts)


def test_generate_labels_fault_spans_and_is_deterministic() -> None:
    a = generate(4, 3600, seed=5, faulty=2)
    b = generate(4, 3600, seed=5, faulty=2)
    assert a.spans == b.spans
    assert {s.instance for s in a.spans} == {("coredns", "10.0.0.1:9153"), ("coredns", "10.0.0.2:9153")}
    assert all(s.end_ms > s.start_ms and 0.2 <= s.severity <= 1.0 for s in a.spans)


def test_faults_show_in_the_shared_features() -> None:
    fleet = SyntheticFleet(
        2,
        seed=6,
        scrape_interval_s=15,
        restarts_per_hour=0,
        traffic_shifts_per_hour=0,
        qps_range=(500.0, 2000.0),
        low_qps_fraction=0.0,
    )
    start = fleet.start_ms + 30 * 60_000
    slow = fleet.inject(0, "upstream_latency", start, start + 20 * 60_000, severity=1.0)
    panics = fleet.inject(1, "panics", start, start + 20 * 60_000, severity=0.5)
    series = extract(fleet.write_requests(3600), 15_000)
    for key, fs in series.items():
        inside = (fs.timestamps_ms > start + 60_000) & (fs.timestamps_ms <= slow.end_ms)
        before = fs.timestamps_ms < start
        v = fs.values
        if key == slow.instance:
            sf = v[:, IDX["rcode_servfail_share"]]
            assert sf[inside].mean() > 5 * sf[before].mean() + 0.0005
            assert v[before, IDX["upstream_healthcheck_failure_rate"]].max() == 0
            assert v[inside, IDX["upstream_healthcheck_failure_rate"]].mean() > 0.3
            up99 = v[:, IDX["upstream_latency_p99_seconds"]]
            assert np.median(up99[inside]) > max(1.0, 5 * np.median(up99[before]))
        else:
            assert key == panics.instance
            assert v[before, IDX["panic_rate"]].max() == 0
            assert v[inside, IDX["panic_rate"]].mean() == pytest.approx(1.0, rel=0.3)


def test_inject_refuses_bad_arguments() -> None:
    fleet = SyntheticFleet(2, seed=0)
    with pytest.raises(ValueError, match="unknown fault class"):
        fleet.inject(0, "meteor", fleet.start_ms, fleet.start_ms + 1000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity"):
        fleet.inject(0, "panics", fleet.start_ms, fleet.start_ms + 1000, severity=2.0)
    with pytest.raises(ValueError, match="instance"):
        fleet.inject(5, "panics", fleet.start_ms, fleet.start_ms + 1000)


def test_a_thousand_instances_scrape_quickly() -> None:
    import time

    fleet = SyntheticFleet(1000, seed=0, lazy_series=False, restarts_per_hour=0)
    fleet.scrape_payloads()
    t0 = time.perf_counter()
    payloads = fleet.scrape_payloads()
    elapsed = time.perf_counter() - t0
    samples = sum(len(pb1.WriteRequest.FromString(p).timeseries) for p in payloads)
    assert samples >= 1000 * 150
    assert elapsed < 2.0, f"one scrape of 1000 instances took {elapsed:.2f}s"

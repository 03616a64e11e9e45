"""Feature extraction: rates with resets, shares, quantiles, aggregation, gaps, stale markers, re-sends."""

from __future__ import annotations

import gc
import math
from collections import Counter

import numpy as np
import pytest

from detectord.ingest.features import (
    FEATURE_NAMES,
    FeatureExtractor,
    FeatureRow,
    IngestStats,
    _unpack_series,
    bucket_quantile,
)
from detectord.ingest.remote_write import STALE_NAN, DecodedWrite, LabelCache, SeriesKey, decode
from tests.support import coredns_scrape, v1_body

IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


def L(name: str, instance: str = "a:9153", **kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"__name__": name, "job": "coredns", "instance": instance, **kw}.items()))


_CACHE = LabelCache()


def write(*series: tuple[tuple[tuple[str, str], ...], list[tuple[int, float]]]) -> DecodedWrite:
    """A decoded request; every test's extractor shares one interning cache, which is fine
    because each test's series states start unbound (keys are forgotten per extractor below)."""
    w = DecodedWrite("1.0")
    for labels, samples in series:
        w.add(_CACHE.intern(labels), samples)
    return w


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    global _CACHE
    _CACHE = LabelCache()


def feed(ext: FeatureExtractor, scrapes: list[DecodedWrite]) -> list[FeatureRow]:
    rows: list[FeatureRow] = []
    for w in scrapes:
        rows += ext.ingest(w)
    return rows + ext.flush()


def col(rows: list[FeatureRow], name: str, digits: int = 6) -> list[float]:
    return [round(float(r.values[IDX[name]]), digits) for r in rows]


def test_counter_rate_with_reset_and_aggregation_over_servers() -> None:
    ext = FeatureExtractor(1000)
    # Two server blocks of one instance; the process restarts at t=5 (counters back near 0).
    values = [0, 100, 200, 300, 400, 50, 150, 250]
    scrapes = [
        write(
            (L("coredns_dns_requests_total", server="dns://:53"), [(t * 1000 + 100, v)]),
            (L("coredns_dns_requests_total", server="dns://:5353"), [(t * 1000 + 100, v / 10)]),
        )
        for t, v in enumerate(values)
    ]
    rows = feed(ext, scrapes)
    # The first step only sets the counters' starting values; after it every step is one row.
    assert col(rows, "request_rate") == [110.0, 110.0, 110.0, 110.0, 55.0, 110.0, 110.0]
    assert [r.step_ts_ms for r in rows] == [2000, 3000, 4000, 5000, 6000, 7000, 8000]
    # Both servers' counters reset in one step: one process restart, on that step's row.
    assert [r.step_ts_ms for r in rows if r.process_restart] == [6000]


def test_shares_and_new_series_count_from_zero() -> None:
    ext = FeatureExtractor(1000)
    scrapes = []
    for t in range(6):
        ok = 100.0 * t
        series = [(L("coredns_dns_responses_total", rcode="NOERROR", plugin="cache"), [(t * 1000, ok)])]
        if t >= 3:  # the SERVFAIL series is born at t=3 with its first 10 errors
            series.append((L("coredns_dns_responses_total", rcode="SERVFAIL", plugin=""), [(t * 1000, 10.0 * (t - 2))]))
        scrapes.append(write(*series))
    rows = feed(ext, scrapes)
    assert col(rows, "rcode_servfail_share") == [0.0, 0.0, round(10 / 110, 6), round(10 / 110, 6), round(10 / 110, 6)]
    assert col(rows, "rcode_noerror_share")[0] == 1.0


def test_latency_quantiles_from_bucket_increases() -> None:
    ext = FeatureExtractor(1000)
    bounds = ["0.001", "0.01", "0.1", "+Inf"]
    scrapes = []
    for t in range(5):
        # Per step: 90 fast (≤1 ms), 9 at ≤10 ms, 1 at ≤100 ms.
        cum = [90 * t, 99 * t, 100 * t, 100 * t]
        scrapes.append(
            write(
                *[
                    (
                        L("coredns_dns_request_duration_seconds_bucket", le=le, server="dns://:53", zone="."),
                        [(t * 1000, float(c))],
                    )
                    for le, c in zip(bounds, cum, strict=True)
                ]
            )
        )
    rows = feed(ext, scrapes)
    assert col(rows, "latency_p50_seconds", 9)[0] == pytest.approx(0.001 * 50 / 90, rel=1e-4)
    assert col(rows, "latency_p99_seconds", 9)[0] == pytest.approx(0.01, rel=1e-4)


def test_bucket_quantile_matches_prometheus_edge_cases() -> None:
    inf = math.inf
    assert bucket_quantile(0.5, []) == 0.0
    assert bucket_quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) == 0.0
    # Everything in +Inf: Prometheus answers the highest finite bound.
    assert bucket_quantile(0.99, [(0.1, 0.0), (1.0, 0.0), (inf, 10.0)]) == 1.0
    assert bucket_quantile(0.5, [(1.0, 10.0), (inf, 10.0)]) == 0.5


def test_resent_request_is_not_counted_twice() -> None:
    ext = FeatureExtractor(1000)
    scrapes = [write((L("coredns_dns_requests_total"), [(t * 1000, 100.0 * t)])) for t in range(6)]
    # Prometheus retried the request for t=3 after a 5xx: the same bytes arrive again.
    stats = IngestStats()
    rows = []
    for i, w in enumerate(scrapes):
        rows += ext.ingest(w, stats)
        if i == 3:
            rows += ext.ingest(w, stats)
    rows += ext.flush()
    assert stats.duplicate == 1
    assert col(rows, "request_rate") == [100.0] * 5


def test_missed_scrape_is_filled_and_rate_spans_the_gap() -> None:
    ext = FeatureExtractor(1000, max_gap_steps=3)
    ts = [0, 1, 2, 3, 5, 6, 7]  # the scrape at t=4 failed
    rows = feed(ext, [write((L("coredns_dns_requests_total"), [(t * 1000, 100.0 * t)])) for t in ts])
    assert [r.gap for r in rows] == [False, False, False, True, False, False, False]
    # The gap row holds the last value; the row after it divides the increase by the real 2 s.
    assert col(rows, "request_rate") == [100.0] * 7


def test_long_gap_restarts_the_window() -> None:
    ext = FeatureExtractor(1000, max_gap_steps=2)
    ts = [0, 1, 2, 3, 30, 31, 32, 33]
    rows = feed(ext, [write((L("coredns_dns_requests_total"), [(t * 1000, 100.0 * t)])) for t in ts])
    restarts = [r for r in rows if r.restart]
    assert len(restarts) == 1
    after = rows[rows.index(restarts[0]) :]
    assert col(after, "request_rate") == [100.0] * len(after)
    assert not any(r.gap for r in after)


def test_stale_marker_then_series_returns() -> None:
    ext = FeatureExtractor(1000)
    stats = IngestStats()
    seq = [(0, 0.0), (1000, 100.0), (2000, 200.0), (3000, STALE_NAN), (4000, 5.0), (5000, 105.0), (6000, 205.0)]
    rows = []
    for ts, v in seq:
        rows += ext.ingest(write((L("coredns_dns_requests_total"), [(ts, v)])), stats)
    rows += ext.flush()
    assert stats.stale == 1
    # After the stale marker the counter came back lower: a new process, counting from 0. No negative
    # rate, and the row says the process restarted.
    assert min(col(rows, "request_rate")) >= 0.0
    assert col(rows, "request_rate")[-1] == 100.0
    assert [r.step_ts_ms for r in rows if r.process_restart] == [5000]


def test_a_failed_scrape_of_a_live_process_is_no_spike_and_no_restart() -> None:
    """One scrape times out (Prometheus marks every series stale) while CoreDNS keeps counting:
    the next sample's increase spans the gap, it is not a new series' whole value."""
    ext = FeatureExtractor(1000)
    seq = [(t * 1000, 100.0 * t) for t in range(3)] + [(3000, STALE_NAN)] + [(t * 1000, 100.0 * t) for t in range(4, 8)]
    rows = feed(ext, [write((L("coredns_dns_requests_total"), [s])) for s in seq])
    assert col(rows, "request_rate") == [100.0] * len(rows)
    assert not any(r.process_restart for r in rows)


def test_nan_and_inf_are_counted_not_used() -> None:
    ext = FeatureExtractor(1000)
    stats = IngestStats()
    ext.ingest(write((L("coredns_panics_total"), [(0, float("nan")), (1000, float("inf")), (2000, 12.0)])), stats)
    assert stats.non_finite == 2 and stats.accepted == 1


def test_instances_are_separate_and_capped() -> None:
    ext = FeatureExtractor(1000, max_instances=2)
    stats = IngestStats()
    rows = []
    for t in range(4):
        w = write(
            *[(L("coredns_dns_requests_total", instance=f"i{k}"), [(t * 1000, (k + 1) * 10.0 * t)]) for k in range(3)]
        )
        rows += ext.ingest(w, stats)
    rows += ext.flush()
    assert ext.instances == 2
    assert stats.instance_limit == 4
    by = {r.instance: float(r.values[IDX["request_rate"]]) for r in rows}
    assert by == {("coredns", "i0"): 10.0, ("coredns", "i1"): 20.0}


def test_irrelevant_series_are_ignored_and_counted() -> None:
    ext = FeatureExtractor(1000)
    stats = IngestStats()
    ext.ingest(write((L("node_cpu_seconds_total"), [(0, 1.0)]), (L("coredns_build_info"), [(0, 1.0)])), stats)
    assert stats.ignored == 2 and ext.instances == 0


def test_other_targets_process_and_go_series_make_no_instance() -> None:
    """A keep rule on names alone lets every Go target's process_* and go_goroutines through."""
    ext = FeatureExtractor(1000)
    stats = IngestStats()
    node = [L(n, instance="node-1:9100", job="node") for n in ("process_cpu_seconds_total", "go_goroutines", "up")]
    for t in range(3):
        ext.ingest(write(*[(labels, [(t * 1000, 1.0 + t)]) for labels in node]), stats)
    assert ext.instances == 0 and stats.ignored == 9
    # A CoreDNS's own series make it one; its process series (first in the request) then count.
    coredns = [L("process_cpu_seconds_total"), L("coredns_dns_requests_total")]
    rows = feed(ext, [write(*[(labels, [(t * 1000, 1.0 * t)]) for labels in coredns]) for t in range(4)])
    assert ext.instance_keys() == [("coredns", "a:9153")]
    assert col(rows, "cpu_seconds_rate")[1:] == [1.0, 1.0]


def test_samples_of_one_scrape_split_across_late_requests_stay_together() -> None:
    """Parallel shards: part of scrape t arrives after part of scrape t+1."""
    ext = FeatureExtractor(1000)
    a, b = L("coredns_dns_requests_total", server="a"), L("coredns_dns_requests_total", server="b")
    rows = []
    for t in range(8):
        rows += ext.ingest(write((a, [(t * 1000, 10.0 * t)])))
        if t > 0:
            rows += ext.ingest(write((b, [((t - 1) * 1000, 10.0 * (t - 1))])))
    rows += ext.ingest(write((b, [(7000, 70.0)])))
    rows += ext.flush()
    assert col(rows, "request_rate") == [20.0] * len(rows)


def test_process_metrics() -> None:
    ext = FeatureExtractor(15000)
    rows = feed(
        ext,
        [
            write(
                (L("coredns_dns_requests_total"), [(t * 15000, 10.0 * t)]),
                (L("process_cpu_seconds_total"), [(t * 15000, 1.5 * t)]),
                (L("process_resident_memory_bytes"), [(t * 15000, 3e7)]),
                (L("go_goroutines"), [(t * 15000, 42.0)]),
            )
            for t in range(4)
        ],
    )
    assert col(rows, "cpu_seconds_rate") == [0.1] * 3
    assert col(rows, "resident_memory_bytes") == [3e7] * 3
    assert col(rows, "goroutines") == [42.0] * 3
    assert all(r.values.dtype == np.float32 for r in rows)


def test_gauges_belong_to_their_step_and_hold_across_missed_scrapes() -> None:
    ext = FeatureExtractor(1000, max_gap_steps=5)
    mem = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0, 5: 15.0, 6: 16.0, 7: 17.0, 8: 18.0}
    rows = []
    for t, v in mem.items():
        series = [
            (L("process_resident_memory_bytes"), [(t * 1000, v)]),
            (L("coredns_dns_requests_total"), [(t * 1000, 100.0 * t)]),
        ]
        rows += ext.ingest(write(*series))
    rows += ext.flush()
    # Row for step [t, t+1) carries that step's gauge, never a later one; the gap row holds.
    assert col(rows, "resident_memory_bytes") == [11.0, 12.0, 13.0, 13.0, 15.0, 16.0, 17.0, 18.0]
    assert [r.gap for r in rows] == [False, False, False, True, False, False, False, False]


def test_stale_gauges_come_back_with_the_restarted_process() -> None:
    ext = FeatureExtractor(1000)
    rows = []
    for t in range(12):
        if t == 5:  # the scrape failed: Prometheus writes stale markers
            series = [
                (L("go_goroutines"), [(t * 1000, STALE_NAN)]),
                (L("coredns_dns_requests_total"), [(t * 1000, STALE_NAN)]),
            ]
        else:
            reqs = 100.0 * t if t < 5 else 100.0 * (t - 5)  # the restarted process counts from 0
            series = [(L("go_goroutines"), [(t * 1000, 40.0)]), (L("coredns_dns_requests_total"), [(t * 1000, reqs)])]
        rows += ext.ingest(write(*series))
    rows += ext.flush()
    assert all(v == 40.0 for v in col(rows, "goroutines")), col(rows, "goroutines")


def test_an_instance_forwards_to_the_to_labels_of_its_proxy_series() -> None:
    """Alerts group by what an instance forwards to: the `to` labels of its coredns_proxy_* series."""
    ext = FeatureExtractor(1000, ("job", "instance"))
    rows = []
    for k in range(4):
        series = coredns_scrape("a:9153", 1000 * k, k) + coredns_scrape("b:9153", 1000 * k, k)  # b forwards nowhere
        for to in ("10.0.0.3:53", "10.0.0.2:53"):
            labels = {"__name__": "coredns_proxy_request_duration_seconds_count", "job": "coredns", "to": to}
            series.append(({**labels, "instance": "a:9153", "proxy_name": "forward"}, [(1000 * k, 5.0 * k)]))
        rows += ext.ingest(decode(v1_body(series), "1.0", ext.labels, max_decoded=1 << 26))
    assert {r.instance[1]: r.upstream for r in rows} == {"a:9153": "10.0.0.2:53,10.0.0.3:53", "b:9153": ""}


def test_offline_extraction_keeps_every_up_sample() -> None:
    from detectord.ingest.features import extract

    up = {"__name__": "up", "job": "coredns", "instance": "a:9153"}
    reqs = [
        decode(
            v1_body([*coredns_scrape("a:9153", 1000 * k, k), (up, [(1000 * k, 0.0 if k in (5, 6) else 1.0)])]),
            "1.0",
            LabelCache(),
            max_decoded=1 << 26,
        )
        for k in range(10)
    ]
    (series,) = extract(reqs, 1000).values()
    assert series.up_ms.tolist() == [1000 * k for k in range(10)]
    assert np.flatnonzero(series.up == 0).tolist() == [5, 6]


def test_tracked_instances_series_stay_cached_beyond_the_label_cache_size() -> None:
    """The label cache's size bounds junk, not the fleet: 400 tracked instances whose series take
    more than the whole cache stay one lookup each, round after round, while series of instances
    refused at max_instances still make it turn."""
    ext = FeatureExtractor(15000, max_instances=400, label_cache_bytes=1024**2)
    cache = ext.labels

    def round_(instances: range, step: int) -> list[SeriesKey]:
        """One scrape of `instances`, in requests of 50 instances' series as Prometheus shards send."""
        keys = []
        for a in range(instances.start, instances.stop, 50):
            series = [
                s
                for i in range(a, a + 50)
                for s in coredns_scrape(f"10.0.{i // 250}.{i % 250}:9153", step * 15000, step)
            ]
            w = decode(v1_body(series), "1.0", cache, max_decoded=64 * 1024**2, keep=ext.series_names)
            ext.ingest(w)
            keys += w.keys
        return keys

    first = round_(range(400), 1)
    assert cache.size_bytes > cache.max_bytes, "the fleet alone is bigger than the cache"
    for step in (2, 3, 4):
        again = round_(range(400), step)
        assert cache.forgotten["size"] == 0
        assert all(a is b for a, b in zip(again, first, strict=True))
    # Instances beyond max_instances: refused, their series only cached, and the cache turns.
    round_(range(400, 1400), 4)
    assert cache.forgotten["size"] > 0
    assert all(a is b for a, b in zip(round_(range(400), 5), first, strict=True)), "the tracked series are kept"


def test_a_series_decoded_before_the_cache_let_go_of_its_key_binds_to_the_one_series() -> None:
    """A request decoded, then the label cache turned twice (its keys let go) and the same series
    came again under new keys and bound: the first request's old keys still feed those series,
    not second copies of them."""
    ext = FeatureExtractor(1000)
    body = v1_body(coredns_scrape("a:9153", 1000, 1))
    held = decode(body, "1.0", ext.labels, max_decoded=1 << 20)
    ext.labels.turn()
    ext.labels.turn()
    again = decode(body, "1.0", ext.labels, max_decoded=1 << 20)
    assert all(a is not b for a, b in zip(held.keys, again.keys, strict=True)), "the cache made new keys"
    ext.ingest(again)
    bound = ext.series_bound
    stats = IngestStats()
    ext.ingest(held, stats)
    assert ext.series_bound == bound, "no series bound twice"
    assert (stats.accepted, stats.duplicate) == (0, len(held.keys)), "the same samples, already in"


def test_a_histogram_bucket_bounded_by_nan_is_not_a_bucket() -> None:
    """`le="NaN"` orders with no bound: such a series feeds no quantile (and takes no slot)."""
    ext = FeatureExtractor(1000)
    series = [
        (
            {
                "__name__": "coredns_dns_request_duration_seconds_bucket",
                "job": "coredns",
                "instance": "a:9153",
                "server": "dns://:53",
                "zone": ".",
                "type": "A",
                "le": le,
            },
            [(1000, 1.0)],
        )
        for le in ("0.1", "NaN", "+Inf")
    ]
    ext.ingest(decode(v1_body(series), "1.0", ext.labels, max_decoded=1 << 20))
    (inst,) = ext._instances.values()
    assert [le for order in inst.bucket_order for le, _ in order] == [0.1, math.inf]


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_instances_share_a_bucket_layout_until_one_gets_a_bucket_of_its_own(native: bool) -> None:
    """Instances with the same histogram buckets hold one layout between them (5 KB an instance
    less); a new bucket of one instance changes its own quantiles and no other's."""
    bounds = ["0.001", "0.01", "0.1", "+Inf"]

    def scrape(instance: str, t: int) -> list[tuple[dict[str, str], list[tuple[int, float]]]]:
        # c has a bucket more from the start: so its `le` is known when a gets it too.
        les = bounds if instance == "b:9153" or (instance == "a:9153" and t < 4) else ["0.005", *bounds]
        out = []
        if instance == "a:9153" and t >= 4:
            # A new series first, so that the new bucket binds right after it, in one run (in C).
            labels = {"__name__": "coredns_dns_requests_total", "job": "coredns", "instance": instance}
            out.append(({**labels, "server": "dns://:53", "type": "AAAA", "zone": "."}, [(t * 1000, 10.0 * t)]))
        for le in les:
            # Per step: 90 at ≤1 ms, 9 at ≤10 ms (from step 4 on, a's are all ≤5 ms), 1 at ≤100 ms.
            c = {"0.001": 90, "0.005": 99, "0.01": 99, "0.1": 100, "+Inf": 100}[le] * t
            labels = {"__name__": "coredns_dns_request_duration_seconds_bucket", "job": "coredns"}
            out.append(
                ({**labels, "instance": instance, "le": le, "server": "dns://:53", "zone": "."}, [(t * 1000, c)])
            )
        return out

    def run(instances: list[str]) -> tuple[FeatureExtractor, dict[str, list[tuple[int, bytes]]]]:
        ext = FeatureExtractor(1000, native=native)
        rows: list[FeatureRow] = []
        for t in range(8):
            body = v1_body([s for i in instances for s in scrape(i, t)])
            rows += ext.ingest(decode(body, "1.0", ext.labels, max_decoded=1 << 20, keep=ext.series_names))
            if t == 3 and len(instances) > 1:
                a, b = (ext._instances[("coredns", i)] for i in instances[:2])
                assert a.bucket_order is b.bucket_order and a.bucket_slots is b.bucket_slots
        out: dict[str, list[tuple[int, bytes]]] = {}
        for r in rows + ext.flush():
            out.setdefault(r.instance[1], []).append((r.step_ts_ms, r.values.tobytes()))
        return ext, out

    ext, both = run(["a:9153", "b:9153", "c:9153"])
    a, b = (ext._instances[("coredns", i)] for i in ("a:9153", "b:9153"))
    assert a.bucket_order is not b.bucket_order and len(a.bucket_order[0]) == 5 and len(b.bucket_order[0]) == 4
    assert both["a:9153"] == run(["a:9153"])[1]["a:9153"]
    assert both["b:9153"] == run(["b:9153"])[1]["b:9153"]
    p99 = [float(np.frombuffer(v, dtype=np.float32)[IDX["latency_p99_seconds"]]) for _, v in both["a:9153"]]
    assert p99[1] == pytest.approx(0.01, rel=1e-4) and p99[-1] == pytest.approx(0.005, rel=1e-4), p99


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_closing_a_fleets_steps_leaves_nothing_new_but_the_rows(native: bool) -> None:
    """Closing a step makes no lasting object per instance but its row. New buffers for the next
    step, made as the old ones went, kept the cyclic GC's count of new objects flat while they
    piled up in its youngest generation, until one collection walked them all holding the GIL:
    the event loop stalled 0.1 s at 50,000 instances (tests/serve/test_event_loop.py)."""
    n = 2000
    ext = FeatureExtractor(1000, native=native)
    for t in range(4):
        body = v1_body([s for i in range(n) for s in coredns_scrape(f"10.0.{i // 256}.{i % 256}:9153", t * 1000, t)])
        decoded = decode(body, "1.0", ext.labels, max_decoded=1 << 26, keep=ext.series_names)
        gc.collect()
        gc.disable()
        try:
            rows = ext.ingest(decoded)
            young = gc.get_objects(generation=0)
        finally:
            gc.enable()
    assert len(rows) == n
    made = Counter(type(o).__name__ for o in young if not isinstance(o, FeatureRow) and o is not rows)
    assert sum(made.values()) < n / 10, made.most_common(5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_a_snapshot_holds_the_series_an_instance_bound_since_the_last_one(native: bool) -> None:
    """An instance's label block is encoded once and kept for the snapshots after: a series it
    binds later (a new upstream) is in the next one, and a restored instance keeps the block it
    came back with and goes on as the original does."""
    key = ("coredns", "a:9153")

    def scrape(t: int, upstreams: list[str]) -> bytes:
        series = coredns_scrape("a:9153", 1000 * t, t)
        for i, to in enumerate(upstreams):
            labels = {"__name__": "coredns_proxy_request_duration_seconds_count", "job": "coredns", "to": to}
            series.append(({**labels, "instance": "a:9153", "proxy_name": "forward"}, [(1000 * t, 5.0 * t * (i + 1))]))
        return v1_body(series)

    def series(state: dict[str, object]) -> list[tuple[dict[str, str], list[str]]]:
        """Each series' labels and its numbers (by repr: NaN equals NaN)."""
        assert isinstance(state["labels"], bytes) and isinstance(state["series"], bytes)
        unpacked = _unpack_series(state["labels"], state["series"])
        return [(dict(labels), [repr(x) for x in rest]) for labels, *rest in unpacked]

    def feed_into(ext: FeatureExtractor, body: bytes) -> list[FeatureRow]:
        return ext.ingest(decode(body, "1.0", ext.labels, max_decoded=1 << 20, keep=ext.series_names))

    ext = FeatureExtractor(1000, native=native)
    for t in range(3):
        feed_into(ext, scrape(t, ["10.0.0.2:53"]))
    first = ext.instance_state(key, 0.0)
    assert first is not None
    for t in range(3, 6):
        feed_into(ext, scrape(t, ["10.0.0.2:53", "10.0.0.3:53"]))
    second = ext.instance_state(key, 0.0)
    assert second is not None
    before, after = series(first), series(second)
    assert [s[0] for s in after[:-1]] == [s[0] for s in before] and after[-1][0]["to"] == "10.0.0.3:53"
    assert after[-1][1][:2] == ["5000", repr(2 * 5.0 * 5)], "the new series' last timestamp and value"
    assert [s[1][0] for s in after[:-1]] == ["5000"] * len(before)

    restored = FeatureExtractor(1000, native=native)
    restored.restore_instance(second, 0.0)
    again = restored.instance_state(key, 0.0)
    assert again is not None and again["labels"] == second["labels"] and series(again) == after
    rows: list[tuple[list[bytes], list[bytes]]] = []
    for t in range(6, 9):
        body = scrape(t, ["10.0.0.2:53", "10.0.0.3:53"])
        rows.append(
            (
                [r.values.tobytes() for r in feed_into(restored, body)],
                [r.values.tobytes() for r in feed_into(ext, body)],
            )
        )
    assert all(mine == theirs for mine, theirs in rows) and sum(len(mine) for mine, _ in rows) >= 2

"""Per-instance baselines: a fleet's own level is its normal (scale-free inputs), absolute features
keep their meaning, rare events stay visible, and training sees exactly what serving sees."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectord.config import IngestConfig
from detectord.ingest.features import FEATURE_NAMES, FeatureSeries, extract
from detectord.ingest.normalise import BaselineConfig, InputPlan, baseline_series, windows_at
from detectord.ingest.pipeline import Ingestor
from detectord.serve.metrics import DaemonMetrics
from lab.synthetic import SyntheticFleet

IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}
PLAN = InputPlan.default(FEATURE_NAMES)


def fleet_rows(qps: float, steps: int, seed: int, step_s: float = 5.0) -> FeatureSeries:
    """Rows of a healthy server at `qps` with Poisson noise and a slow swell, 60 % cache hits."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    rate = qps * (1 + 0.2 * np.sin(2 * np.pi * t / 400)) * rng.gamma(qps * step_s, 1 / (qps * step_s), steps)
    v = np.zeros((steps, len(FEATURE_NAMES)), dtype=np.float32)
    v[:, IDX["request_rate"]] = rate
    v[:, IDX["rcode_noerror_share"]] = 0.85 + rng.normal(0, 0.3 / np.sqrt(qps * step_s), steps)
    v[:, IDX["rcode_nxdomain_share"]] = 1 - v[:, IDX["rcode_noerror_share"]]
    v[:, IDX["cache_hit_ratio"]] = 0.6 + rng.normal(0, 0.5 / np.sqrt(qps * step_s), steps)
    v[:, IDX["latency_p99_seconds"]] = 0.002 * rng.lognormal(0, 0.2, steps)
    v[:, IDX["upstream_request_rate"]] = 0.4 * rate
    v[:, IDX["cpu_seconds_rate"]] = qps * 2e-4
    v[:, IDX["resident_memory_bytes"]] = 40e6
    v[:, IDX["goroutines"]] = 20
    return FeatureSeries(t.astype(np.int64) * int(step_s * 1000), v, np.zeros(steps, bool))


@pytest.mark.parametrize(
    "feature",
    ["request_rate", "upstream_request_rate", "cache_hit_ratio", "rcode_nxdomain_share", "latency_p99_seconds"],
)
def test_fleets_at_20_and_20000_qps_look_alike(feature: str) -> None:
    small = baseline_series(fleet_rows(20, 800, seed=1), PLAN, 5.0)
    large = baseline_series(fleet_rows(20_000, 800, seed=2), PLAN, 5.0)
    ends = np.arange(200, 800)
    i = IDX[feature]
    zs, zl = windows_at(small, ends, 32, 20.0)[:, -1, i], windows_at(large, ends, 32, 20.0)[:, -1, i]
    # Rates three decades apart; the noise of a share ten times larger at 20 qps: the model
    # inputs of both stay within a few spreads of 0, so neither looks anomalous.
    for z in (zs, zl):
        assert abs(np.median(z)) < 1.0 and np.quantile(np.abs(z), 0.99) < 4.0
    if feature.endswith("request_rate"):
        assert abs(small.x[ends, i].mean() - large.x[ends, i].mean()) > 5  # log1p: e^5 ≈ 150×
        assert abs(np.median(zs) - np.median(zl)) < 0.5 and 0.5 < np.std(zs) / np.std(zl) < 2


def test_a_flood_stands_out_at_any_level() -> None:
    for qps in (20, 20_000):
        rows = fleet_rows(qps, 600, seed=3)
        rows.values[500:, IDX["request_rate"]] *= 3
        bs = baseline_series(rows, PLAN, 5.0)
        z = windows_at(bs, np.array([520]), 32, 20.0)[0, -1, IDX["request_rate"]]
        assert z > 3, qps


def test_absolute_features_keep_their_level() -> None:
    rows = fleet_rows(100, 300, seed=4)
    rows.values[250:, IDX["rcode_servfail_share"]] = 0.03
    bs = baseline_series(rows, PLAN, 5.0)
    z = windows_at(bs, np.array([240, 299]), 32, 20.0)[:, -1, IDX["rcode_servfail_share"]]
    assert z[0] == 0.0
    # The CoreDNS mixin's critical level, whatever the instance's history.
    assert z[1] == pytest.approx(2 * np.arcsin(np.sqrt(0.03)) / 0.05, rel=1e-5)


def test_one_reload_failure_stays_visible_for_two_minutes() -> None:
    rows = fleet_rows(100, 300, seed=5)
    rows.values[200, IDX["reload_failure_rate"]] = 1 / 5.0  # one failure in a 5 s step
    bs = baseline_series(rows, PLAN, 5.0)
    col = bs.x[:, IDX["reload_failure_rate"]]
    assert (col[200:224] > 2).all() and (col[224:] == 0).all() and (col[:200] == 0).all()


def test_a_short_incident_hardly_moves_the_baseline() -> None:
    rows = fleet_rows(100, 1500, seed=6)
    before = baseline_series(rows, PLAN, 5.0).loc[1199, IDX["latency_p99_seconds"]]
    rows.values[1100:1160, IDX["latency_p99_seconds"]] = 2.0  # five minutes of 2 s
    bs = baseline_series(rows, PLAN, 5.0)
    assert abs(bs.loc[1199, IDX["latency_p99_seconds"]] - before) < 0.1
    assert windows_at(bs, np.array([1150]), 32, 20.0)[0, -1, IDX["latency_p99_seconds"]] > 10


def test_garbage_values_make_finite_inputs() -> None:
    """NaN, ±Inf and negative values (a broken exporter) never reach a model as anything but finite
    inputs within ±clip."""
    fs = fleet_rows(100, 80, seed=5)
    v = fs.values
    v[70, IDX["request_rate"]] = np.nan
    v[71, IDX["request_rate"]] = np.inf
    v[72, IDX["latency_p99_seconds"]] = np.inf
    v[73, IDX["cache_hit_ratio"]] = -1.0
    v[74, IDX["upstream_request_rate"]] = -np.inf
    v[75, IDX["rcode_servfail_share"]] = 7.0
    bs = baseline_series(fs, PLAN, 5.0)
    x = windows_at(bs, np.arange(40, 80), 16, PLAN.baseline.clip)
    assert np.isfinite(x).all() and np.abs(x).max() <= PLAN.baseline.clip


def test_instance_warms_until_its_baseline_has_min_buckets() -> None:
    plan = InputPlan.default(FEATURE_NAMES, BaselineConfig(bucket_steps=8, min_buckets=4))
    bs = baseline_series(fleet_rows(100, 40, seed=7), plan, 5.0)
    assert not bs.ready[:31].any() and bs.ready[31:].all()


def test_input_plan_round_trips_and_refuses_unknown_keys() -> None:
    assert InputPlan.from_dict(PLAN.to_dict()) == PLAN
    bad = PLAN.to_dict()
    bad["features"]["request_rate"]["scael"] = 1.0
    with pytest.raises(ValueError, match="unknown input keys"):
        InputPlan.from_dict(bad)
    with pytest.raises(ValueError, match="min_buckets"):
        BaselineConfig(min_buckets=0)


def test_training_windows_are_the_windows_serve_scores() -> None:
    """The offline path (extract → baseline_series → windows_at) and the Ingestor give the same bytes."""
    step_ms, window = 15_000, 16
    fleet = SyntheticFleet(3, seed=3, scrape_interval_s=15.0)
    requests = list(fleet.write_requests(3 * 3600))
    sink: list[Any] = []

    class Sink:
        def submit_many(self, reqs: list[Any]) -> int:
            sink.extend(reqs)
            return len(reqs)

    ing = Ingestor(
        step_ms=step_ms,
        instance_labels=IngestConfig.instance_labels,
        window=window,
        inputs=PLAN,
        max_instances=100,
        max_gap_steps=5,
        max_decoded=1 << 30,
        max_future_s=1e9,
        worker=Sink(),
        metrics=DaemonMetrics(CollectorRegistry(), IngestConfig.instance_labels),
    )
    from detectord.ingest.remote_write import encode_v1

    try:
        for req in requests:
            ing.write_sync(encode_v1(req), "1.0")
    finally:
        ing.close()
    offline = {}
    for key, fs in extract(requests, step_ms).items():
        bs = baseline_series(fs, PLAN, step_ms / 1000)
        ok = bs.ready.copy()
        ok[: window - 1] = False
        for r in bs.restarts:
            ok[r : r + window - 1] = False
        ends = np.flatnonzero(ok)
        offline[key] = (bs.timestamps_ms[ends], windows_at(bs, ends, window, PLAN.baseline.clip))
    live: dict[Any, Any] = {}
    for r in sink:
        live.setdefault(r.instance, []).append(r)
    assert set(live) == set(offline) and len(live) == 3
    for key, reqs in live.items():
        ts, wins = offline[key]
        # Serve never closes the last open steps; everything it did score matches offline, bit for bit.
        n = len(reqs)
        assert n > 500 and len(ts) - n <= 2
        np.testing.assert_array_equal(np.array([r.step_ts_ms for r in reqs]), ts[:n])
        np.testing.assert_array_equal(np.stack([r.window for r in reqs]), wins[:n])

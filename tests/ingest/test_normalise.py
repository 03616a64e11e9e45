"""Per-instance baselines: a fleet's own level is its normal (scale-free inputs), absolute features
keep their meaning, rare events stay visible, and training sees exactly what serving sees."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectord.config import IngestConfig
from detectord.ingest.features import FEATURE_NAMES, FeatureSeries, extract
from detectord.ingest.normalise import BaselineConfig, BaselineSeries, InputPlan, baseline_series, windows_at
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
    zs, zl = windows_at(small, ends, 32, PLAN)[:, -1, i], windows_at(large, ends, 32, PLAN)[:, -1, i]
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
        z = windows_at(bs, np.array([520]), 32, PLAN)[0, -1, IDX["request_rate"]]
        assert z > 3, qps


def test_absolute_features_keep_their_level() -> None:
    rows = fleet_rows(100, 300, seed=4)
    rows.values[250:, IDX["rcode_servfail_share"]] = 0.03
    bs = baseline_series(rows, PLAN, 5.0)
    z = windows_at(bs, np.array([240, 299]), 32, PLAN)[:, -1, IDX["rcode_servfail_share"]]
    assert z[0] == 0.0
    # The CoreDNS mixin's critical level, whatever the instance's history.
    assert z[1] == pytest.approx(2 * np.arcsin(np.sqrt(0.03)) / 0.05, rel=1e-5)


def test_an_emptied_cache_is_no_move_and_a_filling_one_is() -> None:
    """A reload, restart or cache flush empties the cache, which refills over many minutes: the
    model sees no fall. A flood of random names that fills it is a rise, and is seen."""
    entries = IDX["cache_entries"]
    rows = fleet_rows(100, 600, seed=9)
    rows.values[:, entries] = 2000.0
    rows.values[400:, entries] = np.linspace(5.0, 2000.0, 200)  # flushed at 400
    flushed = baseline_series(rows, PLAN, 5.0)
    z = windows_at(flushed, np.arange(400, 600), 32, PLAN)[:, -1, entries]
    assert (z == 0.0).all()
    rows.values[400:, entries] = 20_000.0
    filled = baseline_series(rows, PLAN, 5.0)
    assert windows_at(filled, np.array([410]), 32, PLAN)[0, -1, entries] > 3
    # A model made before `direction` existed still sees both ways.
    old = PLAN.to_dict()
    for spec in old["features"].values():
        del spec["direction"]
    both = InputPlan.from_dict(old)
    assert windows_at(flushed, np.array([401]), 32, both)[0, -1, entries] < -3


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
    assert windows_at(bs, np.array([1150]), 32, PLAN)[0, -1, IDX["latency_p99_seconds"]] > 10


@pytest.mark.parametrize("step_s", [5.0, 15.0, 60.0])
def test_a_long_incident_is_held_out_of_the_baseline_and_a_lasting_level_taken_in(step_s: float) -> None:
    """Thirty minutes of a tripled query rate stay far out to their end (the baseline holds them
    out), and a level that lasts beyond `hold_max_s` becomes the normal."""
    from detectord.offline.recipes import recipe_for

    plan = InputPlan.default(FEATURE_NAMES, recipe_for(step_s).baseline)
    assert plan.baseline.hold_z > 0
    per_h = round(3600 / step_s)
    hours = 12
    rows = fleet_rows(100, hours * per_h, seed=7, step_s=step_s)
    rate = IDX["request_rate"]
    # Without fleet_rows' slow swell: at 60 s steps its 400 steps are a whole day's trend.
    rng = np.random.default_rng(8)
    rows.values[:, rate] = 100 * rng.gamma(100 * step_s, 1 / (100 * step_s), len(rows.values))
    # Half an hour after the instance (or detectord) started, 30 minutes of a flood: as long as
    # the baseline's history, enough to drag a median of it along.
    start, end = per_h // 2, per_h
    rows.values[start:end, rate] *= 3
    rows.values[5 * per_h :, rate] *= 3  # from 5 h on, for good: the traffic grew
    held = baseline_series(rows, plan, step_s)
    unheld = baseline_series(
        rows, dataclasses.replace(plan, baseline=dataclasses.replace(plan.baseline, hold_z=0.0)), step_s
    )

    def z(bs: BaselineSeries, row: int) -> float:
        return float(windows_at(bs, np.array([row]), 8, plan)[0, -1, rate])

    assert z(held, start + 2) > 4 and z(held, end - 1) > 4
    # Where and how wide the baseline is at the flood's end, against just before it: unmoved,
    # where without the hold both drift towards the flood.
    before, loc, scale = start - 1, held.loc[:, rate], held.scale[:, rate]
    assert abs(loc[end - 1] - loc[before]) < 0.02 and scale[end - 1] < 1.1 * scale[before]
    assert unheld.loc[end - 1, rate] - loc[before] > 0.02 or unheld.scale[end - 1, rate] > 1.5 * scale[before]
    # After the flood: back within reach at once, the held buckets dropped.
    assert abs(z(held, end + 10)) < 3
    # The lasting level: far out at first, then learned: held for hold_max_s, then at the pace of
    # a median over the baseline's horizon (2.8 h at 5 s, 6.4 h at 1 m).
    assert z(held, 5 * per_h + 2) > 4 and abs(z(held, hours * per_h - 1)) < 3


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
    x = windows_at(bs, np.arange(40, 80), 16, PLAN)
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


PARTIAL = InputPlan.default(FEATURE_NAMES, BaselineConfig(bucket_steps=3, min_buckets=1), min_rows=3)


@pytest.mark.parametrize(
    ("plan", "window", "max_gap_steps"),
    [(PLAN, 16, 5), (PARTIAL, 8, 0)],
    ids=["full-windows", "partial-windows-and-restarts"],
)
def test_training_windows_are_the_windows_serve_scores(plan: InputPlan, window: int, max_gap_steps: int) -> None:
    """The offline path (extract → baseline_series → windows_at) and the Ingestor give the same bytes,
    also for windows scored before they are full (after a start, and after each restart)."""
    from detectord.offline.dataset import _window_ends

    step_ms = 15_000
    fleet = SyntheticFleet(3, seed=3, scrape_interval_s=15.0)
    requests = list(fleet.write_requests(3 * 3600))
    if plan.min_rows is not None:
        # Prometheus could not reach us for a while, twice: every instance's window starts again.
        n = len(requests)
        requests = requests[: n // 3] + requests[n // 3 + n // 50 : 2 * n // 3] + requests[2 * n // 3 + n // 50 :]
    sink: list[Any] = []

    class Sink:
        def submit_many(self, reqs: list[Any]) -> int:
            sink.extend(reqs)
            return len(reqs)

    ing = Ingestor(
        step_ms=step_ms,
        instance_labels=IngestConfig.instance_labels,
        window=window,
        inputs=plan,
        max_instances=100,
        max_gap_steps=max_gap_steps,
        max_decoded=1 << 30,
        max_future_s=1e9,
        stale_after_s=120.0,
        failed_scrapes=IngestConfig.failed_scrapes,
        crash_loop_restarts=IngestConfig.crash_loop_restarts,
        crash_loop_within_s=float(IngestConfig.crash_loop_within),
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
    restarts = 0
    for key, fs in extract(requests, step_ms, max_gap_steps=max_gap_steps).items():
        bs = baseline_series(fs, plan, step_ms / 1000)
        restarts += len(bs.restarts)
        ends = _window_ends(bs, plan.rows_needed(window))
        offline[key] = (bs.timestamps_ms[ends], windows_at(bs, ends, window, plan))
    if plan.min_rows is not None:
        assert restarts >= 3, "the fleet must restart for this test to mean anything"
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


def test_the_baselines_median_is_numpys() -> None:
    """The baseline's medians (a sort, for speed) are np.median's numbers, bit for bit, on what a
    baseline holds (non-negative bucket means, spreads and deviations, with ties and zeros), so a
    model trained before keeps scoring the same; a column with NaN gives NaN."""
    from detectord.ingest.normalise import _median

    rng = np.random.default_rng(11)
    for n in [*range(1, 20), 64, 127, 128]:
        a = np.abs(rng.standard_normal((n, 12))).astype(np.float32)
        a[:, 0] = 0.0
        a[:, 1] = np.round(a[:, 1])
        a[:, 2] = a[0, 2]
        assert _median(a).tobytes() == np.median(a, axis=0).tobytes(), n
    a[5, 3] = np.nan
    got = _median(a)
    assert np.isnan(got[3]) and np.isfinite(np.delete(got, 3)).all()

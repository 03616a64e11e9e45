"""Scrape intervals users run, on real parts: a real CoreDNS under dnsperf load, scraped by real
Prometheus 2.42 servers.

- A 1 s recording cut into 10 s steps (what training does to make the coarser models) gives the
  features a Prometheus scraping every 10 s gives: the steps take the scrape at their end.
- At a 15 s scrape, `detectord serve` with the shipped model set runs its 15 s model, scores a new
  edge within about 3 minutes, alerts on an upstream timeout and stays quiet on the healthy edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest

from detectord.ingest.features import FEATURE_NAMES, FeatureSeries, extract
from detectord.ingest.remote_write import LabelCache
from detectord.offline.dataset import shift_writes
from detectord.recordings.format import read_writes
from lab.peers.alertmanager import run_alertmanager
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import run_detectord, run_recorder
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.test_e2e import Watch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _features(path: Path, step_ms: int, shift_ms: int = 0) -> FeatureSeries:
    writes = (w for _, w in read_writes(path, LabelCache()))
    (series,) = extract(shift_writes(writes, shift_ms), step_ms).values()
    return series


def _scrape_phase_ms(path: Path, step_ms: int) -> int:
    """Where in its interval a Prometheus scrapes (its offset is a hash of the target)."""
    phases = [t % step_ms for _, w in read_writes(path, LabelCache()) for t in w.timestamps]
    return int(np.median(phases))


# How close the two must be, per feature, as the median over steps of |a - b| / max(|a|, |b|, tiny).
# The 1 s recording is cut on the 10 s server's own scrape phase (each step takes the 1 s scrape at
# or just before the 10 s server's), so the two steps span the same 10 s to within a second:
# what is left is that second of traffic and gauges read up to a second apart. Quantiles are
# interpolated inside histogram buckets, CPU is a noisy rate.
TOLERANCE = {
    "latency_p50_seconds": 0.25,
    "latency_p99_seconds": 0.25,
    "upstream_latency_p99_seconds": 0.25,
    "cpu_seconds_rate": 0.35,
    # A gauge read at another instant: about 20 goroutines, one more or less.
    "goroutines": 0.1,
}
DEFAULT_TOLERANCE = 0.05


async def test_a_1s_recording_cut_into_10s_steps_gives_the_features_of_a_10s_scrape(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up, edge = Ports(), Ports()
    step_ms = 10_000
    async with (
        run_coredns(upstream_corefile(up, zone), up, workdir=tmp_path, name="up") as upstream,
        run_coredns(edge_corefile(edge, [upstream.address]), edge, workdir=tmp_path, name="edge"),
        run_dnsperf(edge.dns, qps=200, duration_s=600, workdir=tmp_path, name="load", seed=1),
        run_recorder(tmp_path / "1s.drec", log=tmp_path / "rec1.log") as rec1,
        run_recorder(tmp_path / "10s.drec", log=tmp_path / "rec10.log") as rec10,
        run_prometheus(
            {"coredns": {"edge": edge.metrics_target}},
            workdir=tmp_path / "prom1",
            remote_write_url=rec1.write_url,
            scrape_interval="1s",
        ),
        run_prometheus(
            {"coredns": {"edge": edge.metrics_target}},
            workdir=tmp_path / "prom10",
            remote_write_url=rec10.write_url,
            scrape_interval="10s",
        ),
    ):
        await asyncio.sleep(130)
    # Shifting the 1 s scrapes by (step - phase) moves the 10 s server's scrape instants onto the
    # ends of the steps that take them.
    shift_ms = step_ms - _scrape_phase_ms(tmp_path / "10s.drec", step_ms)
    fine = _features(tmp_path / "1s.drec", step_ms, shift_ms)
    coarse = _features(tmp_path / "10s.drec", step_ms)
    common, i, j = np.intersect1d(fine.timestamps_ms, coarse.timestamps_ms, return_indices=True)
    # Past the first minute (the cache fills, the load starts): steady traffic.
    late = common >= common[0] + 60_000
    assert late.sum() >= 4, f"too few common steps: {len(common)}"
    a, b = fine.values[i][late], coarse.values[j][late]
    assert np.median(a[:, FEATURE_NAMES.index("request_rate")]) > 150
    worst = {}
    for f, name in enumerate(FEATURE_NAMES):
        x, y = a[:, f], b[:, f]
        if not (np.any(x) or np.any(y)):
            continue  # 0 in both (no SERVFAIL, no panics, ...): the same
        rel = np.abs(x - y) / np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-9)
        worst[name] = float(np.median(rel))
    print(f"median relative differences per feature: {worst}")
    off = {n: round(v, 3) for n, v in worst.items() if v > TOLERANCE.get(n, DEFAULT_TOLERANCE)}
    assert not off, f"subsampled and real 10 s features differ: {off}; all: {worst}"


CONFIG = """
ingest:
  step: 15s
alerting:
  for: 0s
  keep_firing_for: 30s
  resend_interval: 5s
  alertmanagers:
    - url: {am}
logging:
  format: console
"""


async def test_at_a_15s_scrape_an_upstream_timeout_alerts_and_the_healthy_edge_stays_quiet(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up_a, up_b, edge_a, edge_b = Ports(), Ports(), Ports(), Ports()
    async with contextlib.AsyncExitStack() as stack:
        am = await stack.enter_async_context(run_alertmanager(tmp_path / "am"))
        upstream_a = await stack.enter_async_context(
            run_coredns(upstream_corefile(up_a, zone), up_a, workdir=tmp_path, name="up-a")
        )
        upstream_b = await stack.enter_async_context(
            run_coredns(upstream_corefile(up_b, zone), up_b, workdir=tmp_path, name="up-b")
        )
        for ports, upstream, name in ((edge_a, upstream_a, "edge-a"), (edge_b, upstream_b, "edge-b")):
            await stack.enter_async_context(
                run_coredns(edge_corefile(ports, [upstream.address]), ports, workdir=tmp_path, name=name)
            )
        for i, ports in enumerate((edge_a, edge_b)):
            await stack.enter_async_context(
                run_dnsperf(ports.dns, qps=300, duration_s=900, workdir=tmp_path, name=f"load-{i}", seed=i + 1)
            )
        det = await stack.enter_async_context(run_detectord(CONFIG.format(am=am.url), workdir=tmp_path / "detectord"))
        started = time.monotonic()
        await stack.enter_async_context(
            run_prometheus(
                {"coredns": [edge_a.metrics_target, edge_b.metrics_target]},
                workdir=tmp_path / "prom",
                remote_write_url=det.write_url,
                scrape_interval="15s",
            )
        )
        metrics = await det.metrics()
        assert 'step_seconds="15"' in metrics, "the model set's 15 s model is not the one running"
        healthy, faulty = edge_a.metrics_target, edge_b.metrics_target
        with Watch(am, det) as watch:

            async def both_scoring() -> bool:
                return {healthy, faulty} <= watch.scoring

            # 12 steps of baseline and window, then the step closes a step later and Prometheus
            # sends it within its batch deadline: about 3.5 minutes.
            await watch.until("both edges to be scored", both_scoring, timeout=360)
            first_score_s = time.monotonic() - started
            await asyncio.sleep(60)  # four healthy steps, scored
            assert not watch.seen, f"alerts before any fault: {watch.summary()}"

            fault_at = time.monotonic()
            await upstream_b.reconfigure(upstream_corefile(up_b, zone, "slow"), wait_ready=False)

            async def fired() -> bool:
                return bool(await watch.active(faulty))

            # Two steps to close the first slow step, one or two to alert, a batch to send.
            await watch.until(f"CoreDNSAnomaly for {faulty}", fired, timeout=120)
            detected_after = time.monotonic() - fault_at
            await upstream_b.reconfigure(upstream_corefile(up_b, zone))
            recovered_at = time.monotonic()

            async def resolved() -> bool:
                return not await watch.active(faulty)

            await watch.until(f"the alert for {faulty} to resolve", resolved, timeout=240)
            resolved_after = time.monotonic() - recovered_at
            assert healthy not in watch.seen, f"the healthy edge alerted: {watch.summary()}"
            assert watch.states.get(healthy, set()) <= {"inactive", "pending"}
        print(
            f"first score {first_score_s:.0f}s after Prometheus started, fault detected after "
            f"{detected_after:.0f}s, resolved {resolved_after:.0f}s after recovery"
        )

"""No cold start: a daemon started beside a Prometheus that has scraped real CoreDNS for a while
reads their history back through remote read, and every instance scores from its first live step
after `/-/ready`, exactly as a daemon that received every sample live. Writes that arrive while it
backfills are answered 503, retried by Prometheus, and neither lost nor counted twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from detectord import children
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import Detectord, run_detectord
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.support import REPO, metric, slow_proxy

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# The 15 s model at a 1 s step: it warms in 24 steps (baseline 2 × 6, window 12).
MODEL = REPO / "models/default/15s"
CONFIG = """
ingest:
  step: 1s
model:
  any_step: true
inference:
  score_history: 100000
"""


async def _scores(det: Detectord) -> dict[str, dict[int, float]]:
    async with aiohttp.ClientSession() as s, s.get(f"{det.url}/api/v1/scores") as r:
        data = (await r.json())["data"]
    return {d["labels"]["instance"]: {int(t): v for t, v in d["scores"]} for d in data}


async def test_a_daemon_started_with_backfill_scores_at_once_as_if_it_had_been_there(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up, edge_a, edge_b = Ports(), Ports(), Ports()
    port = children.free_port()
    async with (
        run_coredns(upstream_corefile(up, zone), up, workdir=tmp_path, name="up") as upstream,
        run_coredns(edge_corefile(edge_a, [upstream.address]), edge_a, workdir=tmp_path, name="edge-a"),
        run_coredns(edge_corefile(edge_b, [upstream.address]), edge_b, workdir=tmp_path, name="edge-b"),
        run_dnsperf(edge_a.dns, qps=200, duration_s=600, workdir=tmp_path, name="a", seed=1),
        run_dnsperf(edge_b.dns, qps=100, duration_s=600, workdir=tmp_path, name="b", seed=2),
        run_detectord(CONFIG, workdir=tmp_path / "live", model=MODEL) as live,
        run_prometheus(
            {"coredns": [edge_a.metrics_target, edge_b.metrics_target]},
            workdir=tmp_path / "prom",
            remote_write_url=live.write_url,
        ) as prom,
    ):
        edges = {edge_a.metrics_target, edge_b.metrics_target}
        deadline = time.monotonic() + 120
        while {i["labels"]["instance"] for i in await live.instances() if not i["warming"]} != edges:
            assert time.monotonic() < deadline, "the live daemon never scored both edges"
            await asyncio.sleep(1)
        await asyncio.sleep(30)  # more history than the warm-up needs

        # From now on Prometheus writes to the new daemon too: refused while it is not listening,
        # then answered 503 while it backfills, retried all along.
        prom.add_remote_write(f"http://127.0.0.1:{port}/api/v1/write")
        async with slow_proxy(f"{prom.url}/api/v1/read", delay_s=5.0) as read_url:
            config = CONFIG + f"backfill:\n  url: {read_url}\n  lookback: 30m\n  timeout: 60s\n"
            async with run_detectord(config, workdir=tmp_path / "backfilled", model=MODEL, port=port) as det:
                ready_ms = int(time.time() * 1000)
                instances = await det.instances()
                assert {i["labels"]["instance"] for i in instances} >= edges
                assert [i for i in instances if i["warming"]] == [], "every instance scores at once"
                await asyncio.sleep(20)
                got, want = await _scores(det), await _scores(live)
                text = await det.metrics()
                log = det.log.read_text()

    assert "backfilled from Prometheus" in log
    assert metric(text, "detectord_backfill_total", result="success") == 1
    assert metric(text, "detectord_backfill_samples_total") > 1000
    # Writes refused while it backfilled came back: 503s, then 2xx.
    assert metric(text, "detectord_remote_write_requests_total", code="503", protocol="1.0") >= 1
    for edge in edges:
        steps = sorted(got[edge])
        # Its first live step: a step or two after ready (a scrape, then the step closes).
        assert steps[0] <= ready_ms + 3000, (edge, steps[0] - ready_ms)
        assert steps == list(range(steps[0], steps[-1] + 1, 1000)), f"{edge}: steps missing"
        assert len(steps) >= 15
        common = [t for t in steps if t in want[edge]]
        assert len(common) >= len(steps) - 2
        np.testing.assert_allclose(
            [got[edge][t] for t in common],
            [want[edge][t] for t in common],
            rtol=1e-4,
            atol=1e-5,
            err_msg=f"{edge}; samples late: {metric(text, 'detectord_samples_total', outcome='late')}",
        )

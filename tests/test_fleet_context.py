"""Fleet context, on real parts: two CoreDNS edges forward to one upstream, a third to another;
Prometheus 2.42 scrapes them every second and remote-writes to `detectord serve`, which alerts a
real Alertmanager 0.25 grouping by `alertname` and `upstream` and notifying a webhook.

When the shared upstream times out, both its edges alert with the same `upstream` label and say
that 2 of its 2 edges are anomalous, and Alertmanager sends one notification group for the
incident; the third edge stays quiet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from detectord import children
from lab.peers.alertmanager import run_alertmanager
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import run_detectord
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.support import E2E_DETECTORD_CONFIG
from tests.test_e2e import Watch


@asynccontextmanager
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP receiver for Alertmanager's webhook: every notification it posts, in order."""
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = children.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        await runner.cleanup()


@pytest.mark.e2e
@pytest.mark.slow
async def test_edges_of_a_failing_upstream_alert_as_one_group(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    shared, other = Ports(), Ports()
    edges = {"a": Ports(), "b": Ports(), "c": Ports()}
    async with (
        webhook() as (hook_url, notifications),
        run_alertmanager(
            tmp_path / "am", webhook_url=hook_url, group_by=["alertname", "upstream"], group_wait="10s"
        ) as am,
        run_coredns(upstream_corefile(shared, zone), shared, workdir=tmp_path, name="shared") as up_shared,
        run_coredns(upstream_corefile(other, zone), other, workdir=tmp_path, name="other") as up_other,
        run_coredns(edge_corefile(edges["a"], [up_shared.address]), edges["a"], workdir=tmp_path, name="edge-a"),
        run_coredns(edge_corefile(edges["b"], [up_shared.address]), edges["b"], workdir=tmp_path, name="edge-b"),
        run_coredns(edge_corefile(edges["c"], [up_other.address]), edges["c"], workdir=tmp_path, name="edge-c"),
        run_dnsperf(edges["a"].dns, qps=200, duration_s=600, workdir=tmp_path, name="a", seed=1),
        run_dnsperf(edges["b"].dns, qps=200, duration_s=600, workdir=tmp_path, name="b", seed=2),
        run_dnsperf(edges["c"].dns, qps=200, duration_s=600, workdir=tmp_path, name="c", seed=3),
        run_detectord(E2E_DETECTORD_CONFIG.format(am=am.url), workdir=tmp_path / "detectord") as det,
        run_prometheus(
            {"coredns": [p.metrics_target for p in edges.values()]},
            workdir=tmp_path / "prom",
            remote_write_url=det.write_url,
        ),
    ):
        a, b, c = (edges[n].metrics_target for n in "abc")
        with Watch(am, det) as watch:

            async def all_scoring() -> bool:
                return {a, b, c} <= watch.scoring

            await watch.until("every edge to be scored", all_scoring, timeout=120)
            await asyncio.sleep(15)
            assert not watch.seen, f"alerts before any fault: {watch.summary()}"

            await up_shared.reconfigure(upstream_corefile(shared, zone, "slow"), wait_ready=False)

            async def both_fired() -> bool:
                return bool(await watch.active(a)) and bool(await watch.active(b))

            await watch.until("both edges of the shared upstream to alert", both_fired, timeout=90)
            await asyncio.sleep(15)  # Alertmanager's group_wait (10 s) has passed: it has notified
            alerts = [(await watch.active(x))[0] for x in (a, b)]
            assert {al["labels"]["upstream"] for al in alerts} == {up_shared.address}
            for al in alerts:
                assert "2 of 2 instances forwarding to" in al["annotations"]["description"], al
                assert al["annotations"]["fleet"].startswith("2 of 2 instances")
            await up_shared.reconfigure(upstream_corefile(shared, zone))
            await asyncio.sleep(5)
            assert c not in watch.seen, f"the edge of the healthy upstream alerted: {watch.summary()}"

    firing = [n for n in notifications if n["status"] == "firing"]
    groups = {n["groupKey"] for n in firing}
    assert len(groups) == 1, f"one incident, {len(groups)} notification groups: {groups}"
    first = firing[0]
    assert {al["labels"]["instance"] for al in first["alerts"]} == {a, b}, "the first notification names both edges"

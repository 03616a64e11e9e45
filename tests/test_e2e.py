"""End to end, on real parts: two CoreDNS edges under dnsperf load, each forwarding to its own
CoreDNS upstream; Prometheus 2.42 scrapes the edges every second and remote-writes to
`detectord serve`, which alerts a real Alertmanager 0.25. One upstream starts answering after
the edge's 2 s forward timeout: its edge must alert, then resolve once the upstream is healthy
again; the other edge must never alert.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from lab.peers.alertmanager import Alertmanager, run_alertmanager
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import Detectord, run_detectord
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.support import E2E_DETECTORD_CONFIG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Watch:
    """Polls Alertmanager and detectord in the background; remembers every alert ever seen."""

    def __init__(self, am: Alertmanager, det: Detectord) -> None:
        self.am, self.det = am, det
        self.seen: dict[str, list[dict[str, Any]]] = {}  # instance label -> alerts seen active
        self.states: dict[str, set[str]] = {}  # instance label -> alert states seen in detectord
        self.scoring: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for alert in await self.am.alerts():
                if alert["labels"].get("alertname") == "CoreDNSAnomaly":
                    self.seen.setdefault(alert["labels"].get("instance", ""), []).append(alert)
            for inst in await self.det.instances():
                name = inst["labels"]["instance"]
                self.states.setdefault(name, set()).add(inst["alert"])
                if not inst["warming"]:
                    self.scoring.add(name)
            await asyncio.sleep(0.5)

    def summary(self) -> dict[str, set[str]]:
        return {inst: {a["annotations"]["description"] for a in alerts[:3]} for inst, alerts in self.seen.items()}

    async def active(self, instance: str) -> list[dict[str, Any]]:
        return [
            a
            for a in await self.am.alerts()
            if a["labels"].get("alertname") == "CoreDNSAnomaly" and a["labels"].get("instance") == instance
        ]

    async def until(self, what: str, cond: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await cond():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; detectord log: {self.det.log.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.5)

    def __enter__(self) -> Watch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_upstream_timeouts_alert_then_resolve(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up_a, up_b, edge_a, edge_b = Ports(), Ports(), Ports(), Ports()
    async with (
        run_alertmanager(tmp_path / "am") as am,
        run_coredns(upstream_corefile(up_a, zone), up_a, workdir=tmp_path, name="up-a") as upstream_a,
        run_coredns(upstream_corefile(up_b, zone), up_b, workdir=tmp_path, name="up-b") as upstream_b,
        run_coredns(edge_corefile(edge_a, [upstream_a.address]), edge_a, workdir=tmp_path, name="edge-a"),
        run_coredns(edge_corefile(edge_b, [upstream_b.address]), edge_b, workdir=tmp_path, name="edge-b"),
        run_dnsperf(edge_a.dns, qps=300, duration_s=600, workdir=tmp_path, name="a", seed=1),
        run_dnsperf(edge_b.dns, qps=300, duration_s=600, workdir=tmp_path, name="b", seed=2),
        run_detectord(E2E_DETECTORD_CONFIG.format(am=am.url), workdir=tmp_path / "detectord") as det,
        run_prometheus(
            {"coredns": [edge_a.metrics_target, edge_b.metrics_target]},
            workdir=tmp_path / "prom",
            remote_write_url=det.write_url,
        ),
    ):
        healthy, faulty = edge_a.metrics_target, edge_b.metrics_target
        with Watch(am, det) as watch:

            async def both_scoring() -> bool:
                return {healthy, faulty} <= watch.scoring

            await watch.until("both edges to be scored", both_scoring, timeout=120)
            await asyncio.sleep(20)  # a stretch of normal traffic, scored
            assert not watch.seen, f"alerts before any fault: {watch.summary()}"

            fault_at = time.monotonic()
            await upstream_b.reconfigure(upstream_corefile(up_b, zone, "slow"), wait_ready=False)

            async def fired() -> bool:
                return bool(await watch.active(faulty))

            await watch.until(f"CoreDNSAnomaly for {faulty}", fired, timeout=90)
            detected_after = time.monotonic() - fault_at
            alert = (await watch.active(faulty))[0]
            assert alert["labels"]["job"] == "coredns"
            assert alert["labels"]["severity"] == "warning"
            assert alert["labels"]["model"]
            assert "Top contributing features" in alert["annotations"]["description"]
            assert float(alert["annotations"]["score"]) > 1.0

            await upstream_b.reconfigure(upstream_corefile(up_b, zone))

            async def resolved() -> bool:
                return not await watch.active(faulty)

            await watch.until(f"the alert for {faulty} to resolve", resolved, timeout=120)
            assert healthy not in watch.seen, f"the healthy edge alerted: {watch.summary()}"
            assert watch.states.get(healthy, set()) <= {"inactive", "pending"}
            metrics = await det.metrics()
            assert f'detectord_anomaly_score{{instance="{healthy}",job="coredns"}}' in metrics
            print(f"fault detected after {detected_after:.1f}s")

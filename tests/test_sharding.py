"""Scale-out on real parts: one Prometheus splits a CoreDNS fleet across detectord shards with the
remote-write entries `detectord remote-write --shards 2 --replicas 2` prints (hashmod over
job and instance). Shard 0 runs as two replicas for high availability, shard 1 as one.

Every instance is scored by exactly one shard (by both replicas of it); a shard that is down loses
only its own instances, and Prometheus queues for it and catches up when it is back; a fault
alerts once in Alertmanager though both replicas of its shard send it."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from detectord.children import free_port
from detectord.sharding import remote_writes
from lab.peers.alertmanager import Alertmanager, run_alertmanager
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import Detectord, run_detectord
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.support import E2E_DETECTORD_CONFIG, metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "coredns"


def _shard(instance: str, shards: int = 2) -> int:
    """Prometheus's hashmod over [job, instance]: the last 8 bytes of the md5 of "job;instance"."""
    return int.from_bytes(hashlib.md5(f"{JOB};{instance}".encode()).digest()[8:], "big") % shards


def _names() -> tuple[str, str, str]:
    """Instance names for the faulty edge and a healthy one on shard 0, and a healthy one on shard 1."""
    on: dict[int, list[str]] = {0: [], 1: []}
    for i in range(100):
        on[_shard(f"edge-{i}")].append(f"edge-{i}")
    return on[0][0], on[0][1], on[1][0]


async def _scored(det: Detectord) -> set[str]:
    return {i["labels"]["instance"] for i in await det.instances() if not i["warming"]}


async def _until(what: str, cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.5)


async def _anomalies(am: Alertmanager) -> list[dict[str, Any]]:
    return [a for a in await am.alerts() if a["labels"].get("alertname") == "CoreDNSAnomaly"]


async def test_shards_split_the_fleet_survive_a_shard_down_and_replicas_alert_once(tmp_path: Path) -> None:
    faulty, healthy0, healthy1 = _names()
    zone = zone_file(tmp_path / "example.test.zone")
    up_ok, up_bad = Ports(), Ports()
    edges = {faulty: Ports(), healthy0: Ports(), healthy1: Ports()}
    ports = {"0-r0": free_port(), "0-r1": free_port(), "1-r0": free_port()}
    # The generated entries, with each replica's address and a test's quick queue.
    writes = [
        {**w, "queue_config": {"batch_send_deadline": "500ms", "min_backoff": "50ms", "max_backoff": "1s"}}
        for w in remote_writes("http://127.0.0.1:{shard}-r{replica}/api/v1/write", shards=2, replicas=2)
    ]
    for w in writes:
        key = w["url"].removeprefix("http://127.0.0.1:").removesuffix("/api/v1/write")
        w["url"] = f"http://127.0.0.1:{ports[key]}/api/v1/write" if key in ports else ""
    writes = [w for w in writes if w["url"]]  # shard 1 runs one replica
    assert len(writes) == 3

    def detectord(name: str, am: Alertmanager) -> Any:
        return run_detectord(
            E2E_DETECTORD_CONFIG.format(am=am.url), workdir=tmp_path / f"shard-{name}", port=ports[name]
        )

    async with (
        run_alertmanager(tmp_path / "am") as am,
        run_coredns(upstream_corefile(up_ok, zone), up_ok, workdir=tmp_path, name="up-ok") as upstream_ok,
        run_coredns(upstream_corefile(up_bad, zone), up_bad, workdir=tmp_path, name="up-bad") as upstream_bad,
        run_coredns(edge_corefile(edges[faulty], [upstream_bad.address]), edges[faulty], workdir=tmp_path, name="f"),
        run_coredns(
            edge_corefile(edges[healthy0], [upstream_ok.address]), edges[healthy0], workdir=tmp_path, name="h0"
        ),
        run_coredns(
            edge_corefile(edges[healthy1], [upstream_ok.address]), edges[healthy1], workdir=tmp_path, name="h1"
        ),
        run_dnsperf(edges[faulty].dns, qps=200, duration_s=600, workdir=tmp_path, name="f", seed=1),
        run_dnsperf(edges[healthy0].dns, qps=200, duration_s=600, workdir=tmp_path, name="h0", seed=2),
        run_dnsperf(edges[healthy1].dns, qps=200, duration_s=600, workdir=tmp_path, name="h1", seed=3),
        detectord("0-r0", am) as s0a,
        detectord("0-r1", am) as s0b,
        run_prometheus(
            {JOB: {name: p.metrics_target for name, p in edges.items()}},
            workdir=tmp_path / "prom",
            remote_writes=writes,
        ),
    ):
        async with detectord("1-r0", am) as s1:

            async def all_scored() -> bool:
                return (
                    await _scored(s0a) == {faulty, healthy0}
                    and await _scored(s0b) == {faulty, healthy0}
                    and await _scored(s1) == {healthy1}
                )

            await _until("each shard to score its own instances", all_scored, timeout=120)
            # Exactly one shard each: no shard even tracks another's instances.
            assert {i["labels"]["instance"] for i in await s0a.instances()} == {faulty, healthy0}
            assert {i["labels"]["instance"] for i in await s1.instances()} == {healthy1}
            await asyncio.sleep(10)
            assert not await _anomalies(am), "alerts before any fault"

        # Shard 1 is down: shard 0 goes on, and nothing alerts for shard 1's instance meanwhile.
        down_from_ms = int(time.time() * 1000)
        before = metric(await s0a.metrics(), "detectord_windows_scored_total")
        await asyncio.sleep(10)
        down_to_ms = int(time.time() * 1000)
        assert metric(await s0a.metrics(), "detectord_windows_scored_total") >= before + 2 * 8
        assert await _scored(s0a) == {faulty, healthy0}

        async with detectord("1-r0", am) as s1:
            # Back (its state restored): Prometheus resends what it queued while the shard was down.
            async def caught_up() -> bool:
                data = await s1.scores(healthy1)
                steps = [t for t, _ in data]
                return any(down_from_ms + 2000 <= t <= down_to_ms - 2000 for t in steps)

            await _until("shard 1 to score the steps it was down for", caught_up, timeout=60)
            assert await _scored(s1) == {healthy1}
            assert await _scored(s0a) == {faulty, healthy0}
            assert not await _anomalies(am), "a shard's restart alerted"

            await upstream_bad.reconfigure(upstream_corefile(up_bad, zone, "slow"), wait_ready=False)

            async def fired() -> bool:
                return any(a["labels"]["instance"] == faulty for a in await _anomalies(am))

            await _until(f"CoreDNSAnomaly for {faulty}", fired, timeout=90)
            await asyncio.sleep(3)  # both replicas have sent it (resend_interval 2s)
            for det in (s0a, s0b):
                text = await det.metrics()
                assert metric(text, "detectord_alerts_sent_total") > 0
                assert [i["alert"] for i in await det.instances() if i["labels"]["instance"] == faulty] == ["firing"]
            # Identical alerts from the two replicas: Alertmanager holds one.
            alerts = await _anomalies(am)
            assert [a["labels"]["instance"] for a in alerts] == [faulty], alerts
            assert alerts[0]["labels"]["job"] == JOB

"""Dead is an anomaly: an instance that was scoring alerts when its scrapes fail (`up == 0`, twice
in a row) or its series stop while the rest of the fleet's still arrive, resolves when its data
returns, and is forgotten once Prometheus drops the target (its `up` goes stale). One that
restarts over and over between scrapes alerts as a crash loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from detectord.config import Duration
from detectord.ingest.remote_write import STALE_NAN
from tests.support import V1_HEADERS as HEADERS
from tests.support import Series, coredns_scrape, metric, v1_body

A, B = ("coredns", "a:9153"), ("coredns", "b:9153")


def up(instance: str, ts_ms: int, value: float, job: str = "coredns") -> Series:
    return ({"__name__": "up", "job": job, "instance": instance}, [(ts_ms, value)])


class Fleet:
    """Two CoreDNS instances scraped every second (data time runs from an hour ago, a step per
    write), written to a running server."""

    def __init__(self, srv: Any, session: aiohttp.ClientSession) -> None:
        self.srv, self.s = srv, session
        self.url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        self.k = 0
        self.t0 = int(time.time() * 1000) - 3_600_000
        self.a_sent = 0.0  # monotonic time a's latest samples were sent (before they arrived)
        self.a_started = 0  # the step a's process (re)started at: its counters count from there

    def ts(self) -> int:
        return self.t0 + self.k * 1000

    async def scrape(self, a: str = "ok", extra: list[Series] = ()) -> None:  # type: ignore[assignment]
        """One scrape round: b healthy; a healthy ("ok"), failing ("failing": up 0, its series
        stale as Prometheus writes them) or absent ("absent")."""
        ts, series = self.ts(), [*coredns_scrape(B[1], self.ts(), self.k), up(B[1], self.ts(), 1.0), *extra]
        if a == "ok":
            series += [*coredns_scrape(A[1], ts, self.k - self.a_started), up(A[1], ts, 1.0)]
            self.a_sent = time.monotonic()
        elif a == "failing":
            series.append(up(A[1], ts, 0.0))
        async with self.s.post(self.url, data=v1_body(series), headers=HEADERS) as r:
            assert r.status == 204, await r.text()
        self.k += 1

    async def metrics(self) -> str:
        async with self.s.get(f"http://127.0.0.1:{self.srv.port}/metrics") as r:
            return await r.text()

    def alert(self) -> dict[str, str] | None:
        firing = [a for a in self.srv.sink.alerts.firing() if a.labels["instance"] == A[1]]
        return firing[0].annotations if firing else None

    async def wait(self, pred: Callable[[], bool], timeout: float) -> None:
        """Until `pred`, writing nothing more."""
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"not within {timeout}s; alert: {self.alert()}"
            await asyncio.sleep(0.05)

    async def until(self, pred: Callable[[], bool], a: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.25)  # what the write started reaches the loop
            if pred():
                return
            assert time.monotonic() < deadline, f"not within {timeout}s; alert: {self.alert()}"
            await self.scrape(a)


async def test_a_dead_instance_alerts_says_why_and_recovers(server_factory: Callable[..., Any]) -> None:
    async with (
        server_factory(
            ingest={"stale_after": Duration(3.0), "instance_ttl": Duration(10.0)},
            alerting={"for_": Duration(0), "keep_firing_for": Duration(0)},
        ) as srv,
        aiohttp.ClientSession() as s,
    ):
        fleet = Fleet(srv, s)
        window = srv.pipeline.model.window
        for _ in range(window + 40):
            await fleet.scrape()
        await fleet.until(lambda: not srv.ingestor.is_warming(A), "ok")
        assert not srv.ingestor.is_warming(A) and fleet.alert() is None

        # One timed-out scrape between good ones is no page.
        await fleet.scrape("failing")
        for _ in range(3):
            await fleet.scrape()
        await asyncio.sleep(0.5)
        assert fleet.alert() is None

        # Its scrapes fail: alert at the second failed scrape in a row, saying since when.
        first_failed = fleet.k
        first_failed_at = time.strftime("%H:%M:%S", time.gmtime(fleet.ts() / 1000))
        await fleet.scrape("failing")
        await asyncio.sleep(0.5)
        assert fleet.alert() is None, "one failed scrape is no page"
        await fleet.scrape("failing")
        # The second alerts by itself: no third scrape is written (once within 0.25 s of wall
        # time, which a loaded machine missed).
        # (The loop raises the alert; the ingest thread counts the instance down right after.)
        await fleet.wait(lambda: fleet.alert() is not None and srv.ingestor.instance_counts["down"] == 1, timeout=5)
        assert fleet.k - first_failed == 2
        annotations = fleet.alert()
        assert annotations is not None and annotations["down"] == "scrape_failing"
        assert f"Scrapes failing since {first_failed_at}" in annotations["description"]
        assert "up == 0" in annotations["description"]
        assert metric(await fleet.metrics(), "detectord_instances", state="down") == 1
        # `up` of a target that is no CoreDNS is ignored: it makes no instance.
        await fleet.scrape("failing", extra=[up("node-1:9100", fleet.ts(), 0.0, job="node")])
        assert metric(await fleet.metrics(), "detectord_instances", state="down") == 1
        assert ("node", "node-1:9100") not in srv.ingestor.extractor.instance_keys()

        # Back: the alert resolves (keep_firing_for 0) while its window warms again.
        await fleet.until(lambda: fleet.alert() is None and srv.ingestor.instance_counts["down"] == 0, "ok", timeout=5)
        assert metric(await fleet.metrics(), "detectord_instances", state="down") == 0

        # Its series stop while b's go on: "no data" after stale_after (3 s), at most a step later.
        await fleet.until(lambda: fleet.alert() is not None, "absent", timeout=10)
        assert 3.0 <= time.monotonic() - fleet.a_sent <= 3.0 + 2.5
        annotations = fleet.alert()
        assert annotations is not None and annotations["down"] == "no_data"
        assert annotations["description"].startswith("No data for ")

        # Prometheus drops the target: its `up` goes stale, and it is forgotten (long before
        # instance_ttl) with its alert resolved.
        async with s.post(fleet.url, data=v1_body([up(A[1], fleet.ts(), STALE_NAN)]), headers=HEADERS) as r:
            assert r.status == 204
        # (The ingest thread forgets it first; the loop resolves its alert when that call returns.)
        await fleet.until(
            lambda: A not in srv.ingestor.extractor.instance_keys() and fleet.alert() is None, "absent", timeout=5
        )
        assert metric(await fleet.metrics(), "detectord_instances_evicted_total") == 1


async def test_when_nothing_arrives_at_all_no_instance_is_called_dead(server_factory: Callable[..., Any]) -> None:
    # Prometheus (or the path to detectord) down is not every CoreDNS down.
    async with (
        server_factory(ingest={"stale_after": Duration(1.0)}, alerting={"for_": Duration(0)}) as srv,
        aiohttp.ClientSession() as s,
    ):
        fleet = Fleet(srv, s)
        for _ in range(srv.pipeline.model.window + 40):
            await fleet.scrape()
        assert not srv.ingestor.is_warming(A)
        await asyncio.sleep(3.5)
        assert srv.sink.alerts.firing() == []
        assert metric(await fleet.metrics(), "detectord_instances", state="down") == 0


async def test_a_crash_loop_alerts_though_every_scrape_succeeds(server_factory: Callable[..., Any]) -> None:
    """CoreDNS dies and is restarted between two scrapes, again and again (a 10 s crash at a 15 s
    scrape): `up` stays 1 and no step is missed, only its counters reset."""
    async with (
        server_factory(
            ingest={"crash_loop_within": Duration(20.0)},
            alerting={"for_": Duration(0), "keep_firing_for": Duration(0)},
        ) as srv,
        aiohttp.ClientSession() as s,
    ):
        fleet = Fleet(srv, s)
        for _ in range(srv.pipeline.model.window + 40):
            await fleet.scrape()
        await fleet.until(lambda: not srv.ingestor.is_warming(A), "ok")

        def looping() -> bool:
            return (fleet.alert() or {}).get("down") == "crash_looping"

        async def restart_and_run(steps: int) -> None:
            fleet.a_started = fleet.k
            for _ in range(steps):
                await fleet.scrape()
            await asyncio.sleep(0.25)

        # Two restarts (a rollout, then a rollback) are no crash loop.
        await restart_and_run(4)
        await restart_and_run(4)
        assert not looping()
        # The third within crash_loop_within (20 s of data time) is.
        await restart_and_run(1)
        await fleet.until(looping, "ok", timeout=5)
        annotations = fleet.alert()
        assert annotations is not None
        assert annotations["description"].startswith("Crash loop: restarted 3 times in the last 20s")
        assert metric(await fleet.metrics(), "detectord_anomaly", instance=A[1]) == 1
        # It stops restarting: the loop is over after 1.5 times its longest interval (6 s), and
        # the alert no longer says it is one.
        stopped = fleet.k
        await fleet.until(lambda: not looping(), "ok", timeout=10)
        assert fleet.k - stopped <= 8

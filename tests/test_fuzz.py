"""Junk input against a live `detectord serve`: 20,000 seeded bodies (structure-aware mutants of
valid remote-write 1.0 and 2.0 requests, random bytes, and valid requests full of made-up series
and instances) get no 5xx and no hang, the daemon stays up and still takes a valid write, and once
the junk's idle state has expired its resident memory is back within 10 % of where it was."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from lab.peers.detectord import Detectord, run_detectord
from tests.ingest.junk import junk_requests
from tests.support import V1_HEADERS, coredns_scrape, metric, v1_body

pytestmark = pytest.mark.slow

SEED = 20261203
BODIES = 20_000
CONCURRENCY = 8
HANG_S = 5.0
TTL_S = 3.0
CONFIG = {
    "ingest": {"step": "1s", "instance_ttl": f"{TTL_S:g}s"},
    "model": {"any_step": True},
}


async def _send_all(url: str, bodies: Iterator[tuple[bytes, dict[str, str]]]) -> tuple[Counter[int], float]:
    statuses: Counter[int] = Counter()
    slowest = 0.0
    source = iter(bodies)

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal slowest
        for body, headers in source:
            t0 = time.monotonic()
            async with s.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=HANG_S)) as r:
                await r.read()
                statuses[r.status] += 1
            slowest = max(slowest, time.monotonic() - t0)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s) for _ in range(CONCURRENCY)))
    return statuses, slowest


async def _idle_rss(det: Detectord) -> int:
    """RSS once every instance the junk made has expired (and the label cache let go of it)."""
    await asyncio.sleep(3 * TTL_S)
    return det.rss()


async def test_twenty_thousand_junk_bodies_leave_no_5xx_no_hang_and_no_memory_behind(tmp_path: Path) -> None:
    async with run_detectord(CONFIG, workdir=tmp_path) as det:
        url = det.write_url
        # Warm up: the first of everything (code paths, allocator pools) is not what we measure.
        await _send_all(url, junk_requests(SEED + 1, 2_000))
        before = await _idle_rss(det)

        t0 = time.monotonic()
        statuses, slowest = await _send_all(url, itertools.islice(junk_requests(SEED, BODIES), BODIES))
        took = time.monotonic() - t0
        assert sum(statuses.values()) == BODIES
        assert not [s for s in statuses if s >= 500], statuses
        assert slowest < HANG_S
        assert statuses[204] > 0 and statuses[400] > 0, statuses  # the mix holds both
        assert det.child.alive

        async with aiohttp.ClientSession() as s:
            body = v1_body(coredns_scrape("valid:9153", int(time.time() * 1000), 1))
            async with s.post(url, data=body, headers=V1_HEADERS) as r:
                assert r.status == 204

        after = await _idle_rss(det)
        text = await det.metrics()
        assert metric(text, "detectord_label_cache_forgotten_total", reason="idle") > 0
        print(f"{BODIES} bodies in {took:.1f}s: {dict(statuses)}; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
        assert after <= before * 1.10, (before, after)

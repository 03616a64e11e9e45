"""One huge request does not stall everyone else's: while `detectord serve` works through a
remote-write request of a million new series, a Prometheus writing small requests beside it keeps
getting answers within a second."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import pytest

from lab.peers.detectord import run_detectord
from tests.support import V1_HEADERS, V2_HEADERS, coredns_scrape, v1_body, v2_body

pytestmark = pytest.mark.slow

SERIES = 1_000_000
CONFIG = {
    "ingest": {"step": "1s"},
    "model": {"any_step": True},
    "web": {"max_body_size": "64MiB", "max_decoded_body_size": "256MiB"},
}


def _million(version: str) -> bytes:
    now = int(time.time() * 1000)
    # A metric the features read, so every series is bound the whole way (other metrics are only counted).
    series = (
        ({"__name__": "coredns_dns_requests_total", "instance": "flood", "zone": f"z{i}."}, [(now, 1.0)])
        for i in range(SERIES)
    )
    return v1_body(series) if version == "1.0" else v2_body(series)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
async def test_a_million_series_request_leaves_other_writers_answered_within_a_second(
    tmp_path: Path, version: str
) -> None:
    big = await asyncio.to_thread(_million, version)
    async with run_detectord(CONFIG, workdir=tmp_path) as det, aiohttp.ClientSession() as s:
        url = det.write_url

        async def flood() -> tuple[int, float]:
            t0 = time.monotonic()
            headers = V1_HEADERS if version == "1.0" else V2_HEADERS
            async with s.post(
                url, data=io.BytesIO(big), headers=headers, timeout=aiohttp.ClientTimeout(total=120)
            ) as r:
                return r.status, time.monotonic() - t0

        big_write = asyncio.create_task(flood())
        latencies: list[float] = []
        i = 0
        while not big_write.done():
            body = v1_body(coredns_scrape("steady:9153", int(time.time() * 1000), i))
            t0 = time.monotonic()
            async with s.post(url, data=body, headers=V1_HEADERS, timeout=aiohttp.ClientTimeout(total=30)) as r:
                assert r.status == 204
            latencies.append(time.monotonic() - t0)
            i += 1
            await asyncio.sleep(0.1)
        status, took = await big_write
        assert status == 204
        print(
            f"{SERIES:,} series ({len(big) / 2**20:.1f} MiB) in {took:.1f}s; "
            f"beside it {len(latencies)} writes, slowest {max(latencies):.2f}s"
        )
        assert took > 1.0  # long enough for the writes beside it to say something
        assert max(latencies) < 1.0, sorted(latencies)[-5:]

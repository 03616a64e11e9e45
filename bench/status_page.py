"""How fast the status page, the API behind it and /metrics answer with N instances scoring.

A synthetic CoreDNS fleet (as in bench/ingest_inference.py) is written to `detectord serve` at a
15 s step until every instance scores; then each page request is timed, sequentially, as a
browser makes them (status page: `/`, `api/v1/status`, one page of `api/v1/instances`).

    .venv/bin/python bench/status_page.py --instances 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest_inference import STEP_S, make_rounds, send
from lab.peers.detectord import run_detectord


async def _time(session: aiohttp.ClientSession, url: str, n: int) -> tuple[float, float, int]:
    """Median and worst milliseconds of `n` GETs, and the size of the answer."""
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url) as r:
            body = await r.read()
            assert r.status == 200, (url, r.status, body[:200])
        times.append((time.perf_counter() - t0) * 1000)
        size = len(body)
    return statistics.median(times), max(times), size


async def bench(instances: int, rounds: int, repeat: int) -> None:
    t0 = time.perf_counter()
    data = make_rounds(instances, rounds)
    print(f"{instances} instances, {rounds} scrape rounds made in {time.perf_counter() - t0:.0f} s", flush=True)
    config = {
        "web": {"max_body_size": "64MiB", "max_decoded_body_size": "256MiB"},
        "ingest": {"step": f"{STEP_S:g}s", "max_instances": instances + 100},
        "inference": {"queue_size": 4 * instances},
        "logging": {"level": "warning"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        async with run_detectord(config, workdir=Path(tmp), ready_timeout=180) as det:
            t0 = time.perf_counter()
            await send(det.write_url, data, concurrency=4)
            async with aiohttp.ClientSession() as s:
                while True:
                    async with s.get(f"{det.url}/api/v1/status") as r:
                        fleet = (await r.json())["data"]["fleet"]
                    if fleet["scoring"] >= instances or time.perf_counter() - t0 > 900:
                        break
                    await asyncio.sleep(1)
                print(f"written and scored in {time.perf_counter() - t0:.0f} s: {fleet}", flush=True)
                async with s.get(f"{det.url}/api/v1/instances?limit=1") as r:
                    key = (await r.json())["data"][0]["key"]
                print(f"\n| request ({fleet['tracked']} instances tracked) | median ms | max ms | bytes |")
                print("|---|---|---|---|")
                for path in (
                    "/",
                    "/api/v1/status",
                    "/api/v1/instances",
                    "/api/v1/instances?sort=labels&offset=5000",
                    "/api/v1/instances?filter=job%3Dcoredns%2010.0.1.",
                    f"/instances/{key}",
                    f"/api/v1/instances/{key}",
                    "/api/v1/scores",
                    "/metrics",
                ):
                    med, worst, size = await _time(s, det.url + path, repeat)
                    print(f"| `GET {path}` | {med:.1f} | {worst:.1f} | {size:,} |", flush=True)
                # What the status page costs, as its script fetches it: the page, then both calls.
                page = []
                for _ in range(repeat):
                    t1 = time.perf_counter()
                    for path in ("/", "/api/v1/status", "/api/v1/instances"):
                        async with s.get(det.url + path) as r:
                            await r.read()
                    page.append((time.perf_counter() - t1) * 1000)
                print(f"| status page, all three | {statistics.median(page):.1f} | {max(page):.1f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=10_000)
    # The 15 s model scores an instance once its baseline has two buckets of 16 steps.
    p.add_argument("--rounds", type=int, default=36)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    asyncio.run(bench(args.instances, args.rounds, args.repeat))


if __name__ == "__main__":
    main()

"""What junk costs `detectord serve` in memory, and whether it gives it back: resident memory
before, after N junk bodies (seeded mutants of remote-write 1.0 and 2.0 requests, random bytes,
and valid requests full of made-up series and instances) and after their idle state expired;
then the bytes one tracked CoreDNS instance and one distinct series no feature reads cost.

    .venv/bin/python bench/junk_memory.py                    # 100,000 bodies
    .venv/bin/python bench/junk_memory.py --bodies 20000 --ttl 5

Needs the machine to itself (the numbers are resident sizes of a process other work also loads).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.peers.detectord import run_detectord
from tests.ingest.junk import junk_requests
from tests.support import V1_HEADERS, coredns_scrape, metric, v1_body

CONCURRENCY = 8


async def _send(url: str, requests: Iterable[tuple[bytes, dict[str, str]]]) -> Counter[int]:
    statuses: Counter[int] = Counter()
    source = iter(requests)

    async def client(s: aiohttp.ClientSession) -> None:
        for body, headers in source:
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
                statuses[r.status] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s) for _ in range(CONCURRENCY)))
    return statuses


def _instances(first: int, n: int, per_body: int = 100) -> Iterable[tuple[bytes, dict[str, str]]]:
    now = int(time.time() * 1000)
    for i in range(first, first + n, per_body):
        series = [s for k in range(i, min(i + per_body, first + n)) for s in coredns_scrape(f"i{k}:9153", now, 1)]
        yield v1_body(series), V1_HEADERS


def _distinct_series(n: int, per_body: int = 2000) -> Iterable[tuple[bytes, dict[str, str]]]:
    now = int(time.time() * 1000)
    for i in range(0, n, per_body):
        series = [
            (
                {"__name__": "node_cpu_seconds_total", "instance": f"node-{k}:9100", "cpu": "0", "mode": "idle"},
                [(now, 1.0)],
            )
            for k in range(i, min(i + per_body, n))
        ]
        yield v1_body(series), V1_HEADERS


async def main(args: argparse.Namespace) -> None:
    config = {
        "ingest": {"step": "15s", "instance_ttl": f"{args.ttl}s", "max_instances": 100_000},
        "web": {"max_body_size": "64MiB", "max_decoded_body_size": "256MiB"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        async with run_detectord(config, workdir=Path(tmp)) as det:
            url = det.write_url
            idle = 3 * args.ttl

            await _send(url, junk_requests(args.seed + 1, 1000))  # warm-up: first calls, allocator pools
            await asyncio.sleep(idle)
            before = det.rss()
            # Twice: what the second round adds tells a leak from memory the allocator keeps for reuse.
            for run in range(1, args.rounds + 1):
                t0 = time.monotonic()
                bodies = junk_requests(args.seed + 1000 * run, args.bodies)
                statuses = await _send(url, itertools.islice(bodies, args.bodies))
                took = time.monotonic() - t0
                after = det.rss()
                await asyncio.sleep(idle)
                expired = det.rss()
                print(
                    f"round {run}: {args.bodies:,} junk bodies in {took:.0f}s ({args.bodies / took:,.0f}/s), "
                    f"answers {dict(statuses)}"
                )
                print(
                    f"  RSS before {before / 2**20:,.0f} MiB, after {after / 2**20:,.0f} MiB, after idle expiry "
                    f"(ttl {args.ttl:g}s) {expired / 2**20:,.0f} MiB ({(expired - before) / before:+.1%})"
                )

            base = det.rss()
            await _send(url, _instances(0, args.instances))
            text = await det.metrics()
            tracked = metric(text, "detectord_instances", state="warming") + metric(
                text, "detectord_instances", state="scoring"
            )
            per_instance = (det.rss() - base) / max(tracked, 1)
            print(f"{tracked:,.0f} tracked CoreDNS instances: {per_instance:,.0f} bytes each (RSS)")
            await asyncio.sleep(idle)

            base = det.rss()
            await _send(url, _distinct_series(args.series))
            grown = det.rss() - base
            text = await det.metrics()
            cache = metric(text, "detectord_label_cache_bytes")
            series = metric(text, "detectord_label_cache_series")
            print(
                f"{args.series:,} distinct series no feature reads: {grown / args.series:,.0f} bytes each (RSS); "
                f"label cache estimate {cache / max(series, 1):,.0f} bytes each over {series:,.0f} series"
            )
            await asyncio.sleep(idle)
            print(f"after their expiry: RSS {(det.rss() - base) / 2**20:+,.0f} MiB against before them")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bodies", type=int, default=100_000)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--series", type=int, default=200_000)
    p.add_argument("--ttl", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=20261203)
    asyncio.run(main(p.parse_args()))

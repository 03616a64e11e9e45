"""The event loop keeps answering while big bodies are decoded and windows are scored.

A probe task sleeps 2 ms at a time and records the longest it had to wait. If decoding or
inference ran on the loop, the probe would stall for as long as they take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.payloads import V1_HEADERS, coredns_scrape, v1_body
from tests.test_server import metric

MAX_LAG = 0.1


class LagProbe:
    def __init__(self) -> None:
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.002)
            self.max_lag = max(self.max_lag, time.perf_counter() - t - 0.002)

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_decoding_and_inference_do_not_block_the_loop(server_factory: Callable[..., Any]) -> None:
    instances = 1024
    async with server_factory(web={"max_body_size": 64 * 2**20, "max_decoded_body_size": 256 * 2**20},
                              inference={"max_batch": 1024, "queue_size": 8192}) as srv:
        window = srv.pipeline.model.window
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        t0 = int(time.time() * 1000) - (window + 5) * 1000
        bodies = []
        for k in range(window + 3):
            series = []
            for i in range(instances):
                series += coredns_scrape(f"10.0.{i // 256}.{i % 256}:9153", t0 + k * 1000, k)
            bodies.append(v1_body(series))
        async with aiohttp.ClientSession() as s:
            with LagProbe() as probe:
                for body in bodies:
                    async with s.post(url, data=body, headers=V1_HEADERS) as r:
                        assert r.status == 204
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    async with s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
                        text = await r.text()
                    if metric(text, "detectord_windows_scored_total") >= instances:
                        break
                    await asyncio.sleep(0.01)
    decode_s = metric(text, "detectord_remote_write_decode_seconds_sum")
    infer_s = metric(text, "detectord_inference_batch_seconds_sum")
    assert metric(text, "detectord_windows_scored_total") >= instances
    # The work is big enough that running it on the loop would have stalled the probe.
    assert decode_s > 5 * MAX_LAG, decode_s
    assert probe.max_lag < MAX_LAG, f"loop stalled {probe.max_lag:.3f}s (decode {decode_s:.2f}s, inference {infer_s:.2f}s)"

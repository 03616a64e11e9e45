"""The event loop keeps answering while big bodies are decoded and windows are scored.

A probe task sleeps 2 ms at a time and records the longest it had to wait. If decoding or
inference ran on the loop, the probe would stall for as long as they take.
"""

from __future__ import annotations

import asyncio
import gc
import io
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from tests.support import V1_HEADERS, coredns_scrape, metric, v1_body

MAX_LAG = 0.1


class LagProbe:
    def __init__(self) -> None:
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None
        self._since = 0.0

    async def _run(self) -> None:
        while True:
            self._since = time.perf_counter()
            await asyncio.sleep(0.002)
            self.max_lag = max(self.max_lag, time.perf_counter() - self._since - 0.002)

    def __enter__(self) -> LagProbe:
        self._since = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        # A stall just before exit may not have let the probe run again: count it too.
        self.max_lag = max(self.max_lag, time.perf_counter() - self._since - 0.002)
        self._task.cancel()


async def post_from_thread(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST from another thread: the client's own copying must not count as the server's stall
    (an aiohttp client on the same loop blocks it for a quarter second sending 10 MB)."""

    def post() -> int:
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)

    return await asyncio.get_running_loop().run_in_executor(None, post)


def scrape_body(instances: range, ts_ms: int, k: int, scrapes: int = 1) -> bytes:
    """The instances' scrape k, or `scrapes` of them from k on, a second apart."""
    series = []
    for j in range(k, k + scrapes):
        for i in instances:
            series += coredns_scrape(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:9153", ts_ms + 1000 * (j - k), j)
    return v1_body(series)


async def test_decoding_does_not_block_the_loop(server_factory: Callable[..., Any]) -> None:
    # One request with three scrapes of 50,000 instances (750,000 samples) after their first one
    # (every series new), which is ingested before the probe starts.
    now = int(time.time() * 1000)
    first, second = scrape_body(range(50000), now - 4000, 0), scrape_body(range(50000), now - 3000, 1, scrapes=3)
    async with server_factory(
        web={"max_body_size": 64 * 2**20, "max_decoded_body_size": 256 * 2**20}, ingest={"max_instances": 60000}
    ) as srv:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=io.BytesIO(first), headers=V1_HEADERS) as r:
                assert r.status == 204
            before = srv.registry.get_sample_value("detectord_remote_write_decode_seconds_sum")
            with LagProbe() as probe:
                assert await post_from_thread(url, second, V1_HEADERS) == 204
        decode_s = srv.registry.get_sample_value("detectord_remote_write_decode_seconds_sum") - before
    # The work is big enough that running it on the loop would have stalled the probe.
    assert decode_s > 2 * MAX_LAG, decode_s
    assert probe.max_lag < MAX_LAG, f"loop stalled {probe.max_lag:.3f}s while decoding for {decode_s:.2f}s"


class SlowScorer:
    """The real detector, made to take 0.3 s per batch as a large model on a slow CPU would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def score_batch(self, windows: np.ndarray) -> Any:
        time.sleep(0.3)
        return self.inner.score_batch(windows)


async def test_inference_does_not_block_the_loop(server_factory: Callable[..., Any]) -> None:
    instances = 256
    async with server_factory() as srv:
        srv.pipeline.worker.swap(SlowScorer(srv.pipeline.model))
        window = srv.pipeline.model.window
        t0 = int(time.time() * 1000) - (window + 5) * 1000
        bodies = [scrape_body(range(instances), t0 + k * 1000, k) for k in range(window + 3)]
        async with aiohttp.ClientSession() as s:
            with LagProbe() as probe:
                for body in bodies:
                    async with s.post(f"http://127.0.0.1:{srv.port}/api/v1/write", data=body, headers=V1_HEADERS) as r:
                        assert r.status == 204
                deadline = time.monotonic() + 60
                while srv.registry.get_sample_value("detectord_windows_scored_total") < instances:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
            async with s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
                text = await r.text()
    batches = metric(text, "detectord_inference_batch_seconds_count")
    assert batches >= 2 and metric(text, "detectord_inference_batch_seconds_sum") >= 0.3 * batches
    # Every scored step says how late it was scored: never sooner than a 0.3 s batch.
    delays = metric(text, "detectord_step_score_delay_seconds_count")
    assert delays >= metric(text, "detectord_windows_scored_total") >= instances
    assert metric(text, "detectord_step_score_delay_seconds_bucket", le="0.25") == 0
    assert metric(text, "detectord_step_score_delay_seconds_sum") >= 0.3 * delays
    assert probe.max_lag < MAX_LAG, f"loop stalled {probe.max_lag:.3f}s while scoring"
    assert 'detectord_anomaly_score{instance="10.0.0.1:9153",job="coredns"}' in text


async def test_a_fleets_new_series_are_frozen_out_of_full_collections(server_factory: Callable[..., Any]) -> None:
    # Prometheus sends a fleet's first scrape in requests of 500 series. The cyclic GC's full
    # collections would scan the new series' objects again and again, holding the GIL (the loop
    # waits), and made the first round twice as slow: however they come, they are frozen.
    now = int(time.time() * 1000)
    async with server_factory(ingest={"max_instances": 5000}) as srv, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        frozen = gc.get_freeze_count()
        for i in range(0, 2400, 100):
            async with s.post(url, data=scrape_body(range(i, i + 100), now, 0), headers=V1_HEADERS) as r:
                assert r.status == 204
        bound = srv.ingestor.extractor.series_bound
        assert bound == 2400 * 5
        assert gc.get_freeze_count() - frozen >= bound

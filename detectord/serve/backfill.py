"""Backfill at start: the last `backfill.lookback` of every CoreDNS instance's series, read back
from Prometheus's remote-read API and run through the ingest path, so instances score at once.

History goes through the very features, baselines and windows live writes do (`Ingestor.
backfill_sync`), oldest first and a time chunk at a time, so memory stays bounded. Nothing of it
is scored or paged. A sample the daemon already has (restored state) is a duplicate and counts
once; live writes wait (503, retried by Prometheus) until the backfill is done.
"""

from __future__ import annotations

import asyncio
import math
import time
from itertools import islice

import structlog

from detectord import http_client
from detectord.config import BackfillConfig
from detectord.errors import ConfigError, RemoteReadError
from detectord.ingest.features import FEATURES, Feature
from detectord.ingest.pipeline import Ingestor
from detectord.ingest.remote_read import Matcher, ReadSeries, RemoteReadClient, parse_selector, writes_in_time_order
from detectord.serve.metrics import DaemonMetrics

log = structlog.get_logger(__name__)

# History is read and ingested this much data time at a time: a bounded response and memory.
CHUNK_S = 600.0
# Slices handed to the ingest thread per call, between checks of the deadline.
SLICES_PER_CALL = 64


def default_match(features: tuple[Feature, ...] = FEATURES) -> str:
    """A selector for exactly the series the features read, and `up`."""
    names = sorted({s.series_name for f in features for s in f.expr.sources()} | {"up"})
    return '{__name__=~"' + "|".join(names) + '"}'


def matchers(cfg: BackfillConfig) -> list[Matcher]:
    try:
        return parse_selector(cfg.match or default_match())
    except RemoteReadError as exc:
        raise ConfigError("backfill.match", exc.reason) from exc


async def backfill(cfg: BackfillConfig, ingestor: Ingestor, metrics: DaemonMetrics) -> None:
    """Read and take in the history, and log what was read; when none was to be had, the daemon
    starts cold and the log says why. Never raises for a Prometheus that is down, slow or broken."""
    t0 = time.monotonic()
    deadline = t0 + float(cfg.timeout)
    want = matchers(cfg)
    step_ms = ingestor.extractor.step_ms
    end_ms = int(time.time() * 1000)
    chunk_ms = max(int(CHUNK_S * 1000), step_ms) // step_ms * step_ms
    chunks = math.ceil(float(cfg.lookback) * 1000 / chunk_ms)
    # The newest history that still lets an instance score at once: its baseline's warm-up and a
    # window, with a few steps to spare.
    warm = ingestor.normaliser.plan.baseline.warm_steps + ingestor.windows.window + 3
    tail = min(chunks, math.ceil(warm * step_ms / chunk_ms))
    series = samples = 0
    skipped_ms = 0
    complete = False
    try:
        async with http_client.session(
            cfg.http_config, "backfill.http_config", url=cfg.url, timeout=float(cfg.timeout)
        ) as s:
            client = RemoteReadClient(cfg.url, session=s, timeout=float(cfg.timeout))
            i = 0
            while i < chunks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                client.timeout = left
                at = end_ms - (chunks - i) * chunk_ms
                got = await client.read(at, at + chunk_ms - 1, want)
                series = max(series, len(got))
                samples += sum(len(x.timestamps) for x in got)
                await _take(ingestor, got, step_ms, deadline)
                i += 1
                # Not all of the lookback fits in the time left: skip ahead, so that what is read
                # is the newest history (a gap before it starts the windows over, as a long
                # missed stretch does) and instances score when ready, with younger baselines.
                per_chunk = (time.monotonic() - t0) / i
                fits = max(tail, int((deadline - time.monotonic()) / per_chunk) - 1)
                if chunks - i > fits:
                    skipped_ms += (chunks - i - fits) * chunk_ms
                    i = chunks - fits
            complete = True
    except RemoteReadError as exc:
        if time.monotonic() < deadline:
            metrics.backfills.labels("failure").inc()
            log.warning("backfill from Prometheus failed; instances without state warm up", error=str(exc))
        else:
            _timed_out(cfg, metrics)
    except TimeoutError:
        _timed_out(cfg, metrics)
    seconds = time.monotonic() - t0
    metrics.backfill_samples.inc(samples)
    metrics.backfill_seconds.set(seconds)
    if not complete:
        return
    metrics.backfills.labels("success").inc()
    scoring = await ingestor.call(lambda: sum(not ingestor.is_warming(k) for k in ingestor.extractor.instance_keys()))
    log.info(
        "backfilled from Prometheus",
        url=cfg.url,
        lookback_seconds=float(cfg.lookback),
        skipped_seconds=skipped_ms / 1000,
        series=series,
        samples=samples,
        scoring_instances=scoring,
        seconds=round(seconds, 2),
    )


def _timed_out(cfg: BackfillConfig, metrics: DaemonMetrics) -> None:
    metrics.backfills.labels("timeout").inc()
    log.warning(
        "backfill from Prometheus timed out; instances without state warm up",
        url=cfg.url,
        timeout_seconds=float(cfg.timeout),
    )


async def _take(ingestor: Ingestor, got: list[ReadSeries], step_ms: int, deadline: float) -> None:
    """Feed one chunk on the ingest thread, a few slices per call, up to the deadline."""
    writes = await ingestor.call(lambda: writes_in_time_order(got, ingestor.extractor.labels, step_ms))

    def some() -> bool:
        taken = False
        for w in islice(writes, SLICES_PER_CALL):
            ingestor.backfill_sync(w)
            taken = True
        return taken

    while await ingestor.call(some):
        if time.monotonic() > deadline:
            raise TimeoutError
    await asyncio.sleep(0)

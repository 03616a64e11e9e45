"""`detectord replay`: re-send a recording to any remote-write endpoint, in order, at real or faster speed.

Requests go one at a time, in recorded order (the receiver's features depend on it), each with the
headers a Prometheus would send. Like Prometheus, it retries 5xx, 429 and connection errors with
backoff and does not retry other 4xx (it counts them and goes on).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from detectord import __version__
from detectord.recordings.format import ReadStats, Record, read_records

RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))


@dataclass
class ReplayStats:
    sent: int = 0
    bytes: int = 0
    retries: int = 0
    # Non-retryable answers (4xx other than 429): status -> count, and the first reason.
    refused: dict[int, int] = field(default_factory=dict)
    first_refusal: str | None = None
    failed: int = 0  # gave up after max_retries
    read: ReadStats = field(default_factory=ReadStats)
    seconds: float = 0.0


def _headers(rec: Record) -> dict[str, str]:
    return {
        "Content-Type": rec.content_type,
        "Content-Encoding": "snappy",
        "X-Prometheus-Remote-Write-Version": "0.1.0" if rec.version == "1.0" else "2.0.0",
        "User-Agent": f"detectord-replay/{__version__}",
    }


async def replay(
    path: str | Path,
    url: str,
    *,
    speed: float = 1.0,
    max_retries: int = 10,
    timeout: float = 30.0,
    progress: bool = False,
) -> ReplayStats:
    """Send every record of `path` to `url`. speed 1 keeps the recorded gaps, 10 is ten times
    faster, 0 sends as fast as the receiver answers."""
    if speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    stats = ReplayStats()
    t0 = time.monotonic()
    first_ns: int | None = None
    records = read_records(path, stats.read)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for rec in records:
            if first_ns is None:
                first_ns = rec.arrival_ns
            if speed > 0:
                due = (rec.arrival_ns - first_ns) / 1e9 / speed
                wait = due - (time.monotonic() - t0)
                if wait > 0:
                    await asyncio.sleep(wait)
            await _send(session, url, rec, stats, max_retries)
            if progress and stats.sent % 500 == 0:
                print(f"replay: {stats.sent} requests sent", file=sys.stderr, flush=True)
    stats.seconds = time.monotonic() - t0
    return stats


async def _send(session: aiohttp.ClientSession, url: str, rec: Record, stats: ReplayStats, max_retries: int) -> None:
    backoff = 0.03
    for attempt in range(max_retries + 1):
        try:
            # A file-like body: aiohttp warns that large bytes bodies would block the loop.
            async with session.post(url, data=io.BytesIO(rec.body), headers=_headers(rec)) as resp:
                if resp.status < 300:
                    stats.sent += 1
                    stats.bytes += len(rec.body)
                    return
                reason = (await resp.text()).strip()
                if resp.status not in RETRY_STATUSES:
                    stats.refused[resp.status] = stats.refused.get(resp.status, 0) + 1
                    stats.first_refusal = stats.first_refusal or f"{resp.status}: {reason}"
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        if attempt < max_retries:
            stats.retries += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    stats.failed += 1


def summary(stats: ReplayStats) -> str:
    parts = [
        f"sent {stats.sent} requests ({stats.bytes} bytes) in {stats.seconds:.1f}s",
        f"{stats.retries} retries",
        f"{stats.failed} failed",
    ]
    if stats.refused:
        parts.append(
            "refused "
            + ", ".join(f"{n}x{code}" for code, n in sorted(stats.refused.items()))
            + f" (first: {stats.first_refusal})"
        )
    if stats.read.torn_bytes:
        parts.append(f"ignored a torn tail of {stats.read.torn_bytes} bytes")
    return "; ".join(parts)

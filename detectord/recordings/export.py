"""`detectord export`: a time range read back over Prometheus remote read into a recording.

Samples go in as remote-write 1.0 requests in time order, one per short slice, so `score`, `replay`
and `train` read the file like one `detectord record` made live. An export that stopped resumes.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import aiohttp

from detectord.config import Duration
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest.remote_read import Matcher, ReadSeries, RemoteReadClient, writes_in_time_order
from detectord.ingest.remote_write import LabelCache, SeriesKey, encode_v1
from detectord.recordings.format import RecordingWriter, read_writes

# What the features read (the README's remote_write relabel rule keeps the same).
DEFAULT_MATCH = '{__name__=~"coredns_.+|process_.+|go_goroutines|up"}'
# One remote-write request per second of samples: a scrape's samples arrive together, as live.
SLICE_MS = 1000


@dataclass(frozen=True)
class ExportOptions:
    url: str
    start_ms: int  # inclusive
    end_ms: int  # inclusive
    out: Path
    # Series matching any of these selectors (each a tuple of matchers, all of which must match).
    selectors: tuple[tuple[Matcher, ...], ...]
    chunk_ms: int = 3_600_000
    timeout: float = 300.0
    slice_ms: int = SLICE_MS

    def __post_init__(self) -> None:
        if self.end_ms < self.start_ms:
            raise ValueError(f"--end {_iso(self.end_ms)} is before --start {_iso(self.start_ms)}")
        if not self.selectors:
            raise ValueError("no series selector")
        if self.chunk_ms < 1000:
            raise ValueError(f"--chunk must be >= 1s, got {self.chunk_ms / 1000:g}s")


@dataclass
class ExportStats:
    chunks: int = 0
    series: int = 0
    samples: int = 0
    records: int = 0
    resumed_after_ms: int | None = None
    truncated_bytes: int = 0


def parse_time(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch from RFC 3339 (no zone means UTC), Unix seconds, `now` or `now-2h`."""
    t = text.strip()
    now = time.time() if now is None else now
    m = re.fullmatch(r"now\s*(?:([+-])\s*(.+))?", t)
    if m:
        offset = float(Duration.parse(m.group(2))) if m.group(2) else 0.0
        return round((now + (offset if m.group(1) == "+" else -offset)) * 1000)
    try:
        seconds = float(t)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return round(seconds * 1000)
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use RFC 3339 like 2024-05-01T12:00:00Z, Unix seconds or now-2h)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def newest_sample_ms(path: Path) -> int | None:
    """The newest sample time in a recording's whole records, None when it has none."""
    newest: int | None = None
    for _, write in read_writes(path, LabelCache()):
        if write.timestamps:
            m = max(write.timestamps)
            if newest is None or m > newest:
                newest = m
    return newest


def _append(writer: RecordingWriter, series: Sequence[ReadSeries], cache: LabelCache, slice_ms: int) -> int:
    """Append the series' samples as 1.0 requests, one per slice; the number appended."""
    labels: dict[SeriesKey, list[pb1.Label]] = {}
    records = 0
    for write in writes_in_time_order(series, cache, slice_ms):
        req = pb1.WriteRequest()
        j = 0
        for key, n in zip(write.keys, write.counts, strict=True):
            pbl = labels.get(key)
            if pbl is None:
                pbl = labels[key] = [pb1.Label(name=k, value=v) for k, v in key.labels]
            ts = req.timeseries.add(labels=pbl)
            for k in range(j, j + n):
                ts.samples.add(value=write.values[k], timestamp=write.timestamps[k])
            j += n
        # Arrival: when the slice's newest sample was taken, as if sent at once.
        writer.append(encode_v1(req), "1.0", arrival_ns=max(write.timestamps) * 1_000_000)
        records += 1
    return records


async def _read(
    client: RemoteReadClient, start_ms: int, end_ms: int, selectors: Sequence[tuple[Matcher, ...]]
) -> list[ReadSeries]:
    """The union of what each selector matches (as Prometheus's match[] does)."""
    if len(selectors) == 1:
        return await client.read(start_ms, end_ms, selectors[0])
    merged: dict[tuple[tuple[str, str], ...], dict[int, float]] = {}
    for sel in selectors:
        for s in await client.read(start_ms, end_ms, sel):
            merged.setdefault(s.labels, {}).update(zip(s.timestamps, s.values, strict=True))
    out = []
    for labels, by_ts in merged.items():
        ts = sorted(by_ts)
        out.append(ReadSeries(labels, ts, [by_ts[t] for t in ts]))
    return out


async def export(opts: ExportOptions, *, log: TextIO | None = None) -> ExportStats:
    """Read [start, end] chunk by chunk and append it to `opts.out`, after what it already holds."""
    stats = ExportStats()
    created = not opts.out.exists()
    writer = await asyncio.to_thread(RecordingWriter, opts.out)
    done = False
    try:
        await _fill(opts, writer, stats, log if log is not None else sys.stderr)
        done = True
    finally:
        await asyncio.to_thread(writer.close)
        if not done and created and not writer.records:
            opts.out.unlink(missing_ok=True)  # a failed first try leaves no empty recording behind
    return stats


async def _fill(opts: ExportOptions, writer: RecordingWriter, stats: ExportStats, log: TextIO) -> None:
    stats.truncated_bytes = writer.truncated_bytes
    if writer.truncated_bytes:
        print(f"detectord export: cut off a torn tail of {writer.truncated_bytes} bytes from {opts.out}", file=log)
    start = opts.start_ms
    newest = await asyncio.to_thread(newest_sample_ms, opts.out)
    if newest is not None and newest >= start:
        stats.resumed_after_ms = newest
        start = newest + 1
        print(f"detectord export: {opts.out} holds samples up to {_iso(newest)}: resuming after it", file=log)
    if start > opts.end_ms:
        print(f"detectord export: {opts.out} already covers up to {_iso(opts.end_ms)}: nothing to do", file=log)
        return
    bounds = [(a, min(a + opts.chunk_ms, opts.end_ms + 1) - 1) for a in range(start, opts.end_ms + 1, opts.chunk_ms)]
    cache = LabelCache()
    seen: set[tuple[tuple[str, str], ...]] = set()
    async with aiohttp.ClientSession() as session:
        client = RemoteReadClient(opts.url, session=session, timeout=opts.timeout)
        for i, (a, b) in enumerate(bounds, 1):
            series = await _read(client, a, b, opts.selectors)
            samples = sum(len(s.timestamps) for s in series)
            records = await asyncio.to_thread(_append, writer, series, cache, opts.slice_ms)
            seen.update(s.labels for s in series)
            stats.chunks += 1
            stats.series = len(seen)
            stats.samples += samples
            stats.records += records
            print(
                f"detectord export: chunk {i}/{len(bounds)} {_iso(a)} .. {_iso(b)}: "
                f"{len(series)} series, {samples} samples, {records} requests",
                file=log,
                flush=True,
            )

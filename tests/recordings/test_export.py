"""`detectord export` against a real Prometheus 2.42 that scrapes two real CoreDNS servers under
dnsperf load every second and remote-writes to a live `detectord record`: the exported recording
gives exactly the windows of the live one over the same time range.

Remote read brings XOR chunks, which hold every float64 bit for bit (XOR is lossless), and export
writes the values as they came: there is no rounding anywhere, so windows compare with
np.array_equal. An export that stopped (a torn record at its tail) resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from detectord.ingest.features import FEATURE_NAMES
from detectord.ingest.normalise import InputPlan
from detectord.ingest.remote_write import LabelCache, encode_v1
from detectord.recordings.format import ReadStats, RecordingWriter, read_records, read_writes
from detectord.recordings.scoring import recording_windows
from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.detectord import run_recorder
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus
from tests.support import REPO, v1_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECORD_S = 120
STEP_S = 1
WINDOW = 10

Samples = dict[tuple[tuple[str, str], ...], list[tuple[int, bytes]]]


async def _export(url: str, start_ms: int, end_ms: int, out: Path, *args: str) -> str:
    """`detectord export` as a user runs it; its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detectord",
        "export",
        "--from",
        url,
        "--start",
        f"{start_ms / 1000:.3f}",
        "--end",
        f"{end_ms / 1000:.3f}",
        "--out",
        str(out),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert b"requests" in stdout
    return stderr.decode()


def _samples(path: Path) -> Samples:
    """Every sample of a recording by series, values as raw bits, in the order they come."""
    out: Samples = {}
    for _, write in read_writes(path, LabelCache()):
        for key, samples in write.series():
            out.setdefault(key.labels, []).extend((t, np.float64(v).tobytes()) for t, v in samples)
    return out


def _span(path: Path) -> tuple[int, int]:
    ts = [t for s in _samples(path).values() for t, _ in s]
    return min(ts), max(ts)


def _trim(src: Path, dst: Path, lo: int, hi: int) -> Path:
    """The samples of `src` in [lo, hi], request by request."""
    with RecordingWriter(dst) as w:
        for rec, write in read_writes(src, LabelCache()):
            kept = [
                (dict(key.labels), [(t, v) for t, v in samples if lo <= t <= hi]) for key, samples in write.series()
            ]
            kept = [(labels, samples) for labels, samples in kept if samples]
            if kept:
                w.append(encode_v1(v1_request(kept)), "1.0", rec.arrival_ns)
    return dst


def _windows(path: Path) -> dict[tuple[tuple[str, ...], int], np.ndarray]:
    got = recording_windows(path, step_seconds=STEP_S, window=WINDOW, inputs=InputPlan.default(FEATURE_NAMES))
    assert got.bad_requests == 0 and got.read.torn_bytes == 0
    return {(r.instance, r.step_ts_ms): r.window for r in got.requests}


@pytest.mark.timeout(400)
async def test_export_gives_the_windows_of_the_live_recording_and_resumes(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up, edge = Ports(), Ports()
    live = tmp_path / "live.drec"
    async with (
        run_coredns(upstream_corefile(up, zone), up, workdir=tmp_path, name="up") as upstream,
        run_coredns(edge_corefile(edge, [upstream.address]), edge, workdir=tmp_path, name="edge"),
        run_dnsperf(edge.dns, qps=150, duration_s=RECORD_S + 120, workdir=tmp_path),
        run_recorder(live, log=tmp_path / "record.log") as recorder,
        run_prometheus(
            {"coredns": [edge.metrics_target, up.metrics_target]},
            workdir=tmp_path / "prom",
            remote_write_url=recorder.write_url,
        ) as prom,
    ):
        await asyncio.sleep(RECORD_S)
        end_ms = int(time.time() * 1000) - 3000
        await asyncio.sleep(5)  # remote write sends within a second: the live file has all up to end_ms
        first_live, _ = await asyncio.to_thread(_span, live)
        start_ms = first_live - 10_000
        url = f"{prom.url}/api/v1/read"

        full = tmp_path / "full.drec"
        log = await _export(url, start_ms, end_ms, full, "--chunk", "40s")
        chunks = re.findall(r"chunk (\d+)/(\d+) .*: (\d+) series, (\d+) samples", log)
        assert len(chunks) >= 3 and chunks[-1][0] == chunks[-1][1] == str(len(chunks)), log
        assert all(int(series) > 100 and int(samples) > 0 for _, _, series, samples in chunks), log

        # Stopped half way, mid-record (a torn tail), then run again over the whole range.
        resumed = tmp_path / "resumed.drec"
        await _export(url, start_ms, (start_ms + end_ms) // 2, resumed, "--chunk", "40s")
        with open(resumed, "ab") as f:
            f.write(b"\x40\x00\x00\x00torn")
        log = await _export(url, start_ms, end_ms, resumed, "--chunk", "40s")
        assert "cut off a torn tail of 8 bytes" in log and "resuming after it" in log
        # Run again when done: it looks only past the newest sample, and finds nothing to add.
        log = await _export(url, start_ms, end_ms, resumed)
        assert "resuming after it" in log and ": 0 series, 0 samples, 0 requests" in log

    assert await asyncio.to_thread(_samples, resumed) == await asyncio.to_thread(_samples, full)
    stats = ReadStats()
    arrivals = [r.arrival_ns for r in read_records(full, stats)]
    assert arrivals == sorted(arrivals) and stats.torn_bytes == 0

    # Both over the time range both hold in full (the live one starts with Prometheus's first scrape).
    first_export, last_export = await asyncio.to_thread(_span, full)
    assert last_export <= end_ms
    lo = max(first_live, first_export) + 5000
    want = _windows(await asyncio.to_thread(_trim, live, tmp_path / "live.trim.drec", lo, end_ms))
    got = _windows(await asyncio.to_thread(_trim, full, tmp_path / "full.trim.drec", lo, end_ms))
    assert len({k for k, _ in want}) == 2 and len(want) > 2 * (RECORD_S - 60), sorted(want)[:3]
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    differ = [k for k in want if not np.array_equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} windows differ, first {differ[0]}"

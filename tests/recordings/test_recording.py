"""Recordings: the file format, `detectord record` (a real process, killed with -9 mid-write) and
`detectord replay`."""

from __future__ import annotations

import asyncio
import io
import lzma
import os
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import snappy

from detectord.children import free_port
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.recordings.format import MAGIC, ReadStats, RecordingError, RecordingWriter, read_records
from detectord.recordings.recorder import Recorder, RecorderOptions
from detectord.recordings.replay import replay
from lab.peers.detectord import run_recorder
from tests.support import V1_HEADERS as V1
from tests.support import V2_HEADERS, v1_body, v2_body


def _bodies(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [
        v1_body(
            [
                (
                    {"__name__": "coredns_dns_requests_total", "instance": f"i{rng.randrange(9)}"},
                    [(1_700_000_000_000 + i * 1000, float(i))],
                )
            ]
        )
        for i in range(n)
    ]


def test_round_trip_keeps_bodies_versions_and_arrival_times(tmp_path: Path) -> None:
    path = tmp_path / "r.drec"
    bodies = _bodies(20)
    with RecordingWriter(path) as w:
        for i, b in enumerate(bodies):
            w.append(b, "2.0" if i % 5 == 0 else "1.0", arrival_ns=1_000 + i)
    recs = list(read_records(path))
    assert [r.body for r in recs] == bodies
    assert [r.arrival_ns for r in recs] == [1_000 + i for i in range(20)]
    assert [r.version for r in recs] == ["2.0" if i % 5 == 0 else "1.0" for i in range(20)]
    # Committed data sets are xz-compressed recordings, read the same way.
    xz = tmp_path / "r.drec.xz"
    xz.write_bytes(lzma.compress(path.read_bytes()))
    assert [r.body for r in read_records(xz)] == bodies


def test_every_torn_tail_is_ignored_and_cut_off_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.drec"
    bodies = _bodies(5)
    with RecordingWriter(path) as w:
        for b in bodies:
            w.append(b, "1.0")
    whole = path.read_bytes()
    last = 20 + len(bodies[-1])
    for cut in range(1, last):  # every length the last record can be torn to
        torn = tmp_path / "torn.drec"
        torn.write_bytes(whole[:-cut])
        stats = ReadStats()
        assert [r.body for r in read_records(torn, stats)] == bodies[:-1]
        assert stats.torn_bytes == last - cut
    # A corrupt byte inside the last record: its checksum fails, everything before reads back.
    flipped = bytearray(whole)
    flipped[-3] ^= 0xFF
    bad = tmp_path / "bad.drec"
    bad.write_bytes(bytes(flipped))
    stats = ReadStats()
    assert [r.body for r in read_records(bad, stats)] == bodies[:-1]
    assert stats.torn_bytes == last
    # Appending to a torn recording first cuts the tail off.
    torn.write_bytes(whole[:-7])
    with RecordingWriter(torn) as w:
        assert w.truncated_bytes == last - 7
        w.append(bodies[0], "1.0")
    stats = ReadStats()
    assert [r.body for r in read_records(torn, stats)] == [*bodies[:-1], bodies[0]]
    assert stats.torn_bytes == 0


def test_a_file_that_is_not_a_recording_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello, this is not a recording\n")
    with pytest.raises(RecordingError, match="not a detectord recording"):
        list(read_records(other))
    with pytest.raises(RecordingError, match="not a detectord recording"):
        RecordingWriter(other)
    assert other.read_text() == "hello, this is not a recording\n"
    # A file killed before its magic was whole is just empty.
    short = tmp_path / "short.drec"
    short.write_bytes(MAGIC[:3])
    assert list(read_records(short)) == []


async def test_recorder_refuses_bad_requests_and_records_good_ones(tmp_path: Path) -> None:
    out = tmp_path / "rec.drec"
    rec = Recorder(RecorderOptions(out=out, listen_address="127.0.0.1:0", max_body_size=64 * 1024))
    await rec.startup()
    try:
        url = f"http://127.0.0.1:{rec.port}/api/v1/write"
        good = _bodies(3)
        v2 = v2_body([({"__name__": "coredns_panics_total", "instance": "a"}, [(1_700_000_000_000, 1.0)])])
        async with aiohttp.ClientSession() as s:
            for b in good:
                async with s.post(url, data=b, headers=V1) as r:
                    assert r.status == 204
            async with s.post(url, data=v2, headers=V2_HEADERS) as r:
                assert r.status == 204
                assert r.headers["X-Prometheus-Remote-Write-Samples-Written"] == "1"
            async with s.post(url, data=good[0], headers={**V1, "Content-Encoding": "gzip"}) as r:
                assert r.status == 415
            async with s.post(url, data=b"\x05not snappy", headers=V1) as r:
                assert r.status == 400 and "snappy" in await r.text()
            async with s.post(url, data=snappy.compress(b"\xff\xff\xff"), headers=V1) as r:
                assert r.status == 400 and "protobuf" in await r.text()
            async with s.post(url, data=os.urandom(70 * 1024), headers=V1) as r:
                assert r.status == 413
            async with s.get(f"http://127.0.0.1:{rec.port}/metrics") as r:
                text = await r.text()
        assert 'detectord_record_requests_total{code="204"} 4.0' in text
        assert 'detectord_record_requests_total{code="400"} 2.0' in text
    finally:
        await rec.shutdown()
    recs = list(read_records(out))
    assert [r.body for r in recs] == [*good, v2]
    assert [r.version for r in recs] == ["1.0"] * 3 + ["2.0"]


def _big_body(i: int, size: int) -> bytes:
    # Random bytes do not compress: each record is about `size` bytes on disk, so the write that
    # kill -9 interrupts can be torn.
    msg = pb1.WriteRequest()
    ts = msg.timeseries.add()
    ts.labels.add(name="__name__", value="coredns_panics_total")
    ts.samples.add(value=float(i), timestamp=1_700_000_000_000 + i)
    # In metadata's help text: a label value that long is beyond web.label_value_length_limit.
    msg.metadata.add(metric_family_name="coredns_panics_total", help=os.urandom(size // 2).hex())
    return bytes(snappy.compress(msg.SerializeToString()))


def _kill_when_growing(path: Path, pid: int, timeout: float = 10.0) -> None:
    size = path.stat().st_size
    deadline = time.monotonic() + timeout
    while path.stat().st_size == size and time.monotonic() < deadline:
        pass
    os.kill(pid, signal.SIGKILL)


async def test_recording_survives_kill_9_mid_write(tmp_path: Path) -> None:
    """Senders stream large requests at `detectord record`; it is killed with SIGKILL while
    writing. Every request it acknowledged reads back, in order, with nothing after a torn tail;
    started again on the same file, it cuts the tail off and appends."""
    out = tmp_path / "rec.drec"
    seen_torn = 0
    acked_all: list[bytes] = []
    for round_ in range(4):
        async with run_recorder(
            out, log=tmp_path / f"record.{round_}.log", args=["--web.max-body-size", "64MiB"]
        ) as recorder:
            url = recorder.write_url
            acked: list[tuple[int, bytes]] = []
            stop = time.monotonic() + 1.0 + random.random()
            killed = False

            # The senders read `killed` as it is when they look: late binding is the point.
            async def sender(k: int) -> None:
                i = 0
                async with aiohttp.ClientSession() as s:
                    while not killed:  # noqa: B023
                        body = _big_body(k * 10_000 + i, 16 * 1024 * 1024)
                        i += 1
                        try:
                            async with s.post(url, data=io.BytesIO(body), headers=V1) as r:  # noqa: B023
                                if r.status == 204:
                                    acked.append((k, body))  # noqa: B023
                        except aiohttp.ClientError:
                            return

            senders = [asyncio.ensure_future(sender(k)) for k in range(3)]
            await asyncio.sleep(stop - time.monotonic())
            # Kill the moment the file starts growing: the recorder is inside a write.
            await asyncio.get_running_loop().run_in_executor(None, _kill_when_growing, out, recorder.child.proc.pid)
            killed = True
            await asyncio.gather(*senders)
        stats = ReadStats()
        bodies = [r.body for r in read_records(out, stats)]
        seen_torn += stats.torn_bytes > 0
        print(f"kill {round_}: {len(bodies)} records, torn tail of {stats.torn_bytes} bytes")
        acked_all.extend(b for _, b in acked)
        assert acked, "the recorder acknowledged nothing before it was killed"
        assert set(acked_all) <= set(bodies), "an acknowledged request is missing"
        for k in range(3):  # each sender's requests are in the order it sent them
            mine = [b for b in bodies if b in {a for kk, a in acked if kk == k}]
            assert mine == [a for kk, a in acked if kk == k]
    assert seen_torn >= 1, "no kill landed inside a write: the test did not test a torn tail"


async def test_replay_resends_a_recording_in_order_and_paced(tmp_path: Path) -> None:
    src = tmp_path / "src.drec"
    bodies = _bodies(12)
    with RecordingWriter(src) as w:
        for i, b in enumerate(bodies):
            w.append(b, "1.0", arrival_ns=5_000_000_000 + i * 100_000_000)  # 1.1 s of traffic
    with open(src, "ab") as f:
        f.write(b"\x07\x00\x00")  # a torn tail: replayed without it
    out = tmp_path / "copy.drec"
    rec = Recorder(RecorderOptions(out=out, listen_address="127.0.0.1:0"))
    await rec.startup()
    try:
        url = f"http://127.0.0.1:{rec.port}/api/v1/write"
        t0 = time.monotonic()
        stats = await replay(src, url, speed=2.0)
        took = time.monotonic() - t0
        fast = await replay(src, url, speed=0)
    finally:
        await rec.shutdown()
    assert stats.sent == fast.sent == 12 and not stats.refused and not stats.failed
    assert stats.read.torn_bytes == 3
    assert took >= 0.5, f"speed 2 of 1.1 s of traffic took only {took:.2f}s"
    assert [r.body for r in read_records(out)] == bodies + bodies


async def test_replay_retries_until_the_receiver_is_up_and_counts_refusals(tmp_path: Path) -> None:
    src = tmp_path / "src.drec"
    with RecordingWriter(src) as w:
        for b in _bodies(3):
            w.append(b, "1.0")
        w.append(b"\x05corrupt", "1.0")
    out = tmp_path / "late.drec"
    port = free_port()
    rec = Recorder(RecorderOptions(out=out, listen_address=f"127.0.0.1:{port}"))

    async def start_late() -> None:
        await asyncio.sleep(0.5)
        await rec.startup()

    starter = asyncio.ensure_future(start_late())
    try:
        stats = await replay(src, f"http://127.0.0.1:{port}/api/v1/write", speed=0)
    finally:
        await starter
        await rec.shutdown()
    assert stats.sent == 3 and stats.retries >= 1 and stats.failed == 0
    assert stats.refused == {400: 1} and "snappy" in (stats.first_refusal or "")
    assert len(list(read_records(out))) == 3

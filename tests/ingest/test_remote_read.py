"""Remote read against a real Prometheus 2.42: samples written through its remote-write receiver
come back exactly (bit for bit) as XOR chunks and as SAMPLES; selectors select; errors say what
went wrong. Fakes stand in only for faults a real Prometheus will not produce (a stall, a
corrupt frame)."""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from pathlib import Path

import aiohttp
import google_crc32c
import pytest
from aiohttp import web

from detectord.children import free_port
from detectord.errors import RemoteReadError
from detectord.ingest._proto import remote_read_pb2 as pbr
from detectord.ingest.remote_read import (
    STREAMED_CONTENT_TYPE,
    Matcher,
    ReadSeries,
    RemoteReadClient,
    decode_xor_chunk,
    parse_selector,
    writes_in_time_order,
)
from detectord.ingest.remote_write import STALE_NAN, LabelCache
from lab.peers.prometheus import Prometheus, run_prometheus
from tests.support import V1_HEADERS, remote_read_endpoint, v1_body

Samples = list[tuple[int, float]]
Written = dict[tuple[tuple[str, str], ...], Samples]


def _bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def _series(now_ms: int) -> Written:
    """Counters, gauges, `up`; irregular intervals, a stale marker, NaN, ±Inf, -0.0, floats that
    need all 64 bits, and 400 samples a series, so Prometheus cuts several chunks of each."""
    rng = random.Random(7)
    t0 = now_ms - 40 * 60_000
    steps = [1000] * 300 + [999, 1001, 15_000, 1, 250, 60_000, 2, 123_457] * 8 + [1000] * 36
    times: list[int] = []
    t = t0
    for d in steps:
        t += d
        times.append(t)
    assert len(times) == 400 and times[-1] < now_ms
    counter: Samples = []
    total = 0.0
    for i, ts in enumerate(times):
        total = 0.0 if i == 250 else total + rng.choice([0.0, 1.0, 17.0, 0.1, 1e-9, 2.0**40])
        counter.append((ts, total))
    gauge: Samples = [(ts, rng.uniform(-1e6, 1e6) + rng.random() * 1e-7) for ts in times]
    gauge[100] = (gauge[100][0], STALE_NAN)
    gauge[101] = (gauge[101][0], math.nan)
    gauge[102:106] = [
        (gauge[102][0], math.inf),
        (gauge[103][0], -math.inf),
        (gauge[104][0], -0.0),
        (gauge[105][0], 0.0),
    ]
    gauge[200] = (gauge[200][0], math.pi)
    gauge[201] = (gauge[201][0], 5e-324)
    up: Samples = [(ts, 0.0 if 50 <= i < 60 else 1.0) for i, ts in enumerate(times)]
    other: Samples = [(ts, float(i)) for i, ts in enumerate(times[:150])]
    a = (("instance", "a"), ("job", "rr"))
    return {
        (("__name__", "rr_requests_total"), *a): counter,
        (("__name__", "rr_temperature_celsius"), *a): gauge,
        (("__name__", "up"), *a): up,
        (("__name__", "rr_requests_total"), ("instance", "b"), ("job", "rr")): other,
    }


async def _write(prom: Prometheus, written: Written) -> None:
    """Through Prometheus's remote-write receiver, 50 samples a series per request, in time order."""
    url = f"{prom.url}/api/v1/write"
    n = max(len(s) for s in written.values())
    async with aiohttp.ClientSession() as s:
        for a in range(0, n, 50):
            body = v1_body((dict(labels), samples[a : a + 50]) for labels, samples in written.items())
            async with s.post(url, data=body, headers=V1_HEADERS) as r:
                assert r.status == 204, await r.text()


def _as_written(got: list[ReadSeries]) -> dict[tuple[tuple[str, str], ...], tuple[list[int], list[bytes]]]:
    return {s.labels: (s.timestamps, _bits(s.values)) for s in got}


def _expect(written: Written, lo: int | None = None, hi: int | None = None) -> dict[object, object]:
    out: dict[object, object] = {}
    for labels, samples in written.items():
        kept = [(t, v) for t, v in samples if (lo is None or t >= lo) and (hi is None or t <= hi)]
        if kept:
            out[labels] = ([t for t, _ in kept], _bits([v for _, v in kept]))
    return out


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_samples_written_come_back_exactly_as_chunks_and_as_samples(tmp_path: Path) -> None:
    now_ms = int(time.time() * 1000)
    written = _series(now_ms)
    async with run_prometheus({}, workdir=tmp_path / "prom", enable_receiver=True) as prom:
        await _write(prom, written)
        url = f"{prom.url}/api/v1/read"
        rr = [Matcher("=", "job", "rr")]
        async with aiohttp.ClientSession() as session:
            for accepted in (("STREAMED_XOR_CHUNKS", "SAMPLES"), ("SAMPLES",)):
                client = RemoteReadClient(url, session=session, timeout=30, accepted=accepted)
                got = await client.read(now_ms - 3_600_000, now_ms, rr)
                assert client.last_response_type == accepted[0]
                if accepted[0] == "SAMPLES":
                    # proto3 leaves a zero double off the wire, and to Go -0.0 is zero: SAMPLES
                    # brings -0.0 back as 0.0. XOR chunks keep its sign bit like every other bit.
                    written = {k: [(t, 0.0 if v == 0 else v) for t, v in s] for k, s in written.items()}
                assert _as_written(got) == _expect(written), accepted

                # Whole chunks reach past a range's ends; only the range comes back, ends included.
                times = [t for t, _ in written[next(iter(written))]]
                lo, hi = times[130], times[333]
                got = await client.read(lo, hi, rr)
                assert _as_written(got) == _expect(written, lo, hi)

                got = await client.read(now_ms - 3_600_000, now_ms, parse_selector('rr_requests_total{instance!~"a"}'))
                assert [s.labels for s in got] == [
                    (("__name__", "rr_requests_total"), ("instance", "b"), ("job", "rr"))
                ]
                got = await client.read(
                    now_ms - 3_600_000, now_ms, parse_selector('{__name__=~"rr_.+|up", job="rr", instance="a"}')
                )
                assert sorted(s.labels[0][1] for s in got) == ["rr_requests_total", "rr_temperature_celsius", "up"]
                assert await client.read(now_ms - 3_600_000, now_ms, parse_selector('{job="nope"}')) == []

            # A regular expression Prometheus cannot compile: its 500, and the start of its reason.
            client = RemoteReadClient(url, session=session, timeout=30)
            with pytest.raises(RemoteReadError, match=r"HTTP 500: Internal Server Error: error parsing regexp") as info:
                await client.read(now_ms - 60_000, now_ms, [Matcher("=~", "job", "(" + "x" * 500)])
            assert info.value.status == 500 and str(info.value).startswith(url)
            assert len(info.value.body) == 200 and str(info.value).endswith("xxx...")


def test_bad_selectors_say_what_is_wrong() -> None:
    assert parse_selector('up{job="x"}') == [Matcher("=", "__name__", "up"), Matcher("=", "job", "x")]
    assert parse_selector(' { a !~ "x\\"y" , b=`c\\d`, c!="\\u00e9",} ') == [
        Matcher("!~", "a", 'x"y'),
        Matcher("=", "b", "c\\d"),
        Matcher("!=", "c", "é"),
    ]
    bad = {
        '{job="x"': r"expected ',' or '}' at position 8, found the end",
        "{job=x}": r"expected a quoted label value at position 5, found 'x'",
        '{job=="x"}': r"expected a quoted label value at position 5, found '='",
        '{9job="x"}': r"expected a label name at position 1",
        '{job~"x"}': r"expected one of =, !=, =~, !~ at position 4",
        '{job="x}': r"the string at position 5 is not closed",
        'up{__name__="x"}': r"the metric name is set twice",
        "{}": r"has no matchers",
        "": r"has no matchers",
        'up{job="x"} offset 5m': r"expected the end of the selector at position 12",
        '{job="\\q"}': r"unknown escape \\q",
    }
    for text, why in bad.items():
        with pytest.raises(RemoteReadError, match=why):
            parse_selector(text)


def test_writes_come_in_time_order_one_slice_at_a_time() -> None:
    cache = LabelCache()
    a = (("__name__", "x"), ("instance", "a"))
    b = (("__name__", "y"), ("instance", "a"))
    series = [
        ReadSeries(a, [1000, 1500, 2000, 7000], [1.0, 2.0, 3.0, STALE_NAN]),
        ReadSeries(b, [999, 2001, 2999, 3000], [9.0, 8.0, 7.0, 6.0]),
        ReadSeries((("__name__", "z"),), [], []),
    ]
    writes = list(writes_in_time_order(series, cache, 1000))
    # A NaN equals nothing, not even itself: stale markers are compared by their bits.
    stale = _bits([STALE_NAN])

    def shown(v: float) -> float | str:
        return "stale" if _bits([v]) == stale else v

    got = [[(key.labels, [(t, shown(v)) for t, v in samples]) for key, samples in w.series()] for w in writes]
    assert got == [
        [(b, [(999, 9.0)])],
        [(a, [(1000, 1.0), (1500, 2.0)])],
        [(a, [(2000, 3.0)]), (b, [(2001, 8.0), (2999, 7.0)])],
        [(b, [(3000, 6.0)])],
        [(a, [(7000, "stale")])],
    ]
    assert _bits([writes[4].values[0]]) == _bits([STALE_NAN])
    assert [w.samples for w in writes] == [1, 2, 3, 1, 1]
    assert all(w.version == "1.0" for w in writes)
    assert writes[1].keys[0] is cache.intern(a) and writes[2].keys[1] is cache.intern(b)


def test_a_corrupt_xor_chunk_is_refused() -> None:
    one = b"\x00\x01" + bytes([0x80, 0x01]) + struct.pack(">d", 2.5)  # one sample: t=64, v=2.5
    assert decode_xor_chunk(one) == ([64], [2.5])
    with pytest.raises(RemoteReadError, match="cut off in its first sample"):
        decode_xor_chunk(one[:-1])
    with pytest.raises(RemoteReadError, match="cut off in sample"):
        decode_xor_chunk(b"\x00\x05" + one[2:] + b"\x05")


# ---- faults a real Prometheus will not produce: fakes --------------------------------------------


def _frame(series: list[tuple[dict[str, str], int, float]], *, crc_flip: int = 0) -> bytes:
    """One STREAMED_XOR_CHUNKS frame with a one-sample XOR chunk per series."""
    msg = pbr.ChunkedReadResponse()
    for labels, t, v in series:
        cs = msg.chunked_series.add()
        for k in sorted(labels):
            cs.labels.add(name=k, value=labels[k])
        zz = (t << 1) ^ (t >> 63)
        varint = bytearray()
        while True:
            varint.append((zz & 0x7F) | (0x80 if zz > 0x7F else 0))
            zz >>= 7
            if not zz:
                break
        cs.chunks.add(
            min_time_ms=t, max_time_ms=t, type=pbr.Chunk.XOR, data=b"\x00\x01" + varint + struct.pack(">d", v)
        )
    data: bytes = msg.SerializeToString()
    n, length = len(data), bytearray()
    while True:
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return bytes(length) + (int(google_crc32c.value(data)) ^ crc_flip).to_bytes(4, "big") + data


async def _read_from(body: bytes, *, status: int = 200, delay: float = 0.0, timeout: float = 10.0) -> list[ReadSeries]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        ctype = STREAMED_CONTENT_TYPE if status == 200 else "text/plain"
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    async with remote_read_endpoint(handler) as url, aiohttp.ClientSession() as session:
        client = RemoteReadClient(url, session=session, timeout=timeout)
        return await client.read(0, 10_000, [Matcher("=", "job", "x")])


async def test_a_frame_that_fails_its_crc_is_refused() -> None:
    """Fake server: Prometheus never sends a bad CRC-32C, so a fake sends two good frames (one
    series split across both), then the same with one bit of the second frame's CRC flipped."""
    x = {"__name__": "x", "job": "x"}
    good = _frame([(x, 1000, 1.5)]) + _frame([(x, 2000, STALE_NAN), ({"__name__": "y", "job": "x"}, 2000, 3.0)])
    got = await _read_from(good)
    assert [(s.labels, s.timestamps, _bits(s.values)) for s in got] == [
        ((("__name__", "x"), ("job", "x")), [1000, 2000], _bits([1.5, STALE_NAN])),
        ((("__name__", "y"), ("job", "x")), [2000], _bits([3.0])),
    ]
    bad = _frame([(x, 1000, 1.5)]) + _frame([(x, 2000, 2.5)], crc_flip=1 << 7)
    with pytest.raises(RemoteReadError, match=r"/api/v1/read: streamed response: frame 2 fails its CRC-32C check"):
        await _read_from(bad)
    with pytest.raises(RemoteReadError, match=r"cut off inside frame 2"):
        await _read_from(good[:-3])


async def test_error_answers_unreachable_endpoints_and_stalls_are_remote_read_errors() -> None:
    """Fake server for a stall and a 503 (a real Prometheus's 500 is tested above); a port nobody
    listens on for an unreachable endpoint."""
    with pytest.raises(RemoteReadError, match=r"HTTP 503: Service Unavailable: too many queries$") as info:
        await _read_from(b"too many queries\n", status=503)
    assert info.value.status == 503
    with pytest.raises(RemoteReadError, match=r"no complete answer within 0.3s"):
        await _read_from(_frame([]), delay=5.0, timeout=0.3)
    url = f"http://127.0.0.1:{free_port()}/api/v1/read"
    async with aiohttp.ClientSession() as session:
        client = RemoteReadClient(url, session=session, timeout=5)
        with pytest.raises(RemoteReadError, match=rf"{url}: ClientConnectorError: Cannot connect"):
            await client.read(0, 1, [Matcher("=", "job", "x")])

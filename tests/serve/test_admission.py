"""Slow and many clients: header and body deadlines, the connection and request caps, and a
1,100-client slowloris against a daemon held to 1,024 open files while Prometheus-like writes go on."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import structlog

from detectord.serve import admission
from lab.peers.detectord import Detectord, run_detectord
from tests.support import V1_HEADERS, coredns_scrape, metric, running_server, test_config, v1_body


async def _write(base: str, i: int) -> int:
    body = v1_body(coredns_scrape(f"w{i % 3}:9153", int(time.time() * 1000), i))
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/api/v1/write", data=body, headers=V1_HEADERS, timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        return r.status


async def _metrics(base: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        return await r.text()


async def _stalled_upload(port: int, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A remote write that declares `size` body bytes, sends 3 and stops."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: 0.1.0\r\n"
        + f"Content-Length: {size}\r\n\r\nabc".encode()
    )
    await writer.drain()
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
            return True
    return False


async def test_a_client_that_never_finishes_its_headers_is_closed_after_the_header_timeout() -> None:
    cfg = test_config(web={"read_header_timeout": 1.0})
    async with running_server(cfg) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert await _closed_by_server(reader, timeout=5)
        assert 0.9 < time.monotonic() - t0 < 3
        writer.close()
        text = await _metrics(f"http://127.0.0.1:{srv.port}")
        assert metric(text, "detectord_http_connections_closed_total", reason="header_timeout") == 1


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    cfg = test_config(web={"read_body_timeout": 1.0})
    async with running_server(cfg) as srv:
        reader, writer = await _stalled_upload(srv.port, 1000)
        async with asyncio.timeout(5):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 408"), status
        writer.close()


async def test_at_the_request_cap_the_slowest_body_makes_room_for_a_prompt_write() -> None:
    cfg = test_config(web={"max_concurrent_requests": 1, "read_body_timeout": 30.0})
    async with running_server(cfg) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        reader, writer = await _stalled_upload(srv.port, 1000)
        await asyncio.sleep(0.3)  # it holds the only request slot
        assert await _write(base, 0) == 204
        assert await _closed_by_server(reader, timeout=2)
        writer.close()
        text = await _metrics(base)
        assert metric(text, "detectord_http_connections_closed_total", reason="evicted") == 1


async def test_body_bytes_in_flight_are_capped_and_a_stalled_upload_makes_room() -> None:
    size = 16 * 1024**2
    cfg = test_config(web={"max_body_size": size, "max_body_bytes_in_flight": size, "read_body_timeout": 30.0})
    async with running_server(cfg) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        reader, writer = await _stalled_upload(srv.port, size)
        await asyncio.sleep(0.3)  # it holds the whole budget
        assert srv.admission is not None and srv.admission.body_bytes == size
        assert await _write(base, 0) == 204
        assert await _closed_by_server(reader, timeout=2)
        writer.close()
        text = await _metrics(base)
        assert metric(text, "detectord_http_connections_closed_total", reason="evicted") == 1
        assert srv.admission.body_bytes == 0


def test_failed_accepts_are_logged_once_per_interval_not_per_attempt() -> None:
    from prometheus_client import CollectorRegistry

    adm = admission.Admission(admission.Limits(64, 8, 2**28, 10.0, 30.0), CollectorRegistry())
    loop = asyncio.new_event_loop()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(10_000):
                adm.exception_handler(
                    loop,
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    },
                )
    finally:
        loop.close()
    assert len(logs) == 1
    assert "LimitNOFILE" in logs[0]["event"]
    assert adm.metrics.accept_errors._value.get() == 10_000


def test_the_connection_cap_fits_the_open_files_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert admission.connection_cap(10**9) == soft - admission.FD_RESERVE - admission.ACCEPT_BURST
    assert admission.connection_cap(100) == 100


# ---- many slow clients against a daemon held to 1,024 open files --------------------------------

SLOW_CLIENTS = 1100
HEAD = b"POST /api/v1/write HTTP/1.1\r\nHost: detectord\r\n"
BODY_HEAD = (
    HEAD + b"Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n"
    b"X-Prometheus-Remote-Write-Version: 0.1.0\r\nContent-Length: 100000\r\n\r\n"
)


@contextlib.contextmanager
def _open_files_limit(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def _daemon_at_1024_files(tmp_path: Path) -> AsyncIterator[Detectord]:
    config = {
        "ingest": {"step": "1s"},
        "model": {"any_step": True},
        "web": {"read_header_timeout": "5s", "read_body_timeout": "10s"},
    }
    with _open_files_limit(1024):
        cm = run_detectord(config, workdir=tmp_path)
        det = await cm.__aenter__()
    try:
        yield det
    finally:
        await cm.__aexit__(None, None, None)


async def _slow_client(port: int, body: bool, stop: asyncio.Event) -> None:
    """Holds a connection, trickling a header line (or a body byte) a second; reconnects when closed."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(BODY_HEAD if body else HEAD)
            while not stop.is_set() and not reader.at_eof():
                await asyncio.sleep(1)
                writer.write(b"x" if body else b"X-Slow: 1\r\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest.mark.slow
async def test_1100_slow_clients_at_1024_open_files_do_not_stop_prometheus_writes(tmp_path: Path) -> None:
    async with _daemon_at_1024_files(tmp_path) as det:
        stop = asyncio.Event()
        clients = [asyncio.create_task(_slow_client(det.port, i % 2 == 1, stop)) for i in range(SLOW_CLIENTS)]
        try:
            await asyncio.sleep(3)  # all of them connected and holding on
            statuses: list[int] = []
            latencies: list[float] = []
            for i in range(40):
                t0 = time.monotonic()
                for _attempt in range(3):  # Prometheus retries a 503
                    status = await _write(det.url, i)
                    if status != 503:
                        break
                    await asyncio.sleep(0.5)
                statuses.append(status)
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.25)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
        assert statuses == [204] * len(statuses)
        assert max(latencies) < 5
        text = await det.metrics()
        closed = sum(
            metric(text, "detectord_http_connections_closed_total", reason=r)
            for r in ("header_timeout", "body_timeout", "evicted")
        )
        assert closed >= SLOW_CLIENTS - (1024 - admission.FD_RESERVE - admission.ACCEPT_BURST)
        assert det.child.alive
    log_size = det.log.stat().st_size
    assert log_size < 200_000, det.child.tail()

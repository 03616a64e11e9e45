"""`detectord record`: a remote-write receiver that appends every request it accepts to a recording.

It checks each request as `serve` would (headers, sizes, snappy, protobuf) and answers only once the
record is in the file, so a 2xx means recorded. Appends and checks run on one writer thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import snappy
import structlog
from aiohttp import web
from google.protobuf.message import DecodeError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.errors import RemoteWriteError
from detectord.recordings.format import RecordingWriter
from detectord.ingest.remote_write import Version, check_encoding, declared_length, protocol_of

log = structlog.get_logger(__name__)

_V2_HEADERS = ("X-Prometheus-Remote-Write-Samples-Written", "X-Prometheus-Remote-Write-Histograms-Written",
               "X-Prometheus-Remote-Write-Exemplars-Written")


@dataclass(frozen=True)
class RecorderOptions:
    out: Path
    listen_address: str = "0.0.0.0:9465"
    max_body_size: int = 16 * 1024**2
    max_decoded_body_size: int = 64 * 1024**2
    fsync_interval: float = 1.0
    shutdown_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class _Counts:
    samples: int
    histograms: int
    exemplars: int


def _check(body: bytes, version: Version, max_decoded: int) -> _Counts:
    """Decompress and parse the body, as `serve` would, to refuse what it would refuse."""
    if not body:
        raise RemoteWriteError(400, "empty body")
    if declared_length(body) > max_decoded:
        raise RemoteWriteError(413, f"declared decompressed length {declared_length(body)} exceeds the limit "
                                    f"of {max_decoded} bytes")
    try:
        data = snappy.uncompress(body)
    except Exception as exc:  # python-snappy raises several unrelated types for corrupt input
        raise RemoteWriteError(400, f"snappy: corrupt input ({exc.__class__.__name__})") from None
    try:
        if version == "1.0":
            m1 = pb1.WriteRequest.FromString(data)
            return _Counts(sum(len(ts.samples) for ts in m1.timeseries), 0, 0)
        m2 = pb2.Request.FromString(data)
        return _Counts(sum(len(ts.samples) for ts in m2.timeseries),
                       sum(len(ts.histograms) for ts in m2.timeseries),
                       sum(len(ts.exemplars) for ts in m2.timeseries))
    except DecodeError as exc:
        raise RemoteWriteError(400, f"protobuf: cannot parse {version} request: {exc}") from None


class Recorder:
    """startup() opens the file and listens; run() waits for SIGTERM/SIGINT; shutdown() closes both."""

    def __init__(self, opts: RecorderOptions, *, registry: CollectorRegistry | None = None) -> None:
        self.opts = opts
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("detectord_record_requests_total", "Remote-write requests by HTTP status.",
                                ["code"], registry=self.registry)
        self.samples = Counter("detectord_record_samples_total", "Samples in recorded requests.",
                               registry=self.registry)
        self.file_bytes = Gauge("detectord_record_file_bytes", "Size of the recording file.",
                                registry=self.registry)
        self.should_exit = asyncio.Event()
        self.writer: RecordingWriter | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detectord-record")

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer = await loop.run_in_executor(
            self._executor, lambda: RecordingWriter(self.opts.out, fsync_interval=self.opts.fsync_interval))
        if self.writer.truncated_bytes:
            log.warning("cut off a torn tail", file=str(self.opts.out), bytes=self.writer.truncated_bytes)
        self.file_bytes.set(self.writer.bytes)
        app = web.Application(client_max_size=self.opts.max_body_size + 1, handler_args={"auto_decompress": False})
        app.router.add_post("/api/v1/write", self.handle_write)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/-/healthy", _ok)
        app.router.add_get("/-/ready", _ok)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.opts.shutdown_timeout)
        await self._runner.setup()
        host, _, port = self.opts.listen_address.rpartition(":")
        site = web.TCPSite(self._runner, host or "0.0.0.0", int(port), reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("recording", file=str(self.opts.out), listen=f"{host}:{self.port}",
                 url=f"http://{host or 'localhost'}:{self.port}/api/v1/write")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await self.should_exit.wait()

    def _on_signal(self) -> None:
        if self.should_exit.is_set():
            os._exit(1)
        self.should_exit.set()

    async def shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        loop = asyncio.get_running_loop()
        if self.writer is not None:
            await loop.run_in_executor(self._executor, self.writer.close)
            log.info("recording closed", file=str(self.opts.out), records=self.writer.records,
                     bytes=self.writer.bytes)
        self._executor.shutdown(wait=True)

    def _append(self, body: bytes, version: Version) -> _Counts:
        counts = _check(body, version, self.opts.max_decoded_body_size)
        assert self.writer is not None
        self.writer.append(body, version)
        self.file_bytes.set(self.writer.bytes)
        return counts

    async def handle_write(self, request: web.Request) -> web.Response:
        version: Version | None = None
        try:
            version = protocol_of(request.headers.get("Content-Type"))
            check_encoding(request.headers.get("Content-Encoding"))
            limit = self.opts.max_body_size
            if request.content_length is not None and request.content_length > limit:
                raise RemoteWriteError(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RemoteWriteError(413, f"body exceeds the limit of {limit} bytes") from None
            counts = await asyncio.get_running_loop().run_in_executor(self._executor, self._append, body, version)
        except RemoteWriteError as exc:
            self.requests.labels(str(exc.status)).inc()
            return web.Response(status=exc.status, text=exc.reason + "\n", headers=_written(version))
        except OSError as exc:
            # Disk full or gone: the sender keeps the data and retries.
            self.requests.labels("500").inc()
            log.error("cannot append", error=str(exc))
            return web.Response(status=500, text=f"cannot write the recording: {exc}\n")
        self.requests.labels("204").inc()
        self.samples.inc(counts.samples)
        return web.Response(status=204, headers=_written(version, counts))

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _written(version: Version | None, counts: _Counts | None = None) -> dict[str, str]:
    if version != "2.0":
        return {}
    c = counts or _Counts(0, 0, 0)
    return dict(zip(_V2_HEADERS, (str(c.samples), str(c.histograms), str(c.exemplars))))


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="OK\n")


async def record(opts: RecorderOptions) -> int:
    rec = Recorder(opts)
    try:
        await rec.startup()
        await rec.run()
    finally:
        await rec.shutdown()
    return 0

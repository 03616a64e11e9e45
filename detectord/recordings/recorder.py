"""`detectord record`: a remote-write receiver that appends every request it accepts to a recording.

Requests go through the same intake and decoder as `serve`'s, so it refuses what serve would
refuse; one some of whose series serve would refuse is recorded (serve takes the rest) and
answered 400 with the reason, as serve answers it. It answers only once the record is in the
file, so a 2xx means recorded. Decoding and appends run on one writer thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from detectord.errors import RemoteWriteError
from detectord.ingest.intake import Limits, Written, accepted, read_request, refused
from detectord.ingest.remote_write import DecodedWrite, LabelCache, Version, decode
from detectord.recordings.format import RecordingWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RecorderOptions:
    out: Path
    listen_address: str = "0.0.0.0:9465"
    max_body_size: int = 16 * 1024**2
    max_decoded_body_size: int = 64 * 1024**2
    fsync_interval: float = 1.0
    shutdown_timeout: float = 10.0


class Recorder:
    """startup() opens the file and listens; run() waits for SIGTERM/SIGINT; shutdown() closes both."""

    def __init__(self, opts: RecorderOptions, *, registry: CollectorRegistry | None = None) -> None:
        self.opts = opts
        self.limits = Limits(opts.max_body_size, opts.max_decoded_body_size)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "detectord_record_requests_total", "Remote-write requests by HTTP status.", ["code"], registry=self.registry
        )
        self.samples = Counter(
            "detectord_record_samples_total", "Samples in recorded requests.", registry=self.registry
        )
        self.file_bytes = Gauge("detectord_record_file_bytes", "Size of the recording file.", registry=self.registry)
        self.should_exit = asyncio.Event()
        self.writer: RecordingWriter | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detectord-record")

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer = await loop.run_in_executor(
            self._executor, lambda: RecordingWriter(self.opts.out, fsync_interval=self.opts.fsync_interval)
        )
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
        log.info(
            "recording",
            file=str(self.opts.out),
            listen=f"{host}:{self.port}",
            url=f"http://{host or 'localhost'}:{self.port}/api/v1/write",
        )

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
            log.info("recording closed", file=str(self.opts.out), records=self.writer.records, bytes=self.writer.bytes)
        self._executor.shutdown(wait=True)

    def _append(self, body: bytes, version: Version) -> DecodedWrite:
        # Decoded as `serve` decodes it, so that it refuses what serve would refuse; a fresh label
        # cache each time keeps the recorder's memory flat whatever the series churn.
        decoded = decode(body, version, LabelCache(), max_decoded=self.opts.max_decoded_body_size)
        assert self.writer is not None
        self.writer.append(body, version)
        self.file_bytes.set(self.writer.bytes)
        return decoded

    async def handle_write(self, request: web.Request) -> web.Response:
        version: Version | None = None
        try:
            version, body = await read_request(request, self.limits)
            decoded = await asyncio.get_running_loop().run_in_executor(self._executor, self._append, body, version)
        except RemoteWriteError as exc:
            exc.version = exc.version or version
            self.requests.labels(str(exc.status)).inc()
            return refused(exc)
        except OSError as exc:
            # Disk full or gone: the sender keeps the data and retries.
            self.requests.labels("500").inc()
            log.error("cannot append", error=str(exc))
            return web.Response(status=500, text=f"cannot write the recording: {exc}\n")
        written = Written(decoded.samples - decoded.invalid_samples, decoded.histograms, decoded.exemplars)
        self.samples.inc(written.samples)
        response = accepted(version, written, decoded.first_error)
        self.requests.labels(str(response.status)).inc()
        return response

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


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

"""The daemon's memory across restarts: restores the latest snapshot at start, before ready, and
writes one every `state.snapshot_interval` and at shutdown (`snapshots` holds the file format).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from detectord.config import StateConfig
from detectord.ingest.pipeline import Ingestor
from detectord.serve import snapshots
from detectord.serve.metrics import DaemonMetrics
from detectord.serve.sink import ScoreSink
from detectord.serve.snapshots import SnapshotRefused

log = structlog.get_logger(__name__)

# Instances read per visit to the ingest thread: writes wait for one slice at most, not the whole.
SLICE = 256
# The next periodic snapshot waits at least this many times as long as the last one took, so
# snapshots take at most a fifth of the daemon's time whatever the fleet (at 100,000 instances
# one took longer than the default interval).
SPACING = 4.0


class StateKeeper:
    """Owns `state.dir`. One writer thread encodes and writes snapshots, one at a time."""

    def __init__(
        self, cfg: StateConfig, *, fingerprint: Mapping[str, Any], model: Mapping[str, str], metrics: DaemonMetrics
    ) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.fingerprint = dict(fingerprint)
        self.model = dict(model)
        self.metrics = metrics
        for reason in snapshots.REFUSALS:
            metrics.restore_refused.labels(reason)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detectord-state")
        self.took = 0.0  # seconds the latest snapshot took

    def use(self, fingerprint: Mapping[str, Any], model: Mapping[str, str]) -> None:
        """After a reload: snapshots are of the new model's state."""
        self.fingerprint, self.model = dict(fingerprint), dict(model)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.dir)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    async def restore(self, ingestor: Ingestor, sink: ScoreSink) -> None:
        """Restore the latest snapshot if it fits. Never raises: a
        snapshot that cannot be restored is logged, counted and left for the next one to replace."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        path = self.dir / snapshots.FILE_NAME
        try:
            snap = await loop.run_in_executor(
                self._writer,
                lambda: snapshots.read(self.dir, self.fingerprint, max_age_s=float(self.cfg.max_age)),
            )
            if snap is None:
                log.info("no state snapshot to restore; starting clean", path=str(path))
                return
            with snap:
                # Records are decoded as the ingest thread restores them: damage found halfway
                # raises there, and restore_instances keeps none of the instances.
                try:
                    keys = await ingestor.call(ingestor.restore_instances, snap.instances())
                except (ValueError, TypeError, KeyError) as exc:
                    raise SnapshotRefused("corrupt", f"an instance's state does not fit ({exc})") from exc
                try:
                    alerts = sink.restore(await loop.run_in_executor(self._writer, snap.alerts))
                except (ValueError, TypeError, KeyError, SnapshotRefused) as exc:
                    await ingestor.call(ingestor.forget, keys)
                    if isinstance(exc, SnapshotRefused):
                        raise
                    raise SnapshotRefused("corrupt", f"the alert states do not fit ({exc})") from exc
        except SnapshotRefused as exc:
            self.metrics.restore_refused.labels(exc.reason).inc()
            log.warning("state snapshot refused; starting clean", path=str(path), reason=exc.reason, detail=exc.detail)
            return
        n = len(keys)
        self.metrics.restored.labels("instances").inc(n)
        self.metrics.restored.labels("alerts").inc(alerts)
        log.info(
            "state restored",
            path=str(path),
            instances=n,
            alerts=alerts,
            age_seconds=round(time.time() - snap.written_at, 1),
        )

    async def snapshot(self, ingestor: Ingestor, sink: ScoreSink) -> None:
        """Write a snapshot while the daemon runs: instances are read on the ingest thread a slice
        at a time (each instance whole), so writes wait for one slice at most."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        keys: list[tuple[str, ...]] = await ingestor.call(ingestor.extractor.instance_keys)
        records: list[bytes] = []
        for i in range(0, len(keys), SLICE):
            states = await ingestor.call(ingestor.instance_states, keys[i : i + SLICE])
            records += await loop.run_in_executor(self._writer, _encode, states)
        await self._write(records, sink.state(), t0)

    async def final_snapshot(self, ingestor: Ingestor, sink: ScoreSink) -> None:
        """At shutdown, once nothing writes any more: everything, in one go on the writer thread
        (still a slice at a time, so it never holds every instance's state as Python objects)."""
        t0 = time.perf_counter()
        alerts = sink.state()

        def everything() -> list[bytes]:
            keys = ingestor.extractor.instance_keys()
            return [
                r for i in range(0, len(keys), SLICE) for r in _encode(ingestor.instance_states(keys[i : i + SLICE]))
            ]

        records = await asyncio.get_running_loop().run_in_executor(self._writer, everything)
        await self._write(records, alerts, t0)

    async def run(self, ingestor: Ingestor, sink: ScoreSink) -> None:
        while True:
            await asyncio.sleep(max(float(self.cfg.snapshot_interval), SPACING * self.took))
            await self.snapshot(ingestor, sink)

    async def _write(self, records: list[bytes], alerts: dict[str, Any], t0: float) -> None:
        loop = asyncio.get_running_loop()
        m = self.metrics
        try:
            stats = await loop.run_in_executor(
                self._writer, snapshots.write, self.dir, self.fingerprint, self.model, records, alerts
            )
        except OSError as exc:
            m.snapshots.labels("failure").inc()
            m.snapshot_seconds_total.inc(time.perf_counter() - t0)
            log.error("state snapshot not written", dir=str(self.dir), error=str(exc))
            return
        self.took = seconds = time.perf_counter() - t0
        m.snapshot_seconds_total.inc(seconds)
        m.snapshots.labels("success").inc()
        m.snapshot_bytes.set(stats.bytes)
        m.snapshot_seconds.set(seconds)
        m.snapshot_last_success.set(time.time())
        log.debug("state snapshot written", instances=stats.instances, bytes=stats.bytes, seconds=round(seconds, 3))


def _encode(states: list[dict[str, Any]]) -> list[bytes]:
    return [snapshots.encode(st) for st in states]

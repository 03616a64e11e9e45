"""The ingest path: a remote-write body to feature rows, per-instance baselines, windows and score
requests.

All of it runs on one dedicated thread that owns the extractor, the baselines and the windows, so
the event loop never decodes and the per-instance state has a single writer.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import math
import mmap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from detectord.ingest.features import FeatureExtractor, FeatureRow, IngestStats, InstanceKey
from detectord.ingest.liveness import CrashLoop, CrashLoops, LivenessEvent, LivenessTracker
from detectord.ingest.metrics import IngestMetrics
from detectord.ingest.normalise import BaselineView, InputPlan, Normaliser
from detectord.ingest.remote_write import (
    DEFAULT_CACHE_BYTES,
    DecodedWrite,
    Steps,
    Version,
    WriteLimits,
    declared_length,
    decode_steps,
)
from detectord.ingest.thread import IngestThread
from detectord.ingest.windows import WindowStore

FREEZE_AFTER_NEW_SERIES = 10_000
# Objects the cyclic GC tracks for an instance's baseline (lists of held rows and buckets): 50,000
# new instances' first rows made a full collection that held the GIL for 0.2 s.
BASELINE_OBJECTS = 5
# Entries the label cache lets go in one turn past which freed heap is handed back to the system.
GIVE_BACK_AFTER_FORGETTING = 10_000
# Resident growth since freed heap was last handed back past which the next eviction pass (at
# most every 30 s) hands it back again: as a fleet grows, the tables and arrays it outgrows are
# freed in the middle of the heap, which glibc keeps (10,000 instances once all score: 64 KB an
# instance resident without it, 58-63 KB with it). Handing back hundreds of MB takes milliseconds.
GIVE_BACK_AFTER_GROWING = 32 * 1024**2
# One request's work in one job on the ingest thread (a decoding step or a slice of series can
# take a little longer): about the most it delays another request's.
SLICE_S = 0.1
# A request whose body decompresses to more than this waits for the big one before it, if any.
BIG_REQUEST_BYTES = 4 * 1024**2
INGEST_SLICE_SERIES = 20_000
T = TypeVar("T")


@dataclass(slots=True)
class WriteResult:
    samples_written: int
    histograms_written: int
    exemplars_written: int
    # Why some series were refused (the rest was still ingested): answer 400 with it.
    error: str | None
    stats: IngestStats
    # Series refused, by reason (remote_write.Reason.kind). The written counts are of the
    # series accepted only.
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ScoreRequest:
    instance: InstanceKey
    step_ts_ms: int
    window: np.ndarray  # (W, F) float32 model inputs, oldest row first
    latest: np.ndarray  # (F,) the newest feature row as extracted (what an alert quotes)
    upstream: str = ""  # what the instance forwards to (FeatureRow.upstream)
    crash_loop: CrashLoop | None = None  # it is in a crash loop: alert whatever the score
    # Monotonic time the remote-write request that completed this step reached the ingest path
    # (0: not from a request), for detectord_step_score_delay_seconds.
    arrived: float = 0.0


class ScoreSink(Protocol):
    """Where full windows go: the inference worker when serving, a list when scoring offline."""

    def submit_many(self, reqs: list[ScoreRequest]) -> int: ...


class Ingestor:
    """The ingest path of one daemon (or of one offline scoring run): remote-write bodies through
    decoding, features, per-instance baselines and windows, full windows out to a `ScoreSink`.

    `write` runs a body on the one ingest thread, which owns all per-instance state (one writer,
    no locks); `call` runs anything else that touches it there. `write_sync` is the same work on
    the caller's thread, for offline use.
    """

    def __init__(
        self,
        *,
        step_ms: int,
        instance_labels: tuple[str, ...],
        window: int,
        inputs: InputPlan,
        max_instances: int,
        label_cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_gap_steps: int,
        max_decoded: int,
        max_future_s: float,
        worker: ScoreSink,
        metrics: IngestMetrics,
        stale_after_s: float,
        failed_scrapes: int,
        crash_loop_restarts: int,
        crash_loop_within_s: float,
        on_liveness: Callable[[list[LivenessEvent]], object] | None = None,
        limits: WriteLimits | None = None,
    ) -> None:
        self.extractor = FeatureExtractor(
            step_ms,
            instance_labels,
            max_instances=max_instances,
            max_gap_steps=max_gap_steps,
            label_cache_bytes=label_cache_bytes,
        )
        if limits is not None:
            self.extractor.labels.limits = limits
        self.step_s = step_ms / 1000.0
        self.normaliser = Normaliser(inputs, self.step_s)
        self.windows = WindowStore(window, len(inputs.features), inputs.min_rows)
        self.worker = worker
        self.metrics = metrics
        self.instance_counts: dict[str, int] = {"warming": 0, "scoring": 0, "down": 0}
        self._exported_counts: tuple[dict[str, int], int] | None = None
        # Instances whose window and baseline are both warm (the rest are warming).
        self._scoring: set[InstanceKey] = set()
        # Restored scoring instances not heard from since the restart.
        self._unconfirmed: set[InstanceKey] = set()
        # Which of them are down, and where their liveness events go (called on the ingest thread).
        self.liveness = LivenessTracker(stale_after_s, failed_scrapes)
        self.crash_loops = CrashLoops(crash_loop_restarts, crash_loop_within_s)
        self.on_liveness = on_liveness
        self.last_write = 0.0  # monotonic
        # The resident size right after freed heap was last handed back (None: not on glibc).
        self._resident_after_give_back = resident_bytes() if _malloc_trim is not None else None
        self.max_decoded = max_decoded
        self.max_future_ms = int(max_future_s * 1000)
        self._thread = IngestThread()
        self._big = asyncio.Semaphore(1)
        # The label cache's forgotten entries already counted in the metric, by reason.
        self._forgotten_counted: dict[str, int] = {}
        # Series keys made and series bound, as of the last gc.freeze().
        self._frozen_at = 0

    async def write(self, body: bytes, version: Version) -> WriteResult:
        """`write_sync` on the ingest thread, in jobs of at most about SLICE_S each: other
        requests' jobs run between them, so one huge request does not hold up the rest (a usual
        request is one job)."""
        if declared_length(body) < BIG_REQUEST_BYTES:
            return await self._write(body, version, big=False)
        # Big requests one at a time: each holds its decompressed body until it is done, and
        # taking turns between two of them would only hold both longer.
        async with self._big:
            return await self._write(body, version, big=True)

    async def _write(self, body: bytes, version: Version, *, big: bool) -> WriteResult:
        w = _Write(self, body, version)
        # A usual request is one short job; the rest of one that needs more is long.
        long = big
        while (result := await self._thread.submit(w.run, SLICE_S, long=long)) is None:
            long = True
        return result

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on the ingest thread (to touch extractor or windows safely)."""
        return await self._thread.submit(fn, *args, long=True)

    def close(self) -> None:
        self._thread.close()

    def write_sync(self, body: bytes, version: Version) -> WriteResult:
        """One request body through decoding, features and windows, on the calling thread (the
        caller's own when scoring a recording offline)."""
        result = _Write(self, body, version).run(math.inf)
        assert result is not None
        return result

    def decode_steps(self, body: bytes, version: Version) -> Steps:
        now_ms = int(time.time() * 1000)
        return decode_steps(
            body,
            version,
            self.extractor.labels,
            max_decoded=self.max_decoded,
            max_ts_ms=now_ms + self.max_future_ms,
            keep=self.extractor.series_names,
        )

    def ingest(self, decoded: DecodedWrite, stats: IngestStats, arrived: float = 0.0) -> None:
        """Decoded series through features, baselines and windows; full windows to the worker.
        `arrived`: when their request reached the ingest path (monotonic)."""
        now = time.monotonic()
        self.last_write = now
        rows = self.extractor.ingest(decoded, stats, now)
        self.freeze_if_grown()
        self.push_rows(rows, arrived=arrived or now)
        self.freeze_if_grown()
        events = self.liveness.after_write(self.extractor, self._scoring, now)
        if events:
            self._deliver_liveness(events)
            self.update_instance_gauges()

    def freeze_if_grown(self) -> None:
        """Many new long-lived objects (series keys and bound series, instances' baselines) since
        the last time: take them out of the cyclic GC's full collections, which would otherwise
        scan them all again and again while a fleet's series are new, holding the GIL (and
        stalling the event loop) for a time that grows with the number of series tracked.
        Counted across requests: a Prometheus request holds 500 to 2,000 series. Their cycles are
        broken by hand when an instance is forgotten, so reference counting still frees them."""
        made = self.extractor.series_bound + self.extractor.labels.interned + BASELINE_OBJECTS * self.normaliser.made
        if made - self._frozen_at >= FREEZE_AFTER_NEW_SERIES:
            gc.freeze()
            self._frozen_at = made

    def account(self, decoded: DecodedWrite, stats: IngestStats, seconds: float) -> WriteResult:
        """Count a whole request (`seconds` of work on the ingest thread) in the metrics and say
        what was written."""
        m = self.metrics
        m.count_ingest(stats)
        if decoded.invalid_samples:
            m.samples.labels("rejected").inc(decoded.invalid_samples)
            m.rejected.labels("invalid_series").inc(decoded.invalid_samples)
        for kind, n in (
            ("native_histogram", decoded.histograms),
            ("exemplar", decoded.exemplars),
            ("metadata", decoded.metadata),
        ):
            if n:
                m.ignored_other.labels(kind).inc(n)
        m.decode_seconds.observe(seconds)
        return WriteResult(
            samples_written=decoded.samples - decoded.invalid_samples,
            # Native histograms are valid input that no feature reads: received, not stored.
            histograms_written=decoded.histograms,
            exemplars_written=decoded.exemplars,
            error=decoded.first_error,
            stats=stats,
            refused=decoded.refused,
        )

    def backfill_sync(self, write: DecodedWrite) -> IngestStats:
        """History read back from Prometheus through the same features, baselines and windows as a
        live write, but nothing is scored and no liveness event is sent: it only makes state (an
        incident of an hour ago is not paged now). Samples already taken are duplicates, so
        history that overlaps restored state or live writes counts once."""
        stats = IngestStats()
        rows = self.extractor.ingest(write, stats, time.monotonic())
        self.push_rows(rows, score=False)
        self.liveness.after_write(self.extractor, self._scoring, time.monotonic())
        return stats

    def push_rows(self, rows: list[FeatureRow], *, score: bool = True, arrived: float = 0.0) -> None:
        windows, norm, loops = self.windows, self.normaliser, self.crash_loops
        gaps = restarts = 0
        ready = []
        unconfirmed = self._unconfirmed
        transformed = norm.transform(np.array([row.values for row in rows])) if rows else np.empty((0, 0))
        for row, t in zip(rows, transformed, strict=True):
            if unconfirmed:
                unconfirmed.discard(row.instance)
            gaps += row.gap
            restarts += row.restart
            x, baseline = norm.take(row.instance, t, gap=row.gap)
            w = windows.push(row.instance, row.step_ts_ms, x, restart=row.restart, gap=row.gap)
            loop = loops.step(row.instance, row.step_ts_ms, row.process_restart)
            if w is not None and baseline.ready:
                self._scoring.add(row.instance)
                if not score:
                    continue
                ready.append(
                    ScoreRequest(
                        row.instance,
                        row.step_ts_ms,
                        norm.inputs(baseline, w),
                        row.values,
                        row.upstream,
                        loop,
                        arrived,
                    )
                )
            elif row.restart:
                self._scoring.discard(row.instance)
        if ready:
            self.worker.submit_many(ready)
        if gaps:
            self.metrics.gap_rows.inc(gaps)
        if restarts:
            self.metrics.window_restarts.inc(restarts)
        self.update_instance_gauges()

    def check_stale(self) -> None:
        """Instances that went quiet while the rest of the stream goes on (run it on the ingest thread)."""
        alive = time.monotonic() - self.last_write <= self.liveness.stale_after_s
        watched = self._scoring - self._unconfirmed if self._unconfirmed else self._scoring
        events = self.liveness.check_stale(self.extractor, watched, stream_alive=alive)
        if events:
            self._deliver_liveness(events)
            self.update_instance_gauges()

    def _deliver_liveness(self, events: list[LivenessEvent]) -> None:
        if self.on_liveness is not None:
            self.on_liveness(events)

    def update_instance_gauges(self) -> None:
        total = self.extractor.instances
        down = len(self.liveness.down)
        # Down instances are (almost always) scoring ones: count them without copying the set.
        scoring = len(self._scoring) - sum(1 for k in self.liveness.down if k in self._scoring)
        counts = {"warming": total - scoring - down, "scoring": scoring, "down": down}
        refused = len(self.extractor.refused)
        # Called for every request: the gauges are set only when a count moved.
        if (counts, refused) == self._exported_counts:
            return
        self._exported_counts = counts, refused
        # One plain dict, replaced whole: the event loop reads it for systemd's STATUS= line.
        self.instance_counts = counts
        for state, n in counts.items():
            self.metrics.instances.labels(state).set(n)
        self.metrics.instances_refused.set(refused)

    def evict_idle(self, older_than: float) -> list[InstanceKey]:
        """Forget instances not heard from since `older_than` (monotonic), and the label cache's
        series not seen for as long."""
        gone = self.extractor.evict_idle(older_than)
        self._forget_state(gone)
        if gone:
            self.metrics.instances_evicted.inc(len(gone))
        self.update_instance_gauges()
        now = time.monotonic()
        cache = self.extractor.labels
        let_go = sum(cache.forgotten.values())
        cache.turn_if_idle(now, now - older_than)
        if gone or sum(cache.forgotten.values()) - let_go >= GIVE_BACK_AFTER_FORGETTING or self._grown():
            self._give_back()
        self.update_cache_gauges()
        return gone

    def _grown(self) -> bool:
        """Whether the process grew by GIVE_BACK_AFTER_GROWING since it last gave memory back."""
        after = self._resident_after_give_back
        now = resident_bytes() if after is not None else None
        return after is not None and now is not None and now - after >= GIVE_BACK_AFTER_GROWING

    def _give_back(self) -> None:
        self.metrics.memory_given_back.inc(give_back_memory())
        if self._resident_after_give_back is not None:
            self._resident_after_give_back = resident_bytes()

    def update_cache_gauges(self) -> None:
        cache, m = self.extractor.labels, self.metrics

        m.label_cache_bytes.set(cache.size_bytes)
        m.label_cache_series.set(len(cache))
        for why, n in cache.forgotten.items():
            new = n - self._forgotten_counted.get(why, 0)
            if new:
                m.label_cache_forgotten.labels(why).inc(new)
                self._forgotten_counted[why] = n

    def reset_windows(self, window: int, inputs: InputPlan) -> None:
        """A model with another window or other inputs: every instance warms again."""
        self.windows = WindowStore(window, len(inputs.features), inputs.min_rows)
        if inputs != self.normaliser.plan:
            made = self.normaliser.made
            self.normaliser = Normaliser(inputs, self.step_s)
            self.normaliser.made = made
        self._scoring.clear()
        self._unconfirmed.clear()
        self.update_instance_gauges()

    def is_warming(self, key: InstanceKey) -> bool:
        return key not in self._scoring

    # ---- what the pages show (serve.api); on the ingest thread ------------------------------

    def instance_overview(self) -> tuple[list[tuple[InstanceKey, str]], int]:
        """Every tracked instance with its state (warming, scoring or down), and how many
        instances were refused at ingest.max_instances."""
        down, scoring = self.liveness.down, self._scoring
        out = [
            (k, "down" if k in down else "scoring" if k in scoring else "warming")
            for k in self.extractor.instance_keys()
        ]
        return out, len(self.extractor.refused)

    def instance_window(self, key: InstanceKey) -> tuple[BaselineView, int] | None:
        """The instance's current window against its baseline, and the newest row's step."""
        got = self.windows.rows_of(key)
        if got is None:
            return None
        rows, last_ts = got
        view = self.normaliser.view(key, rows)
        return None if view is None else (view, last_ts)

    # ---- state across restarts (serve.snapshots); on the ingest thread ------------------------

    def instance_states(self, keys: Iterable[InstanceKey]) -> list[dict[str, Any]]:
        """Each instance's whole state, as plain values: features, baseline, window, liveness."""
        now = time.monotonic()
        out = []
        for key in keys:
            st = self.extractor.instance_state(key, now)
            if st is None:  # evicted since the keys were listed
                continue
            st["baseline"] = self.normaliser.state_of(key)
            st["window"] = self.windows.state_of(key)
            st["scoring"] = key in self._scoring
            st["down"] = self.liveness.down.get(key)
            st["restarts"] = self.crash_loops.state_of(key)
            out.append(st)
        return out

    def restore_instances(self, states: Iterable[Mapping[str, Any]]) -> list[InstanceKey]:
        """Bring instances back from `instance_states`; all or none (ValueError, TypeError or
        KeyError on a state that does not fit, or whatever `states` raises, and nothing is kept).
        Returns the instances restored."""
        now = time.monotonic()
        before = set(self.extractor.instance_keys())
        restored: list[InstanceKey] = []
        try:
            for st in states:
                self.extractor.restore_instance(st, now)
                self.freeze_if_grown()
                key = tuple(st["key"])
                restored.append(key)
                if st["baseline"] is not None:
                    self.normaliser.restore(key, st["baseline"])
                if st["window"] is not None:
                    self.windows.restore(key, st["window"])
                if st["scoring"]:
                    self._scoring.add(key)
                    # It has not said whether it is still there: no "no data" alert until it has.
                    self._unconfirmed.add(key)
                if st["down"] is not None:
                    state, since = st["down"]
                    if state not in ("scrape_failing", "no_data"):
                        raise ValueError(f"unknown liveness state {state!r}")
                    self.liveness.down[key] = (state, int(since))
                if st["restarts"]:
                    self.crash_loops.restore(key, st["restarts"])
        except BaseException:
            # Every instance made since, even one a state failed halfway through binding.
            self.forget([k for k in self.extractor.instance_keys() if k not in before])
            raise
        self.update_instance_gauges()
        return restored

    def forget(self, keys: list[InstanceKey]) -> None:
        for key in keys:
            self.extractor.forget(key)
        self._forget_state(keys)
        self.update_instance_gauges()

    def _forget_state(self, keys: list[InstanceKey]) -> None:
        self.windows.forget(keys)
        self.normaliser.forget(keys)
        self._scoring.difference_update(keys)
        self._unconfirmed.difference_update(keys)
        self.liveness.forget(keys)
        self.crash_loops.forget(keys)


class _Write:
    """One request through the ingest path in jobs: its decoding's steps, then its series in
    slices, then the account of it. `run` does what fits in a time budget on the ingest thread."""

    def __init__(self, ingestor: Ingestor, body: bytes, version: Version) -> None:
        self.ingestor = ingestor
        self.arrived = time.monotonic()
        self.steps = ingestor.decode_steps(body, version)
        self.decoded: DecodedWrite | None = None
        self.parts: Iterator[DecodedWrite] = iter(())
        self.stats = IngestStats()
        self.busy = 0.0

    def run(self, budget_s: float) -> WriteResult | None:
        """Work for about `budget_s` (at least one step): the result once done, else None."""
        t0 = time.perf_counter()
        until = t0 + budget_s
        ing = self.ingestor
        try:
            while True:
                if self.decoded is None:
                    try:
                        next(self.steps)
                    except StopIteration as done:
                        self.decoded = done.value
                        self.parts = slices(done.value, INGEST_SLICE_SERIES)
                    ing.freeze_if_grown()
                else:
                    part = next(self.parts, None)
                    if part is None:
                        return ing.account(self.decoded, self.stats, self.busy + time.perf_counter() - t0)
                    ing.ingest(part, self.stats, self.arrived)
                if time.perf_counter() >= until:
                    return None
        finally:
            self.busy += time.perf_counter() - t0


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


def give_back_memory() -> int:
    """Hand freed heap back to the system: without it glibc keeps the pages of objects freed in
    bulk (an expired flood of junk series, the tables a growing fleet outgrew) and the resident
    size never comes down. The resident bytes it gave back (0 where unknown)."""
    if _malloc_trim is None:
        return 0
    before = resident_bytes()
    _malloc_trim(0)
    after = resident_bytes()
    return max(0, before - after) if before is not None and after is not None else 0


def resident_bytes() -> int | None:
    """This process's resident size, where /proc tells it."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


def slices(decoded: DecodedWrite, n: int) -> Iterator[DecodedWrite]:
    """`decoded`'s series, `n` at a time (itself when it has no more than `n`)."""
    if len(decoded.keys) <= n:
        yield decoded
        return
    first = 0
    for i in range(0, len(decoded.keys), n):
        counts = decoded.counts[i : i + n]
        last = first + sum(counts)
        yield DecodedWrite(
            decoded.version,
            decoded.keys[i : i + n],
            counts,
            decoded.timestamps[first:last],
            decoded.values[first:last],
            turns=decoded.turns,
        )
        first = last

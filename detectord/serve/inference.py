"""The inference worker: one thread that owns the model and scores windows in batches.

Windows arrive through a bounded queue from the ingest thread; the worker coalesces them
(up to `max_batch`, waiting at most `max_wait`), pads each batch to a bucket size so the
compiled forward pass is not retraced, and hands scores back to the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import structlog

from detectord.detectors.base import ScoreBatch, Scorer
from detectord.ingest.pipeline import ScoreRequest

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


@dataclass(slots=True)
class ScoredBatch:
    """One scored batch, by column (a result object per window would cost the worker half a
    microsecond each): the requests in the order they were scored and, in the same order, their
    scores, their feature deviations (n, F), and the anomaly class each window resembles where
    the model knows classes."""

    requests: list[ScoreRequest]
    scores: list[float]
    deviation: np.ndarray
    looks_like: list[str | None]

    def __len__(self) -> int:
        return len(self.requests)


class InferenceMetrics(Protocol):
    def observe_batch(self, size: int, padded: int, seconds: float) -> None: ...
    def set_queue_depth(self, depth: int) -> None: ...
    def count_dropped(self, reason: str, n: int) -> None: ...
    def observe_step_delays(self, seconds: np.ndarray) -> None: ...


def bucket_sizes(max_batch: int, smallest: int = 8) -> list[int]:
    sizes, b = [], smallest
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


class InferenceWorker:
    """One thread that owns the model and scores windows from every instance in batches.

    `submit_many` never blocks (a full queue drops and counts); batches are padded to a few fixed
    sizes so the compiled forward pass is never retraced; each scored batch goes back to the event
    loop through `deliver`. `swap` changes the model between batches (a reload).
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        window: int,
        nfeatures: int,
        max_batch: int,
        max_wait: float,
        queue_size: int,
        deliver: Callable[[ScoredBatch], None],
        loop: asyncio.AbstractEventLoop,
        metrics: InferenceMetrics,
    ) -> None:
        self._scorer = scorer
        self._pending_scorer: Scorer | None = None
        self._lock = threading.Lock()
        self.window, self.nfeatures = window, nfeatures
        self.max_batch, self.max_wait = max_batch, max_wait
        self._buckets = bucket_sizes(max_batch)
        # Batch sizes not compiled yet: the worker compiles them while it has nothing to score.
        self._cold = list(self._buckets)
        # A deque under one condition, not queue.Queue: the ingest thread hands over all the
        # windows of a request at once, and the worker takes a whole batch, one lock each.
        self._queue: collections.deque[ScoreRequest] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._taken = 0  # windows taken from the queue whose batch is not yet handed back
        self._stopping = False
        self._deliver, self._loop, self._metrics = deliver, loop, metrics
        self._thread = threading.Thread(target=self._run, name="detectord-inference", daemon=True)
        # Two batch buffers: one is filled while the forward pass may still read the other.
        self._buffers = [np.zeros((max_batch, window, nfeatures), dtype=np.float32) for _ in range(2)]
        self._flip = 0
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def warm_up(self, *, every_size: bool = False) -> None:
        """Compile the smallest batch size (or all of them) before the worker starts. The others
        are compiled by the worker while it has nothing to score, a bucket at a time (on JAX
        about 0.3 s each), or at their first batch: start-up is not held up by them."""
        sizes = self._cold if every_size else self._cold[:1]
        warm_up(self._scorer, sizes, self.window, self.nfeatures)
        del self._cold[: len(sizes)]

    def submit(self, req: ScoreRequest) -> bool:
        """Non-blocking; False (and counted) when the queue is full."""
        return self.submit_many([req]) == 1

    def submit_many(self, reqs: list[ScoreRequest]) -> int:
        """Queue what fits, never blocking; the rest is dropped and counted. Returns how many fit."""
        with self._cond:
            room = self._queue_size - len(self._queue)
            take = reqs if len(reqs) <= room else reqs[: max(room, 0)]
            self._queue.extend(take)
            self._cond.notify()
        if len(take) < len(reqs):
            self._metrics.count_dropped("queue_full", len(reqs) - len(take))
        return len(take)

    def depth(self) -> int:
        return len(self._queue)

    def idle(self) -> bool:
        """Nothing queued and every window taken handed back to `deliver` (or dropped): a queue
        that is empty still has up to two batches on the model."""
        with self._cond:
            return not self._queue and not self._taken

    def swap(self, scorer: Scorer) -> None:
        """Use `scorer` from the next batch on (a reload). The caller has warmed it up."""
        with self._lock:
            self._pending_scorer = scorer

    def stop(self, timeout: float = 10.0) -> None:
        """Score what is queued, then end the thread."""
        if not self._thread.is_alive():
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self, block: bool = True) -> list[ScoreRequest] | None:
        """The next batch: up to max_batch windows, waiting at most max_wait to fill it once one
        is there. None when stopping with nothing left. [] when the worker has better to do than
        wait: compile a batch size (nothing queued), or collect the batch in flight (`block`
        False, and not a full batch queued: only a backlog is worth overlapping, and smaller
        batches would cost more passes)."""
        q, cond = self._queue, self._cond
        with cond:
            if not block and len(q) < self.max_batch:
                return []
            while not q and not self._stopping:
                if self._cold:
                    return []
                cond.wait()
            if not q:
                return None
            deadline = time.monotonic() + self.max_wait
            while block and len(q) < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                cond.wait(remaining)
            n = min(len(q), self.max_batch)
            self._taken += n
            return [q.popleft() for _ in range(n)]

    def _handed_back(self, n: int) -> None:
        with self._cond:
            self._taken -= n

    def _run(self) -> None:
        # A batch is started (on a device, the forward pass runs), then the next one is filled
        # and started before the first is collected: filling and the pass overlap.
        in_flight: _InFlight | None = None
        while (items := self._take(block=in_flight is None)) is not None:
            if not items:
                if in_flight is not None:
                    self._collect(in_flight)
                    in_flight = None
                else:
                    self._warm_one()
                continue
            self._metrics.set_queue_depth(len(self._queue))
            started = self._guarded(items, self._start, items)
            if started is None:  # failed and counted as dropped
                self._handed_back(len(items))
            if in_flight is not None:
                self._collect(in_flight)
            in_flight = started
        if in_flight is not None:
            self._collect(in_flight)

    def _guarded(self, items: list[ScoreRequest], fn: Callable[..., _T], *args: Any) -> _T | None:
        try:
            return fn(*args)
        except Exception:
            # A model that fails on one batch must not take the worker down with it.
            log.exception("inference batch failed", size=len(items))
            self._metrics.count_dropped("inference_error", len(items))
            return None

    def _collect(self, batch: _InFlight) -> None:
        self._guarded(batch.items, self._finish, batch)
        self._handed_back(len(batch.items))

    def _warm_one(self) -> None:
        with self._lock:
            scorer = self._scorer if self._pending_scorer is None else self._pending_scorer
        size = self._cold.pop(0)
        try:
            warm_up(scorer, [size], self.window, self.nfeatures)
        except Exception:
            log.exception("compiling a batch size failed; it is tried again at its first batch", size=size)

    def _start(self, items: list[ScoreRequest]) -> _InFlight:
        with self._lock:
            if self._pending_scorer is not None:
                self._scorer, self._pending_scorer = self._pending_scorer, None
            scorer = self._scorer
        n = len(items)
        size = next(b for b in self._buckets if b >= n)
        if size in self._cold:  # compiled by this batch
            self._cold.remove(size)
        batch = self._buffers[self._flip][:size]
        self._flip ^= 1
        for i, it in enumerate(items):
            batch[i] = it.window
        if size > n:
            batch[n:] = batch[0]  # pad with a real window, whose scores are thrown away
        t0 = time.perf_counter()
        start = getattr(scorer, "start_batch", None)
        if start is not None:
            result = start(batch)
        else:  # a Scorer with score_batch alone
            out = scorer.score_batch(batch)
            result = lambda: out  # noqa: E731
        return _InFlight(items, size, result, t0)

    def _finish(self, batch: _InFlight) -> None:
        items, n = batch.items, len(batch.items)
        out = batch.result()
        scores = np.asarray(out.scores)[:n]
        dev = np.asarray(out.feature_deviation)[:n]
        arrived = np.fromiter([it.arrived for it in items], dtype=np.float64, count=n)
        self._metrics.observe_step_delays(time.monotonic() - arrived[arrived > 0])
        self._metrics.observe_batch(n, batch.size, time.perf_counter() - batch.started)
        self.batches += 1
        like: list[str | None] = [None] * n if out.looks_like is None else list(out.looks_like[:n])
        scored = ScoredBatch(items, scores.tolist(), dev, like)
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self._loop.call_soon_threadsafe(self._deliver, scored)


class _InFlight(NamedTuple):
    """A batch started on the model: its requests, its padded size, what waits for its scores,
    and when it started."""

    items: list[ScoreRequest]
    size: int
    result: Callable[[], ScoreBatch]
    started: float


def warm_up(scorer: Scorer, buckets: list[int], window: int, nfeatures: int) -> None:
    x = np.zeros((max(buckets), window, nfeatures), dtype=np.float32)
    for b in buckets:
        scorer.score_batch(x[:b])

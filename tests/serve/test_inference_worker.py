"""The inference worker on its own: under a backlog it fills the next batch while the previous
one's forward pass runs, without touching the windows that pass still reads; without a backlog
it batches exactly as before (one batch, collected before the next is taken)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry

from detectord.detectors.base import ScoreBatch
from detectord.ingest.pipeline import ScoreRequest
from detectord.serve.inference import InferenceWorker, ScoredBatch
from detectord.serve.metrics import DaemonMetrics

WINDOW, FEATURES = 4, 3


class DeviceLikeScorer:
    """A fake with a device's timing, which a real backend on this machine cannot be made to show
    reliably (JAX on the CPU often finishes before the worker looks): `start_batch` returns at
    once and the windows are read only when the result is collected. A window's score is its
    own value, so a batch buffer rewritten while in flight shows as wrong scores."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start_batch(self, windows: np.ndarray) -> Callable[[], ScoreBatch]:
        k = sum(1 for e, _ in self.events if e == "start")
        self.events.append(("start", k))

        def result() -> ScoreBatch:
            self.events.append(("collect", k))
            return ScoreBatch(windows[:, -1, 0].copy(), np.zeros((len(windows), FEATURES), np.float32), None)

        return result

    def score_batch(self, windows: np.ndarray) -> ScoreBatch:
        return self.start_batch(windows)()


def _requests(values: range) -> list[ScoreRequest]:
    latest = np.zeros(FEATURES, np.float32)
    return [ScoreRequest(("coredns", str(v)), v, np.full((WINDOW, FEATURES), v, np.float32), latest) for v in values]


async def _score(scorer: DeviceLikeScorer, batches_of: list[list[ScoreRequest]], max_batch: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    scored: dict[str, float] = {}
    total = sum(map(len, batches_of))

    def deliver(batch: ScoredBatch) -> None:
        for req, score in zip(batch.requests, batch.scores, strict=True):
            scored[req.instance[1]] = score

    worker = InferenceWorker(
        scorer,
        window=WINDOW,
        nfeatures=FEATURES,
        max_batch=max_batch,
        max_wait=0.05,
        queue_size=10_000,
        deliver=deliver,
        loop=loop,
        metrics=DaemonMetrics(CollectorRegistry(), ("job", "instance")),
    )
    worker.warm_up(every_size=True)
    scorer.events.clear()
    for reqs in batches_of:
        worker.submit_many(reqs)
    worker.start()
    for _ in range(500):
        if len(scored) == total:
            break
        await asyncio.sleep(0.01)
    worker.stop()
    return scored


async def test_a_backlog_overlaps_filling_and_the_forward_pass_and_every_window_keeps_its_score() -> None:
    scorer = DeviceLikeScorer()
    scored = await _score(scorer, [_requests(range(1, 81))], max_batch=8)
    assert scored == {str(v): float(v) for v in range(1, 81)}, "a window scored as another's"
    starts = [k for e, k in scorer.events if e == "start"]
    assert len(starts) == 10
    # Batch k+1 started before batch k was collected: the two overlapped.
    overlapped = [k for k in starts[:-1] if scorer.events.index(("start", k + 1)) < scorer.events.index(("collect", k))]
    assert len(overlapped) >= 5, scorer.events


async def test_without_a_backlog_windows_wait_for_one_batch_and_nothing_overlaps() -> None:
    scorer = DeviceLikeScorer()
    scored = await _score(scorer, [_requests(range(1, 4))], max_batch=8)
    assert scored == {"1": 1.0, "2": 2.0, "3": 3.0}
    assert scorer.events == [("start", 0), ("collect", 0)]

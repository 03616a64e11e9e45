"""Scoring a recording offline, through the very Ingestor that `serve` feeds (decoding, features,
windows), so a model's offline scores are the scores it gives when the recording is replayed live.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from detectord.config import IngestConfig
from detectord.detectors.base import Scorer
from detectord.ingest.features import InstanceKey
from detectord.ingest.metrics import IngestMetrics
from detectord.ingest.normalise import InputPlan
from detectord.ingest.pipeline import Ingestor, ScoreRequest
from detectord.recordings.format import ReadStats, read_records

_NO_LIMIT = 1 << 30


@dataclass
class _Collect:
    """The score sink offline: keeps every full window, in order."""

    requests: list[ScoreRequest] = field(default_factory=list)

    def submit_many(self, reqs: list[ScoreRequest]) -> int:
        self.requests.extend(reqs)
        return len(reqs)


@dataclass
class RecordingWindows:
    requests: list[ScoreRequest]
    read: ReadStats
    bad_requests: int


def recording_windows(
    path: str | Path,
    *,
    step_seconds: float,
    window: int,
    inputs: InputPlan,
    instance_labels: Sequence[str] = IngestConfig.instance_labels,
    max_gap_steps: int = IngestConfig.max_gap_steps,
) -> RecordingWindows:
    """Every full window `serve` would have scored from this recording, with its instance and step.

    Like `serve`, the last steps stay open (no flush): a live receiver never sees them close."""
    sink = _Collect()
    ing = Ingestor(
        step_ms=round(step_seconds * 1000),
        instance_labels=tuple(instance_labels),
        window=window,
        inputs=inputs,
        max_instances=_NO_LIMIT,
        max_gap_steps=max_gap_steps,
        max_decoded=_NO_LIMIT,
        max_future_s=float(IngestConfig.max_future),
        stale_after_s=120.0,
        failed_scrapes=IngestConfig.failed_scrapes,
        crash_loop_restarts=IngestConfig.crash_loop_restarts,
        crash_loop_within_s=float(IngestConfig.crash_loop_within),
        worker=sink,
        metrics=IngestMetrics(CollectorRegistry()),
    )
    stats = ReadStats()
    bad = 0
    try:
        for rec in read_records(path, stats):
            result = ing.write_sync(rec.body, rec.version)
            bad += result.error is not None
    finally:
        ing.close()
    return RecordingWindows(sink.requests, stats, bad)


@dataclass(frozen=True)
class InstanceScores:
    timestamps_ms: np.ndarray  # int64 (N,): the step each scored window ends with
    scores: np.ndarray  # float32 (N,): > 1.0 is anomalous


def score_windows(
    requests: Sequence[ScoreRequest], scorer: Scorer, *, batch_size: int = 512
) -> dict[InstanceKey, InstanceScores]:
    """Scores per instance, in step order."""
    scores = np.empty(len(requests), dtype=np.float32)
    for a in range(0, len(requests), batch_size):
        chunk = requests[a : a + batch_size]
        scores[a : a + len(chunk)] = np.asarray(scorer.score_batch(np.stack([r.window for r in chunk])).scores)
    by: dict[InstanceKey, list[int]] = {}
    for i, r in enumerate(requests):
        by.setdefault(r.instance, []).append(i)
    return {
        k: InstanceScores(np.array([requests[i].step_ts_ms for i in idx], dtype=np.int64), scores[idx])
        for k, idx in by.items()
    }


def iter_rows(scores: dict[InstanceKey, InstanceScores]) -> Iterator[tuple[InstanceKey, int, float]]:
    for key in sorted(scores):
        s = scores[key]
        for t, v in zip(s.timestamps_ms.tolist(), s.scores.tolist(), strict=True):
            yield key, t, v

"""What serving remembers of each instance's recent scores, for the pages and the JSON API: a
compact ring of (step, score) and the latest step's feature deviations, values and class.
"""

from __future__ import annotations

import numpy as np

from detectord.alerting.states import Alert

# Alerts kept per instance for its page (firing and recently resolved).
RECENT_ALERTS = 5


class InstanceScores:
    """One instance's last `capacity` scores (12 bytes each, not a deque of tuples: 10,000
    instances × 240 steps is 29 MB here, 260 MB as tuples) and its latest step's detail."""

    __slots__ = (
        "_pos",
        "alerts",
        "anomalous",
        "count",
        "deviation",
        "latest",
        "looks_like",
        "score",
        "scores",
        "steps",
        "top",
    )

    def __init__(self, capacity: int) -> None:
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.scores = np.zeros(capacity, dtype=np.float32)
        self._pos = 0
        self.count = 0
        self.score = float("nan")  # the latest score, full precision
        self.deviation: np.ndarray | None = None  # (F,) σ of the latest row from the baseline
        self.latest: np.ndarray | None = None  # (F,) the latest raw feature row
        self.looks_like: str | None = None
        # detectord_anomaly (None: no series yet), and the top features shown while it fires.
        self.anomalous: bool | None = None
        self.top: list[tuple[str, float, float]] | None = None
        # The newest last. A tuple, not a deque: most instances never fire, and an empty deque
        # takes 640 bytes, the empty tuple none of its own.
        self.alerts: tuple[Alert, ...] = ()

    @property
    def step(self) -> int | None:
        return None if self.count == 0 else int(self.steps[self._pos - 1])

    def add(self, step_ms: int, score: float) -> None:
        cap = len(self.steps)
        self.score = score
        if cap == 0:
            return
        self.steps[self._pos] = step_ms
        self.scores[self._pos] = score
        self._pos = (self._pos + 1) % cap
        self.count = min(self.count + 1, cap)

    def last(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The newest `n` (all, by default) steps and scores, oldest first."""
        n = self.count if n is None else max(0, min(n, self.count))
        idx = (np.arange(self._pos - n, self._pos)) % max(1, len(self.steps))
        return self.steps[idx], self.scores[idx]

    def pairs(self) -> list[tuple[int, float]]:
        steps, scores = self.last()
        return list(zip(steps.tolist(), scores.tolist(), strict=True))

    def remember(self, alert: Alert) -> None:
        """Keep `alert` (one that began firing) for the page, unless it is the newest kept."""
        if not self.alerts or self.alerts[-1] is not alert:
            self.alerts = (*self.alerts, alert)[-RECENT_ALERTS:]

    def resized(self, capacity: int) -> InstanceScores:
        new = InstanceScores(capacity)
        steps, scores = self.last(capacity)
        for t, s in zip(steps.tolist(), scores.tolist(), strict=True):
            new.add(t, s)
        new.score, new.deviation, new.latest, new.looks_like = self.score, self.deviation, self.latest, self.looks_like
        new.anomalous, new.top = self.anomalous, self.top
        new.alerts = self.alerts
        return new

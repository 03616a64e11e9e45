"""An IsolationForest on the same windows the models see (flattened), fitted on normal training
windows; the score is the forest's anomaly score (−score_samples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detectord.detectors.quality import threshold_for_rate
from detectord.offline.dataset import Data
from detectord.offline.evaluation import Timeline, timelines_from_windows


@dataclass
class IsolationForestComparison:
    name: str = "isolation_forest"
    n_estimators: int = 200
    seed: int = 0
    target_per_day: float = 0.5
    margin: float = 1.0
    threshold: float = 1.0
    _forest: Any = field(default=None, repr=False)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = -self._forest.score_samples(x.reshape(len(x), -1))
        return out.astype(np.float32)

    def fit(self, data: Data) -> None:
        from sklearn.ensemble import IsolationForest

        train = data.train
        normal = train.x[train.clean_normal]
        self._forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed, n_jobs=1)
        self._forest.fit(normal.reshape(len(normal), -1))
        val = data.validation
        m = val.normal
        t, _ = threshold_for_rate(
            self._raw(val.x[m]), val.series_id[m], val.end_ms[m], data.all.step_s, self.target_per_day
        )
        self.threshold = t * self.margin

    def timelines(self, data: Data) -> dict[str, Timeline]:
        return timelines_from_windows(data, self._raw(data.all.x) / self.threshold)

"""Per-feature robust z-score: each feature against the median and MAD of its own trailing window,
the score the largest |z| over features (vmanomaly's MAD model, Grafana's median/MAD bands)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectord.detectors.quality import threshold_for_rate
from detectord.ingest.normalise import BaselineSeries
from detectord.offline.dataset import Data
from detectord.offline.evaluation import Timeline


@dataclass
class RobustZ:
    name: str = "robust_z"
    # The trailing window, in steps (an hour at 5 s steps), and the smallest MAD a feature may
    # have (per feature, in transformed units: the model inputs' floors), so a constant feature
    # does not divide by zero.
    trailing_steps: int = 720
    min_steps: int = 32
    target_per_day: float = 0.5
    margin: float = 1.0
    threshold: float = 1.0

    def raw(self, bs: BaselineSeries, floor: np.ndarray) -> np.ndarray:
        """max_f |x_f - median| / (1.4826 MAD) over the trailing window (not including the step)."""
        x = bs.x.astype(np.float64)
        n = len(x)
        out = np.full(n, np.nan, dtype=np.float32)
        for i in range(self.min_steps, n):
            past = x[max(0, i - self.trailing_steps) : i]
            med = np.median(past, axis=0)
            mad = 1.4826 * np.median(np.abs(past - med), axis=0)
            out[i] = float(np.max(np.abs(x[i] - med) / np.maximum(mad, floor)))
        return out

    def fit(self, data: Data, raws_by_series: dict[str, np.ndarray]) -> None:
        """Calibrate the threshold on the validation role's normal steps (`raw` of every series)."""
        raws, sids, ends = [], [], []
        for sid, info in enumerate(data.series):
            r = raws_by_series[info.name]
            m = np.array([ro == "validation" for ro in info.role], dtype=bool) & (info.label == "") & ~np.isnan(r)
            raws.append(r[m])
            sids.append(np.full(int(m.sum()), sid))
            ends.append(info.timestamps_ms[m])
        t, _ = threshold_for_rate(
            np.concatenate(raws), np.concatenate(sids), np.concatenate(ends), data.all.step_s, self.target_per_day
        )
        self.threshold = t * self.margin

    def timelines(self, data: Data, raws_by_series: dict[str, np.ndarray]) -> dict[str, Timeline]:
        return {
            info.name: Timeline(info.timestamps_ms, (raws_by_series[info.name] / self.threshold).astype(np.float32))
            for info in data.series
        }

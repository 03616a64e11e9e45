"""What every detector offers: scoring raw windows in batches, thresholds, save and load.

`ScoreBatch.scores` are normalised by the detector's threshold, so > 1.0 means anomalous.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .artifact import ModelMeta


@dataclass(frozen=True)
class ScoreBatch:
    scores: np.ndarray  # float32 (B,): raw score / threshold; > 1.0 is anomalous
    # float32 (B, F): signed deviation of each feature from what the model expected, in training
    # standard deviations, averaged over the window's last steps: what moved, and which way.
    feature_deviation: np.ndarray


class Detector(ABC):
    """A model over windows (B, W, F) of raw feature rows, oldest row first.

    `score_batch` is the serving call: one dedicated thread calls it, with batch sizes the
    caller keeps to a few values (it pads), so a compiled forward pass is traced once per size.
    """

    kind: ClassVar[str]
    meta: ModelMeta

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"threshold must be a positive number, got {value}")
        self.meta.threshold = float(value)

    @property
    def window(self) -> int:
        return self.meta.window

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.meta.features)

    @abstractmethod
    def fit(self, windows: np.ndarray, **kwargs: object) -> dict[str, float]:
        """Train on windows of normal behaviour only; returns training statistics."""

    @abstractmethod
    def raw_scores(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores in the model's own units (B,) and feature deviations (B, F)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the artifact directory (metadata and weights)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, meta: ModelMeta) -> Detector:
        """Rebuild from an artifact directory whose metadata has been read and checked."""

    def score_batch(self, windows: np.ndarray) -> ScoreBatch:
        raw, dev = self.raw_scores(windows)
        return ScoreBatch((raw / np.float32(self.threshold)).astype(np.float32, copy=False), dev)

    score = score_batch

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """True where a window is anomalous."""
        return self.score_batch(windows).scores > 1.0

    def infer_threshold(self, windows: np.ndarray, *, quantile: float = 0.9999, margin: float = 1.5,
                        floor: float = 0.0, batch_size: int = 1024) -> float:
        """Set the threshold to `margin` × the `quantile` of raw scores on held-out normal windows,
        but not below `floor` (raw score units)."""
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        raw = self.raw_scores_batched(windows, batch_size)
        self.threshold = max(float(np.quantile(raw, quantile)) * margin, floor)
        return self.threshold

    def raw_scores_batched(self, windows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Raw scores of many windows, in fixed-size batches (the last one padded)."""
        out = np.empty(len(windows), dtype=np.float32)
        for a in range(0, len(windows), batch_size):
            chunk = windows[a : a + batch_size]
            n = len(chunk)
            if n < batch_size and len(windows) > batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
            out[a : a + n] = self.raw_scores(chunk)[0][:n]
        return out

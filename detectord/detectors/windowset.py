"""Labelled windows: what a detector trains, calibrates and is judged on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class WindowSet:
    """Windows of model inputs with what is known about each."""

    x: np.ndarray  # float32 (N, W, F)
    label: np.ndarray  # object (N,): "" normal, a class name, None unlabelled
    series_id: np.ndarray  # int64 (N,): index into `series`
    end_ms: np.ndarray  # int64 (N,): the step each window ends with
    series: list[str]  # "RECORDING/job/instance"
    step_s: float
    # bool (N,): no step of the window lies in an incident or its aftermath (None: all are clean).
    clean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, mask: np.ndarray) -> WindowSet:
        return WindowSet(
            self.x[mask],
            self.label[mask],
            self.series_id[mask],
            self.end_ms[mask],
            self.series,
            self.step_s,
            None if self.clean is None else self.clean[mask],
        )

    @property
    def clean_normal(self) -> np.ndarray:
        """Normal windows with nothing of an incident in them (what an autoencoder learns normal from)."""
        return self.normal & (self.clean if self.clean is not None else True)

    @property
    def anomalous(self) -> np.ndarray:
        return np.array([lb is not None and lb != "" for lb in self.label], dtype=bool)

    @property
    def normal(self) -> np.ndarray:
        return np.array([lb == "" for lb in self.label], dtype=bool)

    def classes(self) -> list[str]:
        return sorted({str(lb) for lb in self.label if lb})

    def labelled(self, classes: Sequence[str] | None = None) -> WindowSet:
        """The windows with a label: normal, or (if `classes` is given) one of those classes."""
        keep = [lb is not None and (classes is None or lb == "" or lb in classes) for lb in self.label]
        return self.subset(np.array(keep, dtype=bool))

    def instance_days(self, step_s: float | None = None) -> float:
        return len(self) * (step_s or self.step_s) / 86400.0

    @staticmethod
    def concat(sets: Sequence[WindowSet]) -> WindowSet:
        if not sets:
            raise ValueError("nothing to concatenate")
        names: list[str] = []
        ids = []
        for s in sets:
            index = {n: i for i, n in enumerate(names)}
            mapping = []
            for n in s.series:
                if n not in index:
                    index[n] = len(names)
                    names.append(n)
                mapping.append(index[n])
            ids.append(np.asarray(mapping, dtype=np.int64)[s.series_id] if len(s) else s.series_id)
        return WindowSet(
            np.concatenate([s.x for s in sets]),
            np.concatenate([s.label for s in sets]),
            np.concatenate(ids),
            np.concatenate([s.end_ms for s in sets]),
            names,
            sets[0].step_s,
            np.concatenate([s.clean if s.clean is not None else np.ones(len(s), bool) for s in sets]),
        )

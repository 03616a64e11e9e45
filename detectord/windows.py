"""Per-instance sliding windows (the FIFO stack): preallocated ring buffers of feature rows.

An instance is "warming" until its window is full; only full windows are scored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .features import FeatureRow, InstanceKey


class _Ring:
    __slots__ = ("buf", "pos", "count", "last_ts")

    def __init__(self, window: int, nfeatures: int) -> None:
        self.buf = np.zeros((window, nfeatures), dtype=np.float32)
        self.pos = 0  # where the next row goes; also the oldest row once full
        self.count = 0
        self.last_ts = 0


class WindowStore:
    """Ring buffers keyed by instance. Owned by the ingest thread."""

    def __init__(self, window: int, nfeatures: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.window = window
        self.nfeatures = nfeatures
        self._rings: dict[InstanceKey, _Ring] = {}
        self.gap_rows = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._rings)

    def __contains__(self, key: InstanceKey) -> bool:
        return key in self._rings

    @property
    def warming(self) -> int:
        return sum(1 for r in self._rings.values() if r.count < self.window)

    def push(self, row: FeatureRow) -> np.ndarray | None:
        """Append a row; return the instance's full window (oldest first, a copy) or None while warming."""
        ring = self._rings.get(row.instance)
        if ring is None:
            ring = self._rings[row.instance] = _Ring(self.window, self.nfeatures)
        elif row.restart:
            ring.count = 0
            ring.pos = 0
            self.restarts += 1
        if row.gap:
            self.gap_rows += 1
        ring.buf[ring.pos] = row.values
        ring.pos = (ring.pos + 1) % self.window
        ring.count = min(ring.count + 1, self.window)
        ring.last_ts = row.step_ts_ms
        if ring.count < self.window:
            return None
        if ring.pos == 0:
            full: np.ndarray = ring.buf.copy()
            return full
        out: np.ndarray = np.concatenate((ring.buf[ring.pos:], ring.buf[:ring.pos]))
        return out

    def is_warming(self, key: InstanceKey) -> bool:
        ring = self._rings.get(key)
        return ring is None or ring.count < self.window

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        for k in keys:
            self._rings.pop(k, None)

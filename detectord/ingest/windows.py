"""Per-instance sliding windows (the FIFO stack): preallocated ring buffers of transformed rows.

An instance is "warming" until its window holds `min_rows` rows (by default: until it is full);
a window not yet full repeats its oldest row in front, as training cuts windows at a series' start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from detectord.ingest.features import InstanceKey


class _Ring:
    __slots__ = ("buf", "count", "last_ts", "pos")

    def __init__(self, window: int, nfeatures: int) -> None:
        self.buf = np.zeros((window, nfeatures), dtype=np.float32)
        self.pos = 0  # where the next row goes; also the oldest row once full
        self.count = 0
        self.last_ts = 0


class WindowStore:
    """Ring buffers keyed by instance. Owned by the ingest thread."""

    def __init__(self, window: int, nfeatures: int, min_rows: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.window = window
        self.min_rows = window if min_rows is None else max(1, min(min_rows, window))
        self.nfeatures = nfeatures
        self._rings: dict[InstanceKey, _Ring] = {}
        self.gap_rows = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._rings)

    def __contains__(self, key: InstanceKey) -> bool:
        return key in self._rings

    def push(
        self, key: InstanceKey, step_ts_ms: int, values: np.ndarray, *, restart: bool = False, gap: bool = False
    ) -> np.ndarray | None:
        """Append a row; return the instance's window (oldest first, a copy) or None while warming."""
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(self.window, self.nfeatures)
        elif restart:
            ring.count = 0
            ring.pos = 0
            self.restarts += 1
        if gap:
            self.gap_rows += 1
        ring.buf[ring.pos] = values
        ring.pos = (ring.pos + 1) % self.window
        ring.count = min(ring.count + 1, self.window)
        ring.last_ts = step_ts_ms
        if ring.count < self.min_rows:
            return None
        if ring.count < self.window:
            # Not full yet (rows 0..count-1 hold the segment): its oldest row stands in for the rest.
            return np.concatenate((np.repeat(ring.buf[:1], self.window - ring.count, axis=0), ring.buf[: ring.count]))
        if ring.pos == 0:
            full: np.ndarray = ring.buf.copy()
            return full
        out: np.ndarray = np.concatenate((ring.buf[ring.pos :], ring.buf[: ring.pos]))
        return out

    def rows_of(self, key: InstanceKey) -> tuple[np.ndarray, int] | None:
        """The instance's rows so far (oldest first, at most a window) and the newest one's step."""
        ring = self._rings.get(key)
        if ring is None or ring.count == 0:
            return None
        if ring.count < self.window:
            return ring.buf[: ring.count].copy(), ring.last_ts
        return np.concatenate((ring.buf[ring.pos :], ring.buf[: ring.pos])), ring.last_ts

    def state_of(self, key: InstanceKey) -> tuple[bytes, int, int, int] | None:
        """The instance's ring as plain values: rows, next position, row count, last step."""
        ring = self._rings.get(key)
        return None if ring is None else (ring.buf.tobytes(), ring.pos, ring.count, ring.last_ts)

    def restore(self, key: InstanceKey, state: Sequence[Any]) -> None:
        data, pos, count, last_ts = state
        ring = _Ring(self.window, self.nfeatures)
        if len(data) != ring.buf.nbytes or not 0 <= int(pos) < self.window or not 0 <= int(count) <= self.window:
            raise ValueError(f"the window does not fit {self.window} steps of {self.nfeatures} features")
        ring.buf[:] = np.frombuffer(data, dtype=np.float32).reshape(ring.buf.shape)
        ring.pos, ring.count, ring.last_ts = int(pos), int(count), int(last_ts)
        self._rings[key] = ring

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        for k in keys:
            self._rings.pop(k, None)

"""Dead is an anomaly: an instance that was scoring and whose scrapes now fail (Prometheus writes
`up == 0`, `failed_scrapes` times in a row), or whose series stopped while the rest of the
fleet's still arrive, is down; it is up again when its feature samples return. No model can see
this: a dead instance makes no windows. Nor one that dies and is restarted between two scrapes,
over and over: its counters' resets show it (`CrashLoops`).

Owned by the ingest thread, beside the extractor it reads.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Literal

from detectord.ingest.features import FeatureExtractor, InstanceKey

State = Literal["scrape_failing", "no_data", "up"]


@dataclass(frozen=True, slots=True)
class LivenessEvent:
    """One step of a down instance (or the step it came back at), for its alert."""

    instance: InstanceKey
    ts_ms: int  # the step's data time: the `up` sample's, or now for no data
    state: State
    since_ms: int  # when it went down


class LivenessTracker:
    """Which watched instances are down, and since when. `watched` are those that have scored: an
    instance that never did has no normal to have left."""

    def __init__(self, stale_after_s: float, failed_scrapes: int) -> None:
        self.stale_after_s = stale_after_s
        # Consecutive failed scrapes that make an instance down (one timed-out scrape is no page).
        self.failed_scrapes = failed_scrapes
        self.down: dict[InstanceKey, tuple[State, int]] = {}

    def after_write(self, ext: FeatureExtractor, watched: set[InstanceKey], write_time: float) -> list[LivenessEvent]:
        """After one ingest call at monotonic `write_time`: failing scrapes, and data back."""
        out: list[LivenessEvent] = []
        for key in ext.up_seen:
            lv = ext.liveness(key)
            if lv is None or lv.up != 0.0:
                continue
            if key not in self.down and (key not in watched or lv.failing < self.failed_scrapes):
                continue
            since = self._went(key, "scrape_failing", lv.failing_since_ms)
            out.append(LivenessEvent(key, lv.up_ts_ms, "scrape_failing", since))
        for key, (_, since) in list(self.down.items()):
            lv = ext.liveness(key)
            if lv is not None and lv.last_data >= write_time and lv.up != 0.0:
                del self.down[key]
                out.append(LivenessEvent(key, _wall_ms(), "up", since))
        return out

    def check_stale(
        self, ext: FeatureExtractor, watched: set[InstanceKey], *, stream_alive: bool
    ) -> list[LivenessEvent]:
        """Periodically: watched instances without feature samples for `stale_after_s`, while the
        stream is alive (otherwise it is Prometheus, or the path to us, that is down)."""
        if not stream_alive:
            return []
        now, now_ms = time.monotonic(), _wall_ms()
        out: list[LivenessEvent] = []
        for key in chain(watched, [k for k in self.down if k not in watched]):
            lv = ext.liveness(key)
            if lv is None or lv.up == 0.0 or now - lv.last_data <= self.stale_after_s:
                continue
            last_ms = now_ms - int((now - lv.last_data) * 1000)
            since = self._went(key, "no_data", last_ms)
            out.append(LivenessEvent(key, now_ms, "no_data", since))
        return out

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        for k in keys:
            self.down.pop(k, None)

    def _went(self, key: InstanceKey, state: State, at_ms: int) -> int:
        was = self.down.get(key)
        since = was[1] if was is not None else at_ms
        self.down[key] = (state, since)
        return since


@dataclass(frozen=True, slots=True)
class CrashLoop:
    """An instance in a crash loop: `restarts` process restarts within `within_s`, the first at `since_ms`."""

    restarts: int
    within_s: float
    since_ms: int


class CrashLoops:
    """Which instances are in a crash loop, Kubernetes' KubePodCrashLooping seen from the metrics:
    `restarts` process restarts (their counters reset) within `within_s`. The loop is over once the
    instance has run one and a half times its longest interval between them (at most `within_s`)
    without another. Stepped with every feature row of an instance, in order; serving and the
    offline evaluation both use it.
    """

    def __init__(self, restarts: int, within_s: float) -> None:
        if restarts < 2:
            raise ValueError(f"a crash loop needs >= 2 restarts, got {restarts}")
        # Plain values: a reload may set them.
        self.restarts = restarts
        self.within_s = within_s
        # Recent restarts (row timestamps), only of instances that restarted within `within_s`.
        self._seen: dict[InstanceKey, deque[int]] = {}

    def step(self, key: InstanceKey, ts_ms: int, restarted: bool) -> CrashLoop | None:
        seen = self._seen.get(key)
        if restarted:
            if seen is None:
                seen = self._seen[key] = deque()
            seen.append(ts_ms)
        if seen is None:
            return None
        within_ms = int(self.within_s * 1000)
        while seen and seen[0] <= ts_ms - within_ms:
            seen.popleft()
        if not seen:
            del self._seen[key]
            return None
        if len(seen) < self.restarts:
            return None
        longest = max(b - a for a, b in pairwise(seen))
        if ts_ms - seen[-1] > min(within_ms, 1.5 * longest):
            return None
        return CrashLoop(len(seen), self.within_s, seen[0])

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        for k in keys:
            self._seen.pop(k, None)

    def state_of(self, key: InstanceKey) -> list[int] | None:
        seen = self._seen.get(key)
        return None if seen is None else list(seen)

    def restore(self, key: InstanceKey, restarts: Iterable[int]) -> None:
        seen = deque(sorted(int(t) for t in restarts))
        if seen:
            self._seen[key] = seen


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000

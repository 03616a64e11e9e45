"""When an alert is pending, fires and resolves: Prometheus's `for` and `keep_firing_for`, counted
in data time. The one definition used by serving, by every evaluation and by the mixin rules.

An alert goes pending at its first anomalous step and fires at the first anomalous step at least
`for` after that (at `for: 10s` and 5 s steps: the third); a normal step while pending clears
it. A firing alert resolves at the first normal step at least `keep_firing_for` after the first
normal step of the quiet spell, unless an anomalous step comes first. Steps that were not
observed (nothing scored, the instance warming) change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

Phase = Literal["inactive", "pending", "firing"]
# What one step did to an alert: nothing, or one of these.
Change = Literal["", "pending", "fired", "resolved", "cleared"]

INACTIVE, PENDING, FIRING = 0, 1, 2
PHASES: tuple[Phase, ...] = ("inactive", "pending", "firing")


@dataclass(frozen=True)
class AlertRule:
    """`for` and `keep_firing_for` in seconds, as in a Prometheus alerting rule."""

    for_s: float = 0.0
    keep_firing_for_s: float = 0.0

    def __post_init__(self) -> None:
        if self.for_s < 0 or self.keep_firing_for_s < 0:
            raise ValueError(f"for and keep_firing_for must be >= 0, got {self.for_s}, {self.keep_firing_for_s}")


@dataclass(slots=True)
class AlertTimer:
    """One alert's clock. Call `step` once per observed step, in time order."""

    rule: AlertRule
    phase: Phase = "inactive"
    active_at: float = 0.0  # the step it went pending at
    fired_at: float = 0.0  # the step it began firing at
    quiet_since: float | None = None  # first normal step while firing

    def step(self, ts: float, anomalous: bool) -> Change:
        """Advance to the step at data time `ts` (seconds); return what changed."""
        rule = self.rule
        if anomalous:
            self.quiet_since = None
            if self.phase == "inactive":
                self.phase, self.active_at = "pending", ts
                if ts - self.active_at >= rule.for_s:
                    self.phase, self.fired_at = "firing", ts
                    return "fired"
                return "pending"
            if self.phase == "pending" and ts - self.active_at >= rule.for_s:
                self.phase, self.fired_at = "firing", ts
                return "fired"
            return ""
        if self.phase == "pending":
            self.phase = "inactive"
            return "cleared"
        if self.phase == "firing":
            if self.quiet_since is None:
                self.quiet_since = ts
            if ts - self.quiet_since >= rule.keep_firing_for_s:
                self.phase, self.quiet_since = "inactive", None
                return "resolved"
        return ""


@dataclass
class Resemblance:
    """The incident class an alert names: the one its anomalous steps resembled most often so far
    (ties go to the latest). A window that has just turned anomalous is mostly healthy rows and
    its class is a guess; the tally settles within a few steps."""

    _counts: dict[str, int] = field(default_factory=dict)
    _best: str | None = None

    def add(self, name: str | None) -> str | None:
        """Count one anomalous step's class; None (a model that names none) names nothing."""
        if not name:
            return None
        n = self._counts[name] = self._counts.get(name, 0) + 1
        if self._best is None or n >= self._counts[self._best]:
            self._best = name
        return self._best


def phases(
    timestamps_ms: npt.ArrayLike, anomalous: npt.ArrayLike, rule: AlertRule, observed: npt.ArrayLike | None = None
) -> npt.NDArray[np.int8]:
    """The phase (INACTIVE, PENDING or FIRING) after each step of one series, steps in time
    order; where `observed` is False the step is skipped and the phase carries over."""
    ts = np.asarray(timestamps_ms, dtype=np.int64)
    an = np.asarray(anomalous, dtype=bool)
    seen = np.ones(len(ts), dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    out = np.zeros(len(ts), dtype=np.int8)
    timer = AlertTimer(rule)
    code = INACTIVE
    for i, (t, a, ok) in enumerate(zip(ts.tolist(), an.tolist(), seen.tolist(), strict=True)):
        if ok:
            timer.step(t / 1000.0, a)
            code = PHASES.index(timer.phase)
        out[i] = code
    return out


def firing(
    timestamps_ms: npt.ArrayLike, anomalous: npt.ArrayLike, rule: AlertRule, observed: npt.ArrayLike | None = None
) -> npt.NDArray[np.bool_]:
    """Per step: the alert is firing (see `phases`)."""
    out: npt.NDArray[np.bool_] = phases(timestamps_ms, anomalous, rule, observed) == FIRING
    return out

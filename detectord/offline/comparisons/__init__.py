"""The comparisons: what every detector is measured against, on the same data and the same evaluation:
the CoreDNS mixin's alert rules, a per-feature robust z-score, and an IsolationForest. Their
thresholds are calibrated for the same false-alert target as the models', with no margin added
(the models add 20 to 50 %): where that favours anyone, it favours the comparisons."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from detectord.offline.dataset import Data
from detectord.offline.evaluation import Timeline

if TYPE_CHECKING:
    from detectord.offline.comparisons.mixin import RuleResult

Comparison = Callable[[Data, float], dict[str, Timeline]]


def robust_z(data: Data, target_per_day: float) -> dict[str, Timeline]:
    from detectord.offline.comparisons.robust_z import RobustZ

    series = data.baseline_series()
    floor = np.array([s.floor for s in data.recordings[0].inputs.specs], dtype=np.float64)
    b = RobustZ(target_per_day=target_per_day)
    raws = {info.name: b.raw(series[info.name], floor) for info in data.series}
    b.fit(data, raws)
    return b.timelines(data, raws)


def isolation_forest(data: Data, target_per_day: float) -> dict[str, Timeline]:
    from detectord.offline.comparisons.isolation_forest import IsolationForestComparison

    b = IsolationForestComparison(target_per_day=target_per_day)
    b.fit(data)
    return b.timelines(data)


@functools.lru_cache(maxsize=32)
def _rule_results(path: str, step_s: float, mtime_ns: int) -> dict[str, RuleResult]:
    """Every rule set on one recording: replaying it into Prometheus is the slow part, done once."""
    from detectord.offline.comparisons.mixin import evaluate_rules

    return evaluate_rules(path, step_s=step_s)


def _rules(ruleset: str) -> Comparison:
    def run(data: Data, target_per_day: float) -> dict[str, Timeline]:
        """Alert rules have no threshold to calibrate: they fire or they do not (score 2 or 0)."""
        out = {}
        for rec in data.recordings:
            result = _rule_results(str(rec.path), rec.step_s, rec.path.stat().st_mtime_ns)[ruleset]
            for key, alerts in result.instances.items():
                out["/".join((rec.name, *key))] = Timeline(
                    alerts.timestamps_ms, np.where(alerts.firing, 2.0, 0.0).astype(np.float32)
                )
        return out

    return run


COMPARISONS: dict[str, Comparison] = {
    "mixin": _rules("mixin"),
    "mixin_tuned": _rules("mixin_tuned"),
    "robust_z": robust_z,
    "isolation_forest": isolation_forest,
}

"""One alert timing for everyone: serving's AlertStates, the offline evaluation and the mixin
comparison see the same score series and agree on every step it is pending, firing and resolved;
and that timing is Prometheus's."""

from __future__ import annotations

import numpy as np
import pytest

from detectord.alerting.timing import FIRING, INACTIVE, PENDING, AlertRule
from detectord.config import Duration
from detectord.offline.comparisons.mixin import hold_for
from detectord.offline.evaluation import alert_phases
from tests.support import KEY, LABELS, TOP, states

STEP_S = 5.0
# Scores at 5 s steps: a blip, a run of three, a flapping incident, a long one; NaN where the
# instance was not scored (warming again after a gap) in the middle of the long one.
SCORES = np.array(
    [
        0.2,
        1.5,
        0.3,
        1.2,
        1.3,
        1.4,
        0.5,
        0.4,
        2.0,
        0.1,
        2.0,
        2.0,
        0.2,
        0.3,
        0.1,
        0.2,
        0.3,
        3.0,
        3.0,
        3.0,
        np.nan,
        np.nan,
        3.0,
        3.0,
        0.5,
        0.5,
        0.5,
        0.5,
        0.5,
        0.5,
        0.5,
        0.5,
    ],
    dtype=np.float32,
)
TS_MS = (np.arange(len(SCORES)) + 1) * int(STEP_S * 1000)
RULES = [(0, 0), (0, 10), (5, 0), (10, 0), (10, 15), (15, 30), (60, 0), (0, 60)]


def serving(for_s: float, keep_s: float) -> tuple[np.ndarray, list[int], list[int]]:
    """Phase after each step, and the steps an alert fired and resolved at, as serving has them."""
    s = states(for_=Duration(for_s), keep_firing_for=Duration(keep_s))
    out = np.zeros(len(SCORES), dtype=np.int8)
    fired: list[int] = []
    resolved: list[int] = []
    code = INACTIVE
    for i, (t, score) in enumerate(zip(TS_MS.tolist(), SCORES.tolist(), strict=True)):
        if not np.isnan(score):  # serving observes scored steps only
            for alert in s.observe(KEY, LABELS, t / 1000, score, 0.042, TOP):
                (resolved if alert.resolved else fired).append(i)
            code = {"inactive": INACTIVE, "pending": PENDING, "firing": FIRING}[s.state_of(KEY)]
        out[i] = code
    return out, fired, resolved


def starts_and_ends(firing: np.ndarray) -> tuple[list[int], list[int]]:
    f = firing.astype(np.int8)
    edges = np.diff(np.concatenate(([0], f)))
    return np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()


@pytest.mark.parametrize(("for_s", "keep_s"), RULES)
def test_serving_and_the_evaluation_agree_on_every_step(for_s: float, keep_s: float) -> None:
    served, fired, resolved = serving(for_s, keep_s)
    evaluated = alert_phases(SCORES, TS_MS, AlertRule(for_s, keep_s))
    assert evaluated.tolist() == served.tolist()
    assert starts_and_ends(evaluated == FIRING) == (fired, resolved)


@pytest.mark.parametrize("for_s", [0, 5, 10, 15, 60])
def test_the_mixin_rules_fire_as_serving_would(for_s: float) -> None:
    # A rule's alert series exists at the steps its expression returns something: here, the
    # anomalous ones; the mixin's rules have no keep_firing_for.
    observed = ~np.isnan(SCORES)
    active = np.nan_to_num(SCORES, nan=0.0) > 1.0
    served, _, _ = serving(for_s, 0)
    mixin = hold_for(active[observed], TS_MS[observed], for_s)
    assert mixin.tolist() == (served[observed] == FIRING).tolist()


def test_the_timing_is_prometheus_s() -> None:
    # At `for: 10s` and 5 s steps an alert fires at its third anomalous step (ts - activeAt >= for),
    # not its second; a run of three anomalous steps at `for: 15s` never fires. Time is data time:
    # the unscored steps in the long incident count towards `for`.
    phases, fired, _ = serving(10, 0)
    assert phases[3:6].tolist() == [PENDING, PENDING, FIRING] and fired == [5, 19]
    assert serving(15, 0)[1] == [22]
    # keep_firing_for merges the flaps into one alert, resolved at the first normal step
    # `keep_firing_for` after the quiet began.
    _, fired, resolved = serving(0, 10)
    assert fired == [1, 17] and resolved == [14, 26]

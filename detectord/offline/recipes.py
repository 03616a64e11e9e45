"""How a model is made for each scrape interval we ship: window, baseline buckets, how soon a new
instance scores, how many rows a score reads, and the phases training data is also cut at.

Everything is chosen in time, not steps: a window spans 2-8 minutes, the baseline's horizon about
3 hours or more, a new (or restarted) instance scores within 3 minutes at every step, and a score
reads about the last 30 s (at least the newest row), so an alert resolves within a step or two of
recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from detectord.detectors.model_set import fmt_step as step_name
from detectord.ingest.normalise import BaselineConfig

__all__ = ["FIRST_SCORE_S", "HOLD_Z", "RECIPES", "SHIPPED_STEPS", "Recipe", "recipe_for", "step_name"]

# Windows are multiples of 4 (the autoencoder's two strided layers) and at least 8 steps.
_MIN_WINDOW = 8
# A bucket this many spreads off is held out of the baseline (for up to an hour): an ongoing
# incident must not become the normal (see BaselineConfig.hold_z).
HOLD_Z = 4.0
# A new instance scores within this long of its first row (its baseline and window warm by then).
FIRST_SCORE_S = 180.0


@dataclass(frozen=True)
class Recipe:
    step_s: float
    window: int
    baseline: BaselineConfig
    min_rows: int | None
    # Per-kind settings that depend on the step (merged under a tuned config's).
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    phases: tuple[float, ...] = ()

    @property
    def first_score_s(self) -> float:
        rows = self.window if self.min_rows is None else self.min_rows
        return max(rows, self.baseline.warm_steps) * self.step_s


def _recipe(step_s: float, window: int, bucket_steps: int, min_buckets: int, read: int, trim: int) -> Recipe:
    rows = max(1, math.floor(FIRST_SCORE_S / step_s + 1e-9))
    per_kind = {
        "conv_autoencoder": {"score_steps": read, "trim": trim},
        "conv_classifier": {"explain_steps": read},
        "siamese": {"explain_steps": read},
    }
    return Recipe(
        step_s,
        window,
        BaselineConfig(bucket_steps=bucket_steps, buckets=128, min_buckets=min_buckets, hold_z=HOLD_Z),
        None if rows >= window else rows,
        per_kind,
        # Four other cuts of the same traffic, spread over a step.
        tuple(round(step_s * k / 5, 3) for k in range(1, 5)),
    )


# step (s) -> recipe. 5 s is the lab's historic step; the others are Prometheus scrape intervals
# people use (60 s is Prometheus's default).
RECIPES: dict[float, Recipe] = {
    5.0: _recipe(5.0, window=32, bucket_steps=16, min_buckets=2, read=6, trim=1),
    10.0: _recipe(10.0, window=16, bucket_steps=8, min_buckets=2, read=3, trim=1),
    15.0: _recipe(15.0, window=12, bucket_steps=6, min_buckets=2, read=2, trim=1),
    30.0: _recipe(30.0, window=8, bucket_steps=3, min_buckets=2, read=1, trim=0),
    60.0: _recipe(60.0, window=8, bucket_steps=3, min_buckets=1, read=1, trim=0),
}
SHIPPED_STEPS: tuple[float, ...] = tuple(RECIPES)


def recipe_for(step_s: float) -> Recipe:
    """The recipe of a shipped step, or one made by the same rules in time for another step:
    windows of about 200 s (at least 8 steps), buckets of about 90 s, a first score within 3
    minutes, scores read from the last 30 s."""
    for s, r in RECIPES.items():
        if math.isclose(s, step_s, rel_tol=1e-9):
            return r
    rows = max(1, math.floor(FIRST_SCORE_S / step_s + 1e-9))
    window = max(_MIN_WINDOW, 4 * round(200 / step_s / 4))
    bucket_steps = min(rows, max(1, round(90 / step_s)))
    read = max(1, math.floor(30 / step_s))
    return _recipe(
        step_s,
        window=window,
        bucket_steps=bucket_steps,
        min_buckets=2 if 2 * bucket_steps <= rows else 1,
        read=read,
        trim=1 if read > 1 else 0,
    )

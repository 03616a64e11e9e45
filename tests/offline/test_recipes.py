"""Each step's recipe sets windows and warm-up in time, not steps: at every scrape interval a new
instance scores within 3 minutes, a window spans minutes, a score reads about the last 30 s."""

from __future__ import annotations

import pytest

from detectord.offline.recipes import FIRST_SCORE_S, RECIPES, SHIPPED_STEPS, recipe_for, step_name


@pytest.mark.parametrize("step", [*SHIPPED_STEPS, 20.0, 45.0, 120.0], ids=lambda s: f"{s:g}s")
def test_a_recipe_is_set_in_time(step: float) -> None:
    r = recipe_for(step)
    assert r.step_s == step and r.window >= 8 and r.window % 4 == 0
    assert r.first_score_s <= FIRST_SCORE_S + 1e-9, r
    if step <= 60:
        assert 120 <= r.window * step <= 480, r.window * step
    read = int(r.configs["conv_autoencoder"]["score_steps"])
    assert read == 1 or read * step <= 30, (read, step)
    assert r.baseline.hold_z > 0 and r.baseline.buckets * r.baseline.bucket_steps * step >= 2.5 * 3600
    assert all(0 < p < step for p in r.phases)


def test_the_shipped_steps_and_their_names() -> None:
    assert SHIPPED_STEPS == (5.0, 10.0, 15.0, 30.0, 60.0)
    assert [step_name(s) for s in SHIPPED_STEPS] == ["5s", "10s", "15s", "30s", "1m"]
    assert recipe_for(15.0) is RECIPES[15.0]

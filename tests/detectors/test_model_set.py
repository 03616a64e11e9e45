"""The shipped model set: a model for every common scrape interval, each made by its step's recipe,
the one for `ingest.step` picked automatically, and a step it has no model for refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectord.config import ModelConfig
from detectord.detectors import StepNotCovered, load_model
from detectord.detectors.artifact import META_FILE, ArtifactError, read_meta
from detectord.detectors.model_set import model_set, pick
from detectord.ingest.normalise import InputPlan
from detectord.offline.recipes import FIRST_SCORE_S, RECIPES, SHIPPED_STEPS, step_name
from tests.support import REPO

DEFAULT = REPO / "models" / "default"


@pytest.mark.parametrize("step", SHIPPED_STEPS, ids=step_name)
def test_the_shipped_set_has_each_steps_model_made_by_its_recipe(step: float) -> None:
    path = pick(DEFAULT, step)
    assert path == DEFAULT / step_name(step)
    meta = read_meta(path)
    recipe = RECIPES[step]
    assert meta.step_seconds == step and meta.window == recipe.window
    plan = InputPlan.from_dict(meta.inputs)
    assert plan.baseline == recipe.baseline and plan.min_rows == recipe.min_rows
    # Scores a new instance within 3 minutes, whatever the step.
    assert max(plan.rows_needed(meta.window), plan.baseline.warm_steps) * step <= FIRST_SCORE_S
    assert (path / "MODEL_CARD.md").is_file()
    assert (DEFAULT / "MODEL_CARD.md").is_file()


def test_a_set_without_a_step_picks_1m_and_any_step_picks_the_nearest() -> None:
    assert pick(DEFAULT, None) == DEFAULT / "1m"
    assert pick(DEFAULT, 20.0, any_step=True) == DEFAULT / "15s"
    assert pick(DEFAULT, 1.0, any_step=True) == DEFAULT / "5s"
    assert pick(DEFAULT, 120.0, any_step=True) == DEFAULT / "1m"
    with pytest.raises(StepNotCovered, match=r"20s steps; it has 5s, 10s, 15s, 30s, 1m"):
        pick(DEFAULT, 20.0)


def _fake(path: Path, step: float) -> None:
    path.mkdir(parents=True)
    (path / META_FILE).write_text(json.dumps({"step_seconds": step}))


def test_a_broken_set_is_refused_with_its_reason(tmp_path: Path) -> None:
    _fake(tmp_path / "a", 15.0)
    _fake(tmp_path / "b", 15.0)
    with pytest.raises(ArtifactError, match="two models for 15s steps: a, b"):
        model_set(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="neither a model artifact"):
        model_set(empty)


def test_one_artifact_runs_at_its_own_step_only_unless_any_step() -> None:
    one = DEFAULT / "15s"
    assert load_model(ModelConfig(path=one), 15.0).step_seconds == 15.0
    with pytest.raises(StepNotCovered, match="it has 15s"):
        load_model(ModelConfig(path=one), 5.0)
    assert load_model(ModelConfig(path=one, any_step=True), 5.0).step_seconds == 15.0


def test_serve_refuses_a_step_its_model_set_lacks_and_says_which_it_has(tmp_path: Path) -> None:
    cfg = tmp_path / "detectord.yml"
    cfg.write_text(f"ingest:\n  step: 20s\nmodel:\n  path: {DEFAULT}\n")
    check = subprocess.run(
        [sys.executable, "-m", "detectord", "check", "config", str(cfg)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 2
    assert "no model here is made for 20s steps; it has 5s, 10s, 15s, 30s, 1m" in check.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "detectord", "serve", "--config.file", str(cfg), "--web.listen-address", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode != 0
    assert "it has 5s, 10s, 15s, 30s, 1m" in serve.stdout + serve.stderr

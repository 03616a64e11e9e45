"""`detectord train --init MODEL` fine-tunes a shipped model on a fleet's own recordings (normal
data, no truth: what `detectord export` gives) instead of training one afresh: the same kind,
window, step, input plan and incident classes, weights moved from the shipped ones, and it still
pages on an incident it was never shown on that fleet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectord.detectors import load_detector
from detectord.offline.dataset import load_datasets
from detectord.offline.training import main as train_main
from tests.support import DATA, REPO, slice_recording

MODEL = REPO / "models" / "default" / "15s"

pytestmark = [pytest.mark.slow]


def test_train_init_fine_tunes_the_shipped_model_on_normal_data(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    slice_recording(sorted(DATA.glob("benign.drec*"))[0], export / "week.drec", 30)
    (export / "week.truth.json").unlink()  # a production export has no ground truth
    out = tmp_path / "models"
    args = ["--data", str(export), "--init", str(MODEL), "--out", str(out), "--epochs", "2", "--no-phases"]
    assert train_main([*args, "--tensorboard", ""]) == 0
    shipped, tuned = load_detector(MODEL), load_detector(out / "default" / "15s")
    assert tuned.kind == shipped.kind and tuned.window == shipped.window
    assert tuned.meta.inputs == shipped.meta.inputs and tuned.classes == shipped.classes
    assert tuned.meta.training_data["settings"]["init"] == str(MODEL)
    assert tuned.meta.calibration["target_false_alerts_per_instance_day"] == 0.5
    assert (out / "15s" / "conv_classifier" / "MODEL_CARD.md").is_file()

    # Moved from the shipped weights, not started afresh: the two rank the fleet's windows alike.
    data = load_datasets([export], window=tuned.window, step_s=tuned.step_seconds, inputs=tuned.inputs)
    a, b = shipped.raw_scores_batched(data.all.x)[0], tuned.raw_scores_batched(data.all.x)[0]
    assert not np.allclose(a, b)
    ranks = np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
    print(f"rank correlation with the shipped model's scores: {ranks:.3f}")
    assert ranks > 0.5

    # Still loud at an upstream timeout (unseen-low: twelve healthy minutes, then a minute of it).
    lab = tmp_path / "lab"
    lab.mkdir()
    slice_recording(sorted(DATA.glob("unseen-low.drec*"))[0], lab / "unseen-low.drec", 14)
    incident = load_datasets([lab], window=tuned.window, step_s=tuned.step_seconds, inputs=tuned.inputs)
    hit = incident.all.label == "upstream_timeout"
    assert hit.any() and (tuned.score(incident.all).scores[hit] > 1.0).any()

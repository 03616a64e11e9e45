"""Every backend detectord ships scores the committed data the same, to 1e-5: the default model
set at each of its steps, run under each installed backend in its own process (Keras picks its
backend once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectord.detectors import backend

REPO = Path(__file__).resolve().parents[2]
RECORDINGS = ["faults-1"]
STEPS = {"5s": 5.0, "10s": 10.0, "15s": 15.0, "30s": 30.0, "1m": 60.0}

_SCORE = """
import json, sys
import numpy as np
from detectord.config import ModelConfig
from detectord.detectors import load_model
from detectord.recordings.scoring import iter_rows, recording_windows, score_windows

out = {}
for rec in sys.argv[2:]:
    for step in json.loads(sys.argv[1]):
        model = load_model(ModelConfig(), step)
        got = recording_windows(rec, step_seconds=step, window=model.window, inputs=model.inputs)
        rows = list(iter_rows(score_windows(got.requests, model)))
        out[f"{rec}@{step:g}"] = [[*k, t, v] for k, t, v in rows]
import keras
print(json.dumps({"backend": keras.backend.backend(), "scores": out}))
"""


def _scores(name: str) -> dict[str, list[list[object]]]:
    got = subprocess.run(
        [
            sys.executable,
            "-c",
            _SCORE,
            json.dumps(list(STEPS.values())),
            *(str(REPO / f"data/{r}.drec.xz") for r in RECORDINGS),
        ],
        capture_output=True,
        text=True,
        env={"KERAS_BACKEND": name, "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=REPO,
        check=True,
    )
    body = json.loads(got.stdout)
    assert body["backend"] == name
    scores: dict[str, list[list[object]]] = body["scores"]
    return scores


@pytest.mark.slow
def test_jax_and_tensorflow_score_the_committed_data_alike() -> None:
    for name in ("jax", "tensorflow"):
        if not backend.installed(name):
            pytest.fail(f"{name} is not installed; make venv-dev installs both")
    jax, tf = _scores("jax"), _scores("tensorflow")
    assert sorted(jax) == sorted(tf)
    worst = 0.0
    for run, rows in jax.items():
        assert [r[:-1] for r in rows] == [r[:-1] for r in tf[run]], run  # the same windows, in order
        assert len(rows) > 100, run
        a = np.array([r[-1] for r in rows], dtype=np.float64)
        b = np.array([r[-1] for r in tf[run]], dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))))
        assert np.array_equal(a > 1.0, b > 1.0), run  # the same windows anomalous
    assert worst <= 1e-5, f"largest difference {worst:.3g}"
    print(f"largest difference between jax and tensorflow scores: {worst:.3g}")

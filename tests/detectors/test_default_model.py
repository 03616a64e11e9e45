"""The shipped default model on a fleet it never trained or calibrated on (unseen-low: a tenth of the
training fleets' load, a 300-entry cache): quiet while healthy, loud at once when its upstream
times out, and saying what moved."""

from __future__ import annotations

import numpy as np
import pytest

from detectord.detectors import Detector, ScoreBatch, load_detector
from detectord.detectors.artifact import WEIGHTS_FILE
from detectord.ingest.features import FEATURE_NAMES
from detectord.offline.dataset import Data, load_datasets
from tests.support import DATA, REPO, slice_recording

DEFAULT = REPO / "models" / "default"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Detector, Data, ScoreBatch]:
    # Twelve healthy minutes, then upstream-0 answers beyond forward's timeout for a minute.
    d = tmp_path_factory.mktemp("unseen")
    slice_recording(sorted(DATA.glob("unseen-low.drec*"))[0], d / "unseen-low.drec", 14)
    det = load_detector(DEFAULT, features=FEATURE_NAMES)
    data = load_datasets([d], window=det.window, step_s=det.step_seconds, inputs=det.inputs)
    return det, data, det.score(data.all)


def test_default_artifact_is_small_and_complete() -> None:
    det = load_detector(DEFAULT, features=FEATURE_NAMES)
    assert (DEFAULT / WEIGHTS_FILE).stat().st_size < 1_000_000
    assert (DEFAULT / "MODEL_CARD.md").is_file()
    meta = det.meta
    assert meta.name == "default" and meta.window == 32 and meta.threshold > 0
    assert meta.calibration["target_false_alerts_per_instance_day"] == 0.5
    assert meta.metrics["test"] and meta.training_data["heldout_classes"]


def test_quiet_on_a_healthy_fleet_at_a_tenth_of_the_training_load(scored: tuple[Detector, Data, ScoreBatch]) -> None:
    _, data, out = scored
    assert set(data.role) == {"test"}  # the recording is test only: nothing was learned from it
    healthy = data.all.normal
    assert healthy.sum() > 500
    assert out.scores[healthy].max() < 1.0, f"{(out.scores[healthy] > 1).sum()} healthy windows above 1"


def test_loud_within_two_steps_of_an_upstream_timeout(scored: tuple[Detector, Data, ScoreBatch]) -> None:
    _, data, out = scored
    series = np.array(data.all.series, dtype=object)[data.all.series_id]
    incident = np.array([lb == "upstream_timeout" for lb in data.all.label], dtype=bool)
    edges = sorted(set(series[incident]))
    assert edges == ["unseen-low/coredns-edge/edge-0", "unseen-low/coredns-edge/edge-2"]
    for name in edges:
        idx = np.flatnonzero(incident & (series == name))
        s = out.scores[idx]
        assert len(s) >= 10 and s[:2].max() > 1.0 and (s[2:] > 1.0).all(), (name, s)
        first = idx[np.argmax(s > 1.0)]
        top = {FEATURE_NAMES[i] for i in np.argsort(-np.abs(out.feature_deviation[first]))[:3]}
        assert "rcode_servfail_share" in top, (name, top)

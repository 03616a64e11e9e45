"""The shipped default model set, at every step it has a model for, on a fleet it never trained or
calibrated on (unseen-low: a tenth of the training fleets' load, a 300-entry cache): quiet while
healthy, loud at once when its upstream times out, and saying what moved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectord.detectors import Detector, ScoreBatch, load_detector
from detectord.detectors.artifact import WEIGHTS_FILE
from detectord.detectors.model_set import pick
from detectord.ingest.features import FEATURE_NAMES
from detectord.offline.dataset import Data, load_datasets
from detectord.offline.recipes import RECIPES, SHIPPED_STEPS, step_name
from tests.support import DATA, REPO, slice_recording

SET = REPO / "models" / "default"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Twelve healthy minutes, then upstream-0 answers beyond forward's timeout for a minute.
    d = tmp_path_factory.mktemp("unseen")
    slice_recording(sorted(DATA.glob("unseen-low.drec*"))[0], d / "unseen-low.drec", 14)
    return d


@pytest.fixture(scope="module", params=SHIPPED_STEPS, ids=step_name)
def scored(request: pytest.FixtureRequest, unseen: Path) -> tuple[Detector, Data, ScoreBatch]:
    det = load_detector(pick(SET, request.param), features=FEATURE_NAMES)
    data = load_datasets([unseen], window=det.window, step_s=det.step_seconds, inputs=det.inputs)
    return det, data, det.score(data.all)


@pytest.mark.parametrize("step", SHIPPED_STEPS, ids=step_name)
def test_default_artifact_is_small_and_complete(step: float) -> None:
    path = pick(SET, step)
    det = load_detector(path, features=FEATURE_NAMES)
    assert (path / WEIGHTS_FILE).stat().st_size < 1_000_000
    assert (path / "MODEL_CARD.md").is_file()
    meta = det.meta
    assert meta.name == "default" and meta.window == RECIPES[step].window and meta.threshold > 0
    assert meta.calibration["target_false_alerts_per_instance_day"] == 0.5
    assert meta.metrics["test"] and meta.training_data["heldout_classes"]


def test_quiet_on_a_healthy_fleet_at_a_tenth_of_the_training_load(scored: tuple[Detector, Data, ScoreBatch]) -> None:
    det, data, out = scored
    assert set(data.role) == {"test"}  # the recording is test only: nothing was learned from it
    healthy = data.all.normal
    assert healthy.sum() > 500 * 5 / det.step_seconds
    assert out.scores[healthy].max() < 1.0, f"{(out.scores[healthy] > 1).sum()} healthy windows above 1"


def test_loud_within_two_steps_of_an_upstream_timeout(scored: tuple[Detector, Data, ScoreBatch]) -> None:
    det, data, out = scored
    series = np.array(data.all.series, dtype=object)[data.all.series_id]
    incident = np.array([lb == "upstream_timeout" for lb in data.all.label], dtype=bool)
    hit = sorted(set(series[incident]))
    # Its upstream is judged with them: forward's retries and health checks moved its metrics too.
    assert hit == [
        "unseen-low/coredns-edge/edge-0",
        "unseen-low/coredns-edge/edge-2",
        "unseen-low/coredns-upstream/upstream-0",
    ]
    edges = hit[:2]
    for name in edges:
        idx = np.flatnonzero(incident & (series == name))
        s = out.scores[idx]
        # The minute it lasts, then steps until caches refill: every one of them loud after the second.
        assert len(s) >= max(1, 50 / det.step_seconds) and s[:2].max() > 1.0 and (s[2:] > 1.0).all(), (name, s)
        first = idx[np.argmax(s > 1.0)]
        top = {FEATURE_NAMES[i] for i in np.argsort(-np.abs(out.feature_deviation[first]))[:3]}
        # Its first alert says the upstream path went wrong: by the features that moved most
        # (SERVFAILs, or the upstream's latency at the start, before answers fail), or, from a
        # model that names incident classes, by naming an upstream one ("looks like upstream
        # down" while queries still hang and only latency and waiting goroutines have moved).
        like = out.looks_like[first] if out.looks_like is not None else None
        named = {"rcode_servfail_share", "upstream_latency_p99_seconds"} & top
        assert named or like in {"upstream_timeout", "upstream_down"}, (name, top, like)

"""The three detectors behind one API, trained for a few epochs on a slice of the committed lab data:
the API round-trips, mismatched artifacts are refused, and a real incident window scores above 1.0
while healthy traffic scores below."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectord.detectors import (
    DETECTORS,
    ArtifactInvalid,
    ArtifactMissing,
    ConvAutoencoder,
    Detector,
    FeatureMismatch,
    InputsMismatch,
    UnknownFormatVersion,
    UnknownKind,
    WindowMismatch,
    load_detector,
)
from detectord.detectors.artifact import META_FILE, WEIGHTS_FILE
from detectord.detectors.windowset import WindowSet
from detectord.ingest.features import FEATURE_NAMES
from detectord.ingest.normalise import BaselineConfig, InputPlan
from detectord.offline.dataset import Data, load_datasets
from tests.support import small_data

W = 16
STEP_S = 5.0
# upstream_timeout and upstream_down are the glaring incidents; cpu_starvation is held out.
HELDOUT = ("cpu_starvation",)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return load_datasets([small_data(tmp_path_factory.mktemp("data"))], window=W, step_s=STEP_S, heldout=HELDOUT)


@pytest.fixture(scope="module")
def trained(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Detector, Path]]:
    out = {}
    for kind, cls in DETECTORS.items():
        det = cls(FEATURE_NAMES, window=W, step_seconds=STEP_S, name=f"tiny-{kind}")
        det.initialize_new_weights(seed=0)
        det.train(number_of_iterations=12, batch_size=64, data=data.train, validation=data.validation)
        det.calibrate(data.validation)
        path = tmp_path_factory.mktemp("models") / kind
        det.save(path)
        out[kind] = (det, path)
    return out


def _incident_and_healthy(data: Data) -> tuple[np.ndarray, np.ndarray]:
    """Windows ending late in a real upstream outage or timeout, and validation windows of healthy traffic."""
    lab = data.all.label
    glaring = np.flatnonzero(np.isin(lab, ["upstream_down", "upstream_timeout"]).astype(bool))
    # The last window of each incident run: the incident fills most of it.
    ends = glaring[np.r_[np.diff(glaring) != 1, True]]
    healthy = data.validation.x[data.validation.normal]
    return data.all.x[ends], healthy


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_incident_scores_above_one_and_healthy_traffic_below(
    kind: str, data: Data, trained: dict[str, tuple[Detector, Path]]
) -> None:
    det, _ = trained[kind]
    incident, healthy = _incident_and_healthy(data)
    assert len(incident) >= 2 and len(healthy) > 50
    inc = det.score(incident).scores
    ok = det.score(healthy).scores
    assert np.median(inc) > 1.0, inc
    assert np.quantile(ok, 0.99) < 1.0
    assert det.predict(incident).mean() > 0.5 and det.predict(healthy).mean() < 0.01
    m = det.evaluate(data.test)
    assert set(m) >= {"precision", "recall", "f1", "confusion"}


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_save_load_round_trip_scores_identically(
    kind: str, data: Data, trained: dict[str, tuple[Detector, Path]]
) -> None:
    det, path = trained[kind]
    loaded = Detector.load(path)
    assert type(loaded) is type(det) and loaded.threshold == det.threshold and loaded.classes == det.classes
    x = data.all.x[:300]
    a, b = det.score(x), loaded.score(x)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.feature_deviation, b.feature_deviation)
    assert a.looks_like == b.looks_like
    meta = json.loads((path / META_FILE).read_text())
    for key in ("features", "window", "step_seconds", "threshold", "inputs", "calibration", "trained_at", "version"):
        assert meta[key], key
    # import_weights into a fresh network of the same shape gives the same scores.
    twin = type(det)(FEATURE_NAMES, window=W, step_seconds=STEP_S, meta=loaded.meta)
    twin.import_weights(path)
    np.testing.assert_array_equal(twin.score(x).scores, a.scores)


def test_supervised_detectors_name_the_class(data: Data, trained: dict[str, tuple[Detector, Path]]) -> None:
    incident, _ = _incident_and_healthy(data)
    for kind in ("conv_classifier", "siamese"):
        det, _ = trained[kind]
        assert "upstream_down" in det.classes and "cpu_starvation" not in det.classes
        out = det.score(incident)
        assert out.looks_like is not None and set(out.looks_like) <= set(det.classes)
    assert trained["conv_autoencoder"][0].score(incident).looks_like is None


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_a_window_scores_the_same_in_any_batch(
    batch: int, data: Data, trained: dict[str, tuple[Detector, Path]]
) -> None:
    x = data.all.x[:batch]
    for det, _ in trained.values():
        out = det.score_batch(x)
        assert out.scores.shape == (batch,) and out.scores.dtype == np.float32
        assert out.feature_deviation.shape == (batch, len(FEATURE_NAMES))
        assert np.isfinite(out.scores).all() and np.isfinite(out.feature_deviation).all()
        alone = np.array([det.score_batch(x[i : i + 1]).scores[0] for i in range(batch)])
        np.testing.assert_allclose(out.scores, alone, rtol=1e-5, atol=1e-6)


def test_importing_detectors_does_not_import_keras() -> None:
    code = "import sys, detectord.detectors; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


def test_initialize_new_weights_forgets_training(trained: dict[str, tuple[Detector, Path]], data: Data) -> None:
    det = Detector.load(trained["conv_autoencoder"][1])
    det.initialize_new_weights(seed=1)
    with pytest.raises(RuntimeError, match="not trained"):
        det.score(data.all.x[:4])


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(path, dst)
    return dst


def _edit(path: Path, **changes: object) -> None:
    meta = json.loads((path / META_FILE).read_text())
    meta.update(changes)
    (path / META_FILE).write_text(json.dumps(meta))


def test_mismatched_artifacts_are_refused(trained: dict[str, tuple[Detector, Path]], tmp_path: Path) -> None:
    path = trained["conv_autoencoder"][1]
    with pytest.raises(FeatureMismatch, match="retrain"):
        load_detector(path, features=[*FEATURE_NAMES[:-1], "go_threads"])
    with pytest.raises(FeatureMismatch, match="same features in another order"):
        load_detector(path, features=list(reversed(FEATURE_NAMES)))
    with pytest.raises(WindowMismatch, match="window is 16 steps but 32"):
        load_detector(path, window=32)
    other = InputPlan.default(FEATURE_NAMES, BaselineConfig(bucket_steps=4)).to_dict()
    with pytest.raises(InputsMismatch, match="baseline settings differ"):
        load_detector(path, inputs=other)
    p = _copy(path, tmp_path)
    _edit(p, format_version=1)
    with pytest.raises(UnknownFormatVersion, match="format_version 1 is not supported"):
        load_detector(p)
    _edit(p, format_version=2, kind="lstm")
    with pytest.raises(UnknownKind, match="'lstm' is unknown"):
        load_detector(p)
    _edit(p, kind="conv_autoencoder", config={"filters": [16, 16], "latnet": 3})
    with pytest.raises(ArtifactInvalid, match="latnet"):
        load_detector(p)
    _edit(p, config={"filters": [8]})  # another architecture than the weights were saved from
    with pytest.raises(ArtifactInvalid, match="does not fit"):
        load_detector(p)
    _edit(p, config=json.loads((path / META_FILE).read_text())["config"], threshold=-1)
    with pytest.raises(ArtifactInvalid, match="'threshold' must be a positive number"):
        load_detector(p)
    (p / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactInvalid, match="not readable JSON"):
        load_detector(p)
    (p / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactMissing, match=WEIGHTS_FILE):
        load_detector(p)
    with pytest.raises(ArtifactMissing, match="no such directory"):
        load_detector(tmp_path / "nope")
    with pytest.raises(ArtifactMissing, match=META_FILE):
        load_detector(tmp_path)


def test_training_needs_what_the_kind_learns_from(data: Data) -> None:
    normal_only = data.train.subset(data.train.normal)
    det = DETECTORS["conv_classifier"](FEATURE_NAMES, window=W, step_seconds=STEP_S)
    with pytest.raises(ValueError, match="anomalous windows"):
        det.train(1, 64, normal_only)
    t = data.train
    short = WindowSet(t.x[:, :8], t.label, t.series_id, t.end_ms, t.series, t.step_s)
    with pytest.raises(ValueError, match=r"shape \(batch, 16, 18\)"):
        ConvAutoencoder(FEATURE_NAMES, window=W).train(1, 64, short)

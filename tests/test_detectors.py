"""Detectors: a tiny model trained on synthetic data, the artifact format, and the shipped default model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectord.detectors import (
    ArtifactInvalid,
    ArtifactMissing,
    ConvAutoencoder,
    FeatureMismatch,
    UnknownFormatVersion,
    UnknownKind,
    WindowMismatch,
    load_detector,
)
from detectord.detectors.artifact import META_FILE, WEIGHTS_FILE
from detectord.detectors.conv_autoencoder import ConvAutoencoderConfig
from detectord.features import FEATURE_NAMES, extract
from detectord.synthetic import Fleet
from detectord.training import windows_of

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}
W = 16


def synthetic_windows(n: int, hours: float, step_s: float, seed: int, window: int, **kw: object) -> np.ndarray:
    fleet = Fleet(n, seed=seed, scrape_interval_s=step_s, **kw)  # type: ignore[arg-type]
    series = extract(fleet.write_requests(hours * 3600), int(step_s * 1000))
    return np.concatenate([windows_of(fs.values, window, 1, fs.restarts)[0] for fs in series.values()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConvAutoencoder, np.ndarray, Path]:
    x = synthetic_windows(6, 1.0, 15.0, seed=11, window=W)
    det = ConvAutoencoder(FEATURE_NAMES, window=W, config=ConvAutoencoderConfig(filters=(8, 8), latent=4))
    det.fit(x, epochs=2, batch_size=128, seed=0)
    det.infer_threshold(x, quantile=0.99, margin=1.0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    det.save(path)
    return det, x, path


def test_save_load_round_trip_scores_identically(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    det, x, path = tiny
    loaded = load_detector(path, features=FEATURE_NAMES, window=W)
    assert isinstance(loaded, ConvAutoencoder)
    assert loaded.threshold == det.threshold
    a, b = det.score_batch(x[:64]), loaded.score_batch(x[:64])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.feature_deviation, b.feature_deviation)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["features"] == list(FEATURE_NAMES)
    assert meta["window"] == W and meta["kind"] == "conv_autoencoder"
    assert {s["name"] for s in meta["scaler"]["features"]} == set(FEATURE_NAMES)


def test_calibrated_threshold_separates_the_training_tail(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    det, x, _ = tiny
    scores = det.score_batch(x).scores
    # The threshold sits at the 99th percentile: about 1 % of the windows score above 1.
    assert 0.002 < float((scores > 1.0).mean()) < 0.03


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_score_batch_sizes(tiny: tuple[ConvAutoencoder, np.ndarray, Path], batch: int) -> None:
    det, x, _ = tiny
    out = det.score_batch(x[:batch])
    assert out.scores.shape == (batch,) and out.scores.dtype == np.float32
    assert out.feature_deviation.shape == (batch, len(FEATURE_NAMES))
    assert np.isfinite(out.scores).all() and np.isfinite(out.feature_deviation).all()
    # A window scores the same whatever else is in its batch.
    alone = np.array([det.score_batch(x[i : i + 1]).scores[0] for i in range(batch)])
    np.testing.assert_allclose(out.scores, alone, rtol=1e-5, atol=1e-6)


def test_wrong_window_shape_is_refused(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    det, x, _ = tiny
    with pytest.raises(ValueError, match=r"shape \(batch, 16, 17\)"):
        det.score_batch(x[:2, :8])


def test_garbage_values_do_not_produce_nan(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    det, x, _ = tiny
    bad = x[:5].copy()
    bad[0, -1, IDX["request_rate"]] = np.nan
    bad[1, -1, IDX["request_rate"]] = np.inf
    bad[2, -1, IDX["latency_p99_seconds"]] = np.inf
    bad[3, -1, IDX["cache_hit_ratio"]] = -1.0
    bad[4, -2, IDX["upstream_request_rate"]] = -np.inf
    out = det.score_batch(bad)
    assert np.isfinite(out.scores).all() and np.isfinite(out.feature_deviation).all()


def test_other_features_are_refused_with_a_clear_error(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    _, _, path = tiny
    expected = [*FEATURE_NAMES[:-1], "go_threads"]
    with pytest.raises(FeatureMismatch) as err:
        load_detector(path, features=expected, window=W)
    msg = str(err.value)
    assert "go_threads" in msg and "goroutines" in msg and "retrain" in msg
    with pytest.raises(FeatureMismatch, match="another order"):
        load_detector(path, features=list(reversed(FEATURE_NAMES)), window=W)


def test_another_window_is_refused_with_a_clear_error(tiny: tuple[ConvAutoencoder, np.ndarray, Path]) -> None:
    _, _, path = tiny
    with pytest.raises(WindowMismatch, match="model window is 16 steps but 32 were expected"):
        load_detector(path, features=FEATURE_NAMES, window=32)


def test_broken_artifacts_are_refused(tiny: tuple[ConvAutoencoder, np.ndarray, Path], tmp_path: Path) -> None:
    _, _, path = tiny
    with pytest.raises(ArtifactMissing, match=META_FILE):
        load_detector(tmp_path)
    with pytest.raises(ArtifactMissing, match="no such directory"):
        load_detector(tmp_path / "nope")

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(path, dst)
        return dst

    no_weights = copy("no-weights")
    (no_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactMissing, match=WEIGHTS_FILE):
        load_detector(no_weights)

    def edit(name: str, **changes: object) -> Path:
        dst = copy(name)
        meta = json.loads((dst / META_FILE).read_text())
        meta.update(changes)
        (dst / META_FILE).write_text(json.dumps(meta))
        return dst

    with pytest.raises(UnknownFormatVersion, match="format_version 2 is not supported"):
        load_detector(edit("v2", format_version=2))
    with pytest.raises(UnknownKind, match="'isolation_forest' is unknown; known kinds: conv_autoencoder"):
        load_detector(edit("kind", kind="isolation_forest"))
    with pytest.raises(ArtifactInvalid, match="'threshold' must be a positive number"):
        load_detector(edit("thr", threshold=-1))
    with pytest.raises(ArtifactInvalid, match="does not fit the model"):
        load_detector(edit("arch", config={"filters": [32, 32], "latent": 4}))
    corrupt = copy("corrupt")
    (corrupt / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactInvalid, match="not readable JSON"):
        load_detector(corrupt)


def test_importing_detectors_does_not_import_keras() -> None:
    code = "import sys, detectord.detectors; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


# ---- the shipped default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model() -> ConvAutoencoder:
    det = load_detector(DEFAULT_MODEL, features=FEATURE_NAMES)
    assert isinstance(det, ConvAutoencoder)
    return det


def test_default_artifact_is_small_and_complete(default_model: ConvAutoencoder) -> None:
    assert (DEFAULT_MODEL / WEIGHTS_FILE).stat().st_size < 1_000_000
    assert (DEFAULT_MODEL / "MODEL_CARD.md").is_file()
    meta = default_model.meta
    assert meta.window == 32 and meta.threshold > 0
    assert set(meta.metrics) >= {"step_15s", "step_1s"}


@pytest.fixture(scope="module")
def healthy_1s() -> np.ndarray:
    """A freshly started, healthy CoreDNS under steady load, scraped every second."""
    return synthetic_windows(1, 0.25, 1.0, seed=21, window=32, cold_start=True, restarts_per_hour=0,
                             qps_range=(2000.0, 3000.0), low_qps_fraction=0.0, traffic_shifts_per_hour=0)


def test_default_model_quiet_on_normal_loud_on_servfail_storm(default_model: ConvAutoencoder,
                                                                 healthy_1s: np.ndarray) -> None:
    normal = healthy_1s[-1:].copy()
    assert default_model.score_batch(normal).scores[0] < 1.0
    storm = normal.copy()
    tail = storm[0, -8:]
    tail[:, IDX["rcode_servfail_share"]] = 0.8
    tail[:, IDX["rcode_noerror_share"]] = 0.18
    tail[:, IDX["rcode_nxdomain_share"]] = 0.02
    tail[:, IDX["latency_p99_seconds"]] = 4.0
    out = default_model.score_batch(storm)
    assert out.scores[0] > 1.0
    top = {FEATURE_NAMES[i] for i in np.argsort(-np.abs(out.feature_deviation[0]))[:3]}
    assert "rcode_servfail_share" in top


def test_default_model_never_fires_on_a_healthy_fresh_coredns(default_model: ConvAutoencoder,
                                                                healthy_1s: np.ndarray) -> None:
    scores = default_model.score_batch(healthy_1s).scores
    assert scores.max() < 1.0, f"{(scores > 1).sum()} of {len(scores)} healthy windows scored above 1"


def test_default_model_fires_on_an_upstream_slower_than_the_forward_timeout(default_model: ConvAutoencoder) -> None:
    fleet = Fleet(1, seed=22, scrape_interval_s=1.0, cold_start=True, restarts_per_hour=0,
                  qps_range=(2000.0, 3000.0), low_qps_fraction=0.0, traffic_shifts_per_hour=0)
    start = fleet.start_ms + 240_000
    fleet.inject(0, "upstream_slow", start, start + 120_000, severity=0.8)
    fs = next(iter(extract(fleet.write_requests(420), 1000).values()))
    wins, ends = windows_of(fs.values, 32)
    scores = default_model.raw_scores_batched(wins) / default_model.threshold
    t_end = fs.timestamps_ms[ends]
    before = t_end < start
    during = (t_end > start + 30_000) & (t_end <= start + 120_000)
    assert scores[before].max() < 1.0
    # Anomalous throughout, long enough for a 60 s `for` to fire.
    assert (scores[during] > 1.0).mean() > 0.95

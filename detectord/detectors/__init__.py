"""Anomaly detectors over feature windows, picked by the `kind` their artifact names.

Importing this package does not import Keras; building, training or loading a model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectord.config import ModelConfig
from detectord.detectors import backend, model_set
from detectord.detectors.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    ArtifactInvalid,
    ArtifactMissing,
    FeatureMismatch,
    InputsMismatch,
    ModelMeta,
    UnknownFormatVersion,
    UnknownKind,
    WindowMismatch,
    check_compatible,
    read_meta,
)
from detectord.detectors.base import Detector, DetectorConfig, ScoreBatch, Scorer
from detectord.detectors.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig
from detectord.detectors.conv_classifier import ConvClassifier, ConvClassifierConfig
from detectord.detectors.model_set import StepNotCovered
from detectord.detectors.siamese import Siamese, SiameseConfig
from detectord.ingest.features import FEATURE_NAMES

DETECTORS: dict[str, type[Detector]] = {
    "conv_autoencoder": ConvAutoencoder,
    "conv_classifier": ConvClassifier,
    "siamese": Siamese,
}


def load_detector(
    path: Path | str,
    *,
    features: Sequence[str] | None = None,
    window: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> Detector:
    """Load the artifact directory `path`; refuse it if its features, window or input plan differ
    from the given ones."""
    path = Path(path)
    meta = read_meta(path)
    backend.choose()
    cls = DETECTORS.get(meta.kind)
    if cls is None:
        raise UnknownKind(path, meta.kind, list(DETECTORS))
    check_compatible(path, meta, features=features, window=window, inputs=inputs)
    return cls.from_artifact(path, meta)


def load_model(cfg: ModelConfig, step_s: float | None = None) -> Detector:
    """The model `serve` and `score` run at `step_s` (None: the model's own step): the artifact
    `cfg.path` names, or the member of the model set it names made for that step (see
    `model_set.pick`); refused unless it is made for that step (or `model.any_step`), reads the
    features this detectord extracts and meets the config's guards (`model.window`,
    `model.features`). `model.threshold` overrides its own threshold."""
    path = model_set.pick(Path(cfg.path), step_s, any_step=cfg.any_step)
    det = load_detector(path, features=FEATURE_NAMES, window=cfg.window)
    model_set.check_step(path, det.step_seconds, step_s, any_step=cfg.any_step)
    if cfg.features is not None:
        check_compatible(path, det.meta, features=cfg.features)
    if cfg.threshold is not None:
        det.threshold = float(cfg.threshold)
    return det


__all__ = [
    "DETECTORS",
    "FORMAT_VERSION",
    "ArtifactError",
    "ArtifactInvalid",
    "ArtifactMissing",
    "ConvAutoencoder",
    "ConvAutoencoderConfig",
    "ConvClassifier",
    "ConvClassifierConfig",
    "Detector",
    "DetectorConfig",
    "FeatureMismatch",
    "InputsMismatch",
    "ModelMeta",
    "ScoreBatch",
    "Scorer",
    "Siamese",
    "SiameseConfig",
    "StepNotCovered",
    "UnknownFormatVersion",
    "UnknownKind",
    "WindowMismatch",
    "check_compatible",
    "load_detector",
    "load_model",
    "read_meta",
]

"""Anomaly detectors over feature windows, picked by the `kind` their artifact names.

Importing this package does not import Keras; building, training or loading a model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from detectord.detectors.base import Detector, DetectorConfig, ScoreBatch
from detectord.detectors.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig
from detectord.detectors.conv_classifier import ConvClassifier, ConvClassifierConfig
from detectord.detectors.siamese import Siamese, SiameseConfig

DETECTORS: dict[str, type[Detector]] = {
    "conv_autoencoder": ConvAutoencoder,
    "conv_classifier": ConvClassifier,
    "siamese": Siamese,
}


def load_detector(path: Path | str, *, features: Sequence[str] | None = None, window: int | None = None,
                  inputs: dict[str, Any] | None = None) -> Detector:
    """Load the artifact directory `path`; refuse it if its features, window or input plan differ
    from the given ones."""
    path = Path(path)
    meta = read_meta(path)
    cls = DETECTORS.get(meta.kind)
    if cls is None:
        raise UnknownKind(path, meta.kind, list(DETECTORS))
    check_compatible(path, meta, features=features, window=window, inputs=inputs)
    return cls.from_artifact(path, meta)


__all__ = [
    "DETECTORS", "FORMAT_VERSION", "ArtifactError", "ArtifactInvalid", "ArtifactMissing", "ConvAutoencoder",
    "ConvAutoencoderConfig", "ConvClassifier", "ConvClassifierConfig", "Detector", "DetectorConfig",
    "FeatureMismatch", "InputsMismatch", "ModelMeta", "ScoreBatch", "Siamese", "SiameseConfig",
    "UnknownFormatVersion", "UnknownKind", "WindowMismatch", "check_compatible", "load_detector", "read_meta",
]

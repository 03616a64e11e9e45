"""Anomaly detectors over feature windows, picked by the `kind` their artifact names.

Importing this package does not import Keras; building, training or loading a model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .artifact import (
    FORMAT_VERSION,
    ArtifactError,
    ArtifactInvalid,
    ArtifactMissing,
    FeatureMismatch,
    ModelMeta,
    UnknownFormatVersion,
    UnknownKind,
    WindowMismatch,
    check_compatible,
    read_meta,
)
from .base import Detector, ScoreBatch
from .conv_autoencoder import ConvAutoencoder

DETECTORS: dict[str, type[Detector]] = {
    "conv_autoencoder": ConvAutoencoder,
}


def load_detector(path: Path | str, *, features: Sequence[str] | None = None,
                  window: int | None = None) -> Detector:
    """Load the artifact directory `path`; refuse it if its features or window differ from the given ones."""
    path = Path(path)
    meta = read_meta(path)
    cls = DETECTORS.get(meta.kind)
    if cls is None:
        raise UnknownKind(path, meta.kind, list(DETECTORS))
    check_compatible(path, meta, features=features, window=window)
    return cls.load(path, meta)


__all__ = [
    "DETECTORS", "FORMAT_VERSION", "ArtifactError", "ArtifactInvalid", "ArtifactMissing", "ConvAutoencoder",
    "Detector", "FeatureMismatch", "ModelMeta", "ScoreBatch", "UnknownFormatVersion", "UnknownKind",
    "WindowMismatch", "check_compatible", "load_detector", "read_meta",
]

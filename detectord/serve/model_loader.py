"""Loads a model artifact for serving and checks it against the config's guards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detectord.config import ModelConfig
from detectord.errors import ModelError
from detectord.ingest.features import FEATURE_NAMES
from detectord.serve.inference import Scorer
from detectord.ingest.normalise import InputPlan


@dataclass(frozen=True)
class LoadedModel:
    detector: Scorer
    path: Path
    name: str
    kind: str
    version: str
    trained_at: str
    features: tuple[str, ...]
    window: int
    step_seconds: float
    threshold: float
    inputs: InputPlan
    classes: tuple[str, ...] = ()


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load, check and (with a threshold override) adjust the model `cfg` names. Raises ModelError."""
    from detectord.detectors import load_detector  # Keras is imported only here, never by the network layer

    try:
        det = load_detector(cfg.path)
    except ModelError:
        raise
    except Exception as exc:  # a corrupt weights file surfaces as h5py/Keras errors of many types
        raise ModelError(f"{cfg.path}: cannot load model: {exc.__class__.__name__}: {exc}") from exc
    meta = det.meta
    features = tuple(meta.features)
    if features != FEATURE_NAMES:
        raise ModelError(f"{cfg.path}: model was trained on features {list(features)}, but this detectord "
                         f"extracts {list(FEATURE_NAMES)}; retrain it or use a matching detectord")
    if cfg.features is not None and tuple(cfg.features) != features:
        raise ModelError(f"{cfg.path}: model.features in the config does not match the model's features")
    if cfg.window is not None and cfg.window != meta.window:
        raise ModelError(f"{cfg.path}: model.window is {cfg.window} in the config but the model's window is "
                         f"{meta.window}")
    if cfg.threshold is not None:
        det.threshold = float(cfg.threshold)
    return LoadedModel(
        detector=det, path=Path(cfg.path), name=meta.name, kind=meta.kind, version=str(meta.version),
        trained_at=str(meta.trained_at), features=features, window=int(meta.window),
        step_seconds=float(meta.step_seconds), threshold=float(det.threshold), inputs=det.inputs,
        classes=tuple(meta.classes))

"""The on-disk model format: a directory with `detectord-model.json` and `model.weights.h5`.

Format version 2. The JSON carries everything needed to serve the weights correctly (feature
order, window, step, how inputs are made from features, threshold, learned statistics) and to
judge them (training data, calibration, metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from detectord.errors import ModelError

FORMAT_VERSION = 2
META_FILE = "detectord-model.json"
WEIGHTS_FILE = "model.weights.h5"


class ArtifactError(ModelError):
    """A model directory that cannot be used; `path` is the directory."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ArtifactMissing(ArtifactError):
    def __init__(self, path: Path | str, missing: str) -> None:
        self.missing = missing
        super().__init__(
            path,
            f"no {missing} (a model directory holds {META_FILE} and {WEIGHTS_FILE}; "
            f"create one with `detectord train --out DIR`)",
        )


class ArtifactInvalid(ArtifactError):
    """The metadata file is not valid JSON or lacks a required, well-typed key."""


class UnknownFormatVersion(ArtifactError):
    def __init__(self, path: Path | str, version: object) -> None:
        self.version = version
        super().__init__(
            path,
            f"format_version {version!r} is not supported (this detectord reads "
            f"format_version {FORMAT_VERSION}); use a detectord that matches the model "
            f"or retrain it with `detectord train`",
        )


class UnknownKind(ArtifactError):
    def __init__(self, path: Path | str, kind: str, known: Sequence[str]) -> None:
        self.kind = kind
        super().__init__(path, f"model kind {kind!r} is unknown; known kinds: {', '.join(sorted(known))}")


class FeatureMismatch(ArtifactError):
    def __init__(self, path: Path | str, model: Sequence[str], expected: Sequence[str]) -> None:
        self.model_features = tuple(model)
        self.expected = tuple(expected)
        missing = [f for f in expected if f not in model]
        extra = [f for f in model if f not in expected]
        if missing or extra:
            detail = f"missing {missing}, unexpected {extra}"
        else:
            detail = "same features in another order"
        super().__init__(
            path,
            f"model features do not match the features this detectord extracts "
            f"({detail}); retrain the model with `detectord train`",
        )


class WindowMismatch(ArtifactError):
    def __init__(self, path: Path | str, model: int, expected: int) -> None:
        self.model_window = model
        self.expected = expected
        super().__init__(
            path,
            f"model window is {model} steps but {expected} were expected; "
            f"set model.window to {model} or use a model trained with window {expected}",
        )


class InputsMismatch(ArtifactError):
    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(
            path,
            f"model inputs were made differently from what was expected ({detail}); "
            f"retrain the model with `detectord train`",
        )


@dataclass
class ModelMeta:
    """The contents of `detectord-model.json`."""

    name: str
    kind: str
    version: str
    trained_at: str
    features: list[str]
    window: int
    step_seconds: float
    threshold: float
    # How model inputs are made from feature rows (detectord.ingest.normalise.InputPlan.to_dict()).
    inputs: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    # Anomaly classes a supervised model tells apart (empty for an unsupervised one).
    classes: list[str] = field(default_factory=list)
    # Statistics learned beside the weights (latent mean, centroids), as JSON lists.
    state: dict[str, Any] = field(default_factory=dict)
    # How the threshold was chosen, and on what.
    calibration: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    framework: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        ordered = {"format_version": d.pop("format_version"), **d}
        return json.dumps(ordered, indent=2, sort_keys=False, allow_nan=False) + "\n"


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "kind": str,
    "version": str,
    "trained_at": str,
    "features": list,
    "window": int,
    "step_seconds": (int, float),
    "threshold": (int, float),
    "inputs": dict,
}


def read_meta(path: Path | str) -> ModelMeta:
    """Read and check the metadata of the model directory `path`."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactMissing(path, "such directory")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ArtifactMissing(path, META_FILE)
    if not (path / WEIGHTS_FILE).is_file():
        raise ArtifactMissing(path, WEIGHTS_FILE)
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactInvalid(path, f"{META_FILE} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactInvalid(path, f"{META_FILE} must hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UnknownFormatVersion(path, version)
    for key, tp in _REQUIRED.items():
        if key not in raw:
            raise ArtifactInvalid(path, f"{META_FILE} lacks the key {key!r}")
        if not isinstance(raw[key], tp) or isinstance(raw[key], bool):
            raise ArtifactInvalid(path, f"{META_FILE}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    if not all(isinstance(f, str) for f in raw["features"]) or not raw["features"]:
        raise ArtifactInvalid(path, f"{META_FILE}: 'features' must be a non-empty list of names")
    from detectord.ingest.normalise import InputPlan

    try:
        plan = InputPlan.from_dict(raw["inputs"])
    except ValueError as exc:
        raise ArtifactInvalid(path, f"{META_FILE}: 'inputs': {exc}") from None
    if list(plan.features) != raw["features"]:
        raise ArtifactInvalid(
            path, f"{META_FILE}: 'inputs' describes features {list(plan.features)}, not the model's {raw['features']}"
        )
    if raw["window"] < 1:
        raise ArtifactInvalid(path, f"{META_FILE}: 'window' must be >= 1, got {raw['window']}")
    for key in ("threshold", "step_seconds"):
        if not (math.isfinite(raw[key]) and raw[key] > 0):
            raise ArtifactInvalid(path, f"{META_FILE}: {key!r} must be a positive number, got {raw[key]}")
    known = {f.name for f in fields(ModelMeta)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactInvalid(path, f"{META_FILE}: unknown keys {unknown}")
    return ModelMeta(**raw)


def check_compatible(
    path: Path | str,
    meta: ModelMeta,
    *,
    features: Sequence[str] | None = None,
    window: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Refuse a model whose features, window or input plan differ from what the caller will feed it."""
    if features is not None and list(features) != list(meta.features):
        raise FeatureMismatch(path, meta.features, features)
    if window is not None and window != meta.window:
        raise WindowMismatch(path, meta.window, window)
    if inputs is not None and inputs != meta.inputs:
        differ = sorted(
            k
            for k in set(inputs.get("features", {})) | set(meta.inputs.get("features", {}))
            if inputs.get("features", {}).get(k) != meta.inputs.get("features", {}).get(k)
        )
        detail = f"features {differ} differ" if differ else "baseline settings differ"
        raise InputsMismatch(path, detail)


def write_meta(path: Path | str, meta: ModelMeta) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(meta.to_json(), encoding="utf-8")
    tmp.replace(path / META_FILE)

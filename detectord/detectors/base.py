"""What every detector offers: the 2020 proposal's API (`initialize_new_weights`, `import_weights`,
`train`, `predict`) plus `score`, `evaluate`, `calibrate`, `save` and `load`, and the compiled
forward pass serving uses. Scores are normalised by the threshold: > 1.0 means anomalous.
"""

from __future__ import annotations

import datetime as dt
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from detectord.detectors import backend
from detectord.detectors.artifact import WEIGHTS_FILE, ArtifactInvalid, ModelMeta, write_meta
from detectord.detectors.compiled import Compiled, compile_forward
from detectord.detectors.fitting import Log
from detectord.detectors.quality import threshold_for_rate, window_metrics
from detectord.ingest.normalise import InputPlan

if TYPE_CHECKING:
    from detectord.detectors.windowset import WindowSet


@dataclass(frozen=True)
class ScoreBatch:
    scores: np.ndarray  # float32 (B,): raw score / threshold; > 1.0 is anomalous
    # float32 (B, F): how far each feature was from what the model expected, in the instance's
    # own spreads, over the window's newest rows: what moved, and which way.
    feature_deviation: np.ndarray
    # The anomaly class each window looks most like (supervised models), else None.
    looks_like: list[str] | None = None


class Scorer(Protocol):
    """What serving needs of a detector: one batched forward pass."""

    def score_batch(self, windows: np.ndarray) -> ScoreBatch: ...


@dataclass(frozen=True)
class DetectorConfig:
    """Hyperparameters; each detector extends it. `from_dict` refuses unknown keys."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self, window: int) -> None:
        pass


class Detector(ABC):
    """A model over windows (B, W, F) of model inputs (see detectord.ingest.normalise), oldest row first.

    Retraining a model needs no Keras, only this API and the data set loader::

        from detectord.offline.dataset import load_datasets
        from detectord.detectors import ConvClassifier, load_detector

        shipped = load_detector("models/default/15s")
        data = load_datasets(["data"], window=shipped.window, step_s=shipped.step_seconds)
        det = ConvClassifier(shipped.features, window=shipped.window, step_seconds=shipped.step_seconds)
        det.initialize_new_weights(seed=1)
        det.train(number_of_iterations=30, batch_size=256, data=data.train, validation=data.validation)
        det.calibrate(data.validation)          # threshold for the target false-alert rate
        print(det.evaluate(data.test))          # precision, recall, F1, confusion matrix
        det.save("models/mine")                 # point `model.path` at it; SIGHUP reloads

    `number_of_iterations` counts passes over the training windows (epochs). `data` is a
    `WindowSet` (windows with labels: "" normal, a class name anomalous, None unlabelled);
    `predict` and `score` also take a bare array of windows. `score_batch` is the serving
    call: one thread calls it, with batch sizes the caller keeps to a few values.
    """

    kind: ClassVar[str]
    supervised: ClassVar[bool] = False
    config_class: ClassVar[type[DetectorConfig]]
    # The threshold is this many times the lowest that meets the false-alert target on validation
    # data: headroom for fleets whose normal the validation data never showed.
    calibration_margin: ClassVar[float] = 1.2

    def __init__(
        self,
        features: Sequence[str],
        *,
        window: int = 32,
        step_seconds: float = 5.0,
        inputs: InputPlan | None = None,
        config: DetectorConfig | None = None,
        name: str = "default",
        version: str = "1",
        meta: ModelMeta | None = None,
    ) -> None:
        if not features:
            raise ValueError("features must not be empty")
        if window < 8:
            raise ValueError(f"window must be >= 8 steps, got {window}")
        self.config: Any = config or self.config_class()
        self.config.validate(window)
        inputs = inputs or InputPlan.default(features)
        if list(inputs.features) != list(features):
            raise ValueError("the input plan's features differ from the model's")
        self.meta = meta or ModelMeta(
            name=name,
            kind=self.kind,
            version=version,
            trained_at="",
            features=list(features),
            window=window,
            step_seconds=float(step_seconds),
            threshold=1.0,
            inputs=inputs.to_dict(),
            config=self.config.to_dict(),
        )
        self.network: Any = None
        # The artifact directory it was loaded from (None until saved or loaded).
        self.path: Path | None = None
        self._compiled: Compiled | None = None
        self._lock = threading.Lock()

    # ---- properties ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return str(self.meta.version)

    @property
    def trained_at(self) -> str:
        return str(self.meta.trained_at)

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"threshold must be a positive number, got {value}")
        self.meta.threshold = float(value)

    @property
    def window(self) -> int:
        return self.meta.window

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.meta.features)

    @property
    def nfeatures(self) -> int:
        return len(self.meta.features)

    @property
    def step_seconds(self) -> float:
        return self.meta.step_seconds

    @property
    def inputs(self) -> InputPlan:
        return InputPlan.from_dict(self.meta.inputs)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta.classes)

    def count_params(self) -> int:
        return int(self.network.count_params()) if self.network is not None else 0

    # ---- the proposal's API ----------------------------------------------------------------

    def initialize_new_weights(self, seed: int = 0) -> None:
        """Build the network afresh with random weights (the learned statistics and classes are
        cleared). Without it, `train` continues from the weights it has: fine-tuning."""
        backend.choose()
        import keras

        keras.utils.set_random_seed(seed)
        self.meta.state = {}
        self.meta.classes = []
        self.network = self.build_network()
        self._forget_compiled()

    def import_weights(self, path: Path | str) -> None:
        """Load weights saved by `save` (an artifact directory or its weights file) into this network."""
        path = Path(path)
        file = path / WEIGHTS_FILE if path.is_dir() else path
        if self.network is None:
            import keras

            # The weights come from the file: build without drawing random initial ones (on JAX
            # each draw is compiled, seconds in all). The variables are set by load_weights.
            with keras.StatelessScope():
                self.network = self.build_network()
        try:
            self.network.load_weights(str(file))
        except Exception as exc:  # h5py and Keras raise many types for a corrupt or mismatched file
            raise ArtifactInvalid(
                path, f"{file.name} does not fit this {self.kind} ({exc.__class__.__name__}: {exc})"
            ) from None
        self._forget_compiled()

    def train(
        self,
        number_of_iterations: int,
        batch_size: int,
        data: WindowSet,
        *,
        validation: WindowSet | None = None,
        learning_rate: float = 2e-3,
        seed: int = 0,
        callbacks: Sequence[Any] = (),
        log: Log | None = None,
    ) -> dict[str, float]:
        """Fit the network on `data` for `number_of_iterations` epochs; returns training statistics.

        An unsupervised detector uses the normal windows only; a supervised one learns the
        anomaly classes present in `data`."""
        if number_of_iterations < 1 or batch_size < 1:
            raise ValueError("number_of_iterations and batch_size must be >= 1")
        self._check_shape(data.x)
        if self.network is None:
            self.initialize_new_weights(seed)
        import keras

        keras.utils.set_random_seed(seed)
        stats = self._fit(
            data,
            validation=validation,
            epochs=number_of_iterations,
            batch_size=batch_size,
            learning_rate=learning_rate,
            callbacks=list(callbacks),
            log=log or (lambda _: None),
        )
        self._forget_compiled()
        self._after_fit(data)
        self.meta.trained_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        return stats

    def predict(self, data: WindowSet | np.ndarray) -> np.ndarray:
        """True where a window is anomalous."""
        return self.score(data).scores > 1.0

    def score(self, data: WindowSet | np.ndarray, batch_size: int = 1024) -> ScoreBatch:
        """Normalised scores of any number of windows, in fixed-size batches."""
        return self._normalised(*self.raw_scores_batched(_windows(data), batch_size))

    def evaluate(self, data: WindowSet) -> dict[str, Any]:
        """Window-level precision, recall, F1 and confusion matrix on labelled windows."""
        out = self.score(data)
        return window_metrics(out.scores > 1.0, data.label, out.looks_like, classes=self.classes)

    def calibrate(
        self, data: WindowSet, *, target_per_day: float = 0.5, margin: float | None = None, floor: float = 0.0
    ) -> float:
        """Set the threshold so that the normal windows of `data` (validation data) raise at most
        `target_per_day` alerts per instance-day, times `margin` (default: the kind's
        `calibration_margin`); returns it (raw units)."""
        margin = self.calibration_margin if margin is None else margin
        normal = data.subset(data.label == "")
        if not len(normal):
            raise ValueError("calibration needs normal windows")
        raw = self.raw_scores_batched(normal.x)[0]
        t, achieved = threshold_for_rate(raw, normal.series_id, normal.end_ms, self.step_seconds, target_per_day)
        floor = max(floor, self.threshold_floor())
        self.threshold = max(t * margin, floor, 1e-6)
        self.meta.calibration = {
            "target_false_alerts_per_instance_day": target_per_day,
            "margin": margin,
            "floor": floor,
            "normal_windows": len(normal),
            "instance_days": round(normal.instance_days(self.step_seconds), 4),
            "raw_threshold_before_margin": float(t),
            "false_alerts_per_instance_day_at_it": achieved,
        }
        return self.threshold

    # ---- serving ---------------------------------------------------------------------------

    def score_batch(self, windows: np.ndarray) -> ScoreBatch:
        return self.start_batch(windows)()

    def start_batch(self, windows: np.ndarray) -> Callable[[], ScoreBatch]:
        """Begin scoring `windows`; the returned callable waits for the ScoreBatch. `windows` must
        stay unchanged until then (on JAX the pass may still be reading them)."""
        finish = self._start_raw(windows)
        return lambda: self._normalised(*finish())

    def _normalised(self, raw: np.ndarray, dev: np.ndarray, like: list[str] | None) -> ScoreBatch:
        return ScoreBatch((raw / np.float32(self.threshold)).astype(np.float32, copy=False), dev, like)

    def raw_scores(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """Scores in the model's own units (B,), feature deviations (B, F), and class guesses."""
        return self._start_raw(windows)()

    def _start_raw(self, windows: np.ndarray) -> Callable[[], tuple[np.ndarray, np.ndarray, list[str] | None]]:
        if self.network is None or not self._ready():
            raise RuntimeError(f"the {self.kind} is not trained: call train() or load an artifact")
        windows = np.asarray(windows, dtype=np.float32)
        self._check_shape(windows)
        fn = self._compiled
        if fn is None:
            with self._lock:
                if self._compiled is None:
                    self._compiled = compile_forward(self.network, self._forward, self.window, self.nfeatures)
                fn = self._compiled
        pending = fn.start(windows)

        def finish() -> tuple[np.ndarray, np.ndarray, list[str] | None]:
            out = pending()
            raw, dev = out[0].astype(np.float32, copy=False), out[1].astype(np.float32, copy=False)
            like = None
            if len(out) > 2 and self.classes:
                names = self.classes
                like = [names[i] for i in np.asarray(out[2]).astype(np.int64).tolist()]
            return raw, dev, like

        return finish

    def raw_scores_batched(
        self, windows: np.ndarray, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """`raw_scores` of many windows in fixed-size batches (the last one padded)."""
        n = len(windows)
        raw = np.empty(n, dtype=np.float32)
        dev = np.empty((n, self.nfeatures), dtype=np.float32)
        like: list[str] | None = [] if self.classes else None
        for a in range(0, n, batch_size):
            chunk = windows[a : a + batch_size]
            k = len(chunk)
            if k < batch_size and n > batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - k, axis=0)])
            r, d, lk = self.raw_scores(chunk)
            raw[a : a + k], dev[a : a + k] = r[:k], d[:k]
            if like is not None and lk is not None:
                like.extend(lk[:k])
        return raw, dev, like

    def _check_shape(self, windows: np.ndarray) -> None:
        if windows.ndim != 3 or windows.shape[1:] != (self.window, self.nfeatures):
            raise ValueError(
                f"windows must have shape (batch, {self.window}, {self.nfeatures}), got {tuple(windows.shape)}"
            )

    def _forget_compiled(self) -> None:
        with self._lock:
            self._compiled = None

    # ---- artifact --------------------------------------------------------------------------

    def save(self, path: Path | str) -> None:
        """Write the artifact directory: detectord-model.json and model.weights.h5."""
        import keras

        if self.network is None or not self._ready():
            raise RuntimeError("cannot save an untrained model")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.meta.config = self.config.to_dict()
        self.meta.framework = {"keras": keras.__version__, "backend": keras.backend.backend()}
        self.network.save_weights(str(path / WEIGHTS_FILE))
        write_meta(path, self.meta)
        self.path = path

    @classmethod
    def load(cls, path: Path | str) -> Detector:
        """Load an artifact directory (any kind: the metadata says which)."""
        from detectord.detectors import load_detector

        return load_detector(path)

    @classmethod
    def from_artifact(cls, path: Path, meta: ModelMeta) -> Detector:
        """Rebuild from an artifact directory whose metadata has been read and checked."""
        try:
            config = cls.config_class.from_dict(meta.config)
            det = cls(
                meta.features,
                window=meta.window,
                step_seconds=meta.step_seconds,
                inputs=InputPlan.from_dict(meta.inputs),
                config=config,
                meta=meta,
            )
            det._restore_state()
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactInvalid(path, f"bad model settings: {exc}") from None
        det.import_weights(path)
        det.path = path
        return det

    # ---- what each detector defines ----------------------------------------------------------

    @abstractmethod
    def build_network(self) -> Any:
        """A fresh Keras model."""

    @abstractmethod
    def _fit(
        self,
        data: WindowSet,
        *,
        validation: WindowSet | None,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        callbacks: list[Any],
        log: Log,
    ) -> dict[str, float]:
        """Train `self.network`."""

    def _after_fit(self, data: WindowSet) -> None:
        """Learn the statistics beside the weights (into self.meta.state)."""

    def _restore_state(self) -> None:
        """Read self.meta.state back after loading."""

    def _ready(self) -> bool:
        return True

    def threshold_floor(self) -> float:
        """The lowest threshold that makes sense whatever the validation data (raw units)."""
        return 0.0

    @abstractmethod
    def _forward(self, x: Any, apply: Callable[[Any], Any]) -> tuple[Any, ...]:
        """(raw scores, feature deviations[, class index]) in keras.ops, given `apply` runs the network."""


def _windows(data: WindowSet | np.ndarray) -> np.ndarray:
    x = data if isinstance(data, np.ndarray) else data.x
    return np.asarray(x, dtype=np.float32)

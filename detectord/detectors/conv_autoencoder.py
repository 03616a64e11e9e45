"""A 1-D convolutional autoencoder over (W, F) windows of scaled features.

Trained on normal windows only. The anomaly score is the squared reconstruction error, in
training standard deviations, of the window's newest `score_steps` rows: per row the mean over
features, then the mean over the rows left after dropping the `trim` worst, divided by the
threshold. Shares and latency quantiles of a step that counted few queries are mostly noise, so
their errors are weighted by n / (n + count_half), n being the step's query rate.
Keras 3 layers and ops only: any backend runs it (see `compiled.py` for the serving pass).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import WEIGHTS_FILE, ArtifactInvalid, ModelMeta
from .artifact import write_meta as _write_meta
from .base import Detector
from .compiled import Compiled, compile_forward
from .scaler import Scaler

_SHARES_AND_QUANTILES = ("rcode_noerror_share", "rcode_nxdomain_share", "rcode_servfail_share",
                         "rcode_refused_share", "latency_p50_seconds", "latency_p99_seconds", "cache_hit_ratio")


def _default_weighting() -> dict[str, list[str]]:
    return {"request_rate": list(_SHARES_AND_QUANTILES),
            "upstream_request_rate": ["upstream_latency_p99_seconds"]}


@dataclass(frozen=True)
class ConvAutoencoderConfig:
    # Channels of the encoder's strided convolutions (each halves the time axis); the decoder mirrors them.
    filters: tuple[int, ...] = (16, 16)
    kernel_size: int = 5
    # Channels of the code, at window / 2**len(filters) time steps.
    latent: int = 6
    # The score reads the newest `score_steps` rows and drops the `trim` worst of them: a
    # restart or a burst lasting a few steps does not alert, a state held for more rows does.
    score_steps: int = 8
    trim: int = 3
    # Each squared error counts at most this much, so one feature cannot carry the score alone
    # unless it stays far off.
    residual_cap: float = 100.0
    # The network sees scaled features clipped to ±input_clip, and its error is measured against
    # the unclipped ones: a SERVFAIL share 100 deviations out cannot drag the reconstruction of
    # every other feature along (which would blame the wrong features).
    input_clip: float = 10.0
    # {count feature: [features whose noise it governs]}, and the rate at which they count half.
    count_weighting: dict[str, list[str]] = field(default_factory=_default_weighting)
    count_half: float = 10.0

    def validate(self, window: int, features: Sequence[str]) -> None:
        if window < 8:
            raise ValueError(f"window must be >= 8 steps, got {window}")
        if window % 2 ** len(self.filters):
            raise ValueError(f"window must be a multiple of {2 ** len(self.filters)} for {len(self.filters)} "
                             f"strided layers, got {window}")
        if not 1 <= self.score_steps <= window:
            raise ValueError(f"score_steps must be in [1, window={window}], got {self.score_steps}")
        if not 0 <= self.trim < self.score_steps:
            raise ValueError(f"trim must be in [0, score_steps={self.score_steps}), got {self.trim}")
        if self.latent < 1 or self.kernel_size < 1 or any(f < 1 for f in self.filters):
            raise ValueError("filters, kernel_size and latent must be >= 1")
        if not (self.residual_cap > 0 and self.count_half >= 0 and self.input_clip > 0):
            raise ValueError("residual_cap and input_clip must be > 0 and count_half >= 0")
        named = [*self.count_weighting, *(f for fs in self.count_weighting.values() for f in fs)]
        missing = sorted({f for f in named if f not in features})
        if missing:
            raise ValueError(f"count_weighting names features the model does not have: {missing}")

    def weight_sources(self, features: Sequence[str]) -> np.ndarray:
        """Per feature, the index of the count feature weighting it, or -1."""
        src = np.full(len(features), -1, dtype=np.int64)
        for count, governed in self.count_weighting.items():
            for f in governed:
                src[list(features).index(f)] = list(features).index(count)
        return src

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvAutoencoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown conv_autoencoder settings {unknown}")
        d = dict(d)
        if "filters" in d:
            d["filters"] = tuple(int(f) for f in d["filters"])
        if "count_weighting" in d:
            d["count_weighting"] = {str(k): [str(f) for f in v] for k, v in d["count_weighting"].items()}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d


def build_model(window: int, nfeatures: int, cfg: ConvAutoencoderConfig) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((window, nfeatures), name="window")
    x = inp
    for i, f in enumerate(cfg.filters):
        x = layers.Conv1D(f, cfg.kernel_size, strides=2, padding="same", activation="relu", name=f"enc{i}")(x)
    x = layers.Conv1D(cfg.latent, 3, padding="same", name="code")(x)
    for i, f in enumerate(reversed(cfg.filters)):
        # Upsample then convolve: faster on CPU than Conv1DTranspose, and no checkerboard artefacts.
        x = layers.UpSampling1D(2, name=f"up{i}")(x)
        x = layers.Conv1D(f, cfg.kernel_size, padding="same", activation="relu", name=f"dec{i}")(x)
    out = layers.Conv1D(nfeatures, 3, padding="same", name="reconstruction")(x)
    return keras.Model(inp, out, name="conv_autoencoder")


class ConvAutoencoder(Detector):
    kind = "conv_autoencoder"

    def __init__(
        self,
        features: Sequence[str],
        *,
        window: int = 32,
        step_seconds: float = 15.0,
        config: ConvAutoencoderConfig | None = None,
        scaler: Scaler | None = None,
        name: str = "default",
        version: str = "1",
        meta: ModelMeta | None = None,
    ) -> None:
        if not features:
            raise ValueError("features must not be empty")
        self.config = config or ConvAutoencoderConfig()
        self.config.validate(window, features)
        if scaler is not None and tuple(scaler.names) != tuple(features):
            raise ValueError("the scaler's features differ from the model's")
        self.scaler = scaler
        self.meta = meta or ModelMeta(
            name=name, kind=self.kind, version=version, trained_at="", features=list(features),
            window=window, step_seconds=float(step_seconds), threshold=1.0,
            scaler=scaler.to_dict() if scaler else {}, config=self.config.to_dict())
        self.model = build_model(window, len(features), self.config)
        self._weight_src = self.config.weight_sources(features)
        self._compiled: Compiled | None = None
        self._lock = threading.Lock()

    @property
    def nfeatures(self) -> int:
        return len(self.meta.features)

    def count_params(self) -> int:
        return int(self.model.count_params())

    # ---- training -------------------------------------------------------------------------

    def fit(  # type: ignore[override]
        self,
        windows: np.ndarray,
        *,
        validation: np.ndarray | None = None,
        epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 2e-3,
        seed: int = 0,
        verbose: int = 0,
        callbacks: Sequence[Any] = (),
    ) -> dict[str, float]:
        """Train on raw windows (N, W, F) of normal behaviour; fits the scaler first if unset."""
        import keras

        self._check_shape(windows)
        keras.utils.set_random_seed(seed)
        if self.scaler is None:
            self.scaler = Scaler.fit(self.meta.features, windows)
            self.meta.scaler = self.scaler.to_dict()
        clip = self.config.input_clip
        z = np.clip(self.scaler.transform_np(windows), -clip, clip)
        # The target carries each element's weight beside it, for the loss to split off.
        target = np.concatenate([z, self.weights_np(windows)], axis=-1)
        val = None
        if validation is not None:
            self._check_shape(validation)
            zv = np.clip(self.scaler.transform_np(validation), -clip, clip)
            val = (zv, np.concatenate([zv, self.weights_np(validation)], axis=-1))
        self.model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=self._loss)
        cbs = [keras.callbacks.ReduceLROnPlateau(monitor="val_loss" if val else "loss", factor=0.5, patience=2,
                                                 min_lr=learning_rate / 16), *callbacks]
        hist = self.model.fit(z, target, validation_data=val, epochs=epochs, batch_size=batch_size, shuffle=True,
                              verbose=verbose, callbacks=cbs)
        with self._lock:
            self._compiled = None
        self.meta.trained_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        out = {"loss": float(hist.history["loss"][-1]), "epochs": float(len(hist.history["loss"]))}
        if val is not None:
            out["val_loss"] = float(hist.history["val_loss"][-1])
        return out

    def weights_np(self, windows: np.ndarray) -> np.ndarray:
        """Per-element weights (N, W, F) of raw windows: n / (n + count_half) where a count governs."""
        src = self._weight_src
        w = np.ones(windows.shape, dtype=np.float32)
        cols = np.flatnonzero(src >= 0)
        n = np.maximum(np.nan_to_num(windows[..., src[cols]], nan=0.0), 0.0)
        w[..., cols] = n / (n + self.config.count_half) if self.config.count_half > 0 else 1.0
        return w

    def _weights_ops(self, x: Any) -> Any:
        from keras import ops

        src = self._weight_src
        n = ops.take(x, np.maximum(src, 0), axis=-1)
        n = ops.where(n > 0, ops.minimum(n, 1.0e30), 0.0)  # NaN → 0, +Inf → finite
        w = n / (n + self.config.count_half) if self.config.count_half > 0 else ops.ones_like(n)
        return ops.where(src >= 0, w, 1.0)

    def _loss(self, target: Any, recon: Any) -> Any:
        from keras import ops

        nf = self.nfeatures
        return ops.mean(target[..., nf:] * ops.square(target[..., :nf] - recon), axis=-1)

    # ---- scoring --------------------------------------------------------------------------

    def _forward(self, x: Any, apply: Any) -> tuple[Any, Any]:
        from keras import ops

        assert self.scaler is not None
        cfg = self.config
        k = cfg.score_steps
        z = self.scaler.transform_ops(x)
        recon = apply(ops.clip(z, -cfg.input_clip, cfg.input_clip))
        r = (z[:, -k:, :] - recon[:, -k:, :]) * ops.sqrt(self._weights_ops(x[:, -k:, :]))
        rows = ops.mean(ops.minimum(ops.square(r), cfg.residual_cap), axis=-1)
        kept = ops.sort(rows, axis=-1)[:, : k - cfg.trim]
        return ops.mean(kept, axis=-1), ops.mean(r, axis=1)

    def raw_scores(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.scaler is None:
            raise RuntimeError("the model is not trained: call fit() or load an artifact")
        windows = np.asarray(windows, dtype=np.float32)
        self._check_shape(windows)
        fn = self._compiled
        if fn is None:
            with self._lock:
                if self._compiled is None:
                    self._compiled = compile_forward(self.model, self._forward, self.window, self.nfeatures)
                fn = self._compiled
        raw, dev = fn(windows)
        return raw.astype(np.float32, copy=False), dev.astype(np.float32, copy=False)

    def _check_shape(self, windows: np.ndarray) -> None:
        if windows.ndim != 3 or windows.shape[1:] != (self.window, self.nfeatures):
            raise ValueError(f"windows must have shape (batch, {self.window}, {self.nfeatures}), "
                             f"got {tuple(windows.shape)}")

    # ---- artifact -------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        import keras

        if self.scaler is None:
            raise RuntimeError("cannot save an untrained model")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.meta.scaler = self.scaler.to_dict()
        self.meta.config = self.config.to_dict()
        self.meta.framework = {"keras": keras.__version__, "backend": keras.backend.backend()}
        self.model.save_weights(str(path / WEIGHTS_FILE))
        _write_meta(path, self.meta)

    @classmethod
    def load(cls, path: Path, meta: ModelMeta) -> ConvAutoencoder:
        try:
            config = ConvAutoencoderConfig.from_dict(meta.config)
            scaler = Scaler.from_dict(meta.scaler)
            det = cls(meta.features, window=meta.window, step_seconds=meta.step_seconds, config=config,
                      scaler=scaler, meta=meta)
        except (ValueError, TypeError) as exc:
            raise ArtifactInvalid(path, f"bad model settings: {exc}") from None
        try:
            det.model.load_weights(str(Path(path) / WEIGHTS_FILE))
        except Exception as exc:  # h5py and Keras raise many types for a corrupt or mismatched file
            raise ArtifactInvalid(path, f"{WEIGHTS_FILE} does not fit the model described in the metadata: "
                                        f"{exc.__class__.__name__}: {exc}") from None
        return det

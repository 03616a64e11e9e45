"""A 1-D convolutional autoencoder over windows of model inputs (unsupervised: normal windows only).

The score is the squared reconstruction error of the window's newest `score_steps` rows: per row
the mean over features (each term capped), then the mean over the rows left after dropping the
`trim` worst. Per-feature errors say which metric moved. `score: latent` uses the 2020
proposal's other score instead: the L2 distance of the window's code from the mean code of the
normal training windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from detectord.detectors.base import Detector, DetectorConfig
from detectord.detectors.fitting import Log, fit_callbacks, fit_stats

if TYPE_CHECKING:
    from detectord.detectors.windowset import WindowSet


@dataclass(frozen=True)
class ConvAutoencoderConfig(DetectorConfig):
    # Channels of the encoder's strided convolutions (each halves the time axis); the decoder mirrors them.
    filters: tuple[int, ...] = (32, 32)
    kernel_size: int = 5
    # Channels of the code, at window / 2**len(filters) time steps.
    latent: int = 8
    score: Literal["reconstruction", "latent"] = "reconstruction"
    # The score reads the newest `score_steps` rows and drops the `trim` worst of them: a
    # burst of a step or two does not alert, a state held for more rows does.
    score_steps: int = 6
    trim: int = 1
    # Each squared error counts at most this much, so one feature cannot carry the score alone
    # unless it stays far off.
    residual_cap: float = 100.0
    # Errors within this many spreads cost nothing: a fleet's own noise (three times the lab's at a
    # tenth of its load) must not add up across features into an alert.
    tolerance: float = 1.0
    # The threshold is never below what one feature `min_excess` spreads beyond the tolerance in
    # every scored row gives: quiet validation data must not make a hair trigger.
    min_excess: float = 2.0
    noise: float = 0.1

    def validate(self, window: int) -> None:
        if window % 2 ** len(self.filters):
            raise ValueError(
                f"window must be a multiple of {2 ** len(self.filters)} for {len(self.filters)} "
                f"strided layers, got {window}"
            )
        if not 1 <= self.score_steps <= window:
            raise ValueError(f"score_steps must be in [1, window={window}], got {self.score_steps}")
        if not 0 <= self.trim < self.score_steps:
            raise ValueError(f"trim must be in [0, score_steps={self.score_steps}), got {self.trim}")
        if self.latent < 1 or self.kernel_size < 1 or any(f < 1 for f in self.filters):
            raise ValueError("filters, kernel_size and latent must be >= 1")
        if self.score not in ("reconstruction", "latent"):
            raise ValueError(f"score must be 'reconstruction' or 'latent', got {self.score!r}")
        if not self.residual_cap > 0 or self.tolerance < 0:
            raise ValueError("residual_cap must be > 0 and tolerance >= 0")


class ConvAutoencoder(Detector):
    """1-D convolutional autoencoder, trained on clean normal windows only: a window is anomalous
    when its newest rows reconstruct badly (or, scored "latent", when its code lies far from the
    mean normal code). Names the features that moved; no incident classes."""

    kind = "conv_autoencoder"
    config_class = ConvAutoencoderConfig
    # A reconstruction error sums every feature's noise, and a fleet's noise is its own (a tenth
    # of the load is three times noisier): more headroom than a classifier's probability needs.
    calibration_margin = 1.5

    def build_network(self) -> Any:
        import keras
        from keras import layers

        cfg: ConvAutoencoderConfig = self.config
        inp = keras.Input((self.window, self.nfeatures), name="window")
        # Denoising: the network learns to reconstruct through noise it never sees when scoring.
        x = layers.GaussianNoise(cfg.noise, name="noise")(inp) if cfg.noise > 0 else inp
        for i, f in enumerate(cfg.filters):
            x = layers.Conv1D(f, cfg.kernel_size, strides=2, padding="same", activation="relu", name=f"enc{i}")(x)
        code = layers.Conv1D(cfg.latent, 3, padding="same", name="code")(x)
        x = code
        for i, f in enumerate(reversed(cfg.filters)):
            # Upsample then convolve: faster on CPU than Conv1DTranspose, and no checkerboard artefacts.
            x = layers.UpSampling1D(2, name=f"up{i}")(x)
            x = layers.Conv1D(f, cfg.kernel_size, padding="same", activation="relu", name=f"dec{i}")(x)
        out = layers.Conv1D(self.nfeatures, 3, padding="same", name="reconstruction")(x)
        return keras.Model(inp, [out, code], name="conv_autoencoder")

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
        import keras

        x = data.x[data.clean_normal]
        if not len(x):
            raise ValueError("the autoencoder trains on normal windows, and there are none")
        # Training sees only the reconstruction; `code` is an output for scoring.
        trainer = keras.Model(self.network.inputs, self.network.outputs[0])
        trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
        val = None
        if validation is not None and validation.clean_normal.any():
            xv = validation.x[validation.clean_normal]
            val = (xv, xv)
        cbs = fit_callbacks(
            log, epochs, "autoencoder ", learning_rate=learning_rate, validated=val is not None, extra=callbacks
        )
        hist = trainer.fit(
            x, x, validation_data=val, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=cbs
        )
        return fit_stats(hist, train_windows=float(len(x)))

    def _after_fit(self, data: WindowSet) -> None:
        x = data.x[data.clean_normal]
        codes = []
        for a in range(0, len(x), 1024):
            codes.append(np.asarray(self.network(x[a : a + 1024], training=False)[1]).reshape(len(x[a : a + 1024]), -1))
        self.meta.state = {"latent_mean": np.concatenate(codes).mean(axis=0).astype(float).tolist()}

    def _ready(self) -> bool:
        return "latent_mean" in self.meta.state

    def threshold_floor(self) -> float:
        cfg: ConvAutoencoderConfig = self.config
        if cfg.score == "latent":
            return 0.0
        return min(cfg.min_excess**2, cfg.residual_cap) / self.nfeatures

    def _forward(self, x: Any, apply: Callable[[Any], Any]) -> tuple[Any, ...]:
        from keras import ops

        cfg: ConvAutoencoderConfig = self.config
        k = cfg.score_steps
        recon, code = apply(x)
        r = x[:, -k:, :] - recon[:, -k:, :]
        dev = ops.mean(r, axis=1)
        if cfg.score == "latent":
            mu = np.asarray(self.meta.state["latent_mean"], dtype=np.float32)
            flat = ops.reshape(code, (ops.shape(code)[0], -1))
            return ops.sqrt(ops.sum(ops.square(flat - mu), axis=-1)), dev
        excess = ops.maximum(ops.abs(r) - cfg.tolerance, 0.0)
        rows = ops.mean(ops.minimum(ops.square(excess), cfg.residual_cap), axis=-1)
        kept = ops.sort(rows, axis=-1)[:, : k - cfg.trim]
        return ops.mean(kept, axis=-1), dev

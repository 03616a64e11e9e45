"""A 1-D convolutional classifier (supervised): is a window anomalous, and which incident class
does it look like ("looks like upstream_timeout").

One network, two heads on a shared convolutional trunk: an anomaly logit, and a softmax over the
anomaly classes seen in training (trained on anomalous windows only). The raw score is
softplus(logit) = −log(1 − p), so it never saturates below the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from detectord.detectors.base import Detector, DetectorConfig
from detectord.detectors.fitting import Log, balanced_weights, fit_callbacks, fit_stats, synthetic_for

if TYPE_CHECKING:
    from detectord.detectors.windowset import WindowSet


@dataclass(frozen=True)
class ConvClassifierConfig(DetectorConfig):
    filters: tuple[int, ...] = (32, 32, 32)
    kernel_size: int = 5
    dense: int = 32
    dropout: float = 0.2
    # Weight of the class head's loss beside the anomaly head's.
    class_loss_weight: float = 0.5
    # Gaussian noise added to the inputs while training (in the instance's spreads).
    noise: float = 0.2
    # Synthetic incidents, as a share of the real anomalous windows: healthy windows whose newest
    # rows have a few features pushed 4-12 spreads off. They teach "far from this instance's
    # normal is anomalous" beyond the classes seen (outlier exposure); they have no class.
    synthetic: float = 0.5
    # Feature deviations (what an alert names) are the inputs' mean over the newest rows.
    explain_steps: int = 6

    def validate(self, window: int) -> None:
        if not self.filters or any(f < 1 for f in self.filters) or self.kernel_size < 1 or self.dense < 1:
            raise ValueError("filters, kernel_size and dense must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.explain_steps <= window:
            raise ValueError(f"explain_steps must be in [1, window={window}]")


def conv_trunk(
    window: int, nfeatures: int, filters: tuple[int, ...], kernel_size: int, noise: float
) -> tuple[Any, Any]:
    """The input, then strided convolutions, then max and mean over time: what the supervised
    detectors share. Gaussian noise on the inputs while training only."""
    import keras
    from keras import layers

    inp = keras.Input((window, nfeatures), name="window")
    x = layers.GaussianNoise(noise, name="noise")(inp) if noise > 0 else inp
    for i, f in enumerate(filters):
        x = layers.Conv1D(
            f, kernel_size, strides=2 if i < len(filters) - 1 else 1, padding="same", activation="relu", name=f"conv{i}"
        )(x)
    return inp, layers.Concatenate(name="pool")([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])


class ConvClassifier(Detector):
    """1-D convolutional classifier with two heads: anomalous or not, and which incident class
    (of those seen in training) the window looks like."""

    kind = "conv_classifier"
    supervised = True
    config_class = ConvClassifierConfig

    def build_network(self) -> Any:
        import keras
        from keras import layers

        cfg: ConvClassifierConfig = self.config
        inp, h = conv_trunk(self.window, self.nfeatures, cfg.filters, cfg.kernel_size, cfg.noise)
        h = layers.Dense(cfg.dense, activation="relu", name="dense")(h)
        h = layers.Dropout(cfg.dropout, name="dropout")(h)
        logit = layers.Dense(1, name="anomaly_logit")(h)
        outs = [logit]
        if len(self.classes) > 1:
            outs.append(layers.Dense(len(self.classes), activation="softmax", name="anomaly_class")(h))
        out = layers.Concatenate(name="heads")(outs) if len(outs) > 1 else logit
        return keras.Model(inp, out, name="conv_classifier")

    def _loss(self, y: Any, out: Any) -> Any:
        from keras import ops

        bce = ops.mean(ops.binary_crossentropy(y[:, :1], out[:, :1], from_logits=True), axis=-1)
        if len(self.classes) < 2:
            return bce
        cce = ops.categorical_crossentropy(y[:, 1:], ops.clip(out[:, 1:], 1e-7, 1.0))
        return bce + self.config.class_loss_weight * y[:, 0] * cce

    def _targets(self, data: WindowSet) -> np.ndarray:
        anomalous = data.anomalous
        y = np.zeros((len(data), 1 + (len(self.classes) if len(self.classes) > 1 else 0)), dtype=np.float32)
        y[:, 0] = anomalous
        index = {c: i for i, c in enumerate(self.classes)}
        for i, lb in enumerate(data.label):
            if lb and lb in index and y.shape[1] > 1:
                y[i, 1 + index[lb]] = 1.0
        return y

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

        data = data.labelled()
        # A trained classifier is fine-tuned: its class head stays, incidents of classes it does
        # not know teach the anomaly head only, and normal data alone will do (synthetic incidents,
        # as many as a share of the normal windows, keep "far from normal" anomalous).
        fine_tune = self.network is not None and self._ready()
        classes = self.classes if fine_tune else tuple(data.classes())
        if not classes:
            raise ValueError("the classifier needs anomalous windows with classes in its training data")
        if classes != self.classes:
            # The class head is sized by the classes: build the network for these.
            self.meta.classes = list(classes)
            self.network = self.build_network()
        self.network.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=self._loss)
        x, y = data.x, self._targets(data)
        at_least = int(data.clean_normal.sum()) if fine_tune else 0
        syn = synthetic_for(self, data, self.config.synthetic, at_least=at_least)
        n_syn = len(syn)
        if n_syn:
            y_syn = np.zeros((n_syn, y.shape[1]), dtype=np.float32)
            y_syn[:, 0] = 1.0
            x, y = np.concatenate([x, syn]), np.concatenate([y, y_syn])
        val = None
        if validation is not None:
            v = validation.labelled(classes)
            if len(v):
                val = (v.x, self._targets(v), balanced_weights(v.anomalous))
        cbs = fit_callbacks(
            log, epochs, "classifier ", learning_rate=learning_rate, validated=val is not None, extra=callbacks
        )
        hist = self.network.fit(
            x,
            y,
            sample_weight=balanced_weights(y[:, 0] > 0),
            validation_data=val,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
            callbacks=cbs,
        )
        return fit_stats(
            hist,
            train_windows=float(len(data)),
            train_anomalous=float(data.anomalous.sum()),
            synthetic_incidents=float(n_syn),
        )

    def _ready(self) -> bool:
        return bool(self.classes)

    def _forward(self, x: Any, apply: Callable[[Any], Any]) -> tuple[Any, ...]:
        from keras import ops

        out = apply(x)
        dev = ops.mean(x[:, -self.config.explain_steps :, :], axis=1)
        raw = ops.softplus(out[:, 0])
        if len(self.classes) < 2:
            return raw, dev, ops.zeros_like(raw, dtype="int32")
        return raw, dev, ops.argmax(out[:, 1:], axis=-1)

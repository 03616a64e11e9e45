"""A siamese network (supervised, contrastive): windows are embedded so that windows of the same
kind (normal, or one incident class) lie close and windows of different kinds at least `margin`
apart; a window is then classed by its distances to the centroids of normal and anomalous
training windows in that space.

Score "centroids" (the 2020 proposal's): d_normal / (d_normal + d_anomalous), d_anomalous being
the distance to the nearest incident-class centroid; "normal_distance": d_normal alone, which
does not need an incident to resemble a known one. The nearest class centroid names the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from detectord.detectors.base import Detector, DetectorConfig
from detectord.detectors.conv_classifier import conv_trunk
from detectord.detectors.fitting import Log, epoch_logger, synthetic_for

if TYPE_CHECKING:
    from detectord.detectors.windowset import WindowSet


@dataclass(frozen=True)
class SiameseConfig(DetectorConfig):
    filters: tuple[int, ...] = (32, 32, 32)
    kernel_size: int = 5
    embedding: int = 16
    margin: float = 1.0
    # Pairs drawn per epoch: half with both windows of one kind, half of two kinds.
    pairs_per_epoch: int = 20000
    score: Literal["centroids", "normal_distance"] = "centroids"
    explain_steps: int = 6
    noise: float = 0.2
    # Synthetic incidents (see ConvClassifierConfig.synthetic), a kind of their own in the pairs:
    # their centroid counts for the score, never for naming a class.
    synthetic: float = 0.5
    # Stop when the validation loss has not improved for this many epochs (best weights kept).
    patience: int = 6

    def validate(self, window: int) -> None:
        if not self.filters or any(f < 1 for f in self.filters) or self.kernel_size < 1 or self.embedding < 1:
            raise ValueError("filters, kernel_size and embedding must be >= 1")
        if not self.margin > 0 or self.pairs_per_epoch < 2:
            raise ValueError("margin must be > 0 and pairs_per_epoch >= 2")
        if self.score not in ("centroids", "normal_distance"):
            raise ValueError(f"score must be 'centroids' or 'normal_distance', got {self.score!r}")
        if not 1 <= self.explain_steps <= window:
            raise ValueError(f"explain_steps must be in [1, window={window}]")


def draw_pairs(kinds: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` index pairs over windows of integer `kinds` (0 normal): anchors spread evenly over kinds,
    half the partners of the anchor's kind, half of another; and 1.0 where the kinds match."""
    by_kind = [np.flatnonzero(kinds == k) for k in np.unique(kinds)]
    by_kind = [ix for ix in by_kind if len(ix)]
    if len(by_kind) < 2:
        raise ValueError("pairs need windows of at least two kinds")
    k_a = rng.integers(0, len(by_kind), n)
    same = rng.random(n) < 0.5
    other = (k_a + rng.integers(1, len(by_kind), n)) % len(by_kind)
    k_b = np.where(same, k_a, other)
    a = np.array([by_kind[k][rng.integers(0, len(by_kind[k]))] for k in k_a])
    b = np.array([by_kind[k][rng.integers(0, len(by_kind[k]))] for k in k_b])
    return a, b, same.astype(np.float32)


SYNTHETIC = "~synthetic"


class Siamese(Detector):
    """Siamese network: windows embedded by a contrastive loss and classed by their distances to
    the normal and per-class centroids (see the module docstring for its two scores)."""

    kind = "siamese"
    supervised = True
    config_class = SiameseConfig
    _synthetic: np.ndarray | None = None

    def build_network(self) -> Any:
        import keras
        from keras import layers

        cfg: SiameseConfig = self.config
        inp, h = conv_trunk(self.window, self.nfeatures, cfg.filters, cfg.kernel_size, cfg.noise)
        emb = layers.Dense(cfg.embedding, name="embedding")(h)
        return keras.Model(inp, emb, name="siamese_embedding")

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
        from keras import layers, ops

        cfg: SiameseConfig = self.config
        data = data.labelled()
        classes = data.classes()
        if not classes:
            raise ValueError("the siamese network needs anomalous windows with classes in its training data")
        self.meta.classes = list(classes)

        def kinds_of(labels: np.ndarray) -> np.ndarray:
            return np.array([0 if not lb else 1 + classes.index(lb) for lb in labels])

        kinds = kinds_of(data.label)
        x = data.x
        syn = synthetic_for(self, data, cfg.synthetic)
        self._synthetic = syn if len(syn) else None
        if len(syn):
            x = np.concatenate([x, syn])
            kinds = np.concatenate([kinds, np.full(len(syn), 1 + len(classes))])
        a_in = keras.Input((self.window, self.nfeatures), name="a")
        b_in = keras.Input((self.window, self.nfeatures), name="b")
        ea, eb = self.network(a_in), self.network(b_in)
        d = layers.Lambda(
            lambda t: ops.sqrt(ops.sum(ops.square(t[0] - t[1]), axis=-1, keepdims=True) + 1e-9), name="distance"
        )([ea, eb])
        pair_model = keras.Model([a_in, b_in], d)
        margin = cfg.margin

        def contrastive(y: Any, dist: Any) -> Any:
            dist = dist[:, 0]
            y = y[:, 0]
            return y * ops.square(dist) + (1.0 - y) * ops.square(ops.maximum(margin - dist, 0.0))

        pair_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=contrastive)
        rng = np.random.default_rng(int(np.sum(kinds)) % (2**31))
        cbs = [epoch_logger(log, epochs, "siamese "), *callbacks]
        val_pairs = None
        if validation is not None:
            v = validation.labelled(classes)
            vk = kinds_of(v.label)
            if len(np.unique(vk)) > 1:
                va, vb, vy = draw_pairs(vk, min(cfg.pairs_per_epoch // 4, 5000), np.random.default_rng(7))
                val_pairs = ([v.x[va], v.x[vb]], vy[:, None])
        losses, val_losses = [], []
        best: tuple[float, list[Any]] | None = None
        for cb in cbs:
            cb.set_model(pair_model)
            cb.on_train_begin()
        for epoch in range(epochs):
            ia, ib, y = draw_pairs(kinds, cfg.pairs_per_epoch, rng)
            h = pair_model.fit(
                [x[ia], x[ib]],
                y[:, None],
                batch_size=batch_size,
                epochs=1,
                verbose=0,
                validation_data=val_pairs,
                shuffle=True,
            )
            logs = {k: float(v[-1]) for k, v in h.history.items()}
            losses.append(logs["loss"])
            for cb in cbs:
                cb.on_epoch_end(epoch, logs)
            if "val_loss" in logs:
                val_losses.append(logs["val_loss"])
                if best is None or logs["val_loss"] < best[0]:
                    best = (logs["val_loss"], self.network.get_weights())
                elif len(val_losses) - 1 - int(np.argmin(val_losses)) >= cfg.patience:
                    break
        for cb in cbs:
            cb.on_train_end()
        if best is not None:
            self.network.set_weights(best[1])
        out = {
            "loss": losses[-1],
            "epochs": float(len(losses)),
            "train_windows": float(len(data)),
            "train_anomalous": float(data.anomalous.sum()),
        }
        if val_losses:
            out["val_loss"] = val_losses[-1]
        return out

    def embed(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return np.concatenate(
            [np.asarray(self.network(x[a : a + batch_size], training=False)) for a in range(0, len(x), batch_size)]
        )

    def _after_fit(self, data: WindowSet) -> None:
        data = data.labelled()
        e = self.embed(data.x)
        normal = e[data.normal]
        centroids = {"": normal.mean(axis=0).astype(float).tolist()}
        for c in self.classes:
            m = np.array([lb == c for lb in data.label], dtype=bool)
            centroids[c] = e[m].mean(axis=0).astype(float).tolist()
        if self._synthetic is not None:
            centroids[SYNTHETIC] = self.embed(self._synthetic).mean(axis=0).astype(float).tolist()
        self.meta.state = {"centroids": centroids}

    def _ready(self) -> bool:
        return "centroids" in self.meta.state and bool(self.classes)

    def _forward(self, x: Any, apply: Callable[[Any], Any]) -> tuple[Any, ...]:
        from keras import ops

        cfg: SiameseConfig = self.config
        cents = self.meta.state["centroids"]
        c_normal = np.asarray(cents[""], dtype=np.float32)
        named = [cents[c] for c in self.classes]
        c_anom = np.asarray(named + ([cents[SYNTHETIC]] if SYNTHETIC in cents else []), dtype=np.float32)  # (K, E)
        e = apply(x)
        d_n = ops.sqrt(ops.sum(ops.square(e - c_normal), axis=-1) + 1e-9)
        d_c = ops.sqrt(ops.sum(ops.square(e[:, None, :] - c_anom[None, :, :]), axis=-1) + 1e-9)
        d_a = ops.min(d_c, axis=-1)
        raw = d_n if cfg.score == "normal_distance" else d_n / (d_n + d_a)
        dev = ops.mean(x[:, -cfg.explain_steps :, :], axis=1)
        return raw, dev, ops.argmin(d_c[:, : len(named)], axis=-1)

"""What fitting a detector shares across kinds: the callbacks `Model.fit` runs with, the
statistics it reports, class-balanced sample weights, and the synthetic incidents supervised
kinds learn "far from this instance's normal" from (outlier exposure). Keras is imported here
only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from detectord.detectors.base import Detector
    from detectord.detectors.windowset import WindowSet

Log = Callable[[str], None]


def fit_callbacks(
    log: Log,
    epochs: int,
    what: str,
    *,
    learning_rate: float,
    validated: bool,
    extra: Sequence[Any] = (),
    patience: int = 6,
) -> list[Any]:
    """What `Model.fit` runs with: the learning rate halved on a plateau (down to a sixteenth), with
    validation data a stop after `patience` epochs without improvement (best weights kept), a
    line per epoch, then the caller's callbacks."""
    import keras

    monitor = "val_loss" if validated else "loss"
    stop = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)]
    return [
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=3, min_lr=learning_rate / 16),
        *(stop if validated else []),
        epoch_logger(log, epochs, what),
        *extra,
    ]


def fit_stats(history: Any, **more: float) -> dict[str, float]:
    """The last losses and the epochs run, from `Model.fit`'s history, with `more`."""
    h = history.history
    out = {"loss": float(h["loss"][-1]), "epochs": float(len(h["loss"])), **more}
    if "val_loss" in h:
        out["val_loss"] = float(h["val_loss"][-1])
    return out


def epoch_logger(log: Log, epochs: int, what: str = "") -> Any:
    """A Keras callback printing one line per epoch (Keras' own progress bar is off)."""
    import time

    import keras

    t0 = time.perf_counter()

    class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            parts = " ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()) if k.endswith("loss"))
            log(f"  {what}epoch {epoch + 1}/{epochs}: {parts} ({time.perf_counter() - t0:.0f}s)")

    return EpochLog()


def synthetic_incidents(
    normal: np.ndarray, n: int, low: np.ndarray, clip: float, rng: np.random.Generator
) -> np.ndarray:
    """`n` copies of random normal windows with 1-3 features moved 4-12 spreads in their newest
    4..W/2 rows, each feature within [low, clip] (see `InputPlan.low`): a feature that cannot go
    below 0 (absolute ones, 0 when healthy, and those where only a rise counts) only up."""
    out = normal[rng.integers(0, len(normal), n)].copy()
    w, f = out.shape[1:]
    for i in range(n):
        feats = rng.choice(f, rng.integers(1, 4), replace=False)
        rows = rng.integers(4, w // 2 + 1)
        sign = np.where(low[feats] >= 0, 1.0, rng.choice([-1.0, 1.0], len(feats)))
        tail = out[i, w - rows :]  # a view: (rows, F)
        tail[:, feats] += sign * rng.uniform(4.0, 12.0, len(feats))
    np.clip(out, low, clip, out=out)
    return out


def synthetic_for(det: Detector, data: WindowSet, share: float, *, at_least: int = 0) -> np.ndarray:
    """`share` × the anomalous windows of `data` (or × `at_least`, if more), as synthetic incidents
    made from its clean normal windows in `det`'s inputs (none when either is missing)."""
    n = int(share * max(int(data.anomalous.sum()), at_least))
    normal = data.x[data.clean_normal]
    if not n or not len(normal):
        return data.x[:0]
    plan = det.inputs
    return synthetic_incidents(normal, n, plan.low, plan.baseline.clip, np.random.default_rng(len(data)))


def balanced_weights(anomalous: np.ndarray) -> np.ndarray:
    """Sample weights giving normal and anomalous windows equal total weight."""
    n_a = max(1, int(anomalous.sum()))
    n_n = max(1, int((~anomalous).sum()))
    return np.where(anomalous, 0.5 * len(anomalous) / n_a, 0.5 * len(anomalous) / n_n).astype(np.float32)

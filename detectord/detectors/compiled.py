"""A compiled forward pass per Keras backend; the only module here that names a backend.

`compile_forward(model, fn, window, nfeatures)` returns a numpy → numpy callable running
`fn(x, apply)` (where `apply` runs the model) compiled for the active backend, so serving
never goes through `model.predict` and its per-call overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Forward = Callable[[Any, Callable[[Any], Any]], tuple[Any, ...]]
Compiled = Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _tensorflow(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import tensorflow as tf

    def forward(x: Any) -> tuple[Any, ...]:
        return fn(x, lambda z: model(z, training=False))

    # A fixed signature with an unknown batch size: one trace serves every batch size.
    run = tf.function(forward, input_signature=[tf.TensorSpec([None, window, nfeatures], tf.float32)], autograph=False)

    def call(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in run(x))

    return call


def _jax(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import jax

    def pure(tv: Any, ntv: Any, x: Any) -> tuple[Any, ...]:
        return fn(x, lambda z: model.stateless_call(tv, ntv, z, training=False)[0])

    run = jax.jit(pure)  # traced once per batch size
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def call(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(t) for t in run(tv, ntv, x))

    return call


def _torch(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import torch
    from keras import ops

    def call(x: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            out = fn(ops.convert_to_tensor(x), lambda z: model(z, training=False))
        return tuple(ops.convert_to_numpy(t) for t in out)

    return call


def _numpy(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    from keras import ops

    def call(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(ops.convert_to_numpy(t) for t in fn(x, lambda z: model(z, training=False)))

    return call


COMPILERS: dict[str, Callable[[Any, Forward, int, int], Compiled]] = {
    "tensorflow": _tensorflow,
    "jax": _jax,
    "torch": _torch,
    "numpy": _numpy,
}


def compile_forward(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import keras

    backend = keras.backend.backend()
    try:
        compiler = COMPILERS[backend]
    except KeyError:
        raise RuntimeError(
            f"Keras backend {backend!r} is not supported for serving; use one of {', '.join(COMPILERS)}"
        ) from None
    return compiler(model, fn, window, nfeatures)

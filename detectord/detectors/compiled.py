"""A compiled forward pass per Keras backend; the only module here that names a backend.

`compile_forward(model, fn, window, nfeatures)` returns a numpy → numpy callable running
`fn(x, apply)` (where `apply` runs the model) compiled for the active backend, so serving
never goes through `model.predict` and its per-call overhead. Its `start(x)` begins the pass and
returns what waits for its result: on JAX the pass runs on the device while the caller fills the
next batch (the other backends compute at `start`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Forward = Callable[[Any, Callable[[Any], Any]], tuple[Any, ...]]
Outputs = tuple[np.ndarray, ...]


class Compiled:
    """A compiled forward pass: `start(x)` returns a callable that waits for the outputs; calling
    the pass itself does both."""

    def __init__(self, start: Callable[[np.ndarray], Callable[[], Outputs]]) -> None:
        self.start = start

    def __call__(self, x: np.ndarray) -> Outputs:
        return self.start(x)()


def _synchronous(call: Callable[[np.ndarray], Outputs]) -> Compiled:
    def start(x: np.ndarray) -> Callable[[], Outputs]:
        out = call(x)
        return lambda: out

    return Compiled(start)


def _tensorflow(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import tensorflow as tf

    def forward(x: Any) -> tuple[Any, ...]:
        return fn(x, lambda z: model(z, training=False))

    # A fixed signature with an unknown batch size: one trace serves every batch size.
    run = tf.function(forward, input_signature=[tf.TensorSpec([None, window, nfeatures], tf.float32)], autograph=False)

    def call(x: np.ndarray) -> Outputs:
        return tuple(t.numpy() for t in run(x))

    return _synchronous(call)


def _jax(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import jax

    def pure(tv: Any, ntv: Any, x: Any) -> tuple[Any, ...]:
        return fn(x, lambda z: model.stateless_call(tv, ntv, z, training=False)[0])

    run = jax.jit(pure)  # traced once per batch size
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def start(x: np.ndarray) -> Callable[[], Outputs]:
        # JAX dispatches asynchronously: this returns once the pass is queued on the device.
        out = run(tv, ntv, x)
        return lambda: tuple(np.asarray(t) for t in out)

    return Compiled(start)


def _torch(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    import torch
    from keras import ops

    def call(x: np.ndarray) -> Outputs:
        with torch.no_grad():
            out = fn(ops.convert_to_tensor(x), lambda z: model(z, training=False))
        return tuple(ops.convert_to_numpy(t) for t in out)

    return _synchronous(call)


def _numpy(model: Any, fn: Forward, window: int, nfeatures: int) -> Compiled:
    from keras import ops

    def call(x: np.ndarray) -> Outputs:
        return tuple(ops.convert_to_numpy(t) for t in fn(x, lambda z: model(z, training=False)))

    return _synchronous(call)


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

"""Which Keras backend runs the models: `KERAS_BACKEND` where set, else the first installed of
`PREFERRED`. Keras reads the choice once, at its first import, so it is made before that."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from detectord.errors import ModelError

# The base install's backend first: JAX starts in half the time and memory of TensorFlow and
# scores the same to 1e-5 (bench/backends.py, tests/detectors/test_backends.py).
PREFERRED = ("jax", "tensorflow", "torch")
# What each backend needs importable, and what to install for it.
MODULES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch", "numpy": "jax"}
INSTALL = {
    "jax": "pip install detectord (its base install), or detectord[jax-cuda] for NVIDIA GPUs",
    "tensorflow": "pip install 'detectord[tf]'",
    "torch": "pip install torch",
    "numpy": "pip install detectord (the numpy backend runs its convolutions on JAX)",
}


class BackendMissing(ModelError):
    """No Keras backend detectord can run is installed, or not the one `KERAS_BACKEND` names."""

    def __init__(self, wanted: str | None) -> None:
        self.wanted = wanted
        if wanted is None:
            msg = f"no Keras backend is installed (one of {', '.join(PREFERRED)}); {INSTALL['jax']}"
        elif wanted not in MODULES:
            msg = f"KERAS_BACKEND={wanted!r} is not a backend detectord runs; use one of {', '.join(MODULES)}"
        else:
            msg = f"KERAS_BACKEND={wanted} but {MODULES[wanted]} is not installed: {INSTALL[wanted]}"
        super().__init__(msg)


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODULES[name]) is not None


def choose(environ: MutableMapping[str, str] = os.environ) -> str:
    """The backend Keras will run, set in `environ` for Keras to read; raises `BackendMissing`."""
    wanted = environ.get("KERAS_BACKEND")
    if wanted:
        if wanted not in MODULES or not installed(wanted):
            raise BackendMissing(wanted)
        return wanted
    for name in PREFERRED:
        if installed(name):
            environ["KERAS_BACKEND"] = name
            return name
    raise BackendMissing(None)


def cache_compiled(directory: Path) -> None:
    """Keep JAX's compiled forward passes in `directory` (under `state.dir`): a restart loads them
    instead of compiling every batch size again (5 s of a 10 s start on 2 cores). Where
    JAX_COMPILATION_CACHE_DIR is set, that wins; other backends compile little and keep nothing."""
    if os.environ.get("KERAS_BACKEND") != "jax" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if "jax" in sys.modules:  # read at import: already imported, it is told directly
        import jax

        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

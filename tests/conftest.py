from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import running_server, test_config

# The backend serving picks by default (detectord.detectors.backend), set before any test imports
# Keras; tests/detectors/test_backends.py compares it with TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")


@pytest.fixture
def server_factory() -> Callable[..., Any]:
    return lambda **sections: running_server(test_config(**sections))

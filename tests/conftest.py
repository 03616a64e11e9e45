from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import running_server, test_config

# Keep TensorFlow quiet and on the CPU in tests, whatever the machine has.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture
def server_factory() -> Callable[..., Any]:
    return lambda **sections: running_server(test_config(**sections))

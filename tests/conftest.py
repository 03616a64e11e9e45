from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep TensorFlow quiet and on the CPU in tests, whatever the machine has.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def test_config(**sections: dict[str, Any]) -> Any:
    """A Config for an in-process server on a free port, with small batches; `sections` override."""
    from detectord.config import Config

    base = Config()
    defaults: dict[str, dict[str, Any]] = {
        "web": {"listen_address": "127.0.0.1:0", "shutdown_timeout": 2.0},
        "ingest": {"step": 1.0},
        "model": {"path": REPO / "models/default"},
        "inference": {"max_batch": 64, "queue_size": 4096},
    }
    for name, values in sections.items():
        defaults.setdefault(name, {}).update(values)
    kwargs = {name: dataclasses.replace(getattr(base, name), **values) for name, values in defaults.items()}
    return dataclasses.replace(base, **kwargs)


test_config.__test__ = False  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def running_server(cfg: Any) -> AsyncIterator[Any]:
    from detectord.serve.server import Server

    srv = Server(cfg)
    await srv.startup()
    try:
        yield srv
    finally:
        await srv.shutdown()


@pytest.fixture
def server_factory() -> Callable[..., Any]:
    return lambda **sections: running_server(test_config(**sections))

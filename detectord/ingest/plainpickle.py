"""Plain-value pickles, zstd-compressed: a snapshot's records and an instance's label block.
Loading one never imports or calls anything: dicts, lists, tuples, sets, str, bytes, numbers, None.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cramjam


def dumps(value: Any, level: int = 1) -> bytes:
    return bytes(cramjam.zstd.compress(pickle.dumps(value, protocol=5), level))


def loads(data: bytes) -> Any:
    """Raises whatever decompressing or unpickling raises on damage (several unrelated types)."""
    return _PlainUnpickler(io.BytesIO(bytes(cramjam.zstd.decompress(data)))).load()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a snapshot holds plain values only, not {module}.{name}")

"""The label cache's generations in C (`_fastdecode.DigestMap`): to Python code a dict, whatever
the order of sets and deletions, clustered digests, growth and keys that are not digests."""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import pytest

from detectord.ingest import remote_write
from detectord.serve import hugepages

_fastdecode = remote_write._fastdecode  # type: ignore[attr-defined]
pytestmark = pytest.mark.skipif(_fastdecode is None, reason="the C decoder is not built here (no compiler)")


class Value:
    """A value that can be watched going away."""


def _digests(rng: random.Random, n: int, homes: int) -> list[bytes]:
    """n distinct 16-byte digests whose first 8 bytes take only `homes` values, so they crowd a
    few slots: probing runs long and a deletion shifts whole runs back."""
    firsts = [rng.getrandbits(64).to_bytes(8, "little") for _ in range(homes)]
    return [rng.choice(firsts) + i.to_bytes(8, "little") for i in range(n)]


@pytest.mark.parametrize("homes", [1, 7, 5000], ids=["one-slot", "clustered", "spread"])
def test_it_behaves_as_a_dict(homes: int) -> None:
    rng = random.Random(homes)
    m = _fastdecode.DigestMap()
    ref: dict[Any, Any] = {}
    keys: list[Any] = [*_digests(rng, 600 if homes == 1 else 3000, homes), (b"a", b"b"), b"short", "text"]
    for step in range(40_000):
        k = rng.choice(keys)
        op = rng.random()
        if op < 0.45:
            v = Value()
            m[k] = v
            ref[k] = v
        elif op < 0.65:
            assert m.pop(k, None) is ref.pop(k, None)
        elif op < 0.75:
            if k in ref:
                del m[k]
                del ref[k]
            else:
                with pytest.raises(KeyError):
                    del m[k]
        else:
            assert (k in m) == (k in ref)
            assert m.get(k) is ref.get(k)
        if step % 997 == 0:
            assert len(m) == len(ref)
            assert dict(m.items()) == ref
            assert sorted(map(repr, m)) == sorted(map(repr, ref)) == sorted(map(repr, m.keys()))
            assert {id(v) for v in m.values()} == {id(v) for v in ref.values()}
    for k in list(ref):
        assert m[k] is ref[k]
    m.clear()
    assert len(m) == 0 and m.items() == [] and m.get(keys[0]) is None
    with pytest.raises(KeyError):
        m[keys[0]]
    with pytest.raises(KeyError):
        m.pop(keys[0])


def test_values_go_when_taken_out_and_cycles_through_it_are_collected() -> None:
    m = _fastdecode.DigestMap()
    values = [Value() for _ in range(1000)]
    watch = [weakref.ref(v) for v in values]
    for i, v in enumerate(values):
        m[i.to_bytes(16, "little")] = v
    m[(b"raw", b"labels")] = values[0]
    del values, v
    for i in range(500):
        del m[i.to_bytes(16, "little")]
    assert sum(w() is None for w in watch) == 499  # the first is held by the other key too
    m.clear()
    assert all(w() is None for w in watch)

    # A value that holds the map: only the cyclic GC can free them.
    m = _fastdecode.DigestMap()
    holder = Value()
    holder.map = m  # type: ignore[attr-defined]
    m[bytes(16)] = holder
    gone = weakref.ref(holder)
    del m, holder
    gc.collect()
    assert gone() is None


def test_the_label_cache_keeps_its_digests_in_one() -> None:
    cache = remote_write.LabelCache()
    assert type(cache._raw) is _fastdecode.DigestMap and type(cache._old) is _fastdecode.DigestMap
    cache.turn()
    assert type(cache._raw) is _fastdecode.DigestMap and type(cache._old) is _fastdecode.DigestMap


def _advised_bytes() -> int:
    """Bytes of this process's mappings advised for transparent huge pages."""
    total = size = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                total += size
    return total


def test_a_fleets_table_behaves_as_a_dict_and_asks_for_huge_pages() -> None:
    """200,000 digests: a table of megabytes, mapped on its own (see dm_alloc), through growth,
    deletions and its end."""
    rng = random.Random(7)
    digests = [rng.getrandbits(128).to_bytes(16, "little") for _ in range(200_000)]
    values = [Value() for _ in digests]
    watch = [weakref.ref(v) for v in values[::1000]]
    advised = _advised_bytes() if hugepages.thp_mode() not in (None, "never") else None
    m = _fastdecode.DigestMap()
    for d, v in zip(digests, values, strict=True):
        m[d] = v
    assert len(m) == len(digests)
    assert all(m[d] is v for d, v in zip(digests, values, strict=True))
    if advised is not None:
        # 262,144 slots of 24 bytes.
        assert _advised_bytes() - advised >= 6 * 2**20
    for d in digests[::2]:
        del m[d]
    assert len(m) == len(digests) // 2
    assert all((d in m) == (i % 2 == 1) for i, d in enumerate(digests))
    assert all(m[d] is values[i] for i, d in enumerate(digests) if i % 2)
    del values, v
    m.clear()
    assert len(m) == 0 and m.get(digests[1]) is None
    assert all(w() is None for w in watch)
    if advised is not None:
        assert _advised_bytes() - advised < 2**20  # the table went back to the system

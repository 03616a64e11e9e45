"""One decoder truth: the C fast path and the pure-Python path accept and refuse exactly the same
remote-write bodies, with the same reasons, over recorded traffic and seeded mutants of it."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import snappy

from detectord.errors import RemoteWriteError
from detectord.ingest import remote_write
from detectord.ingest.features import FeatureExtractor
from detectord.ingest.remote_write import DecodedWrite, Keep, LabelCache, SeriesKey, Version, WriteLimits, decode
from detectord.recordings.format import read_records
from tests.ingest import fuzzbodies
from tests.support import REPO, cache_state

pytestmark = pytest.mark.skipif(
    remote_write._fastdecode is None,  # type: ignore[attr-defined]
    reason="the C decoder is not built here (no compiler at install time)",
)

MiB = 1024 * 1024
MAX_TS_MS = 1_700_000_030_000  # some fuzzed samples are beyond it, most are not
RECORDINGS = ("faults-1.drec.xz", "unseen-low.drec.xz")
# Tight enough that mutants cross them, so the limits are compared too.
TIGHT = WriteLimits(label_name_length=10, label_value_length=12, labels=4, series=4)
# What serving keeps: the metrics the features read and `up`; the rest is only counted.
KEEP = FeatureExtractor(15_000).series_names


def _recorded(per_file: int = 150) -> Iterator[tuple[Version, bytes]]:
    for name in RECORDINGS:
        for rec in itertools.islice(read_records(REPO / "data" / name), per_file):
            yield rec.version, rec.body


Outcome = tuple[object, ...]


def decoded_outcome(w: DecodedWrite) -> Outcome:
    """Everything a DecodedWrite says, comparable with ==."""
    return (
        [k.labels for k in w.keys],
        w.counts,
        w.timestamps,
        [repr(v) for v in w.values],  # repr: NaN == NaN, and the stale marker's bits show
        w.samples,
        w.histograms,
        w.exemplars,
        w.metadata,
        w.invalid_series,
        w.invalid_samples,
        w.first_error,
        sorted(w.refused.items()),
        w.ignored,
    )


def _outcome(
    body: bytes, version: Version, cache: LabelCache, *, use_c: bool, max_ts: int | None, keep: Keep
) -> Outcome:
    try:
        w = decode(body, version, cache, max_decoded=16 * MiB, max_ts_ms=max_ts, use_c=use_c, keep=keep)
    except RemoteWriteError as exc:
        return ("refused", exc.status, exc.reason)
    return ("decoded", *decoded_outcome(w))


class _Pair:
    """The two decoders, each with its own label caches (hits and misses are both compared), with
    every series decoded or only those `KEEP` names; and the C decoder again with a cache that
    leaves making keys to Python (the reference for the keys C makes: the caches must end alike,
    also after a body refused halfway). The caches turn every `turn_every` bodies."""

    def __init__(self, turn_every: int = 37) -> None:
        self.caches = {
            (c, tight, keep): LabelCache(limits=TIGHT if tight else None)
            for c in (True, False, "reference")
            for tight in (False, True)
            for keep in (False, True)
        }
        for (c, _, _), cache in self.caches.items():
            cache.native = c is True
        self.seen: dict[str, int] = {}
        self.turn_every = turn_every
        self.checked = 0

    def check(
        self,
        body: bytes,
        version: Version,
        tight: bool,
        where: str,
        max_ts: int | None = MAX_TS_MS,
        keep: bool = False,
    ) -> None:
        names = KEEP if keep else None
        a = _outcome(body, version, self.caches[True, tight, keep], use_c=True, max_ts=max_ts, keep=names)
        b = _outcome(body, version, self.caches[False, tight, keep], use_c=False, max_ts=max_ts, keep=names)
        assert a == b, f"{where}: the C and Python decoders disagree on {body!r}"
        ref = self.caches["reference", tight, keep]
        assert _outcome(body, version, ref, use_c=True, max_ts=max_ts, keep=names) == a, where
        assert cache_state(self.caches[True, tight, keep]) == cache_state(ref), f"{where}: the caches differ"
        self.checked += 1
        if self.checked % self.turn_every == 0:
            for cache in self.caches.values():
                cache.turn()
        kind = str(a[0]) if a[0] == "refused" else ("partial" if a[9] else "decoded")
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if keep and a[0] == "decoded" and a[-1]:
            self.seen["ignored"] = self.seen.get("ignored", 0) + 1


def test_decoders_agree_on_recorded_traffic() -> None:
    pair = _Pair()
    n = 0
    for i, (version, body) in enumerate(_recorded()):
        pair.check(body, version, False, f"record {i}", None)
        pair.check(body, version, True, f"record {i} (tight limits)", None)
        pair.check(body, version, False, f"record {i} (keeping what the features read)", None, keep=True)
        n += 1
    assert n == 2 * 150
    # Recorded Prometheus traffic decodes whole under the default limits.
    assert pair.seen.get("decoded", 0) >= n
    # A CoreDNS target's Go runtime series and the rest are left out by name, by both alike.
    assert pair.seen.get("ignored", 0) >= n * 9 // 10


@pytest.mark.parametrize(("version", "n"), [("1.0", 14_000), ("2.0", 7_000)])
def test_decoders_agree_on_mutated_bodies(version: Version, n: int) -> None:
    bases = [fuzzbodies.trim(snappy.uncompress(body)) for v, body in _recorded(40) if v == version]
    pair = _Pair()
    for i, body in enumerate(fuzzbodies.bodies(12, n, version, bases)):
        pair.check(body, version, bool(i % 3 == 0), f"seed 12, {version} body {i}", keep=i % 2 == 1)
    # The mutants reach every outcome: whole requests decoded, some series refused, bodies refused.
    assert pair.seen["decoded"] > n // 100
    assert pair.seen["partial"] > n // 50
    assert pair.seen["refused"] > n // 5
    # Some series are left out by name, the same ones by both.
    assert pair.seen["ignored"] > n // 100


def test_field_number_zero_is_refused_by_both() -> None:
    # A TimeSeries whose sample carries a field 0: protobuf calls the message malformed.
    sample = b"\x09" + b"\x00" * 8 + b"\x10\x01" + b"\x00\x01"
    raw = b"\x0a" + bytes([len(sample) + 2]) + b"\x12" + bytes([len(sample)]) + sample
    for use_c in (True, False):
        with pytest.raises(RemoteWriteError) as info:
            decode(bytes(snappy.compress(raw)), "1.0", LabelCache(), max_decoded=MiB, use_c=use_c)
        assert info.value.status == 400
        assert info.value.reason == "protobuf: body is not a valid prometheus.WriteRequest message"


def test_an_earlier_sample_in_the_future_refuses_the_series_in_both() -> None:
    from detectord.ingest._proto import remote_write_v1_pb2 as pb1

    req = pb1.WriteRequest()
    ts = req.timeseries.add()
    ts.labels.add(name="__name__", value="up")
    ts.samples.add(timestamp=MAX_TS_MS + 3_600_000, value=1.0)
    ts.samples.add(timestamp=MAX_TS_MS - 1, value=1.0)
    body = remote_write.encode_v1(req)
    for use_c in (True, False):
        w = decode(body, "1.0", LabelCache(), max_decoded=MiB, max_ts_ms=MAX_TS_MS, use_c=use_c)
        assert w.keys == [] and w.invalid_samples == 2
        assert w.first_error == "series up{} has a sample timestamp too far in the future"


def test_recordings_are_here() -> None:
    for name in RECORDINGS:
        assert Path(REPO / "data" / name).stat().st_size > 0


def _field(no: int, data: bytes) -> bytes:
    n, length = len(data), b""
    while n >= 0x80:
        length += bytes([n & 0x7F | 0x80])
        n >>= 7
    return bytes([no << 3 | 2]) + length + bytes([n]) + data


def _label(name: bytes | None, value: bytes | None, extra: bytes = b"") -> bytes:
    return (b"" if name is None else _field(1, name)) + (b"" if value is None else _field(2, value)) + extra


def _series_body(labels: list[bytes]) -> bytes:
    sample = b"\x09" + b"\x00" * 7 + b"\x40" + b"\x10\x01"  # value 2.0 at ts 1
    ts = b"".join(_field(1, lb) for lb in labels) + _field(2, sample)
    return bytes(snappy.compress(_field(1, ts)))


NAME = _label(b"__name__", b"coredns_x")
# Label sets at the edges of the C decoder's shortcut for plainly valid ones: those it takes, and
# those it must leave to the reference checks, which then refuse or accept them.
EDGES: dict[str, list[bytes]] = {
    "plain": [NAME, _label(b"instance", b"a:9153"), _label(b"job", b"coredns")],
    "unsorted": [_label(b"job", b"coredns"), NAME],
    "duplicate name": [NAME, _label(b"job", b"a"), _label(b"job", b"b")],
    "empty value": [NAME, _label(b"a", b""), _label(b"job", b"coredns")],
    "no value field": [NAME, _label(b"job", None)],
    "empty name": [_label(b"", b"x"), NAME],
    "no __name__": [_label(b"job", b"coredns")],
    "multi-byte value over the limit in bytes, not in characters": [NAME, _label(b"v", "é".encode() * 7)],
    "multi-byte value over the limit in characters": [NAME, _label(b"v", "é".encode() * 13)],
    "value over the limit": [NAME, _label(b"v", b"x" * 13)],
    "invalid UTF-8": [NAME, _label(b"job", b"\xff")],
    "name field twice": [NAME, _label(b"job", b"x", _field(1, b"jab"))],
    "unknown field in a label": [NAME, _label(b"job", b"x", b"\x18\x01")],
    "five labels": [NAME, *(_label(b"l%d" % i, b"v") for i in range(4))],
    "seventy labels": [NAME, *(_label(b"l%02d" % i, b"v") for i in range(69))],
}


@pytest.mark.parametrize("tight", [False, True])
def test_decoders_agree_at_the_edges_of_the_plain_label_shortcut(tight: bool) -> None:
    class Counting(LabelCache):
        shortcuts = 0

        def from_label_fields(self, raw: object, labels: Any, checked: bool = False) -> SeriesKey | str:
            Counting.shortcuts += checked
            return super().from_label_fields(raw, labels, checked)

        def count_made(self, made: list[int]) -> None:  # the shortcut's keys made in C
            Counting.shortcuts += made[0]
            super().count_made(made)

    limits = TIGHT if tight else None
    for what, labels in EDGES.items():
        body = _series_body(labels)
        Counting.shortcuts = 0
        a = _outcome(body, "1.0", Counting(limits=limits), use_c=True, max_ts=None, keep=None)
        b = _outcome(body, "1.0", LabelCache(limits=limits), use_c=False, max_ts=None, keep=None)
        assert a == b, f"{what}: the C and Python decoders disagree"
        # The shortcut takes what is plainly valid, and only that.
        plain = what == "plain" or (not tight and what.startswith(("multi-byte", "value over", "five")))
        assert Counting.shortcuts == (1 if plain else 0), what
        assert (a[0] == "decoded" and not a[9]) or not plain, what
        if what.endswith("not in characters"):
            assert a[0] == "decoded" and not a[9], "the limits count characters, not bytes"


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _v2_sample(ts: int, value: float) -> bytes:
    return b"\x09" + struct.pack("<d", value) + b"\x10" + _varint(ts)


def _v2_body(symbols: list[bytes], *series: bytes) -> bytes:
    return bytes(snappy.compress(b"".join(_field(4, s) for s in symbols) + b"".join(_field(5, ts) for ts in series)))


SYMBOLS = [b"", b"__name__", b"coredns_dns_requests_total", b"job", b"coredns", b"instance", b"a:9153", b"node_load1"]
PACKED = _field(1, bytes([1, 2, 3, 4, 5, 6]))
ONE = _field(2, _v2_sample(1000, 1.0))
# Series at the edges of the C walk over 2.0 requests, beside the mutants.
V2_EDGES: dict[str, bytes] = {
    "plain": PACKED + ONE,
    "refs one by one": b"".join(b"\x08" + bytes([r]) for r in (1, 2, 3, 4, 5, 6)) + ONE,
    "refs packed and one by one": _field(1, bytes([1, 2, 3, 4])) + b"\x08\x05\x08\x06" + ONE,
    "unsorted labels": _field(1, bytes([5, 6, 3, 4, 1, 2])) + ONE,
    "a ref beyond 2^32 keeps its low 32 bits": _field(1, bytes([1, 2, 3, 4]) + _varint(2**32 + 5) + b"\x06") + ONE,
    "labels_refs as fixed64 is an unknown field": b"\x09" + b"\x01" * 8 + PACKED + ONE,
    "odd refs": _field(1, bytes([1, 2, 3])) + ONE,
    "a ref out of range": _field(1, bytes([1, 2, 3, 40])) + ONE,
    "empty name symbol": _field(1, bytes([1, 2, 0, 4])) + ONE,
    "empty value symbol": _field(1, bytes([1, 2, 3, 0, 5, 6])) + ONE,
    "two names": _field(1, bytes([1, 2, 1, 7])) + ONE,
    "another metric": _field(1, bytes([1, 7, 3, 4])) + ONE,
    "samples out of order, equal times kept in order": PACKED
    + b"".join(
        _field(2, _v2_sample(t, v)) for t, v in [(3000, 1.0), (1000, 2.0), (3000, 3.0), (2000, 4.0), (1000, 5.0)]
    ),
    "no samples": PACKED,
    "metadata and exemplars": PACKED + ONE + _field(4, b"\x11" + b"\x00" * 8) + _field(5, b"\x08\x01"),
    "a sample in the future": PACKED + _field(2, _v2_sample(MAX_TS_MS + 1, 1.0)),
    "a histogram and samples": PACKED + ONE + _field(3, b"\x08\x00"),
    "only an empty histogram": PACKED + _field(3, b""),
    "a histogram with a bad count": PACKED + _field(3, b"\x08\x05"),
}


def test_decoders_agree_on_the_edges_of_remote_write_2() -> None:
    pair = _Pair()
    for what, ts in V2_EDGES.items():
        for tight in (False, True):
            for keep in (False, True):
                pair.check(_v2_body(SYMBOLS, ts), "2.0", tight, what, keep=keep)
    # All of them in one request, and a first symbol that is not empty (the request is refused).
    pair.check(_v2_body(SYMBOLS, *V2_EDGES.values()), "2.0", False, "all together")
    pair.check(_v2_body([b"x", *SYMBOLS[1:]], V2_EDGES["plain"]), "2.0", False, "symbols[0] not empty")
    assert pair.seen["refused"] == 1 and pair.seen["decoded"] > 10 and pair.seen["partial"] > 10


def test_the_label_cache_sizes_label_sets_alike_with_and_without_the_extension() -> None:
    """The cache's byte estimate counts characters, not bytes, whichever code counts them; and the
    native count refuses what is not a label set rather than reading past it."""
    fast = remote_write._fastdecode.label_chars  # type: ignore[attr-defined]
    sets: list[Any] = [(), (("__name__", "up"),), (("__name__", "coredns_x"), ("le", "+Inf"), ("zone", "ä€😀"))]
    cache = LabelCache()
    for version, body in itertools.islice(_recorded(20), 40):
        decode(body, version, cache, max_decoded=16 * MiB)
    sets += [key.labels for key in cache._keys.values()]
    assert len(sets) > 100
    for labels in sets:
        assert fast(labels) == remote_write._py_label_chars(labels), labels
    for bad in ([("a", "b")], (("a",),), (("a", "b", "c"),), (("a", 1),), ((b"a", "b"),)):
        with pytest.raises(TypeError):
            fast(bad)


# veorq/SipHash vectors.h, vectors_sip128: key 00..0f, message 00..(n-1).
SIPHASH_128 = {
    0: "a3817f04ba25a8e66df67214c7550293",
    1: "da87c1d86b99af44347659119b22fc45",
    7: "a1f1ebbed8dbc153c0b84aa61ff08239",
    8: "3b62a9ba6258f5610f83e264f31497b4",
    15: "5493e99933b0a8117e08ec0f97cfc3d9",
    16: "6ee2a4ca67b054bbfd3315bf85230577",
    63: "5150d1772f50834a503e069a973fbd7c",
}


def test_the_label_digest_is_siphash_2_4_128() -> None:
    """The C decoder keys the label cache by a keyed digest of a series' label bytes: it must be
    the published SipHash, so two label sets collide only by a 2^-128 chance a writer cannot steer."""
    digest = remote_write._fastdecode.siphash128  # type: ignore[attr-defined]
    message = bytes(range(64))
    for n, want in SIPHASH_128.items():
        assert digest(message[:n], bytes(range(16))).hex() == want, n


def test_the_cache_holds_a_digest_of_each_label_set_not_its_bytes() -> None:
    """Each distinct label set the recordings hold is one 16-byte key in the cache (a series held
    costs 16 bytes of key, not its labels again), and no two of them share a key."""
    cache = LabelCache()
    seen: set[tuple[tuple[str, str], ...]] = set()
    for version, body in itertools.islice(_recorded(20), 40):
        w = decode(body, version, cache, max_decoded=16 * MiB)
        seen.update(key.labels for key in w.keys)
    raw = [r for r, hit in cache._raw.items() if isinstance(hit, SeriesKey)]
    assert len(seen) > 100
    assert all(isinstance(r, bytes) and len(r) == 16 for r in raw)
    assert len({cache._raw[r].labels for r in raw}) == len(raw) == len(seen)  # type: ignore[union-attr]


def test_interning_label_sets_in_c_is_interning_them_in_python() -> None:
    """LabelCache.intern_all (a restore's label sets, in C) leaves the cache as `intern` one set at
    a time does: keys pinned, young, older (moved back) and new alike, and refuses what intern
    refuses."""
    sets = [key.labels for key in _decoded_keys()]
    assert len(sets) > 300
    # Label sets as a snapshot gives them back: equal tuples of fresh strings.
    fresh = [tuple(((n + "!")[:-1], (v + "!")[:-1]) for n, v in labels) for labels in sets]
    caches = {native: LabelCache() for native in (True, False)}
    made: dict[bool, list[list[SeriesKey]]] = {True: [], False: []}
    for native, cache in caches.items():
        cache.native = native
        made[native].append(cache.intern_all(fresh[:200]))
        for key in made[native][0][:100]:
            cache.pin(key)
        cache.turn()  # keys 100..199 go to the older generation
        made[native].append(cache.intern_all(fresh[50:150] + fresh[180:] + fresh[:10]))
        with pytest.raises(TypeError):
            cache.intern_all([*fresh[:5], (("__name__", "x"), ("a", 1))])  # type: ignore[list-item]
    assert cache_state(caches[True]) == cache_state(caches[False])
    for a, b in zip(made[True], made[False], strict=True):
        assert [k.labels for k in a] == [k.labels for k in b]
        assert [k.name for k in a] == [k.name for k in b]
    # The same label set is one key, however it came.
    first, second = made[True]
    assert second[:50] == first[50:100] and second[50:100] == first[100:150] and second[-10:] == first[:10]


def _decoded_keys() -> list[SeriesKey]:
    cache = LabelCache()
    keys: dict[tuple[tuple[str, str], ...], SeriesKey] = {}
    for version, body in itertools.islice(_recorded(20), 40):
        for key in decode(body, version, cache, max_decoded=16 * MiB).keys:
            keys.setdefault(key.labels, key)
    return list(keys.values())

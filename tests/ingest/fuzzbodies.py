"""Seeded, structure-aware mutations of valid remote-write 1.0 and 2.0 bodies, plus random bytes.

`bodies(seed, n, version)` yields snappy-compressed bodies ready to POST; `messages` the same
protobuf before compression; `mutate(raw, rng)` one mutation of any serialized message. The
same seed always gives the same bodies, so a failure names the seed and index that reproduce it.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
from collections.abc import Iterator, Sequence
from typing import Literal, Union

import snappy

from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.ingest.remote_write import STALE_NAN

Version = Literal["1.0", "2.0"]

# A parsed message: (field number, wire type, value) where value is an int (varint, fixed32/64),
# bytes, or a nested message when the bytes parse as one.
Field = tuple[int, int, Union[int, bytes, "Fields"]]
Fields = list[Field]

_NAMES = ("coredns_dns_requests_total", "coredns_dns_responses_total", "up", "coredns_panics_total", "x")
_LABELS = ("job", "instance", "server", "zone", "rcode", "type", "proto", "le")
_VALUES = ("coredns", "10.0.0.1:9153", "dns://:53", ".", "NOERROR", "A", "udp", "", "ü", "0.5")


def _hist(rng: random.Random, h: pb1.Histogram | pb2.Histogram) -> None:
    """A valid integer or float native histogram (sometimes with a count that disagrees)."""
    h.schema = rng.choice((-4, 0, 3, 8))
    h.sum = rng.choice((1.5, 0.0, math.nan))
    h.timestamp = 1_700_000_000_000 + rng.randrange(60_000)
    buckets = [rng.randrange(5) for _ in range(rng.randrange(4))]
    zero = rng.randrange(3)
    if buckets:
        h.positive_spans.add(offset=rng.randrange(-2, 3), length=len(buckets))
    if rng.random() < 0.5:
        prev = 0
        for b in buckets:
            h.positive_deltas.append(b - prev)
            prev = b
        h.count_int = sum(buckets) + zero + (rng.random() < 0.2)
        h.zero_count_int = zero
    else:
        h.positive_counts.extend(float(b) for b in buckets)
        h.count_float = float(sum(buckets) + zero)
        h.zero_count_float = float(zero)


def _labels(rng: random.Random) -> dict[str, str]:
    labels = {"__name__": rng.choice(_NAMES)}
    for name in rng.sample(_LABELS, rng.randrange(4)):
        labels[name] = rng.choice(_VALUES)
    return labels


def _samples(rng: random.Random) -> list[tuple[int, float]]:
    t0 = 1_700_000_000_000 + rng.randrange(-60_000, 60_000)
    values = (1.0, 0.0, -2.5, math.inf, -math.inf, math.nan, STALE_NAN, 1e300)
    return [(t0 + 15_000 * i, rng.choice(values)) for i in range(rng.choice((0, 1, 1, 1, 2, 3)))]


def valid_v1(rng: random.Random) -> bytes:
    req = pb1.WriteRequest()
    for _ in range(rng.randrange(1, 6)):
        ts = req.timeseries.add()
        for k, v in sorted(_labels(rng).items()):
            ts.labels.add(name=k, value=v)
        for t, x in _samples(rng):
            ts.samples.add(timestamp=t, value=x)
        if rng.random() < 0.2:
            _hist(rng, ts.histograms.add())
        if rng.random() < 0.2:
            ex = ts.exemplars.add(value=1.0, timestamp=1_700_000_000_000)
            ex.labels.add(name="trace_id", value="abc")
    if rng.random() < 0.3:
        req.metadata.add(type=pb1.MetricMetadata.COUNTER, metric_family_name="x", help="h")
    return bytes(req.SerializeToString())


def valid_v2(rng: random.Random) -> bytes:
    symbols: dict[str, int] = {"": 0}

    def ref(s: str) -> int:
        return symbols.setdefault(s, len(symbols))

    req = pb2.Request()
    for _ in range(rng.randrange(1, 6)):
        ts = req.timeseries.add()
        for k, v in _labels(rng).items():
            ts.labels_refs.extend((ref(k), ref(v)))
        if rng.random() < 0.2:
            _hist(rng, ts.histograms.add())
        else:
            for t, x in _samples(rng):
                ts.samples.add(timestamp=t, value=x)
        if rng.random() < 0.2:
            ts.exemplars.add(value=1.0, timestamp=1_700_000_000_000, labels_refs=[ref("trace_id"), ref("abc")])
        if rng.random() < 0.3:
            ts.metadata.type = pb2.Metadata.METRIC_TYPE_COUNTER
            ts.metadata.help_ref = ref("help")
    req.symbols.extend(symbols)
    return bytes(req.SerializeToString())


VALID = {"1.0": valid_v1, "2.0": valid_v2}

# ---- wire format ------------------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _put_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def parse(data: bytes, depth: int = 0) -> Fields:
    """Fields of a serialized message (ValueError if it is not one)."""
    out: Fields = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field 0")
        value: int | bytes | Fields
        if wt == 0:
            value, pos = _varint(data, pos)
        elif wt in (1, 5):
            size = 8 if wt == 1 else 4
            if pos + size > len(data):
                raise ValueError("fixed")
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif wt == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise ValueError("length")
            raw = data[pos : pos + n]
            pos += n
            value = raw
            if raw and depth < 4:
                with contextlib.suppress(ValueError):
                    value = parse(raw, depth + 1)
        else:
            raise ValueError("wire type")
        out.append((field, wt, value))
    return out


def serialize(fields: Fields) -> bytes:
    out = bytearray()
    for field, wt, value in fields:
        out += _put_varint((field << 3) | (wt & 7))
        if isinstance(value, list):
            value = serialize(value)
        if isinstance(value, bytes):
            if wt == 2:
                out += _put_varint(len(value))
            out += value
        elif wt == 1:
            out += struct.pack("<Q", value & (2**64 - 1))
        elif wt == 5:
            out += struct.pack("<I", value & (2**32 - 1))
        else:
            out += _put_varint(value)
    return bytes(out)


# ---- mutations --------------------------------------------------------------------------------

_INTERESTING = (0, 1, 2, 3, 4, 5, 127, 128, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def _lists(fields: Fields, acc: list[Fields]) -> list[Fields]:
    acc.append(fields)
    for _, _, v in fields:
        if isinstance(v, list):
            _lists(v, acc)
    return acc


def _mutate_tree(fields: Fields, rng: random.Random) -> None:
    target = rng.choice(_lists(fields, []))
    op = rng.randrange(9)
    if not target or op == 0:  # insert a field
        wt = rng.choice((0, 1, 2, 5, 3, 4))
        value: int | bytes = rng.choice(_INTERESTING) if wt != 2 else rng.randbytes(rng.randrange(6))
        target.insert(rng.randrange(len(target) + 1), (rng.choice((0, 1, 2, 3, 4, 5, 6, 15, 16, 2**29 - 1)), wt, value))
        return
    i = rng.randrange(len(target))
    field, wt, v = target[i]
    if op == 1:  # drop
        del target[i]
    elif op == 2:  # duplicate
        target.insert(rng.randrange(len(target) + 1), target[i])
    elif op == 3:  # another field number
        target[i] = (rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 2**29 - 1)), wt, v)
    elif op == 4:  # another wire type, same payload
        target[i] = (field, rng.randrange(8), v)
    elif op == 5 and not isinstance(v, list | bytes):  # another number
        target[i] = (field, wt, rng.choice((*_INTERESTING, v + 1, v - 1, -v)))
    elif op == 6 and isinstance(v, bytes):  # change bytes in a string or blob
        b = bytearray(v)
        if b and rng.random() < 0.5:
            b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randrange(1, 4))
        target[i] = (field, wt, bytes(b))
    elif op == 7:  # swap with a neighbour
        j = rng.randrange(len(target))
        target[i], target[j] = target[j], target[i]
    else:  # replace a nested message by its bytes, corrupted at the byte level
        raw = serialize(v) if isinstance(v, list) else v if isinstance(v, bytes) else _put_varint(v)
        target[i] = (field, 2 if isinstance(v, list | bytes) else wt, _mutate_bytes(raw, rng))


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip a bit
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert bytes
            b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randrange(1, 4))
        elif op == 2 and b:  # delete bytes
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 4)]
        elif op == 3 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif b:  # overwrite with an interesting byte
            b[rng.randrange(len(b))] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x22, 0x2A))
    return bytes(b)


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One mutant of a serialized message: its fields changed (re-framed, so the change reaches
    deep fields), its bytes changed, or both."""
    r = rng.random()
    if r < 0.6:
        try:
            fields = parse(raw)
        except ValueError:
            return _mutate_bytes(raw, rng)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            _mutate_tree(fields, rng)
        out = serialize(fields)
        return _mutate_bytes(out, rng) if r < 0.1 else out
    return _mutate_bytes(raw, rng)


def trim(raw: bytes, fields: int = 8) -> bytes:
    """The first `fields` top-level fields of a serialized message: a recorded request made small
    enough to mutate quickly."""
    return serialize(parse(raw)[:fields])


def messages(seed: int, n: int, version: Version, bases: Sequence[bytes] = ()) -> Iterator[bytes]:
    """n serialized protobuf messages: mostly mutants of valid `version` requests (or of `bases`),
    some valid ones, some random bytes and some requests of the other version."""
    rng = random.Random(f"{seed}-{version}")
    other: Version = "2.0" if version == "1.0" else "1.0"
    for _ in range(n):
        r = rng.random()
        base = rng.choice(bases) if bases and rng.random() < 0.5 else VALID[version](rng)
        if r < 0.05:
            yield rng.randbytes(rng.randrange(64))
        elif r < 0.10:
            yield base
        elif r < 0.13:
            yield VALID[other](rng)
        else:
            yield mutate(base, rng)


def bodies(seed: int, n: int, version: Version, bases: Sequence[bytes] = ()) -> Iterator[bytes]:
    """n snappy-compressed remote-write bodies (as `messages`); one in 50 is not valid snappy."""
    rng = random.Random(f"{seed}-{version}-snappy")
    for msg in messages(seed, n, version, bases):
        if rng.random() < 0.02:
            yield _mutate_bytes(bytes(snappy.compress(msg)), rng)
        else:
            yield bytes(snappy.compress(msg))

"""Remote-write request decoding: HTTP headers and snappy/protobuf bytes to decoded series.

Pure functions with no daemon state, so they run inline, in a worker thread or offline alike.
Remote write 1.0 (`prometheus.WriteRequest`) and 2.0 (`io.prometheus.write.v2.Request`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cramjam
import snappy
from google.protobuf.message import DecodeError

from detectord.errors import RemoteWriteError
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v1_view_pb2 as pbv
from detectord.ingest._proto import remote_write_v2_pb2 as pb2

try:
    from detectord.ingest import _fastdecode  # type: ignore[attr-defined]
except ImportError:  # built from C at install when a compiler is there; pure Python otherwise
    _fastdecode = None

Labels = tuple[tuple[str, str], ...]
"""A series' label set: (name, value) pairs sorted by name, `__name__` included."""

Version = Literal["1.0", "2.0"]

PROTO_V1 = "prometheus.WriteRequest"
PROTO_V2 = "io.prometheus.write.v2.Request"

STALE_NAN_BITS = 0x7FF0000000000002
_STALE_NAN_BYTES = struct.pack("<Q", STALE_NAN_BITS)
STALE_NAN: float = struct.unpack("<d", _STALE_NAN_BYTES)[0]


def is_stale_marker(value: float) -> bool:
    # Compare the raw bits: every NaN compares unequal, and an ordinary NaN is not a stale marker.
    return value != value and struct.pack("<d", value) == _STALE_NAN_BYTES


class SeriesKey:
    """One series' identity, interned by a LabelCache: equal label sets share one SeriesKey.

    `state` belongs to the FeatureExtractor that owns the cache (its per-series counters).
    """

    __slots__ = ("labels", "name", "state")

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.name = metric_name(labels)
        self.state: object | None = None

    def __repr__(self) -> str:
        return f"SeriesKey({_show(self.labels)})"


class LabelCache:
    """Interns label sets. A 1.0 series is looked up by its raw label bytes, so a series seen
    before costs one dict lookup instead of parsing and validating its labels again."""

    def __init__(self, max_raw_entries: int = 4_000_000) -> None:
        # Raw label bytes (a tuple of Label messages, or the label fields as one bytes object
        # for the C decoder) to what they mean.
        self._raw: dict[object, SeriesKey | str] = {}
        self._canonical: dict[Labels, SeriesKey] = {}
        self.max_raw_entries = max_raw_entries

    def __len__(self) -> int:
        return len(self._canonical)

    def intern(self, labels: Labels) -> SeriesKey:
        key = self._canonical.get(labels)
        if key is None:
            key = self._canonical[labels] = SeriesKey(labels)
        return key

    def from_raw(self, raw: tuple[bytes, ...]) -> SeriesKey | str:
        """The SeriesKey of serialized prometheus.Label messages, or why they are invalid."""
        hit = self._raw.get(raw)
        if hit is not None:
            return hit
        return self._store(raw, raw)

    def from_label_fields(self, raw: bytes, pairs: list[tuple[str, str]] | None) -> SeriesKey | str:
        """Like from_raw, for the label fields of a TimeSeries as the C decoder found them."""
        return self._store(raw, pairs)

    def _store(self, raw: object, labels: tuple[bytes, ...] | list[tuple[str, str]] | None) -> SeriesKey | str:
        if len(self._raw) >= self.max_raw_entries:
            self._raw.clear()  # churn: start over rather than grow without bound
        pairs: list[tuple[str, str]] = []
        try:
            if labels is None:
                raise DecodeError("labels")
            for lb in labels:
                if isinstance(lb, bytes):
                    msg = pb1.Label.FromString(lb)
                    pairs.append((msg.name, msg.value))
                else:
                    pairs.append(lb)
        except (DecodeError, UnicodeDecodeError):
            result: SeriesKey | str = "a label is not a valid protobuf message with UTF-8 strings"
        else:
            checked = check_labels(pairs)
            result = checked if isinstance(checked, str) else self.intern(checked)
        self._raw[raw] = result
        return result

    def forget(self, key: SeriesKey) -> None:
        self._canonical.pop(key.labels, None)


@dataclass(slots=True)
class DecodedWrite:
    """One request's series, column by column: series i is keys[i] with counts[i] samples, the
    next ones in timestamps/values. A series may appear several times (Prometheus 2.42 sends
    one sample per TimeSeries), each time with its samples in timestamp order. Flat lists of
    numbers give the cyclic GC nothing to scan, however large the request."""

    version: Version
    keys: list[SeriesKey] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    samples: int = 0
    histograms: int = 0
    exemplars: int = 0
    metadata: int = 0
    # Series refused as invalid, with the first reason; the rest of the request is still used.
    invalid_series: int = 0
    invalid_samples: int = 0
    first_error: str | None = None

    def add(self, key: SeriesKey, samples: Sequence[tuple[int, float]]) -> None:
        self.keys.append(key)
        self.counts.append(len(samples))
        for t, v in samples:
            self.timestamps.append(t)
            self.values.append(v)

    def series(self) -> Iterator[tuple[SeriesKey, list[tuple[int, float]]]]:
        """(key, samples) pairs; for tests and tools, not the hot path."""
        j = 0
        for key, n in zip(self.keys, self.counts, strict=True):
            yield key, list(zip(self.timestamps[j : j + n], self.values[j : j + n], strict=True))
            j += n

    def reject(self, reason: str, samples: int) -> None:
        self.invalid_series += 1
        self.invalid_samples += samples
        if self.first_error is None:
            self.first_error = reason


def negotiate(content_type: str | None, content_encoding: str | None) -> Version:
    """The protocol version a request's headers ask for, or 415 as the spec says."""
    version = protocol_of(content_type)
    check_encoding(content_encoding)
    return version


def protocol_of(content_type: str | None) -> Version:
    ctype = (content_type or "").strip()
    if not ctype:
        return "1.0"  # Prometheus's own receiver treats a missing Content-Type as 1.0.
    media, _, params = ctype.partition(";")
    if media.strip().lower() != "application/x-protobuf":
        raise RemoteWriteError(415, f"unsupported Content-Type {ctype!r}; expected application/x-protobuf")
    proto = PROTO_V1
    for param in params.split(";"):
        k, _, v = param.strip().partition("=")
        if k.strip().lower() == "proto":
            proto = v.strip().strip('"')
    if proto == PROTO_V1:
        return "1.0"
    if proto == PROTO_V2:
        return "2.0"
    raise RemoteWriteError(415, f"unsupported proto {proto!r}; expected {PROTO_V1} or {PROTO_V2}")


def check_encoding(content_encoding: str | None) -> None:
    if (content_encoding or "").strip().lower() != "snappy":
        raise RemoteWriteError(415, f"unsupported Content-Encoding {content_encoding!r}; expected snappy")


def declared_length(body: bytes) -> int:
    """The decompressed length a snappy block declares in its uvarint header."""
    result = shift = 0
    for i, b in enumerate(body[:10]):
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
        if i == 4 and result > 0xFFFFFFFF:
            break
    raise RemoteWriteError(400, "snappy: corrupt input (bad length header)")


def decompress(body: bytes, *, max_decoded: int) -> memoryview:
    if not body:
        raise RemoteWriteError(400, "empty body")
    n = declared_length(body)
    if n > max_decoded:
        raise RemoteWriteError(413, f"decompressed body of {n} bytes exceeds the limit of {max_decoded} bytes")
    # cramjam allocates and decompresses with the GIL released; python-snappy's uncompress()
    # then copies the result into bytes holding it, tens of milliseconds for a big body, during
    # which the event loop cannot run. The decoders read the buffer as it is.
    try:
        data = memoryview(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises several unrelated types for corrupt input
        raise RemoteWriteError(400, f"snappy: corrupt input ({exc.__class__.__name__})") from None
    if len(data) != n:
        raise RemoteWriteError(400, f"snappy: corrupt input (declared {n} bytes, decoded {len(data)})")
    return data


def decode(
    body: bytes, version: Version, cache: LabelCache, *, max_decoded: int, max_ts_ms: int | None = None
) -> DecodedWrite:
    """Snappy-compressed protobuf body to DecodedWrite; raises RemoteWriteError(400/413)."""
    data = decompress(body, max_decoded=max_decoded)
    try:
        if version == "1.0":
            return decode_v1_bytes(data, cache, max_ts_ms=max_ts_ms)
        return decode_v2_message(pb2.Request.FromString(data), cache, max_ts_ms=max_ts_ms)
    except DecodeError as exc:
        raise RemoteWriteError(400, f"protobuf: cannot parse {version} request: {exc}") from None


def decode_v1_message(msg: pb1.WriteRequest, cache: LabelCache, *, max_ts_ms: int | None = None) -> DecodedWrite:
    return decode_v1_bytes(msg.SerializeToString(), cache, max_ts_ms=max_ts_ms)


C_CHUNK_SERIES = 2000
_WHY = {"no_samples": "has no samples", "future": "sample timestamp too far in the future"}


def decode_v1_bytes(
    data: bytes | memoryview, cache: LabelCache, *, max_ts_ms: int | None = None, use_c: bool = True
) -> DecodedWrite:
    if _fastdecode is not None and use_c:
        limit = max_ts_ms if max_ts_ms is not None else 2**63 - 1
        out = DecodedWrite("1.0")
        pos = 0
        while pos < len(data) or pos == 0:
            try:
                # In chunks: C code holds the GIL, and the event loop's thread needs it too.
                n, hist, ex, meta, rejects, pos = _fastdecode.decode_v1(
                    data,
                    cache._raw,
                    cache.from_label_fields,
                    limit,
                    pos,
                    C_CHUNK_SERIES,
                    out.keys,
                    out.counts,
                    out.timestamps,
                    out.values,
                )
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
            out.samples += n
            out.histograms += hist
            out.exemplars += ex
            out.metadata += meta
            for key, count, why in rejects:
                out.reject(key if why == "labels" else f"series {_show(key.labels)} {_WHY[why]}", count)
            if not data:
                break
        return out
    return _decode_v1_python(data, cache, max_ts_ms=max_ts_ms)


def _decode_v1_python(data: bytes | memoryview, cache: LabelCache, *, max_ts_ms: int | None = None) -> DecodedWrite:
    msg = pbv.WriteRequestView.FromString(data)
    out = DecodedWrite("1.0", metadata=len(msg.metadata))
    append = out.add
    from_raw = cache.from_raw
    limit = max_ts_ms if max_ts_ms is not None else 2**63 - 1
    for ts in msg.timeseries:
        sv = ts.samples
        if len(sv) == 1:
            x = sv[0]
            samples = [(x.timestamp, x.value)]
        else:
            samples = [(x.timestamp, x.value) for x in sv]
        n = len(samples)
        out.samples += n
        if ts.histograms:
            out.histograms += len(ts.histograms)
        if ts.exemplars:
            out.exemplars += len(ts.exemplars)
        key = from_raw(tuple(ts.labels))
        if isinstance(key, str):
            out.reject(key, n)
            continue
        if not n:
            if not ts.histograms:
                out.reject(f"series {_show(key.labels)} {_WHY['no_samples']}", 0)
            continue
        if samples[-1][0] > limit:
            out.reject(f"series {_show(key.labels)} {_WHY['future']}", n)
            continue
        append(key, samples)
    return out


def decode_v2_message(msg: pb2.Request, cache: LabelCache, *, max_ts_ms: int | None = None) -> DecodedWrite:
    out = DecodedWrite("2.0")
    symbols = msg.symbols
    if symbols and symbols[0] != "":
        raise RemoteWriteError(400, "symbols[0] must be the empty string")
    nsym = len(symbols)
    append = out.add
    for ts in msg.timeseries:
        samples = [(s.timestamp, s.value) for s in ts.samples]
        n = len(samples)
        out.samples += n
        out.histograms += len(ts.histograms)
        out.exemplars += len(ts.exemplars)
        if ts.HasField("metadata"):
            out.metadata += 1
        refs = ts.labels_refs
        if len(refs) % 2:
            out.reject("labels_refs has an odd length", n)
            continue
        if refs and max(refs) >= nsym:
            out.reject(f"labels_refs index {max(refs)} out of range of {nsym} symbols", n)
            continue
        checked = check_labels([(symbols[refs[i]], symbols[refs[i + 1]]) for i in range(0, len(refs), 2)])
        if isinstance(checked, str):
            out.reject(checked, n)
            continue
        if samples and ts.histograms:
            out.reject(f"series {_show(checked)} has both samples and histograms", n)
            continue
        if not samples:
            if not ts.histograms:
                out.reject(f"series {_show(checked)} has no samples", 0)
            continue
        if any(samples[i][0] > samples[i + 1][0] for i in range(n - 1)):
            samples.sort(key=lambda s: s[0])
        if max_ts_ms is not None and samples[-1][0] > max_ts_ms:
            out.reject(f"series {_show(checked)}: sample timestamp too far in the future", n)
            continue
        append(cache.intern(checked), samples)
    return out


def check_labels(pairs: list[tuple[str, str]]) -> Labels | str:
    """The validated label set, sorted by name, or why it is invalid."""
    prev = ""
    in_order = True
    has_name = empty_value = False
    for k, v in pairs:
        if k <= prev:
            in_order = False
        prev = k
        if not v:
            empty_value = True
        elif k == "__name__":
            has_name = True
    if not in_order:
        pairs = sorted(pairs)
        if pairs[0][0] == "":
            return f"series {_show(tuple(pairs))} has an empty label name"
        if any(pairs[i][0] == pairs[i + 1][0] for i in range(len(pairs) - 1)):
            return f"series {_show(tuple(pairs))} has duplicate label names"
    if not has_name:
        return f"series {_show(tuple(pairs))} has no __name__ label"
    # An empty label value means the label is absent (Prometheus's data model).
    return tuple(p for p in pairs if p[1]) if empty_value else tuple(pairs)


def _show(labels: Labels) -> str:
    d = dict(labels)
    name = d.pop("__name__", "")
    inner = ",".join(f'{k}="{v}"' for k, v in d.items())
    text = f"{name}{{{inner}}}"
    return text if len(text) <= 200 else text[:197] + "..."


def metric_name(labels: Labels) -> str:
    if labels and labels[0][0] == "__name__":
        return labels[0][1]
    for k, v in labels:
        if k == "__name__":
            return v
    return ""


def encode_v1(msg: pb1.WriteRequest) -> bytes:
    """Serialise and snappy-compress a 1.0 request (for replay, tests and benchmarks)."""
    return bytes(snappy.compress(msg.SerializeToString()))


def encode_v2(msg: pb2.Request) -> bytes:
    return bytes(snappy.compress(msg.SerializeToString()))

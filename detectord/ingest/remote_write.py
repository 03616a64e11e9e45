"""Remote-write request decoding: HTTP headers and snappy/protobuf bytes to decoded series.

Pure functions with no daemon state, so they run inline, in a worker thread or offline alike.
Remote write 1.0 (`prometheus.WriteRequest`) and 2.0 (`io.prometheus.write.v2.Request`).
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
import sys
import time
from collections.abc import Callable, Generator, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import cramjam
import snappy
from google.protobuf.message import DecodeError

from detectord.config import WebConfig
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


@dataclass(frozen=True, slots=True)
class WriteLimits:
    """What one request may hold, as Prometheus's `label_name_length_limit`,
    `label_value_length_limit` and `label_limit` (0: no limit) and a series count; beyond them
    a series (or, for the series count, the whole request) is refused with 400."""

    label_name_length: int = 1024
    label_value_length: int = 4096
    labels: int = 64
    series: int = 2_000_000

    @classmethod
    def of(cls, web: WebConfig) -> WriteLimits:
        return cls(
            web.label_name_length_limit, web.label_value_length_limit, web.label_limit, web.remote_write_series_limit
        )


class Reason(str):
    """Why a series or a request was refused, with the short `kind` it is counted under in
    detectord_remote_write_rejected_*_total{reason}."""

    kind: str

    def __new__(cls, text: str, kind: str) -> Reason:
        self = super().__new__(cls, text)
        self.kind = kind
        return self


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


if _fastdecode is not None:
    _fastdecode.key_type(SeriesKey)  # the C decoder makes the keys of new plainly valid label sets


# What the label cache may hold, estimated as below: about 500,000 distinct series of a few labels.
DEFAULT_CACHE_BYTES = 256 * 1024**2
# Estimated bytes of a cache entry beyond its raw key (dict slot, bytes object), of a
# SeriesKey beyond its label strings, and of each label pair's objects (tuple, two str headers).
# The C decoder's raw key is a 16-byte digest of the label bytes (see _fastdecode.siphash128),
# held in a DigestMap's 24-byte slot (40 bytes at its mean load), not as an object.
_ENTRY_BYTES = 120
_DIGEST_ENTRY_BYTES = 40
_KEY_BYTES = 200
_LABEL_BYTES = 170
# A key the C decoder made, with its entry (see LabelCache.count_made), and one it pinned
# (_pinned_bytes), beyond their labels; the C decoder's entry for a key held already.
_MADE_BYTES = _KEY_BYTES + _DIGEST_ENTRY_BYTES
_C_ENTRY_BYTES = _DIGEST_ENTRY_BYTES
_PINNED_BYTES = _KEY_BYTES + 2 * _DIGEST_ENTRY_BYTES


# Interned strings were immortal in CPython 3.12.0 to 3.12.4 (gh-113993): there, interning the
# label values a hostile writer makes up would keep every one for good.
_INTERN_IS_MORTAL = not ((3, 12) <= sys.version_info[:3] < (3, 12, 5))


def _intern(text: str) -> str:
    return sys.intern(text) if _INTERN_IS_MORTAL else text


def _py_label_chars(labels: Labels) -> int:
    """The characters of the labels' names and values (what _fastdecode.label_chars does)."""
    return sum([len(name) + len(value) for name, value in labels])


_label_chars: Callable[[Labels], int] = _py_label_chars if _fastdecode is None else _fastdecode.label_chars


def _key_bytes(labels: Labels, strings: int | None = None) -> int:
    """`strings`: the labels' characters, if known."""
    if strings is None:
        strings = _label_chars(labels)
    return _KEY_BYTES + _LABEL_BYTES * len(labels) + strings


def _pinned_bytes(labels: Labels) -> int:
    """A pinned key's estimated bytes with an entry for it in each generation (the C decoder's
    raw key is a digest; the pure-Python one's raw labels are about as long as the label strings)."""
    strings = _label_chars(labels)
    entry = _DIGEST_ENTRY_BYTES if _fastdecode is not None else _ENTRY_BYTES + strings + 6 * len(labels)
    return _key_bytes(labels, strings) + 2 * entry


def _entry_bytes(raw: object) -> int:
    if isinstance(raw, bytes):
        return _DIGEST_ENTRY_BYTES if _fastdecode is not None and len(raw) == 16 else _ENTRY_BYTES + len(raw)
    if isinstance(raw, tuple):  # the pure-Python decoder's Label messages
        return _ENTRY_BYTES + sum(len(b) + 40 for b in raw)
    return _ENTRY_BYTES


def _generation() -> MutableMapping[object, SeriesKey | str]:
    """A new generation of the label cache's entries: a DigestMap where the C decoder is built."""
    return _fastdecode.DigestMap() if _fastdecode is not None else {}


class LabelCache:
    """Interns label sets. A 1.0 series is looked up by its raw label bytes, so a series seen
    before costs one dict lookup instead of parsing and validating its labels again.

    Bounded in bytes, and given back. Entries live in two generations: `turn()` drops the older
    and makes the younger older, and an entry seen again moves back to the younger. So whatever
    was not seen for a whole period goes, junk series and series nobody reads cost nothing
    lasting, and a turn costs no walk over the entries. Keys the owner `pin`s (an instance's
    series: their SeriesKey carries its counters) stay until unpinned. The owner turns it once
    per idle period (`turn_if_idle`), the decoder whenever it outgrows `max_bytes` (`after_decode`).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, limits: WriteLimits | None = None) -> None:
        # Raw labels (a tuple of Label messages, or for the C decoder a keyed digest of the label
        # fields' bytes) to what they mean, seen since the last turn; and those seen in the
        # period before.
        self._raw: MutableMapping[object, SeriesKey | str] = _generation()
        self._old: MutableMapping[object, SeriesKey | str] = _generation()
        # Label sets to their one key, in the same two generations, and the pinned ones.
        self._keys: dict[Labels, SeriesKey] = {}
        self._old_keys: dict[Labels, SeriesKey] = {}
        self._pinned: dict[Labels, SeriesKey] = {}
        # Each label pair the keys made since the last turn hold, once (see _shared).
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        self.max_bytes = max_bytes
        self._limits = limits or WriteLimits()
        # Estimated bytes of what was made or seen again since the last turn, and of the older generation.
        self.young_bytes = 0
        self.old_bytes = 0
        # Estimated bytes of the pinned keys and of their entries in both generations: the tracked
        # instances' own series, bounded by ingest.max_instances, not by max_bytes.
        self.pinned_bytes = 0
        self.interned = 0  # keys ever made
        self.turned_at = time.monotonic()
        self.turns = 0  # only a turn can let a key go, so a key is the one for its labels until then
        # Entries forgotten by turns, by why the turn came ("idle", "size").
        self.forgotten: dict[str, int] = {"idle": 0, "size": 0}
        # Whether the C decoder makes new keys and pins them itself (native_tables); the reference
        # path, Python's from_label_fields and pin, is what tests compare it with.
        self.native = _fastdecode is not None

    @property
    def limits(self) -> WriteLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: WriteLimits) -> None:
        if limits != self._limits:
            self._limits = limits
            # Their verdicts were made under the old limits.
            self._raw.clear()
            self._old.clear()

    def __len__(self) -> int:
        """Distinct series held."""
        return len(self._keys) + len(self._old_keys) + len(self._pinned)

    @property
    def size_bytes(self) -> int:
        return self.young_bytes + self.old_bytes

    def intern(self, labels: Labels, *, shared: bool = False) -> SeriesKey:
        """The one key of `labels` (valid, sorted; `shared`: already made of this cache's pairs)."""
        key = self._pinned.get(labels) or self._keys.get(labels)
        if key is not None:
            return key
        key = self._old_keys.pop(labels, None)
        if key is None:
            key = SeriesKey(labels if shared else self._shared(labels))
            self.interned += 1
        self._keys[key.labels] = key
        self.young_bytes += _key_bytes(labels)
        return key

    def intern_all(self, sets: list[Labels]) -> list[SeriesKey]:
        """`intern` each of `sets` (valid, sorted)."""
        if not self.native:
            return [self.intern(labels) for labels in sets]
        assert _fastdecode is not None
        keys: list[SeriesKey]
        keys, (made, labels, chars) = _fastdecode.intern_labels(
            sets, self._pairs, self._pinned, self._keys, self._old_keys, self.intern
        )
        self.interned += made
        self.young_bytes += made * _KEY_BYTES + labels * _LABEL_BYTES + chars
        return keys

    def _shared(self, labels: Labels) -> Labels:
        """`labels` made of shared pairs of interned strings. A fleet's series repeat a few names and
        values (job, the metric names, le, each instance's own labels): held once each, not once per
        series, a CoreDNS instance's 136 series take 101 KB instead of 265 KB
        (bench/instance_memory.py). Interned strings go
        when nothing holds them, and the pairs table starts afresh at each turn."""
        pairs = self._pairs
        out = []
        for p in labels:
            q = pairs.get(p)
            if q is None:
                q = (_intern(p[0]), _intern(p[1]))
                pairs[q] = q
            out.append(q)
        return tuple(out)

    def canonical(self, key: SeriesKey) -> SeriesKey:
        """The cache's key for `key`'s labels: `key` itself, unless a turn let go of it while a
        request held it and the same labels came again since."""
        labels = key.labels
        held = self._pinned.get(labels) or self._keys.get(labels) or self._old_keys.get(labels)
        if held is not None:
            return held
        self._keys[labels] = key
        self.young_bytes += _key_bytes(labels)
        return key

    def pin(self, key: SeriesKey) -> None:
        """Keep `key` whatever the turns, until `unpin`."""
        labels, pinned = key.labels, self._pinned
        held = len(pinned)
        pinned[labels] = key
        if len(pinned) > held:  # newly pinned
            self.pinned_bytes += _pinned_bytes(labels)
        if self._keys.pop(labels, None) is None:
            self._old_keys.pop(labels, None)

    def pin_all(self, keys: list[SeriesKey]) -> None:
        """`pin` each of `keys`."""
        if not self.native:
            for key in keys:
                self.pin(key)
            return
        assert _fastdecode is not None
        newly, labels, chars = _fastdecode.pin_keys(keys, self._pinned, self._keys, self._old_keys)
        self.pinned_bytes += newly * _PINNED_BYTES + labels * _LABEL_BYTES + chars

    def unpin(self, key: SeriesKey) -> None:
        """Let `key` go like any other once it is not seen for a while."""
        if self._pinned.pop(key.labels, None) is not None:
            self.pinned_bytes -= _pinned_bytes(key.labels)
            self._keys[key.labels] = key

    def known(self, raw: object) -> SeriesKey | str | None:
        """What the cache holds for `raw`, without making it seen again."""
        hit = self._raw.get(raw)
        return hit if hit is not None else self._old.get(raw)

    def from_raw(self, raw: tuple[bytes, ...]) -> SeriesKey | str:
        """The SeriesKey of serialized prometheus.Label messages, or why they are invalid."""
        hit = self._raw.get(raw)
        if hit is not None:
            return hit
        return self.from_label_fields(raw, raw)

    def from_label_fields(
        self, raw: object, labels: tuple[bytes, ...] | list[tuple[str, str]] | Labels | None, checked: bool = False
    ) -> SeriesKey | str:
        """Like from_raw, for the label fields of a TimeSeries as the C decoder found them: `raw` is
        their digest (it looked in _raw already). `checked`: the C decoder found them plainly valid
        (no check can refuse them) and `labels` is their sorted tuple of the shared pairs
        (`shared_pairs`)."""
        hit = self._old.pop(raw, None)
        if hit is None:
            hit = self.intern(cast(Labels, labels), shared=True) if checked else self._resolve(labels)
        elif isinstance(hit, SeriesKey):
            hit = self.canonical(hit)  # seen again: its key moves back to the younger generation too
        self._raw[raw] = hit
        self.young_bytes += _entry_bytes(raw)
        return hit

    def native_tables(self, made: list[int]) -> tuple[object, ...] | None:
        """Where the C decoder enters plainly valid label sets it has no entry for, as
        from_label_fields(digest, labels, True) would (with their key pinned or young, or a new
        one), and `made`, where it says what it made, for count_made (None: it leaves them all
        to from_label_fields)."""
        return (self._old, self._pinned, self._keys, self._old_keys, made) if self.native else None

    def count_made(self, made: list[int]) -> None:
        """Count what the C decoder made: keys (how many, their labels and their characters) and
        entries for keys held already."""
        keys, labels, chars, entries = made
        self.interned += keys
        self.young_bytes += keys * _MADE_BYTES + labels * _LABEL_BYTES + chars + entries * _C_ENTRY_BYTES

    @property
    def shared_pairs(self) -> dict[tuple[str, str], tuple[str, str]]:
        """The pairs of interned strings the keys made since the last turn hold (see _shared)."""
        return self._pairs

    def _resolve(self, labels: tuple[bytes, ...] | list[tuple[str, str]] | Labels | None) -> SeriesKey | str:
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
            return Reason("a label is not a valid protobuf message with UTF-8 strings", "labels")
        checked = check_labels(pairs, self._limits)
        return checked if isinstance(checked, str) else self.intern(checked)

    def after_decode(self) -> None:
        """Turn if the cache has outgrown max_bytes beyond what the pinned series take. Counting
        those too made a fleet of 10,000 instances (1.4 million series) turn it every few
        requests, so that every series took the slow path every round."""
        if self.young_bytes + self.old_bytes > self.max_bytes + self.pinned_bytes:
            self.turn("size")

    def turn_if_idle(self, now: float, idle_s: float) -> None:
        """Turn every half of `idle_s`: an entry unseen for `idle_s` is gone."""
        if now - self.turned_at >= idle_s / 2:
            self.turn("idle")

    def turn(self, why: str = "idle") -> int:
        """Forget the older generation; the younger becomes the older. Returns how many entries went."""
        gone = len(self._old) + len(self._old_keys)
        self._old, self._raw = self._raw, _generation()
        self._old_keys, self._keys = self._keys, {}
        self._pairs = {}
        self.old_bytes, self.young_bytes = self.young_bytes, 0
        self.turned_at = time.monotonic()
        self.turns += 1
        self.forgotten[why] += gone
        return gone


# A request's column: a list the cyclic GC does not walk (see _fastdecode.untracked_list).
_column: Callable[[], list[Any]] = list if _fastdecode is None else _fastdecode.untracked_list


@dataclass(slots=True)
class DecodedWrite:
    """One request's series, column by column: series i is keys[i] with counts[i] samples, the
    next ones in timestamps/values. A series may appear several times (Prometheus 2.42 sends
    one sample per TimeSeries), each time with its samples in timestamp order. The columns are
    flat lists the cyclic GC does not walk (`_column`), however large the request."""

    version: Version
    keys: list[SeriesKey] = field(default_factory=_column)
    counts: list[int] = field(default_factory=_column)
    timestamps: list[int] = field(default_factory=_column)
    values: list[float] = field(default_factory=_column)
    samples: int = 0
    histograms: int = 0
    exemplars: int = 0
    metadata: int = 0
    # Series refused as invalid, with the first reason; the rest of the request is still used.
    # `histograms` and `exemplars` count those of accepted series only.
    invalid_series: int = 0
    invalid_samples: int = 0
    first_error: str | None = None
    refused: dict[str, int] = field(default_factory=dict)  # series refused, by Reason.kind
    # Samples of series left out by `keep` (a metric nobody reads), counted and nothing else.
    ignored: int = 0
    # The label cache's `turns` when decoding began (-1: unknown). While it has not turned since,
    # every key here is the cache's one key for its labels.
    turns: int = -1

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
        kind = reason.kind if isinstance(reason, Reason) else "invalid"
        self.refused[kind] = self.refused.get(kind, 0) + 1
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
    body: bytes,
    version: Version,
    cache: LabelCache,
    *,
    max_decoded: int,
    max_ts_ms: int | None = None,
    use_c: bool = True,
    keep: Keep = None,
) -> DecodedWrite:
    """Snappy-compressed protobuf body to DecodedWrite; raises RemoteWriteError(400/413).

    The body must parse as the message its Content-Type names: one that does not (a 2.0 body sent
    as 1.0 parses as an empty 1.0 request, and the reverse) is refused rather than answered 204
    with nothing written. The series are counted before any is decoded, so a request beyond the
    series limit costs only a walk over its top-level fields."""
    return finish(
        decode_steps(body, version, cache, max_decoded=max_decoded, max_ts_ms=max_ts_ms, use_c=use_c, keep=keep)
    )


def decode_steps(
    body: bytes,
    version: Version,
    cache: LabelCache,
    *,
    max_decoded: int,
    max_ts_ms: int | None = None,
    use_c: bool = True,
    keep: Keep = None,
) -> Steps:
    """`decode` in steps of about STEP_SERIES series: each `next()` does one, and the last
    returns the DecodedWrite. The ingest thread runs other requests' steps between them, so a
    request of a million new series does not hold up everyone else's for seconds.

    With `keep` (metric names), a float series whose one `__name__` label names another metric is
    only counted (`DecodedWrite.ignored`): its labels are neither checked nor cached, so the rest
    of a whole cluster's remote write costs little and does not crowd the label cache. A series
    with native histograms or an empty name is checked whatever its metric: both are rare, and
    the invalid ones must be refused (the receiver compliance suite sends them)."""
    data = decompress(body, max_decoded=max_decoded)
    c = use_c and _fastdecode is not None
    check_message(data, version, cache.limits, use_c=c)
    yield
    try:
        if c:
            return (yield from _c_steps(data, version, cache, max_ts_ms=max_ts_ms, keep=keep))
        if version == "1.0":
            return (yield from _v1_python_steps(data, cache, max_ts_ms=max_ts_ms, keep=keep))
        msg = pb2.Request.FromString(data)
        yield
        return (yield from _v2_steps(msg, cache, max_ts_ms=max_ts_ms, keep=keep))
    except DecodeError:
        raise _malformed(version) from None
    finally:
        cache.after_decode()


# Metric names to decode, the rest only counted; None: every series.
Keep = frozenset[str] | None


# A decoding in steps: each next() does a slice of the work; StopIteration carries the result.
Steps = Generator[None, None, DecodedWrite]
# Series decoded in one step (a few tens of ms when all are new).
STEP_SERIES = 5_000


def finish(steps: Steps) -> DecodedWrite:
    """Run a decoding's steps to the end."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: DecodedWrite = done.value
            return result


# (field of the series, the message's other field) at the top level of each version's message.
_TOP_FIELDS: dict[Version, tuple[int, int]] = {"1.0": (1, 3), "2.0": (5, 4)}
_PROTO = {"1.0": PROTO_V1, "2.0": PROTO_V2}
_OTHER: dict[Version, Version] = {"1.0": "2.0", "2.0": "1.0"}


class RefusedWrite(RemoteWriteError):
    """A whole request refused, with the `kind` it is counted under."""

    def __init__(self, status: int, reason: str, kind: str) -> None:
        super().__init__(status, reason)
        self.kind = kind


def _malformed(version: Version) -> RefusedWrite:
    # One reason whichever decoder found the fault, so both answer alike.
    return RefusedWrite(400, f"protobuf: body is not a valid {_PROTO[version]} message", "malformed")


def check_message(data: bytes | memoryview, version: Version, limits: WriteLimits, *, use_c: bool = True) -> None:
    """Refuse a body whose top level is not the message `version` names, or that holds more series
    than `limits.series`."""
    series_field, other_field = _TOP_FIELDS[version]
    most = limits.series or 2**62
    try:
        if use_c and _fastdecode is not None:
            series, unknown = _fastdecode.scan(data, series_field, other_field, most)
        else:
            series, unknown = _scan_python(bytes(data), series_field, other_field, most)
    except ValueError:
        raise _malformed(version) from None
    if series > most:
        # Found before the rest of the body was looked at: the walk stops there.
        raise RefusedWrite(400, f"request has more than {most} series, the limit per request", "series_limit")
    if unknown:
        other = _OTHER[version]
        hint = (
            f"; a remote-write {other} body sent with the {version} Content-Type?"
            if unknown in _TOP_FIELDS[other]
            else ""
        )
        raise RefusedWrite(
            400, f"protobuf: body is not a {_PROTO[version]} message: it has field {unknown}{hint}", "wrong_message"
        )


def _scan_python(data: bytes, series_field: int, other_field: int, most: int) -> tuple[int, int]:
    """What _fastdecode.scan does, in Python (the reference it is tested against)."""
    pos, series, unknown = 0, 0, 0
    while pos < len(data):
        field_no, wt, pos = _tag(data, pos)
        if wt == 2 and field_no in (series_field, other_field):
            n, pos = _varint(data, pos)
            if n > len(data) - pos:
                raise ValueError("truncated")
            pos += n
            if field_no == series_field:
                series += 1
                if series > most:
                    break
            continue
        unknown = unknown or field_no
        pos = _skip(data, pos, field_no, wt, 100)
    return series, unknown


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for i in range(10):
        if pos >= len(data):
            break
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
    raise ValueError("malformed varint")


def _tag(data: bytes, pos: int) -> tuple[int, int, int]:
    # As upb reads a tag: at most 5 bytes, below 2^32, field number not 0.
    v = 0
    for i in range(5):
        if pos >= len(data):
            break
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if v > 0xFFFFFFFF or v >> 3 == 0:
                break
            return v >> 3, v & 7, pos
    raise ValueError("malformed tag")


def _skip(data: bytes, pos: int, field_no: int, wt: int, depth: int) -> int:
    if wt == 0:
        return _varint(data, pos)[1]
    if wt in (1, 5):
        pos += 8 if wt == 1 else 4
        if pos > len(data):
            raise ValueError("truncated")
        return pos
    if wt == 2:
        n, pos = _varint(data, pos)
        if n > len(data) - pos:
            raise ValueError("truncated")
        return pos + n
    if wt == 3 and depth > 0:
        while True:
            f, w, pos = _tag(data, pos)
            if w == 4:
                if f != field_no:
                    raise ValueError("unbalanced group")
                return pos
            pos = _skip(data, pos, f, w, depth - 1)
    raise ValueError("malformed field")


def decode_v1_message(msg: pb1.WriteRequest, cache: LabelCache, *, max_ts_ms: int | None = None) -> DecodedWrite:
    return decode_v1_bytes(msg.SerializeToString(), cache, max_ts_ms=max_ts_ms)


C_CHUNK_SERIES = 2000


def _no_samples(labels: Labels) -> Reason:
    return Reason(f"series {_show(labels)} has no samples", "no_samples")


def _future(labels: Labels) -> Reason:
    return Reason(f"series {_show(labels)} has a sample timestamp too far in the future", "future")


def _both(labels: Labels) -> Reason:
    return Reason(f"series {_show(labels)} has both samples and histograms", "histogram")


def _check_symbols(symbols: Sequence[str]) -> None:
    if symbols and symbols[0] != "":
        raise RefusedWrite(400, "symbols[0] must be the empty string", "symbols")


def _bad_histogram(labels: Labels, why: str) -> Reason:
    return Reason(f"series {_show(labels)} has an invalid native histogram: {why}", "histogram")


def decode_v1_bytes(
    data: bytes | memoryview,
    cache: LabelCache,
    *,
    max_ts_ms: int | None = None,
    use_c: bool = True,
    keep: Keep = None,
) -> DecodedWrite:
    if _fastdecode is not None and use_c:
        return finish(_c_steps(data, "1.0", cache, max_ts_ms=max_ts_ms, keep=keep))
    return finish(_v1_python_steps(data, cache, max_ts_ms=max_ts_ms, keep=keep))


def _c_steps(
    data: bytes | memoryview, version: Version, cache: LabelCache, *, max_ts_ms: int | None = None, keep: Keep = None
) -> Steps:
    """Both versions through _fastdecode, in chunks: the C code holds the GIL, and the event
    loop's thread needs it too. A 2.0 body is parsed by protobuf first, which judges its wire
    format as the pure-Python path's does (a fraction of the time the series then take), so the
    C walk over it need not."""
    assert _fastdecode is not None
    limit = max_ts_ms if max_ts_ms is not None else 2**63 - 1
    keep_raw = None if keep is None else tuple(sorted(name.encode() for name in keep))
    limits = cache.limits
    out = DecodedWrite(version, turns=cache.turns)
    head: tuple[bytes, ...] = ()
    if version == "1.0":
        decode_c, check_hist = _fastdecode.decode_v1, _raw_histograms_problem
    else:
        _check_symbols(pb2.Request.FromString(data).symbols)
        yield
        decode_c, head = _fastdecode.decode_v2, (_fastdecode.symbols_v2(data),)
        check_hist = functools.partial(_raw_histograms_problem, message=pb2.Histogram)
    pos = 0
    chunks = 0
    while pos < len(data) or pos == 0:
        chunks += 1
        if chunks % (STEP_SERIES // C_CHUNK_SERIES) == 0:
            yield
        try:
            made = [0, 0, 0, 0]
            n, hist, ex, meta, rejects, pos, ignored = decode_c(
                data,
                *head,
                cache._raw,
                cache.from_label_fields,
                check_hist,
                limit,
                pos,
                C_CHUNK_SERIES,
                out.keys,
                out.counts,
                out.timestamps,
                out.values,
                keep_raw,
                cache.shared_pairs,
                limits.labels,
                limits.label_name_length,
                limits.label_value_length,
                cache.native_tables(made),
            )
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        finally:
            cache.count_made(made)
        out.samples += n
        out.histograms += hist
        out.exemplars += ex
        out.metadata += meta
        out.ignored += ignored
        for key, count, why, detail in rejects:
            out.reject(_c_reason(key, why, detail), count)
        if not data:
            break
    return out


def _c_reason(key: SeriesKey | str | None, why: str, detail: object) -> str:
    """The reason for a series the C decoder refused, as the pure-Python paths word it."""
    if why == "labels":
        assert isinstance(key, str)
        return key
    if why == "refs_odd":
        return Reason("labels_refs has an odd length", "labels")
    if why == "refs_range":
        assert isinstance(detail, tuple)
        top, nsym = detail
        return Reason(f"labels_refs index {top} out of range of {nsym} symbols", "labels")
    assert isinstance(key, SeriesKey)
    if why == "both":
        return _both(key.labels)
    if why == "histogram":
        assert isinstance(detail, str)
        return _bad_histogram(key.labels, detail)
    if why == "no_samples":
        return _no_samples(key.labels)
    return _future(key.labels)


def _v1_python_steps(
    data: bytes | memoryview, cache: LabelCache, *, max_ts_ms: int | None = None, keep: Keep = None
) -> Steps:
    msg = pbv.WriteRequestView.FromString(data)
    out = DecodedWrite("1.0", metadata=len(msg.metadata), turns=cache.turns)
    append = out.add
    from_raw = cache.from_raw
    limit = max_ts_ms if max_ts_ms is not None else 2**63 - 1
    keep_raw = None if keep is None else {name.encode() for name in keep}
    # The same checks in the same order as _fastdecode.decode_v1.
    for i, ts in enumerate(msg.timeseries, 1):
        if i % STEP_SERIES == 0:
            yield
        sv = ts.samples
        if len(sv) == 1:
            x = sv[0]
            samples = [(x.timestamp, x.value)]
        else:
            samples = [(x.timestamp, x.value) for x in sv]
        n = len(samples)
        out.samples += n
        raw = tuple(ts.labels)
        if keep is not None and keep_raw is not None:
            # What _fastdecode does by the raw labels, with the cache first: a series already
            # known under a kept name needs no walk over its labels.
            hit = cache.known(raw)
            if (
                not ts.histograms
                and not (isinstance(hit, SeriesKey) and hit.name in keep)
                and (name := _metric_name_raw(raw))
                and name not in keep_raw
            ):
                out.ignored += n
                out.exemplars += len(ts.exemplars)
                continue
        key = from_raw(raw)
        if isinstance(key, str):
            out.reject(key, n)
            continue
        if ts.histograms:
            why = _raw_histograms_problem(list(ts.histograms))
            if why is not None:
                out.reject(_bad_histogram(key.labels, why), n)
                continue
        if not n:
            if not ts.histograms:
                out.reject(_no_samples(key.labels), 0)
                continue
        elif max(t for t, _ in samples) > limit:
            out.reject(_future(key.labels), n)
            continue
        out.histograms += len(ts.histograms)
        out.exemplars += len(ts.exemplars)
        if n:
            append(key, samples)
    return out


def _metric_name_raw(raw: tuple[bytes, ...]) -> bytes | None:
    """What _fastdecode's name_step finds, label by label, in serialized Label messages: the value of the one
    `__name__` label, or None where there is not exactly one or a Label is not plainly a name
    and a value."""
    found: bytes | None = None
    for lb in raw:
        fields: dict[int, bytes] = {}
        pos = 0
        try:
            while pos < len(lb):
                field_no, wt, pos = _tag(lb, pos)
                if field_no not in (1, 2) or wt != 2 or field_no in fields:
                    return None
                size, pos = _varint(lb, pos)
                if pos + size > len(lb):
                    return None
                fields[field_no] = lb[pos : pos + size]
                pos += size
        except ValueError:
            return None
        if fields.get(1) == b"__name__":
            if found is not None or 2 not in fields:
                return None
            found = fields[2]
    return found


def decode_v2_message(
    msg: pb2.Request, cache: LabelCache, *, max_ts_ms: int | None = None, keep: Keep = None
) -> DecodedWrite:
    return finish(_v2_steps(msg, cache, max_ts_ms=max_ts_ms, keep=keep))


def _v2_steps(msg: pb2.Request, cache: LabelCache, *, max_ts_ms: int | None = None, keep: Keep = None) -> Steps:
    out = DecodedWrite("2.0", turns=cache.turns)
    symbols = msg.symbols
    _check_symbols(symbols)
    nsym = len(symbols)
    append = out.add
    limits = cache.limits
    for i, ts in enumerate(msg.timeseries, 1):
        if i % STEP_SERIES == 0:
            yield
        samples = [(s.timestamp, s.value) for s in ts.samples]
        n = len(samples)
        out.samples += n
        if ts.HasField("metadata"):
            out.metadata += 1
        refs = ts.labels_refs
        if len(refs) % 2:
            out.reject(Reason("labels_refs has an odd length", "labels"), n)
            continue
        if refs and max(refs) >= nsym:
            out.reject(Reason(f"labels_refs index {max(refs)} out of range of {nsym} symbols", "labels"), n)
            continue
        if keep is not None and not ts.histograms:
            names = [symbols[refs[i + 1]] for i in range(0, len(refs), 2) if symbols[refs[i]] == "__name__"]
            if len(names) == 1 and names[0] and names[0] not in keep:
                out.ignored += n
                out.exemplars += len(ts.exemplars)
                continue
        checked = check_labels([(symbols[refs[i]], symbols[refs[i + 1]]) for i in range(0, len(refs), 2)], limits)
        if isinstance(checked, str):
            out.reject(checked, n)
            continue
        if samples and ts.histograms:
            out.reject(_both(checked), n)
            continue
        bad = next((why for h in ts.histograms if (why := histogram_problem(h)) is not None), None)
        if bad is not None:
            out.reject(_bad_histogram(checked, bad), n)
            continue
        if not samples:
            if not ts.histograms:
                out.reject(_no_samples(checked), 0)
            else:
                out.histograms += len(ts.histograms)
                out.exemplars += len(ts.exemplars)
            continue
        if any(samples[i][0] > samples[i + 1][0] for i in range(n - 1)):
            samples.sort(key=lambda s: s[0])
        if max_ts_ms is not None and samples[-1][0] > max_ts_ms:
            out.reject(_future(checked), n)
            continue
        out.exemplars += len(ts.exemplars)
        append(cache.intern(checked), samples)
    return out


class _Span(Protocol):
    offset: int
    length: int


class _Histogram(Protocol):
    """The fields histogram_problem reads; 1.0's and 2.0's Histogram messages both have them."""

    sum: float
    schema: int
    zero_threshold: float

    def WhichOneof(self, oneof_group: Literal["count", "zero_count"], /) -> str | None: ...

    @property
    def count_int(self) -> int: ...
    @property
    def count_float(self) -> float: ...
    @property
    def zero_count_int(self) -> int: ...
    @property
    def zero_count_float(self) -> float: ...
    @property
    def negative_spans(self) -> Sequence[_Span]: ...
    @property
    def positive_spans(self) -> Sequence[_Span]: ...
    @property
    def negative_deltas(self) -> Sequence[int]: ...
    @property
    def positive_deltas(self) -> Sequence[int]: ...
    @property
    def negative_counts(self) -> Sequence[float]: ...
    @property
    def positive_counts(self) -> Sequence[float]: ...
    @property
    def custom_values(self) -> Sequence[float]: ...


CUSTOM_BUCKETS_SCHEMA = -53


def _raw_histograms_problem(
    raws: list[bytes], message: type[pb1.Histogram | pb2.Histogram] = pb1.Histogram
) -> str | None:
    """Why one of a series' serialized Histogram messages (`message`: 1.0's or 2.0's) is invalid, or None."""
    for raw in raws:
        try:
            h = message.FromString(raw)
        except DecodeError:
            return "not a valid protobuf message"
        why = histogram_problem(h)
        if why is not None:
            return why
    return None


def histogram_problem(h: _Histogram) -> str | None:
    """Why a native histogram is invalid, by the checks of Prometheus's receiver
    (model/histogram's Validate): schema in range, spans that match their buckets, no negative
    bucket, and a count that equals the sum of its buckets (at least it, when the sum is NaN)."""
    schema = h.schema
    custom = schema == CUSTOM_BUCKETS_SCHEMA
    if not (-4 <= schema <= 8 or custom):
        return f"schema {schema} is out of range (-4 to 8, or {CUSTOM_BUCKETS_SCHEMA} for custom buckets)"
    is_float = h.WhichOneof("count") == "count_float"
    total = 0.0
    for side in ("negative", "positive"):
        spans: Sequence[_Span] = getattr(h, f"{side}_spans")
        buckets: Sequence[float] = getattr(h, f"{side}_counts" if is_float else f"{side}_deltas")
        if custom and side == "negative" and (spans or buckets):
            return "a custom-buckets histogram has negative buckets"
        covered = 0
        for i, span in enumerate(spans):
            if i > 0 and span.offset < 0:
                return f"{side} span {i} has a negative offset {span.offset}"
            covered += span.length
        if covered != len(buckets):
            what = "counts" if is_float else "deltas"
            return f"{side} spans cover {covered} buckets but {len(buckets)} {what} are given"
        if is_float:
            for c in buckets:
                if not c >= 0:
                    return f"a {side} bucket count {c} is negative"
                total += c
        else:
            running = 0.0
            for d in buckets:
                running += d
                if running < 0:
                    return f"a {side} bucket count {running:g} is negative"
                total += running
    if custom:
        bounds = list(h.custom_values)
        if any(not math.isfinite(b) for b in bounds) or any(a >= b for a, b in itertools.pairwise(bounds)):
            return "custom bucket bounds are not finite and increasing"
    if is_float:
        count: float = h.count_float
        zero: float = h.zero_count_float if h.WhichOneof("zero_count") == "zero_count_float" else h.zero_count_int
        if not (count >= 0 and zero >= 0):
            return "count or zero count is negative"
    else:
        count = h.count_int
        zero = h.zero_count_int if h.WhichOneof("zero_count") != "zero_count_float" else h.zero_count_float
    total += zero
    if math.isnan(h.sum):
        if total > count * (1 + 1e-9) + 1e-9:
            return f"count {count:g} is less than the {total:g} observations in its buckets"
    elif abs(total - count) > 1e-9 * max(abs(count), 1.0):
        return f"count {count:g} does not match the {total:g} observations in its buckets"
    return None


def check_labels(pairs: list[tuple[str, str]], limits: WriteLimits | None = None) -> Labels | str:
    """The validated label set, sorted by name, or why it is invalid (a Reason)."""
    if limits is not None:
        why = _over_limits(pairs, limits)
        if why is not None:
            return why
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
            return Reason(f"series {_show(tuple(pairs))} has an empty label name", "labels")
        if any(pairs[i][0] == pairs[i + 1][0] for i in range(len(pairs) - 1)):
            return Reason(f"series {_show(tuple(pairs))} has duplicate label names", "labels")
    if not has_name:
        return Reason(f"series {_show(tuple(pairs))} has no __name__ label", "labels")
    # An empty label value means the label is absent (Prometheus's data model).
    return tuple(p for p in pairs if p[1]) if empty_value else tuple(pairs)


def _over_limits(pairs: list[tuple[str, str]], limits: WriteLimits) -> Reason | None:
    if limits.labels and len(pairs) > limits.labels:
        why = f"series {_show(tuple(pairs))} has {len(pairs)} labels, more than label_limit {limits.labels}"
        return Reason(why, "label_limit")
    for k, v in pairs:
        if limits.label_name_length and len(k) > limits.label_name_length:
            return Reason(
                f"series {_show(tuple(pairs))} has a label name of {len(k)} characters, longer than "
                f"label_name_length_limit {limits.label_name_length}",
                "label_name_length",
            )
        if limits.label_value_length and len(v) > limits.label_value_length:
            return Reason(
                f"series {_show(tuple(pairs))}: label {_clip(k)} has a value of {len(v)} characters, longer than "
                f"label_value_length_limit {limits.label_value_length}",
                "label_value_length",
            )
    return None


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _show(labels: Labels) -> str:
    d = dict(labels)
    name = _clip(d.pop("__name__", ""), 200)
    inner = ",".join(f'{_clip(k)}="{_clip(v)}"' for k, v in d.items())
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

"""Per-step CoreDNS features, per instance, from decoded remote-write series.

`FEATURES` is the one declarative table; adding a feature is one row. Serving, training and
evaluation all go through `FeatureExtractor`, so a model never sees features computed another way.
"""

from __future__ import annotations

import bisect
import math
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from detectord.ingest import plainpickle
from detectord.ingest.remote_write import (
    DEFAULT_CACHE_BYTES,
    DecodedWrite,
    LabelCache,
    SeriesKey,
    decode_v1_message,
    is_stale_marker,
)

InstanceKey = tuple[str, ...]

_COREDNS_PREFIX = "coredns_"
_KEY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def url_key(key: InstanceKey) -> str:
    """An instance's key as one URL path segment: each label value with every byte outside
    [A-Za-z0-9._:-] written ~XX, joined by ",". Nothing in it is percent-encoded on the way, so
    it reads as it is (`coredns-edge,10.0.0.1:9153`) and survives any proxy's decoding."""
    return ",".join("".join(chr(b) if b in _KEY_SAFE else f"~{b:02X}" for b in value.encode()) for value in key)


def parse_url_key(text: str) -> InstanceKey:
    """The inverse of `url_key`; ValueError on text no key encodes to."""
    out = []
    for part in text.split(","):
        raw = bytearray()
        i = 0
        while i < len(part):
            c = part[i]
            if c == "~":
                h = part[i + 1 : i + 3]
                if len(h) != 2 or any(ch not in "0123456789ABCDEF" for ch in h):
                    raise ValueError(f"bad escape in instance key {text!r}")
                raw.append(int(h, 16))
                i += 3
            elif ord(c) < 128 and ord(c) in _KEY_SAFE:
                raw.append(ord(c))
                i += 1
            else:
                raise ValueError(f"{c!r} cannot appear in an instance key")
        out.append(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
    return tuple(out)


Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Source:
    """One raw input: the series of `metric` whose labels match `match` (summed over the rest)."""

    metric: str
    kind: Kind
    match: tuple[tuple[str, str], ...] = ()

    @property
    def series_name(self) -> str:
        return self.metric + "_bucket" if self.kind == "histogram" else self.metric

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match)


def counter(metric: str, **match: str) -> Source:
    return Source(metric, "counter", tuple(sorted(match.items())))


def gauge(metric: str, **match: str) -> Source:
    return Source(metric, "gauge", tuple(sorted(match.items())))


def histogram(metric: str, **match: str) -> Source:
    return Source(metric, "histogram", tuple(sorted(match.items())))


class Step(NamedTuple):
    """What a compiled expression reads about one closed step of one instance."""

    acc: Sequence[float]  # counter increases in the step, by slot
    gauges: list[float]  # latest gauge values, summed over series, by gauge index
    buckets: list[list[tuple[float, float]]]  # per histogram: (upper bound, cumulative increase)
    elapsed: float  # seconds the increases span


Compiled = Callable[[Step], float]


class Slots(Protocol):
    """Where the extractor keeps each source (see _SourceTable)."""

    def counter(self, src: Source) -> int: ...
    def gauge(self, src: Source) -> int: ...
    def histogram(self, src: Source) -> int: ...


@dataclass(frozen=True)
class Rate:
    """Per-second increase of a counter over the step, resets handled."""

    src: Source

    def sources(self) -> tuple[Source, ...]:
        return (self.src,)

    def compile(self, slots: Slots) -> Compiled:
        i = slots.counter(self.src)
        return lambda st: st.acc[i] / st.elapsed


@dataclass(frozen=True)
class Value:
    """A gauge's latest value, summed over the instance's matching series."""

    src: Source

    def sources(self) -> tuple[Source, ...]:
        return (self.src,)

    def compile(self, slots: Slots) -> Compiled:
        g = slots.gauge(self.src)
        return lambda st: st.gauges[g]


@dataclass(frozen=True)
class Share:
    """Increase of `part` over increase of `whole` in the step; 0 when `whole` did not move."""

    part: Source
    whole: Source

    def sources(self) -> tuple[Source, ...]:
        return (self.part, self.whole)

    def compile(self, slots: Slots) -> Compiled:
        i, j = slots.counter(self.part), slots.counter(self.whole)
        return lambda st: min(1.0, st.acc[i] / st.acc[j]) if st.acc[j] > 0 else 0.0


@dataclass(frozen=True)
class Quantile:
    """histogram_quantile(q) over the step's bucket increases; 0 when nothing was observed."""

    q: float
    src: Source

    def sources(self) -> tuple[Source, ...]:
        return (self.src,)

    def compile(self, slots: Slots) -> Compiled:
        h, q = slots.histogram(self.src), self.q
        return lambda st: bucket_quantile(q, st.buckets[h])


Expr = Rate | Value | Share | Quantile


Transform = Literal["log1p", "asin_sqrt"]
# How a feature is measured: against the instance's own baseline, or from 0 (see normalise.py).
Measure = Literal["relative", "absolute"]
# Which moves a model sees: both ways, or only a rise (a fall is measured as no move at all).
Direction = Literal["both", "rise"]


@dataclass(frozen=True)
class Input:
    """How a model sees a feature (detectord/ingest/normalise.py applies it, per instance).

    `transform(prescale * x)` tames the variance: log1p for magnitudes that span decades (latency
    in ms, CPU in % of a core, memory in MiB, rare events per minute), 2·asin(√p) for shares (it
    evens out a share's binomial noise). Then "relative" features are measured against the
    instance's own baseline (its recent median and spread, never less than `floor`): a fleet's
    level is its own normal. "absolute" features are 0 on a healthy server anywhere (SERVFAILs,
    rejects, failures) and are divided by the fixed `floor` only. `hold_s` keeps a rare event
    visible that long (the max over the trailing `hold_s`). `direction` "rise" hides a fall from
    the model: for a level that routine changes knock down (a reload empties the cache).
    """

    transform: Transform
    prescale: float
    baseline: Measure
    floor: float
    hold_s: float = 0.0
    direction: Direction = "both"


def _rel(transform: Transform, prescale: float, floor: float, direction: Direction = "both") -> Input:
    return Input(transform, prescale, "relative", floor, direction=direction)


def _abs(transform: Transform, prescale: float, floor: float, hold_s: float = 0.0) -> Input:
    return Input(transform, prescale, "absolute", floor, hold_s)


@dataclass(frozen=True)
class Feature:
    name: str
    expr: Expr
    input: Input


_REQ = counter("coredns_dns_requests_total")
_RESP = counter("coredns_dns_responses_total")
_DUR = histogram("coredns_dns_request_duration_seconds")
_PROXY = histogram("coredns_proxy_request_duration_seconds")
# Series whose `to` label names an instance's upstream.
_PROXY_PREFIX = "coredns_proxy_"
_MS = 1000.0
_PER_MIN = 60.0

# SERVFAIL and REFUSED: 2·asin(√0.03) / 0.05 ≈ 7, so the CoreDNS mixin's 3 % is seven floors out.
FEATURES: tuple[Feature, ...] = (
    Feature("request_rate", Rate(_REQ), _rel("log1p", 1.0, 0.05)),
    Feature(
        "rcode_noerror_share",
        Share(counter("coredns_dns_responses_total", rcode="NOERROR"), _RESP),
        _rel("asin_sqrt", 1.0, 0.02),
    ),
    Feature(
        "rcode_nxdomain_share",
        Share(counter("coredns_dns_responses_total", rcode="NXDOMAIN"), _RESP),
        _rel("asin_sqrt", 1.0, 0.02),
    ),
    Feature(
        "rcode_servfail_share",
        Share(counter("coredns_dns_responses_total", rcode="SERVFAIL"), _RESP),
        _abs("asin_sqrt", 1.0, 0.05),
    ),
    Feature(
        "rcode_refused_share",
        Share(counter("coredns_dns_responses_total", rcode="REFUSED"), _RESP),
        _abs("asin_sqrt", 1.0, 0.05),
    ),
    Feature("latency_p50_seconds", Quantile(0.5, _DUR), _rel("log1p", _MS, 0.05)),
    Feature("latency_p99_seconds", Quantile(0.99, _DUR), _rel("log1p", _MS, 0.1)),
    Feature(
        "cache_hit_ratio",
        Share(counter("coredns_cache_hits_total"), counter("coredns_cache_requests_total")),
        _rel("asin_sqrt", 1.0, 0.02),
    ),
    # Every restart, Corefile reload and cache flush empties the cache, and it takes many minutes to
    # refill: only a rise is an incident's (a flood of random names filling it).
    Feature("cache_entries", Value(gauge("coredns_cache_entries")), _rel("log1p", 1.0, 0.5, "rise")),
    Feature(
        "upstream_request_rate", Rate(counter("coredns_proxy_request_duration_seconds_count")), _rel("log1p", 1.0, 0.05)
    ),
    Feature("upstream_latency_p99_seconds", Quantile(0.99, _PROXY), _rel("log1p", _MS, 0.1)),
    Feature(
        "upstream_healthcheck_failure_rate",
        Rate(counter("coredns_proxy_healthcheck_failures_total")),
        _abs("log1p", _PER_MIN, 0.5),
    ),
    Feature(
        "forward_max_concurrent_reject_rate",
        Rate(counter("coredns_forward_max_concurrent_rejects_total")),
        _abs("log1p", _PER_MIN, 0.5),
    ),
    Feature("panic_rate", Rate(counter("coredns_panics_total")), _abs("log1p", _PER_MIN, 0.5, hold_s=120.0)),
    Feature(
        "reload_failure_rate", Rate(counter("coredns_reload_failed_total")), _abs("log1p", _PER_MIN, 0.5, hold_s=120.0)
    ),
    Feature("cpu_seconds_rate", Rate(counter("process_cpu_seconds_total")), _rel("log1p", 100.0, 0.05)),
    # Go returns memory slowly: a burst leaves the heap up for minutes; 20 % more is one floor.
    Feature("resident_memory_bytes", Value(gauge("process_resident_memory_bytes")), _rel("log1p", 1.0 / 2**20, 0.2)),
    Feature("goroutines", Value(gauge("go_goroutines")), _rel("log1p", 1.0, 0.05)),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)

# Metric names a remote_write relabel rule should keep; everything else is ignored cheaply.
RELEVANT_METRICS: frozenset[str] = frozenset(s.series_name for f in FEATURES for s in f.expr.sources())


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile on (upper bound, cumulative count) pairs sorted by bound."""
    if not buckets or buckets[-1][0] != math.inf:
        return 0.0
    count = buckets[-1][1]
    if count <= 0:
        return 0.0
    rank = q * count
    prev_le, prev_cum = 0.0, 0.0
    for i, (le, cum) in enumerate(buckets):
        if cum >= rank:
            if le == math.inf:
                return buckets[i - 1][0] if i > 0 else 0.0
            lower = prev_le if i > 0 or le <= 0 else 0.0
            width = cum - prev_cum
            return lower + (le - lower) * ((rank - prev_cum) / width if width > 0 else 1.0)
        prev_le, prev_cum = le, cum
    return buckets[-2][0] if len(buckets) > 1 else 0.0


@dataclass(slots=True)
class FeatureRow:
    instance: InstanceKey
    step_ts_ms: int
    values: np.ndarray  # float32, (len(FEATURES),)
    # The step had no samples; `values` hold the last row (a missed scrape).
    gap: bool = False
    # The instance came back after a gap too long to fill: windows start over.
    restart: bool = False
    # Its counters were reset since its previous row: the CoreDNS process restarted.
    process_restart: bool = False
    # What it forwards to: the `to` labels of its coredns_proxy_* series, sorted and comma-joined
    # ("" when it forwards nowhere). Instances that share it share a fault domain.
    upstream: str = ""


@dataclass
class IngestStats:
    """What one ingest call did with its samples; every sample lands in exactly one bucket."""

    accepted: int = 0
    ignored: int = 0  # not a metric any feature reads
    duplicate: int = 0  # timestamp not after the series' last (a re-sent request)
    stale: int = 0  # stale markers
    non_finite: int = 0  # NaN or ±Inf values that are not stale markers
    instance_limit: int = 0  # their instance was refused: max_instances reached
    late: int = 0  # accepted, but arrived after their step closed: counted in the next step


_NO_VALUE = math.nan
# The gauge_bins of every counter series: read by instance_state, never written.
_COUNTER_BINS: list[float] = [_NO_VALUE, _NO_VALUE]
# Prometheus's own series per target: 1 after a successful scrape, 0 after a failed one; a stale
# marker when the target left service discovery.
UP = "up"


class Liveness(NamedTuple):
    """What is known of whether an instance is alive, beside its features."""

    up: float  # the latest `up` (1, 0), NaN before any or once it went stale
    up_ts_ms: int  # its timestamp
    up_gone: bool  # `up` went stale: the target left service discovery
    last_data: float  # monotonic time of its latest feature sample
    failing: int  # consecutive failed scrapes (`up == 0`) up to the latest `up`
    failing_since_ms: int  # the first of them's timestamp


class _UpSeries:
    """An `up` series: it belongs to the CoreDNS instance its labels name, once that instance
    exists (`up` of every other target is ignored)."""

    __slots__ = ("inst", "key", "last_ts")

    def __init__(self, key: InstanceKey, inst: _Instance | None) -> None:
        self.key = key
        self.inst = inst
        self.last_ts = -(2**62)


class _Series:
    """A bound series' state. With the C accumulator built, the native extractor binds
    `_fastfeatures.Series` instead: the same attributes, its numbers held in C."""

    __slots__ = ("gauge_bins", "gauge_source", "held", "inst", "last_ts", "last_v", "slots")

    def __init__(self, inst: _Instance, slots: tuple[int, ...], gauge_source: int) -> None:
        self.inst = inst
        self.slots = slots
        self.gauge_source = gauge_source  # index into the source table, -1 for counters
        self.last_ts = -(2**62)
        self.last_v = _NO_VALUE
        # Gauges: the latest value in each of the two open steps (NaN: none yet), and the value
        # held from earlier steps (NaN once the series went stale). Counters, most series, share
        # one pair that nothing writes.
        self.gauge_bins = [_NO_VALUE, _NO_VALUE] if gauge_source >= 0 else _COUNTER_BINS
        self.held = _NO_VALUE


class _Instance:
    __slots__ = (
        "acc",
        "bucket_order",
        "bucket_slots",
        "cur",
        "gap",
        "gauges",
        "key",
        "label_block",
        "last_close_ts",
        "last_data",
        "last_row",
        "last_seen",
        "layout_shared",
        "max_ts",
        "nslots",
        "primed",
        "process_restart",
        "resets",
        "restart",
        "seen",
        "series",
        "up",
        "up_failing",
        "up_failing_since",
        "up_gone",
        "up_ts",
        "upstream",
        "upstreams",
    )

    def __init__(self, key: InstanceKey, nslots: int, ngauges: int, nhist: int) -> None:
        self.key = key
        self.cur = -1  # bin index of acc[0]; -1 until the first sample
        self.nslots = nslots
        # Counter increases by slot in each open step: doubles in an array, not a list of floats
        # (8 bytes a slot instead of 32, and the C accumulator adds in place).
        self.acc = [_sums(nslots), _sums(nslots)]
        self.seen = [False, False]
        self.max_ts = [0, 0]
        self.last_close_ts = 0
        self.primed = False
        self.last_row: np.ndarray | None = None
        self.gap = 0
        self.restart = False
        # A counter reset in each open step, and one of a closed step not yet on a row.
        self.resets = [False, False]
        self.process_restart = False
        self.series: list[SeriesKey] = []
        self.gauges: list[list[_Series]] = [[] for _ in range(ngauges)]
        # Per histogram source: {le: counter slot}, and the same as (le, slot) sorted by le.
        # Most instances of a fleet have the same buckets in the same slots: they share one
        # layout (FeatureExtractor._share_layout), and an instance makes it its own again before
        # changing it (own_layout). True: shared; False: its own; None: its own, and no table
        # was free to share it.
        self.bucket_slots: dict[int, dict[float, int]] = {}
        self.bucket_order: list[list[tuple[float, int]]] = [[] for _ in range(nhist)]
        self.layout_shared: bool | None = False
        self.last_seen = 0.0  # monotonic time of its latest sample, `up` included
        self.last_data = 0.0  # of its latest feature sample
        self.up = _NO_VALUE
        self.up_ts = 0
        self.up_gone = False
        self.up_failing = 0
        self.up_failing_since = 0
        self.upstreams: set[str] = set()
        self.upstream = ""
        # Its series' labels as a snapshot holds them, and for how many series (`series` only
        # grows): a snapshot encodes an instance's labels again only when it gained series.
        self.label_block: tuple[int, bytes] | None = None

    def own_layout(self) -> None:
        """Its bucket layout its own (a copy, if shared), about to change."""
        if self.layout_shared:
            self.bucket_slots = {h: dict(by_le) for h, by_le in self.bucket_slots.items()}
            self.bucket_order = [list(order) for order in self.bucket_order]
        self.layout_shared = False

    def add_slot(self) -> int:
        for a in self.acc:
            a.append(0.0)
        self.nslots += 1
        return self.nslots - 1


class _SourceTable:
    """Numbering of the feature table's sources: fixed counter slots, gauges and histograms."""

    def __init__(self, features: Sequence[Feature]) -> None:
        sources = list(dict.fromkeys(s for f in features for s in f.expr.sources()))
        self.counter_slot = {s: i for i, s in enumerate(x for x in sources if x.kind == "counter")}
        self.gauge_index = {s: i for i, s in enumerate(x for x in sources if x.kind == "gauge")}
        self.hist_index = {s: i for i, s in enumerate(x for x in sources if x.kind == "histogram")}
        self.by_series_name: dict[str, list[Source]] = {}
        for s in sources:
            self.by_series_name.setdefault(s.series_name, []).append(s)
        # What binding a series of each name checks: each source's labels to match, its kind and
        # its counter slot, gauge index or histogram index.
        self.plan: dict[str, list[tuple[tuple[tuple[str, str], ...], Kind, int]]] = {
            name: [(s.match, s.kind, self._number(s)) for s in srcs] for name, srcs in self.by_series_name.items()
        }
        # The label names each name's plan reads: what a series' match depends on.
        self.plan_keys = {name: tuple(dict.fromkeys(k for m, _, _ in p for k, _ in m)) for name, p in self.plan.items()}
        # match's answers so far (_fastfeatures.bind reads them too).
        self.matched: dict[tuple[str | None, ...], tuple[tuple[int, ...], int, tuple[int, ...]] | None] = {}
        self.compiled = [f.expr.compile(self) for f in features]
        self.program = _program(features, self)

    def match(self, name: str, labels: Mapping[str, str]) -> tuple[tuple[int, ...], int, tuple[int, ...]] | None:
        """What a series of metric `name` with `labels` feeds: its counter slots, its gauge index
        (-1: none) and its histogram indices; None if no source matches it. A fleet's series
        repeat a few label values, so the answers are kept (a bounded number: a writer can make
        up values)."""
        memo = (name, *map(labels.get, self.plan_keys[name]))
        hit = self.matched.get(memo, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        counters: list[int] = []
        hists: list[int] = []
        gauge = -1
        matched = False
        for match, kind, i in self.plan[name]:
            if all(labels.get(k) == v for k, v in match):
                matched = True
                if kind == "counter":
                    counters.append(i)
                elif kind == "gauge":
                    gauge = i
                else:
                    hists.append(i)
        out = (tuple(counters), gauge, tuple(hists)) if matched else None
        if len(self.matched) < _MAX_MATCHES_KEPT:
            self.matched[memo] = out
        return out

    def _number(self, src: Source) -> int:
        return {"counter": self.counter_slot, "gauge": self.gauge_index, "histogram": self.hist_index}[src.kind][src]

    def counter(self, src: Source) -> int:
        return self.counter_slot[src]

    def gauge(self, src: Source) -> int:
        return self.gauge_index[src]

    def histogram(self, src: Source) -> int:
        return self.hist_index[src]


def _program(features: Sequence[Feature], table: _SourceTable) -> bytes:
    """What _fastfeatures.row computes for `features` instead of their compiled expressions: per
    feature its operation (the OP_ numbers of _fastfeatures.c) and arguments, as "=iiqd"."""
    ops: list[tuple[int, int, int, float]] = []
    for f in features:
        e = f.expr
        if isinstance(e, Rate):
            ops.append((0, table.counter(e.src), 0, 0.0))
        elif isinstance(e, Value):
            ops.append((1, table.gauge(e.src), 0, 0.0))
        elif isinstance(e, Share):
            ops.append((2, table.counter(e.part), table.counter(e.whole), 0.0))
        elif isinstance(e, Quantile):
            ops.append((3, table.histogram(e.src), 0, e.q))
        else:
            raise TypeError(f"{f.name}: no C operation for {type(e).__name__}")
    return b"".join(struct.pack("=iiqd", *op) for op in ops)


_IGNORED = object()
_MISS = object()
_Layout = tuple[dict[int, dict[float, int]], list[list[tuple[float, int]]]]
# Matches _SourceTable keeps (see match), and slot tuples FeatureExtractor shares (see _bind):
# far more than a fleet's distinct ones; what a writer makes up beyond is not kept.
_MAX_MATCHES_KEPT = 4096

try:
    from detectord.ingest import _fastfeatures  # type: ignore[attr-defined]

    _fastfeatures.layout(_Instance, SeriesKey, _COUNTER_BINS)
except ImportError:  # built without a C compiler: features.py's own loop does it
    _fastfeatures = None


class FeatureExtractor:
    """Turns decoded remote-write series into one FeatureRow per instance per step.

    Samples are binned by timestamp into steps of `step_ms`. A step closes when a sample two
    steps later arrives, so samples of one scrape split across parallel remote-write shards
    still land together. State is per series (last timestamp and value), so a re-sent request
    changes nothing, and counter resets count the post-reset value as the increase.
    Not thread-safe: one thread owns an extractor.
    """

    def __init__(
        self,
        step_ms: int,
        instance_labels: Sequence[str] = ("job", "instance"),
        *,
        features: Sequence[Feature] = FEATURES,
        max_instances: int = 1_000_000,
        max_gap_steps: int = 5,
        label_cache_bytes: int = DEFAULT_CACHE_BYTES,
        native: bool = True,
    ) -> None:
        """`native`: bind new series, key and pin them and accumulate bound series' samples in C
        where it is built (the Python code is the reference; tests/ingest/test_features_differential.py
        compares them)."""
        if step_ms <= 0:
            raise ValueError(f"step must be > 0 ms, got {step_ms}")
        self.step_ms = step_ms
        self.instance_labels = tuple(instance_labels)
        self._no_labels = ("",) * len(self.instance_labels)  # an instance label's value when absent
        self.features = tuple(features)
        self.max_instances = max_instances
        self.max_gap_steps = max_gap_steps
        self._table = _SourceTable(self.features)
        # The metrics it reads: decoding leaves every other series out, only counted.
        self.series_names = frozenset(self._table.by_series_name) | {UP}
        # Decode with this cache: per-series state lives on its SeriesKeys (pinned while bound).
        self.labels = LabelCache(label_cache_bytes)
        self.labels.native &= native
        self.series_bound = 0  # series ever bound (a new series costs far more than a known one)
        self._instances: dict[InstanceKey, _Instance] = {}
        # Instances refused at max_instances, when last refused (monotonic), as many again at most.
        self.refused: dict[InstanceKey, float] = {}
        # Instances whose `up` arrived in the latest ingest call.
        self.up_seen: set[InstanceKey] = set()
        # Offline only (`extract`): every `up` sample (timestamp, value), per instance.
        self.up_samples: dict[InstanceKey, list[tuple[int, float]]] | None = None
        self._accumulate = _fastfeatures.accumulate if native and _fastfeatures is not None else None
        self._slot_tuples: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._les: dict[str | None, float | None] = {}  # `le` label values parsed (a bounded number)
        # Bucket layouts instances share (see _Instance.bucket_slots), by their `le` objects and slots.
        self._layouts: dict[tuple[tuple[tuple[int, int], ...], ...], _Layout] = {}
        self._bind_known = _fastfeatures.bind if native and _fastfeatures is not None else None
        # What it binds a series to: the C accumulator reads only its own Series.
        self._series: type[_Series] = _Series if self._accumulate is None else _fastfeatures.Series
        # A closed step's feature values in C, the compiled expressions' numbers bit for bit.
        self._row = _fastfeatures.row if native and _fastfeatures is not None else None
        self._series_values = _fastfeatures.series_values if self._accumulate is not None else _series_values

    @property
    def instances(self) -> int:
        return len(self._instances)

    def instance_keys(self) -> list[InstanceKey]:
        return list(self._instances)

    def liveness(self, key: InstanceKey) -> Liveness | None:
        inst = self._instances.get(key)
        if inst is None:
            return None
        return Liveness(inst.up, inst.up_ts, inst.up_gone, inst.last_data, inst.up_failing, inst.up_failing_since)

    def ingest(
        self, write: DecodedWrite, stats: IngestStats | None = None, now: float | None = None
    ) -> list[FeatureRow]:
        stats = stats if stats is not None else IngestStats()
        now = time.monotonic() if now is None else now
        rows: list[FeatureRow] = []
        self.up_seen = set()
        stats.ignored += write.ignored
        tss, vals = write.timestamps, write.values
        keys, counts = write.keys, write.counts
        fast = self._accumulate
        if not (type(tss) is list and type(vals) is list and type(keys) is list and type(counts) is list):
            fast = None  # the C code takes the columns as lists
        series = self._series
        pos = j = 0
        while pos < len(keys):
            k = j
            if fast is not None and keys[pos].state.__class__ is series:
                # Bound series in C, up to the first one it leaves to the loop below (one not
                # bound yet, or a sample that closes a step).
                pos, j, k, dup, stale, non_finite, late, accepted = fast(
                    keys, counts, tss, vals, pos, j, self.step_ms, now
                )
                stats.duplicate += dup
                stats.stale += stale
                stats.non_finite += non_finite
                stats.late += late
                stats.accepted += accepted
                if pos == len(keys):
                    break
            key, n = keys[pos], counts[pos]
            pos += 1
            first = j
            j += n
            s = key.state
            if s.__class__ is not series:
                if s is None:
                    canonical = write.turns == self.labels.turns
                    s = self._bind(key, now, canonical)
                    if key.state is s and s.__class__ is series:
                        # New series come in runs (a new instance, a first round): bind the run
                        # first, so the C loop takes all their samples in one call.
                        q = pos
                        while q < len(keys) and keys[q].state is None:
                            if canonical and self._bind_known is not None:
                                q = self._bind_run(keys, q)
                                if q == len(keys) or keys[q].state is not None:
                                    break
                            self._bind(keys[q], now, canonical)
                            if keys[q].state.__class__ is not series:
                                break
                            q += 1
                        if fast is not None:
                            pos, j = pos - 1, first
                            continue
                if s is _IGNORED:
                    stats.ignored += n
                    continue
                if s is None:
                    stats.instance_limit += n
                    continue
                if isinstance(s, _UpSeries):
                    self._up(s, tss[first:j], vals[first:j], stats, now)
                    continue
            assert isinstance(s, series)
            self._samples(s, tss, vals, k, j, stats, rows, now)
        return rows

    def _samples(
        self,
        s: _Series,
        tss: list[int],
        vals: list[float],
        start: int,
        end: int,
        stats: IngestStats,
        rows: list[FeatureRow],
        now: float,
    ) -> None:
        """Samples start..end of bound series `s` into its instance's open steps (what
        _fastfeatures.accumulate does, closing no step)."""
        step_ms = self.step_ms
        inst = s.inst
        inst.last_seen = now
        inst.last_data = now
        for k in range(start, end):
            ts = tss[k]
            v = vals[k]
            if ts <= s.last_ts:
                stats.duplicate += 1
                continue
            if v - v != 0.0:  # NaN or ±Inf
                if is_stale_marker(v):
                    stats.stale += 1
                    # A gauge that went stale adds nothing. A counter keeps its last value:
                    # Prometheus marks every series stale after one failed scrape, and the
                    # process behind it may well have kept counting (a reset shows it did not).
                    s.held = _NO_VALUE
                else:
                    stats.non_finite += 1
                s.last_ts = ts
                continue
            b = ts // step_ms
            if inst.cur < 0:
                inst.cur = b
            elif b > inst.cur + 1:
                self._advance(inst, b, rows)
            if b < inst.cur:
                stats.late += 1
                b = inst.cur
            i = b - inst.cur
            if s.gauge_source < 0:
                last = s.last_v
                if last == last:
                    d = v - last
                    if d < 0:
                        d = v  # counter reset: the process restarted
                        inst.resets[i] = True
                else:
                    # A series born after its instance starts from zero (e.g. the first
                    # SERVFAIL); one seen in the instance's first step only sets the baseline.
                    d = v if inst.primed else 0.0
                if d:
                    acc = inst.acc[i]
                    for slot in s.slots:
                        acc[slot] += d
            else:
                s.gauge_bins[i] = v
            s.last_v = v
            s.last_ts = ts
            inst.seen[i] = True
            if ts > inst.max_ts[i]:
                inst.max_ts[i] = ts
            stats.accepted += 1

    def flush(self) -> list[FeatureRow]:
        """Close every open step (end of a recording)."""
        rows: list[FeatureRow] = []
        for inst in self._instances.values():
            if inst.cur >= 0:
                self._close(inst, rows)
                self._close(inst, rows)
        return rows

    def evict_idle(self, older_than: float) -> list[InstanceKey]:
        """Forget instances whose last sample arrived before `older_than` (monotonic seconds), and
        those whose `up` went stale (the target left service discovery)."""
        gone = [k for k, inst in self._instances.items() if inst.last_seen < older_than or inst.up_gone]
        for k in gone:
            self.forget(k)
        if self.refused:
            self.refused = {k: t for k, t in self.refused.items() if t >= older_than}
        return gone

    def forget(self, key: InstanceKey) -> None:
        inst = self._instances.pop(key, None)
        if inst is not None:
            for sk in inst.series:
                sk.state = None
                self.labels.unpin(sk)  # it goes once it is not seen for a while
            # Break the instance ⇄ series cycles so reference counting frees them (see Ingestor).
            inst.series.clear()
            for g in inst.gauges:
                g.clear()

    # ---- state across restarts (serve.snapshots) ------------------------------------------

    def instance_state(self, key: InstanceKey, now: float) -> dict[str, Any] | None:
        """One instance's state as plain values: its open steps, its series' last samples (the
        counters' last values make the next step's rates), its `up` and when it was last seen
        (seconds before monotonic `now`). Its series are `labels`, a `plainpickle` of their label
        sets in order, and `series`, their numbers packed (`_series_values`)."""
        inst = self._instances.get(key)
        if inst is None:
            return None
        block = inst.label_block
        if block is None or block[0] != len(inst.series):
            # A fleet's label sets rarely change: encoded once, they cost a snapshot nothing.
            labels = [sk.labels for sk in inst.series]
            block = inst.label_block = (len(labels), plainpickle.dumps(labels, LABEL_BLOCK_LEVEL))
        return {
            "key": key,
            "labels": block[1],
            "series": self._series_values(inst.series),
            "cur": inst.cur,
            "acc": (list(inst.acc[0]), list(inst.acc[1])),
            "seen": tuple(inst.seen),
            "max_ts": tuple(inst.max_ts),
            "last_close_ts": inst.last_close_ts,
            "primed": inst.primed,
            "last_row": None if inst.last_row is None else inst.last_row.tolist(),
            "gap": inst.gap,
            "restart": inst.restart,
            "resets": tuple(inst.resets),
            "process_restart": inst.process_restart,
            "up": (inst.up, inst.up_ts, inst.up_gone, inst.up_failing, inst.up_failing_since),
            "seen_ago": now - inst.last_seen,
            "data_ago": now - inst.last_data,
        }

    def restore_instance(self, state: Mapping[str, Any], now: float) -> None:
        """Bring back an instance from `instance_state`. Its series are bound again in their
        original order, so histogram buckets get the same accumulator slots. Raises ValueError
        (or TypeError, KeyError) on a state that does not fit this extractor."""
        key = tuple(str(v) for v in state["key"])
        if len(key) != len(self.instance_labels) or key in self._instances:
            raise ValueError(f"instance {key} does not fit or is restored twice")
        block = state.get("labels")
        series = state["series"] if block is None else _unpack_series(block, state["series"])
        # Label sets come back as the tuples of strings they were (a snapshot holds plain values).
        keys = self.labels.intern_all([labels for labels, *_ in series])
        q = 0
        while q < len(keys):
            if self._bind_known is not None:
                q = self._bind_run(keys, q)  # intern gave the cache's keys
                if q == len(keys):
                    break
            self._bind(keys[q], now, canonical=True)
            q += 1
        for sk, (_, last_ts, last_v, held, g0, g1) in zip(keys, series, strict=True):
            s = sk.state
            if not isinstance(s, self._series) or s.inst.key != key:
                raise ValueError(f"series {sk} is not one of instance {key}'s features")
            try:
                s.last_ts, s.last_v, s.held = int(last_ts), float(last_v), float(held)
            except OverflowError as exc:  # a timestamp beyond int64, which no write can carry
                raise ValueError(f"series {sk}: {exc}") from None
            if s.gauge_source >= 0:
                s.gauge_bins = [float(g0), float(g1)]
        # Binding its first series made the instance (an instance exists only through its series).
        inst = self._instances.get(key)
        if inst is None:
            raise ValueError(f"instance {key} has no series, or no room (ingest.max_instances)")
        acc = [[float(x) for x in a] for a in state["acc"]]
        if len(acc) != 2 or any(len(a) != inst.nslots for a in acc):
            raise ValueError(f"instance {key}: {inst.nslots} accumulator slots, the state has another number")
        last_row = state["last_row"]
        if last_row is not None and len(last_row) != len(self.features):
            raise ValueError(f"instance {key}: the state's rows have {len(last_row)} features")
        inst.cur = int(state["cur"])
        inst.acc = [array("d", a) for a in acc]
        if inst.layout_shared is False:
            self._share_layout(inst)
        inst.seen = [bool(x) for x in state["seen"]]
        inst.max_ts = [int(x) for x in state["max_ts"]]
        inst.last_close_ts = int(state["last_close_ts"])
        inst.primed = bool(state["primed"])
        inst.last_row = None if last_row is None else np.array(last_row, dtype=np.float32)
        inst.gap = int(state["gap"])
        inst.restart = bool(state["restart"])
        inst.resets = [bool(x) for x in state["resets"]]
        inst.process_restart = bool(state["process_restart"])
        up, up_ts, up_gone, failing, failing_since = state["up"]
        inst.up, inst.up_ts, inst.up_gone = float(up), int(up_ts), bool(up_gone)
        inst.up_failing, inst.up_failing_since = int(failing), int(failing_since)
        inst.last_seen = now - float(state["seen_ago"])
        inst.last_data = now - float(state["data_ago"])
        if block is not None and len(inst.series) == len(series):
            inst.label_block = (len(series), bytes(block))

    def _up(self, s: _UpSeries, tss: list[int], vals: list[float], stats: IngestStats, now: float) -> None:
        inst = s.inst
        if inst is None or self._instances.get(s.key) is not inst:
            inst = s.inst = self._instances.get(s.key)
            if inst is None:  # not a CoreDNS instance (yet): its `up` says nothing we use
                stats.ignored += len(tss)
                return
        for ts, v in zip(tss, vals, strict=True):
            if ts <= s.last_ts:
                stats.duplicate += 1
                continue
            s.last_ts = ts
            if is_stale_marker(v):
                stats.stale += 1
                inst.up, inst.up_gone, inst.up_failing = _NO_VALUE, True, 0
            else:
                stats.accepted += 1
                inst.up, inst.up_gone = v, False
                if v != 0.0:
                    inst.up_failing = 0
                else:
                    if not inst.up_failing:
                        inst.up_failing_since = ts
                    inst.up_failing += 1
                if self.up_samples is not None:
                    self.up_samples.setdefault(inst.key, []).append((ts, v))
            inst.up_ts = ts
        inst.last_seen = now
        self.up_seen.add(s.key)

    def _bind(self, sk: SeriesKey, now: float, canonical: bool = False) -> _Series | _UpSeries | object | None:
        """`canonical`: `sk` is known to be the cache's key for its labels (it has not turned since)."""
        canon = sk if canonical else self.labels.canonical(sk)
        if canon is not sk:
            # The label cache let go of this label set while a request that held its old key was
            # being decoded: the series has one key, the cache's, whatever the request holds.
            if canon.state is not None:
                return canon.state
            sk = canon
        if sk.name == UP:
            key = tuple(dict(sk.labels).get(k, "") for k in self.instance_labels)
            inst = self._instances.get(key)
            up = _UpSeries(key, inst)
            if inst is not None and inst.up_ts:
                up.last_ts = inst.up_ts  # a restored instance: a re-sent old `up` is a duplicate
            sk.state = up
            return up
        plan = self._table.plan.get(sk.name)
        if not plan:
            sk.state = _IGNORED
            return _IGNORED
        d = dict(sk.labels)
        key = tuple(map(d.get, self.instance_labels, self._no_labels))
        inst = self._instances.get(key)
        if inst is None:
            if not sk.name.startswith(_COREDNS_PREFIX):
                # Every Go target exports process_* and go_goroutines: only CoreDNS's own series
                # make an instance. Not cached: once it is one, this series binds to it.
                return None if key in self.refused else _IGNORED
            if len(self._instances) >= self.max_instances:
                if key in self.refused or len(self.refused) < self.max_instances:
                    self.refused[key] = now
                return None
            inst = _Instance(
                key, len(self._table.counter_slot), len(self._table.gauge_index), len(self._table.hist_index)
            )
            inst.last_seen = now
            self._instances[key] = inst
        to = d.get("to")
        if to and sk.name.startswith(_PROXY_PREFIX) and to not in inst.upstreams:
            inst.upstreams.add(to)
            inst.upstream = ",".join(sorted(inst.upstreams))
        matched = self._table.match(sk.name, d)
        if matched is None:
            sk.state = _IGNORED
            return _IGNORED
        slots, gauge_source, hists = matched  # the counters' slots, shared by the match
        if hists:
            text = d.get("le")
            le = self._les.get(text, _MISS)
            if le is _MISS:
                le = _parse_le(text)
                if len(self._les) < _MAX_MATCHES_KEPT:
                    self._les[text] = le
            if isinstance(le, float):
                slots = self._bucket_slots(inst, slots, hists, le)
        if not slots and gauge_source < 0:
            sk.state = _IGNORED
            return _IGNORED
        s = self._series(inst, slots, gauge_source)
        if gauge_source >= 0:
            inst.gauges[gauge_source].append(s)
        inst.series.append(sk)
        sk.state = s
        self.labels.pin(sk)
        self.series_bound += 1
        return s

    def _bind_run(self, keys: list[SeriesKey], q: int) -> int:
        """Binds keys[q:] in C as `_bind` would, while each one's binding is known (an existing
        instance, a match and slot tuple seen before: a new instance's series after its first);
        returns the first key left to `_bind` (or bound already)."""
        assert self._bind_known is not None
        bound: list[SeriesKey] = []
        t = self._table
        q = self._bind_known(
            keys,
            q,
            bound,
            t.plan,
            self.instance_labels,
            self._no_labels,
            self._instances,
            t.plan_keys,
            t.matched,
            self._les,
            self._slot_tuples,
            _PROXY_PREFIX,
        )
        self.labels.pin_all(bound)
        self.series_bound += len(bound)
        return q

    def _bucket_slots(
        self, inst: _Instance, counters: tuple[int, ...], hists: tuple[int, ...], le: float
    ) -> tuple[int, ...]:
        """The slots a bucket bounded by `le` of histograms `hists` feeds, beside `counters`."""
        slots = list(counters)
        for i in hists:
            by_le = inst.bucket_slots.get(i)
            slot = None if by_le is None else by_le.get(le)
            if slot is None:
                inst.own_layout()
                by_le = inst.bucket_slots.setdefault(i, {})
                by_le[le] = slot = inst.add_slot()
                bisect.insort(inst.bucket_order[i], (le, slot))
            slots.append(slot)
        # Series of one metric feed the same slots: one tuple for all of them (a bounded number:
        # histogram buckets take slots as their `le` values come).
        held = self._slot_tuples.get(t := tuple(slots))
        if held is None and len(self._slot_tuples) < _MAX_MATCHES_KEPT:
            self._slot_tuples[t] = held = t
        return held or t

    def _advance(self, inst: _Instance, b: int, rows: list[FeatureRow]) -> None:
        """Close steps until bin `b` is the newer of the two open ones."""
        if b - inst.cur > self.max_gap_steps + 2:
            self._close(inst, rows)
            self._close(inst, rows)
            inst.cur = b - 1
            self._restart(inst)
            return
        while inst.cur + 1 < b:
            self._close(inst, rows)

    @staticmethod
    def _restart(inst: _Instance) -> None:
        # The first step after a long gap only sets the counters' starting values again: its increases
        # span the gap.
        if inst.last_row is not None:
            inst.restart = True
        inst.primed = False

    def _share_layout(self, inst: _Instance) -> None:
        """Let `inst` share the bucket layout of the instances whose buckets are its own: an
        instance's two tables of 34 buckets take 5 KB. Keyed by the `le` floats' identity, not
        their value (-0.0 == 0.0, but a quantile's bound is not): most come from one table
        (_les), and the layouts kept keep them alive."""
        key = tuple(tuple((id(le), slot) for le, slot in order) for order in inst.bucket_order)
        held = self._layouts.get(key)
        if held is None:
            if len(self._layouts) >= _MAX_MATCHES_KEPT:
                inst.layout_shared = None
                return
            self._layouts[key] = held = (inst.bucket_slots, inst.bucket_order)
        inst.bucket_slots, inst.bucket_order = held
        inst.layout_shared = True

    def _close(self, inst: _Instance, rows: list[FeatureRow]) -> None:
        if inst.layout_shared is False:
            self._share_layout(inst)
        acc = inst.acc[0]
        step_ts = (inst.cur + 1) * self.step_ms
        gauges = _close_gauges(inst)
        inst.process_restart |= inst.resets[0]
        if inst.seen[0]:
            if inst.primed:
                elapsed = (inst.max_ts[0] - inst.last_close_ts) / 1000.0
                if elapsed <= 0:
                    elapsed = self.step_ms / 1000.0
                if self._row is not None:
                    values = np.empty(len(self.features), dtype=np.float32)
                    self._row(self._table.program, acc, gauges, inst.bucket_order, elapsed, values)
                else:
                    step = Step(acc, gauges, [_cumulative(acc, order) for order in inst.bucket_order], elapsed)
                    values = np.array([fn(step) for fn in self._table.compiled], dtype=np.float32)
                rows.append(
                    FeatureRow(
                        inst.key,
                        step_ts,
                        values,
                        restart=inst.restart,
                        process_restart=inst.process_restart,
                        upstream=inst.upstream,
                    )
                )
                inst.last_row = values
                inst.restart = inst.process_restart = False
            inst.primed = True
            inst.last_close_ts = inst.max_ts[0]
            inst.gap = 0
        elif inst.last_row is not None and not inst.restart:
            inst.gap += 1
            if inst.gap <= self.max_gap_steps:
                rows.append(FeatureRow(inst.key, step_ts, inst.last_row, gap=True, upstream=inst.upstream))
            else:
                self._restart(inst)
        _rotate(inst)
        inst.cur += 1


# zstd's level for label blocks: kept in memory, about 930 bytes an instance of 137 series at 3
# (3.3 KB pickled; 960 at level 1, 890 at 6 and 9, which take two and three times as long).
LABEL_BLOCK_LEVEL = 3
_BIG_ENDIAN = sys.byteorder == "big"


def _series_values(keys: list[SeriesKey]) -> bytes:
    """The numbers of an instance's series: five little-endian columns, last_ts (int64), then
    last_v, held and the two gauge bins (float64). The reference of the C series_values."""
    states: list[_Series] = []
    for sk in keys:
        assert isinstance(sk.state, _Series)
        states.append(sk.state)
    ts = array("q", [s.last_ts for s in states])
    numbers = array("d", [s.last_v for s in states])
    numbers.extend([s.held for s in states])
    for i in (0, 1):
        numbers.extend([s.gauge_bins[i] for s in states])
    if _BIG_ENDIAN:
        ts.byteswap()
        numbers.byteswap()
    return ts.tobytes() + numbers.tobytes()


def _unpack_series(block: bytes, values: bytes) -> list[tuple[Any, ...]]:
    """`instance_state`'s label block and packed numbers as the (labels, last_ts, last_v, held,
    gauge bin, gauge bin) of each series, which snapshot format 1 held. ValueError on damage."""
    try:
        labels = plainpickle.loads(block)
    except Exception as exc:  # damage raises several unrelated types
        raise ValueError(f"the label block does not decode ({exc})") from None
    if not isinstance(labels, list) or not isinstance(values, bytes):
        raise ValueError("the series are not a label block and packed numbers")
    if len(values) != 40 * len(labels):
        raise ValueError(f"{len(values)} bytes of numbers do not fit the label block's {len(labels)} series")
    n = len(labels)
    ts, numbers = array("q", values[: 8 * n]), array("d", values[8 * n :])
    if _BIG_ENDIAN:
        ts.byteswap()
        numbers.byteswap()
    return list(zip(labels, ts, *(numbers[i * n : (i + 1) * n] for i in range(4)), strict=True))


def _sums(n: int) -> array[float]:
    return array("d", bytes(8 * n))


def _rotate(inst: _Instance) -> None:
    """The newer open step becomes the older, the closed one's buffers the newer, cleared.
    In place: new buffers for every instance each step, made as the old ones went, would keep
    the cyclic GC's count of new objects flat while they pile up in its youngest generation,
    until one collection walked them all with the GIL held (0.1 s at 50,000 instances)."""
    acc = inst.acc
    closed = acc[0]
    closed[:] = _sums(len(closed))
    acc[0], acc[1] = acc[1], closed
    inst.seen[0], inst.seen[1] = inst.seen[1], False
    inst.resets[0], inst.resets[1] = inst.resets[1], False
    inst.max_ts[0], inst.max_ts[1] = inst.max_ts[1], 0


def _close_gauges(inst: _Instance) -> list[float]:
    """Each gauge source's value in the closing step, summed over series, and the shift of
    every series' per-step values. A series without a sample in the step holds its last value;
    one that went stale adds nothing. Values from the next step never leak into this one."""
    out = []
    for series in inst.gauges:
        total = 0.0
        for s in series:
            bins = s.gauge_bins
            v = bins[0]
            if v == v:
                s.held = v
            else:
                v = s.held
            if v == v:
                total += v
            bins[0] = bins[1]
            bins[1] = _NO_VALUE
        out.append(total)
    return out


def _cumulative(acc: Sequence[float], order: list[tuple[float, int]]) -> list[tuple[float, float]]:
    out, running = [], 0.0
    for le, slot in order:
        # Bucket increases of different series can land in neighbouring steps; keep them cumulative.
        v = acc[slot]
        if v > running:
            running = v
        out.append((le, running))
    return out


def _parse_le(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        le = float(text)  # "+Inf" parses to inf
    except ValueError:
        return None
    # A NaN bound orders with nothing (and no two are equal: each would take a slot of its own).
    return None if le != le else le


@dataclass
class FeatureSeries:
    """One instance's features over time (offline: training and evaluation)."""

    timestamps_ms: np.ndarray  # int64 (T,)
    values: np.ndarray  # float32 (T, F)
    gap: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (T,)
    # Row indexes where the window must start over (a gap too long to fill).
    restarts: list[int] = field(default_factory=list)
    # Row indexes whose counters were reset (the process restarted): serving's crash-loop alert.
    process_restarts: list[int] = field(default_factory=list)
    # Its `up` samples (timestamps, values): serving's liveness alerts on failed scrapes.
    up_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    up: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


def extract(
    requests: Iterable[object],
    step_ms: int,
    instance_labels: Sequence[str] = ("job", "instance"),
    *,
    max_gap_steps: int = 5,
) -> dict[InstanceKey, FeatureSeries]:
    """Features per instance from remote-write 1.0 messages or DecodedWrites, in arrival order."""
    ext = FeatureExtractor(step_ms, instance_labels, max_gap_steps=max_gap_steps)
    ext.up_samples = {}
    rows: dict[InstanceKey, list[FeatureRow]] = {}
    for row in _iter_rows(ext, requests):
        rows.setdefault(row.instance, []).append(row)
    out: dict[InstanceKey, FeatureSeries] = {}
    for key, rs in rows.items():
        out[key] = FeatureSeries(
            timestamps_ms=np.array([r.step_ts_ms for r in rs], dtype=np.int64),
            values=np.stack([r.values for r in rs]).astype(np.float32, copy=False),
            gap=np.array([r.gap for r in rs], dtype=bool),
            restarts=[i for i, r in enumerate(rs) if r.restart],
            process_restarts=[i for i, r in enumerate(rs) if r.process_restart],
            up_ms=np.array([t for t, _ in ext.up_samples.get(key, [])], dtype=np.int64),
            up=np.array([v for _, v in ext.up_samples.get(key, [])], dtype=np.float32),
        )
    return out


def _iter_rows(ext: FeatureExtractor, requests: Iterable[object]) -> Iterator[FeatureRow]:
    for req in requests:
        write = req if isinstance(req, DecodedWrite) else decode_v1_message(req, ext.labels)  # type: ignore[arg-type,unused-ignore]
        yield from ext.ingest(write)
    yield from ext.flush()

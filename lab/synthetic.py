"""Synthetic CoreDNS fleets: raw /metrics series as Prometheus scrapes and remote-writes them,
for benchmarks and tests that need thousands of instances no lab could run.

Owns the simulation of a fleet (traffic, cache, upstreams, process) with injectable faults and
their ground-truth spans; output is remote-write 1.0 bytes or messages, never features. Fault
classes share the lab's names where they mean the same incident (lab/scenarios); memory_leak and
panics are the simulator's own. Not shipped: the real fleet is lab/fleet.py.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from detectord.ingest._proto import remote_write_v1_pb2 as pb1

FaultClass = Literal[
    "upstream_latency",
    "upstream_down",
    "upstream_servfail",
    "query_flood",
    "random_subdomain_flood",
    "forward_saturation",
    "memory_leak",
    "panics",
]
FAULT_CLASSES: tuple[FaultClass, ...] = get_args(FaultClass)

DEFAULT_START_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MAX_SAMPLES_PER_SEND = 500  # Prometheus 2.42 queue_config default
_GATHER = 1 << 18  # records a slice when _Encoder._sharded moves them
STALE_NAN_BITS = 0x7FF0000000000002

# plugin.TimeBuckets: ExponentialBuckets(0.00025, 2, 16), then +Inf.
TIME_BUCKETS: tuple[float, ...] = tuple(0.00025 * 2**k for k in range(16))
_NB = len(TIME_BUCKETS) + 1
_LE_TEXT = (*tuple(repr(b) for b in TIME_BUCKETS), "+Inf")
_BOUNDS = np.array(TIME_BUCKETS)
_LOG_BOUNDS = np.log(_BOUNDS)
# A value to stand for each bucket in _sum: its geometric middle (the +Inf bucket: 10 s).
_MIDS = np.concatenate(([0.00015], np.sqrt(_BOUNDS[:-1] * _BOUNDS[1:]), [10.0]))
_FORWARD_READ_TIMEOUT = 2.0
_B_TIMEOUT = 13  # (1.024, 2.048]: the only upstream timed out at 2 s, SERVFAIL
_B_RETRIED = 14  # (2.048, 4.096]: a first try timed out at 2 s, another upstream answered
_B_DEADLINE = 15  # (4.096, 8.192]: every try timed out until forward's 5 s deadline

_QTYPES = ("A", "AAAA", "PTR", "SRV", "MX", "TXT", "HTTPS", "NS", "SOA", "other")
_QTYPE_WEIGHTS = np.array([0.55, 0.28, 0.04, 0.03, 0.01, 0.02, 0.04, 0.005, 0.005, 0.02])
_PROTOS = ("udp", "tcp")
_RCODES_UP = ("NOERROR", "NXDOMAIN", "SERVFAIL")
_MAX_UPSTREAMS = 3
_UPSTREAM_POOL = ("8.8.8.8:53", "1.1.1.1:53", "9.9.9.9:53", "10.96.0.10:53", "172.16.0.2:53", "10.0.0.2:53")
_SERVER = "dns://:53"
_ZONE = "."


@dataclass(frozen=True)
class Span:
    """Ground truth: `cls` was injected on `instance` (its job/instance label values) in [start, end)."""

    instance: tuple[str, ...]
    start_ms: int
    end_ms: int
    cls: str
    severity: float = 1.0


@dataclass(frozen=True)
class Restart:
    """A process restart: the instance's counters start again from 0 at its first scrape at/after `ts_ms`."""

    instance: tuple[str, ...]
    ts_ms: int


@dataclass
class _Fault:
    index: int
    cls: FaultClass
    start_s: float
    end_s: float
    severity: float
    # Per-fault random choices, drawn once at injection.
    rate_mult: float = 1.0
    blackhole: bool = False
    ended: bool = False


@dataclass(frozen=True)
class _Col:
    name: str
    labels: tuple[tuple[str, str], ...]
    counter: bool
    trigger: int  # column whose count > 0 makes this one exist (-1: always exists)
    upstream: int = -1  # exists only on instances with more than this many upstreams


class _Catalogue:
    """The series one CoreDNS 1.12 instance (forward + cache) exposes, as numbered columns."""

    def __init__(self) -> None:
        self.cols: list[_Col] = []
        self.req = np.zeros((len(_QTYPES), len(_PROTOS)), dtype=np.int64)
        for ti, t in enumerate(_QTYPES):
            for pi, p in enumerate(_PROTOS):
                self.req[ti, pi] = self._add(
                    "coredns_dns_requests_total", True, "self", server=_SERVER, zone=_ZONE, proto=p, family="1", type=t
                )
        resp = [
            ("NOERROR", "cache"),
            ("NXDOMAIN", "cache"),
            ("NOERROR", "forward"),
            ("NXDOMAIN", "forward"),
            ("SERVFAIL", "forward"),
            ("SERVFAIL", ""),
            ("REFUSED", ""),
        ]
        self.resp = {
            k: self._add(
                "coredns_dns_responses_total", True, "self", server=_SERVER, zone=_ZONE, rcode=k[0], plugin=k[1]
            )
            for k in resp
        }
        self.dur_count = self._add(
            "coredns_dns_request_duration_seconds_count", True, "self", server=_SERVER, zone=_ZONE
        )
        self.dur_sum = self._add(
            "coredns_dns_request_duration_seconds_sum", True, self.dur_count, server=_SERVER, zone=_ZONE
        )
        self.dur_b = np.array(
            [
                self._add(
                    "coredns_dns_request_duration_seconds_bucket",
                    True,
                    self.dur_count,
                    server=_SERVER,
                    zone=_ZONE,
                    le=le,
                )
                for le in _LE_TEXT
            ]
        )
        self.cache_req = self._add("coredns_cache_requests_total", True, "self", server=_SERVER, zones=_ZONE)
        self.cache_hit_s = self._add(
            "coredns_cache_hits_total", True, "self", server=_SERVER, zones=_ZONE, type="success"
        )
        self.cache_hit_d = self._add(
            "coredns_cache_hits_total", True, "self", server=_SERVER, zones=_ZONE, type="denial"
        )
        self.cache_miss = self._add("coredns_cache_misses_total", True, "self", server=_SERVER, zones=_ZONE)
        self.cache_ent_s = self._add(
            "coredns_cache_entries", False, self.cache_req, server=_SERVER, zones=_ZONE, type="success"
        )
        self.cache_ent_d = self._add(
            "coredns_cache_entries", False, self.cache_req, server=_SERVER, zones=_ZONE, type="denial"
        )
        nu, nr = _MAX_UPSTREAMS, len(_RCODES_UP)
        self.px_cnt = np.zeros((nu, nr), dtype=np.int64)
        self.px_sum = np.zeros((nu, nr), dtype=np.int64)
        self.px_b = np.zeros((nu, nr, _NB), dtype=np.int64)
        self.hc = np.zeros(nu, dtype=np.int64)
        for u in range(nu):
            to = f"@upstream{u}"  # replaced per instance by its upstream address
            for r, rc in enumerate(_RCODES_UP):
                cnt = self._add(
                    "coredns_proxy_request_duration_seconds_count",
                    True,
                    "self",
                    upstream=u,
                    proxy_name="forward",
                    to=to,
                    rcode=rc,
                )
                self.px_cnt[u, r] = cnt
                self.px_sum[u, r] = self._add(
                    "coredns_proxy_request_duration_seconds_sum",
                    True,
                    cnt,
                    upstream=u,
                    proxy_name="forward",
                    to=to,
                    rcode=rc,
                )
                for b, le in enumerate(_LE_TEXT):
                    self.px_b[u, r, b] = self._add(
                        "coredns_proxy_request_duration_seconds_bucket",
                        True,
                        cnt,
                        upstream=u,
                        proxy_name="forward",
                        to=to,
                        rcode=rc,
                        le=le,
                    )
            self.hc[u] = self._add(
                "coredns_proxy_healthcheck_failures_total", True, "self", upstream=u, proxy_name="forward", to=to
            )
        self.rejects = self._add("coredns_forward_max_concurrent_rejects_total", True, -1)
        self.broken = self._add("coredns_forward_healthcheck_broken_total", True, -1)
        self.panics = self._add("coredns_panics_total", True, -1)
        self.cpu = self._add("process_cpu_seconds_total", True, -1)
        self.rss = self._add("process_resident_memory_bytes", False, -1)
        self.goroutines = self._add("go_goroutines", False, -1)
        # Series no feature reads, as a real scrape carries them.
        self.threads = self._add("go_threads", False, -1)
        self.alloc = self._add("go_memstats_alloc_bytes", False, -1)
        self.heap = self._add("go_memstats_heap_inuse_bytes", False, -1)
        self.gc_q = np.array(
            [self._add("go_gc_duration_seconds", False, -1, quantile=q) for q in ("0", "0.25", "0.5", "0.75", "1")]
        )
        self.gc_sum = self._add("go_gc_duration_seconds_sum", True, -1)
        self.gc_count = self._add("go_gc_duration_seconds_count", True, -1)
        self.fds = self._add("process_open_fds", False, -1)
        self.max_fds = self._add("process_max_fds", False, -1)
        self.start_time = self._add("process_start_time_seconds", False, -1)
        self.build = self._add(
            "coredns_build_info", False, -1, version="1.12.0", revision="51e11f1", goversion="go1.23.3"
        )
        self.plugins = np.array(
            [
                self._add("coredns_plugin_enabled", False, -1, server=_SERVER, zone=_ZONE, name=n)
                for n in ("cache", "errors", "forward", "prometheus")
            ]
        )
        self.health_count = self._add("coredns_health_request_duration_seconds_count", True, -1)
        self.health_sum = self._add("coredns_health_request_duration_seconds_sum", True, -1)
        self.health_b = np.array(
            [
                self._add("coredns_health_request_duration_seconds_bucket", True, -1, le=le)
                for le in ("0.00025", "0.0025", "0.025", "0.25", "2.5", "+Inf")
            ]
        )
        self.reload_failed = self._add("coredns_reload_failed_total", True, -1)
        # Prometheus's own per-target series: still written while the target is down.
        self.up = self._add("up", False, -1)
        self.scrape_dur = self._add("scrape_duration_seconds", False, -1)
        self.scraped = self._add("scrape_samples_scraped", False, -1)
        self.post_relabel = self._add("scrape_samples_post_metric_relabeling", False, -1)
        self.added = self._add("scrape_series_added", False, -1)
        self.synthetic = np.array([self.up, self.scrape_dur, self.scraped, self.post_relabel, self.added])

        self.n = len(self.cols)
        self.counter = np.array([c.counter for c in self.cols])
        self.trigger = np.array([c.trigger for c in self.cols])
        self.upstream = np.array([c.upstream for c in self.cols])
        self.lazy = self.trigger >= 0
        self.lazy_cols = np.flatnonzero(self.lazy)
        self.lazy_trig = self.trigger[self.lazy_cols]

    def _add(self, metric: str, counter: bool, trigger: int | str, upstream: int = -1, **labels: str) -> int:
        i = len(self.cols)
        trig = i if trigger == "self" else int(trigger)
        # An empty label value means "no label" in Prometheus (e.g. plugin="" on server-written replies).
        lab = tuple(sorted((k, v) for k, v in labels.items() if v))
        self.cols.append(_Col(metric, lab, counter, trig, upstream))
        return i


_CAT = _Catalogue()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _label_bytes(name: str, value: str) -> bytes:
    """One serialized `Label {name = 1; value = 2}` as a field-1 record of a TimeSeries."""
    n, v = name.encode(), value.encode()
    body = b"\x0a" + _varint(len(n)) + n + b"\x12" + _varint(len(v)) + v
    return b"\x0a" + _varint(len(body)) + body


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7); numpy has no erf."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erfc = poly * np.exp(-z * z)
    out: np.ndarray = np.where(x >= 0, 1.0 - 0.5 * erfc, 0.5 * erfc)
    return out


def _bucket_probs(median: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
    """P(bucket) of a lognormal latency for each TimeBuckets bucket: shape median.shape + (17,)."""
    z = (_LOG_BOUNDS - np.log(median)[..., None]) / np.asarray(sigma)[..., None]
    cdf = _norm_cdf(z)
    p = np.diff(cdf, prepend=0.0, append=1.0, axis=-1)
    return np.maximum(p, 0.0)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


class SyntheticFleet:
    """N CoreDNS instances scraped every `scrape_interval_s`; deterministic from `seed`.

    Call `inject` (or `inject_random`) before generating, then `scrape_payloads()` once per
    scrape, or `write_requests(duration_s)` for a stream of `prometheus.WriteRequest`s.
    """

    def __init__(
        self,
        n_instances: int | None = None,
        *,
        instances: Sequence[str] | None = None,
        job: str = "coredns",
        seed: int = 0,
        scrape_interval_s: float = 15.0,
        start_ms: int = DEFAULT_START_MS,
        qps_range: tuple[float, float] = (5.0, 20_000.0),
        low_qps_fraction: float = 0.15,
        restarts_per_hour: float = 0.1,
        traffic_shifts_per_hour: float = 0.3,
        cold_start: bool = False,
        load_start_fraction: float = 0.0,
        load_start_within_s: float = 600.0,
        lazy_series: bool = True,
    ) -> None:
        if instances is None:
            if n_instances is None or n_instances < 1:
                raise ValueError(f"n_instances must be >= 1, got {n_instances}")
            instances = [f"10.0.{i // 250}.{i % 250 + 1}:9153" for i in range(n_instances)]
        elif n_instances is not None and n_instances != len(instances):
            raise ValueError(f"n_instances={n_instances} but {len(instances)} instance names given")
        if scrape_interval_s <= 0:
            raise ValueError(f"scrape_interval_s must be > 0, got {scrape_interval_s}")
        self.job = job
        self.instances = list(instances)
        self.keys: list[tuple[str, str]] = [(job, inst) for inst in self.instances]
        n = self.n = len(self.instances)
        self.interval_s = float(scrape_interval_s)
        self.interval_ms = round(scrape_interval_s * 1000)
        self.start_ms = int(start_ms)
        self.rng = rng = np.random.default_rng(seed)
        self.spans: list[Span] = []
        self.restarts: list[Restart] = []
        self._faults: list[_Fault] = []
        self.scrapes = 0
        self._enc: _Encoder | None = None
        self._gauges: dict[int, np.ndarray] = {}

        # Static profile of each instance.
        low = rng.random(n) < low_qps_fraction
        self.q0 = np.where(low, _log_uniform(rng, 0.2, qps_range[0], n), _log_uniform(rng, *qps_range, n))
        self.diurnal_amp = rng.uniform(0.0, 0.5, n)
        self.diurnal_period = _log_uniform(rng, 1200.0, 86400.0, n)
        self.diurnal_phase = rng.uniform(0, 2 * math.pi, n)
        self.ar_sigma = rng.uniform(0.02, 0.15, n)
        self.ar_tau = _log_uniform(rng, 30.0, 600.0, n)
        self.type_p = rng.dirichlet(_QTYPE_WEIGHTS * 200, n)
        self.tcp_share = rng.uniform(0.0, 0.05, n)
        # Some clients only ask for names that exist, some caches never hit (unique names, a
        # cache too small for the working set): the edges are normal too.
        r = rng.random(n)
        self.nx_share = np.where(
            r < 0.1, 0.0, np.where(r < 0.2, rng.uniform(0.15, 0.5, n), _log_uniform(rng, 0.002, 0.15, n))
        )
        self.sf_share = np.where(rng.random(n) < 0.15, 0.0, _log_uniform(rng, 1e-6, 3e-3, n))
        # REFUSED: mostly none, sometimes a trickle, and on a few servers a steady few percent
        # (an acl, a zone the upstream does not serve).
        r = rng.random(n)
        self.refused_share = np.where(
            r < 0.2, _log_uniform(rng, 1e-6, 1e-3, n), np.where(r < 0.3, _log_uniform(rng, 1e-3, 0.05, n), 0.0)
        )
        r = rng.random(n)
        self.hit_ratio = np.where(
            r < 0.15,
            rng.uniform(0.0, 0.3, n),
            np.where(r < 0.4, rng.uniform(0.95, 0.999, n), rng.uniform(0.3, 0.95, n)),
        )
        self.cache_target = _log_uniform(rng, 50.0, 9984.0, n)
        self.cache_tau = _log_uniform(rng, 30.0, 1200.0, n)
        self.hit_median = _log_uniform(rng, 40e-6, 300e-6, n)
        self.hit_sigma = rng.uniform(0.3, 0.8, n)
        self.n_up = rng.integers(1, _MAX_UPSTREAMS + 1, n)
        self.up_median = np.where(
            rng.random(n)[:, None] < 0.2,
            _log_uniform(rng, 50e-6, 1e-3, n)[:, None] * rng.uniform(0.8, 1.25, (n, _MAX_UPSTREAMS)),
            _log_uniform(rng, 1e-3, 50e-3, n)[:, None] * rng.uniform(0.7, 1.4, (n, _MAX_UPSTREAMS)),
        )
        self.up_sigma = rng.uniform(0.3, 1.0, (n, _MAX_UPSTREAMS))
        self.up_weight = (np.arange(_MAX_UPSTREAMS)[None, :] < self.n_up[:, None]).astype(float)
        self.loss = _log_uniform(rng, 1e-7, 3e-5, n)
        self.cpu_base = _log_uniform(rng, 0.001, 0.02, n)
        self.cpu_per_query = _log_uniform(rng, 10e-6, 300e-6, n)
        self.cores = rng.choice(np.array([1.0, 2.0, 4.0, 8.0]), n)
        self.rss_base = _log_uniform(rng, 15e6, 80e6, n)
        self.rss_per_entry = rng.uniform(500.0, 2000.0, n)
        self.rss_per_qps = rng.uniform(500.0, 5000.0, n)
        self.g_base = rng.integers(8, 80, n).astype(float)
        self.restart_rate = np.where(rng.random(n) < 0.4, restarts_per_hour * rng.uniform(0.5, 4.0, n), 0.0)
        self.shift_rate = traffic_shifts_per_hour * rng.uniform(0.0, 2.0, n)
        upstreams = [rng.permutation(len(_UPSTREAM_POOL))[:_MAX_UPSTREAMS] for _ in range(n)]
        self.upstream_names = [[_UPSTREAM_POOL[j] for j in perm] for perm in upstreams]
        self.offset_ms = rng.integers(0, self.interval_ms, n) if self.interval_ms > 1 else np.zeros(n, np.int64)
        # Some instances get no queries until their clients start (a new deployment, a load test).
        self.load_start = np.where(rng.random(n) < load_start_fraction, rng.uniform(0.0, load_start_within_s, n), 0.0)
        self.lazy_series = lazy_series

        # Dynamic state.
        self.t = 0.0
        self.ar = rng.standard_normal(n)
        self.ar_mem = rng.standard_normal(n)
        self.shift = np.ones(n)
        self.counts = np.zeros((n, _CAT.n))
        self.exists = np.zeros((n, _CAT.n), dtype=bool)
        self.exists[:, ~_CAT.lazy | (not lazy_series)] = True
        self._limit_upstream_columns()
        self.was_emitted = np.zeros((n, _CAT.n), dtype=bool)
        fill = 0.0 if cold_start else 1.0
        self.ent_s = self.cache_target * fill
        self.ent_d = self.cache_target * self.nx_share * fill
        self.leak_bytes = np.zeros(n)
        self.leak_goroutines = np.zeros(n)
        self.down_until = np.full(n, -1.0)
        self.process_start = (self.start_ms / 1000.0) - rng.uniform(3600, 30 * 86400, n)
        self.counts[:, _CAT.cpu] = rng.uniform(10, 5000, n)
        if not cold_start:
            # Long-running processes: counters already far from zero.
            self._prime()

    # ---- faults -------------------------------------------------------------------------------

    def inject(self, instance: int, cls: FaultClass, start_ms: int, end_ms: int, severity: float = 1.0) -> Span:
        """Apply `cls` to instance number `instance` in [start_ms, end_ms) at `severity` in (0, 1]."""
        if cls not in FAULT_CLASSES:
            raise ValueError(f"unknown fault class {cls!r}; expected one of {', '.join(FAULT_CLASSES)}")
        if not 0 < severity <= 1:
            raise ValueError(f"severity must be in (0, 1], got {severity}")
        if not 0 <= instance < self.n:
            raise ValueError(f"instance must be in [0, {self.n}), got {instance}")
        if end_ms <= start_ms:
            raise ValueError(f"end_ms must be after start_ms, got [{start_ms}, {end_ms})")
        rng = self.rng
        f = _Fault(instance, cls, (start_ms - self.start_ms) / 1000.0, (end_ms - self.start_ms) / 1000.0, severity)
        if cls in ("upstream_latency", "forward_saturation", "upstream_down"):
            # Open-loop clients keep (or raise, retrying) their rate; closed-loop ones slow down.
            f.rate_mult = float(_log_uniform(rng, 0.05, 1.5, 1)[0])
        f.blackhole = bool(rng.random() < 0.3)
        self._faults.append(f)
        span = Span(self.keys[instance], int(start_ms), int(end_ms), cls, float(severity))
        self.spans.append(span)
        return span

    def inject_random(
        self,
        instances: Sequence[int],
        *,
        duration_s: float,
        per_instance: int = 2,
        classes: Sequence[FaultClass] = FAULT_CLASSES,
        min_len_s: float = 120.0,
        max_len_s: float = 1800.0,
        severity: tuple[float, float] = (0.2, 1.0),
        margin_s: float = 0.0,
    ) -> list[Span]:
        """`per_instance` non-overlapping faults on each of `instances`, within [margin, duration)."""
        rng = self.rng
        spans = []
        for i in instances:
            slot = (duration_s - margin_s) / per_instance
            for k in range(per_instance):
                length = min(float(rng.uniform(min_len_s, max_len_s)), slot * 0.6)
                start = margin_s + k * slot + float(rng.uniform(0.2, 0.4)) * slot
                cls = classes[int(rng.integers(len(classes)))]
                sev = float(rng.uniform(*severity))
                s0 = self.start_ms + int(start * 1000)
                spans.append(self.inject(i, cls, s0, s0 + int(length * 1000), sev))
        return spans

    # ---- simulation ---------------------------------------------------------------------------

    def _prime(self) -> None:
        """Run a few silent scrapes so every lazily created series exists, then make counters old."""
        keep_t = self.t
        for _ in range(3):
            self._step(600.0, emit=False)
        self.t = keep_t
        self.counts[:, _CAT.counter] *= self.rng.uniform(5, 500, (self.n, 1))
        self.counts[:, _CAT.counter] = np.round(self.counts[:, _CAT.counter])
        self.counts[:, _CAT.cpu] = self.rng.uniform(10, 5000, self.n)

    def _step(self, dt: float, emit: bool = True) -> np.ndarray:
        """Advance every instance by dt seconds; return the mask of instances up at this scrape."""
        rng, n, cat = self.rng, self.n, _CAT
        t = self.t + dt
        self.t = t
        nu = _MAX_UPSTREAMS

        # Restarts (normal operations): the process is gone for a few seconds, then starts afresh.
        up = self.down_until <= t
        if emit:
            p_restart = 1.0 - np.exp(-self.restart_rate * dt / 3600.0)
            starting = up & (rng.random(n) < p_restart)
            for f in self._faults:
                # A leaking process ends its fault by being OOM-killed and restarted.
                if f.cls == "memory_leak" and not f.ended and t >= f.end_s:
                    f.ended = True
                    starting[f.index] = True
            for j in np.flatnonzero(starting):
                at = t - dt * float(rng.random())
                self.down_until[j] = at + float(rng.uniform(1.0, 10.0))
                self._reset(int(j), t)
            up = self.down_until <= t

        # Fault effects for this scrape.
        rate_mult = np.ones(n)
        nx_extra = np.zeros(n)
        up_med = self.up_median.copy()
        up_sig = self.up_sigma.copy()
        down = np.zeros((n, nu), dtype=bool)
        blackhole = np.zeros(n, dtype=bool)
        sf_extra = np.zeros(n)
        p_rej = np.zeros(n)
        panic_rate = np.zeros(n)
        g_extra = np.zeros(n)
        for f in self._faults:
            if not f.start_s <= t < f.end_s:
                continue
            i, s = f.index, f.severity
            if f.cls == "upstream_latency":
                target = math.exp(math.log(0.2) + s * (math.log(4.0) - math.log(0.2)))
                up_med[i] = np.maximum(up_med[i], target)
                up_sig[i] = np.maximum(up_sig[i], 0.6)
                rate_mult[i] *= f.rate_mult
            elif f.cls == "upstream_down":
                n_down = max(1, math.ceil(s * self.n_up[i]))
                down[i, :n_down] = True
                blackhole[i] = f.blackhole
                rate_mult[i] *= f.rate_mult
            elif f.cls == "upstream_servfail":
                sf_extra[i] = 0.05 + 0.95 * s
            elif f.cls == "query_flood":
                rate_mult[i] *= 1.0 + 20.0 * s
            elif f.cls == "random_subdomain_flood":
                nx_extra[i] = (self.q0[i] + 20.0) * 10.0 * s
                up_med[i] *= 1.0 + 2.0 * s
            elif f.cls == "forward_saturation":
                p_rej[i] = 0.05 + 0.75 * s
                up_med[i] *= 3.0 + 10.0 * s
                g_extra[i] += 1000.0
                rate_mult[i] *= f.rate_mult
            elif f.cls == "memory_leak":
                self.leak_bytes[i] += s * 2e6 * dt
                self.leak_goroutines[i] += s * 20.0 * dt
            elif f.cls == "panics":
                panic_rate[i] = 2.0 * s
        down &= self.up_weight > 0
        # Unreachable hosts time out (like a very slow upstream) instead of failing fast.
        bh = down & blackhole[:, None]
        up_med = np.where(bh, 30.0, up_med)
        down &= ~bh

        # Traffic.
        phi = np.exp(-dt / self.ar_tau)
        self.ar = self.ar * phi + np.sqrt(1 - phi**2) * rng.standard_normal(n)
        shifting = rng.random(n) < 1.0 - np.exp(-self.shift_rate * dt / 3600.0)
        self.shift = np.where(shifting, np.clip(self.shift * np.exp(rng.uniform(-1.4, 1.4, n)), 0.2, 5.0), self.shift)
        diurnal = 1.0 + self.diurnal_amp * np.sin(2 * math.pi * t / self.diurnal_period + self.diurnal_phase)
        lam = self.q0 * diurnal * np.exp(self.ar_sigma * self.ar - self.ar_sigma**2 / 2) * self.shift * rate_mult
        lam = np.where(t < self.load_start, 0.0, lam)

        # CPU saturation slows everything the process does itself.
        demand = self.cpu_base + self.cpu_per_query * (lam + nx_extra) * 1.3
        load = demand / self.cores
        slow = np.where(load > 0.8, 1.0 + 20.0 * (load - 0.8) ** 2, 1.0)
        lam = np.where(load > 1.0, lam / load**0.5, lam)

        fill = np.clip(self.ent_s / self.cache_target, 0.0, 1.0)
        h = self.hit_ratio * fill**0.5
        lam_hit = lam * h
        lam_miss = lam * (1.0 - h) + nx_extra
        nx_fwd = np.where(lam_miss > 0, (lam * (1 - h) * self.nx_share + nx_extra) / np.maximum(lam_miss, 1e-12), 0)
        lam_rej = lam_miss * p_rej
        lam_fwd = lam_miss - lam_rej

        # Forwarding: healthy upstreams share the load; all down means fast SERVFAIL.
        healthy = (self.up_weight > 0) & ~down
        all_down = ~healthy.any(axis=1) & (self.up_weight.sum(axis=1) > 0)
        w = np.where(healthy, self.up_weight, 0.0)
        w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        p_rtt = _bucket_probs(up_med, up_sig)  # (n, U, 17)
        cdf_timeout = _norm_cdf((math.log(_FORWARD_READ_TIMEOUT) - np.log(up_med)) / up_sig)
        p_to_u = np.clip(1.0 - cdf_timeout + self.loss[:, None], 0.0, 1.0)
        p_ok = p_rtt.copy()
        p_ok[..., 14:] = 0.0
        p_ok[..., 13] = np.maximum(cdf_timeout - _norm_cdf((_LOG_BOUNDS[12] - np.log(up_med)) / up_sig), 0.0)
        p_ok *= 1.0 - self.loss[:, None, None]
        lam_fast = np.where(all_down, lam_fwd, 0.0)
        lam_try = np.where(all_down, 0.0, lam_fwd)
        p_to = np.where(all_down, 0.0, (w * p_to_u).sum(axis=1))
        # With one upstream a timed-out query fails at 2 s (as a real CoreDNS 1.12 does); with
        # more, forward tries another one, and fails only when that one times out as well.
        multi = self.n_up > 1
        p_retry = np.where(multi, p_to, 0.0)
        lam_deadline = lam_try * p_to * np.where(multi, p_to, 1.0)
        b_fail = np.where(multi, _B_DEADLINE, _B_TIMEOUT)
        t_fail = np.where(multi, 4.5, 2.0)
        # Answers observed by the proxy histogram: first tries plus successful second tries.
        sf_up = np.clip(self.sf_share + sf_extra, 0.0, 1.0)
        p_rc = np.stack([(1.0 - nx_fwd) * (1.0 - sf_up), nx_fwd * (1.0 - sf_up), sf_up], axis=1)  # (n, 3)
        lam_px = (
            (lam_try * (1.0 + p_retry))[:, None, None, None]
            * w[:, :, None, None]
            * p_rc[:, None, :, None]
            * p_ok[:, :, None, :]
        )
        px = rng.poisson(lam_px * dt).astype(float)  # (n, U, 3, 17)
        px_by_b = px.sum(axis=(1, 2))
        n_replies = px_by_b.sum(axis=1)
        n_retried = rng.binomial(n_replies.astype(np.int64), p_retry / (1.0 + p_retry))
        # Which buckets the retried answers came from does not matter for the request histogram.
        frac = np.where(n_replies > 0, n_retried / np.maximum(n_replies, 1), 0.0)
        req_fwd = px_by_b * (1.0 - frac[:, None])
        req_fwd = np.floor(req_fwd)
        req_fwd[:, 0] += n_replies - n_retried - req_fwd.sum(axis=1)

        p_hit = _bucket_probs(self.hit_median * slow, self.hit_sigma)
        hits = rng.poisson((lam_hit * dt)[:, None] * p_hit).astype(float)
        n_hits = hits.sum(axis=1)
        n_hit_d = rng.binomial(n_hits.astype(np.int64), self.nx_share).astype(float)
        fast = rng.poisson((lam_fast * dt)[:, None] * _bucket_probs(3e-4 * slow, 0.5)).astype(float)
        rej = rng.poisson(
            ((lam_rej + lam * self.refused_share) * dt)[:, None] * _bucket_probs(50e-6 * slow, 0.5)
        ).astype(float)
        panics = rng.poisson((panic_rate * dt)[:, None] * _bucket_probs(1e-4 * slow, 0.5)).astype(float)
        n_deadline = rng.poisson(lam_deadline * dt).astype(float)
        req_b = hits + req_fwd + fast + rej + panics
        req_b[:, _B_RETRIED] += n_retried
        req_b[np.arange(n), b_fail] += n_deadline
        n_req = req_b.sum(axis=1)
        n_rej_total = rej.sum(axis=1)
        n_rejects = rng.binomial(
            n_rej_total.astype(np.int64),
            np.where(
                lam_rej + lam * self.refused_share > 0,
                lam_rej / np.maximum(lam_rej + lam * self.refused_share, 1e-12),
                0.0,
            ),
        ).astype(float)
        n_panic = panics.sum(axis=1)
        n_fast = fast.sum(axis=1)

        # Counters: only for processes that are up (a down process has no counters to advance).
        inc = np.zeros((n, cat.n))
        by_type = rng.multinomial(n_req.astype(np.int64), self.type_p).astype(float)
        tcp = rng.binomial(by_type.astype(np.int64), self.tcp_share[:, None]).astype(float)
        inc[:, cat.req[:, 0]] = by_type - tcp
        inc[:, cat.req[:, 1]] = tcp
        px_rc = px.sum(axis=(1, 3))  # (n, 3) answers by rcode
        frac_rc = np.where(n_replies[:, None] > 0, px_rc / np.maximum(n_replies, 1)[:, None], 0.0)
        answered = n_replies  # every proxy answer (first or retried) ends one request
        inc[:, cat.resp["NOERROR", "cache"]] = n_hits - n_hit_d
        inc[:, cat.resp["NXDOMAIN", "cache"]] = n_hit_d
        fwd_rc = np.floor(frac_rc * answered[:, None])
        fwd_rc[:, 0] += answered - fwd_rc.sum(axis=1)
        inc[:, cat.resp["NOERROR", "forward"]] = fwd_rc[:, 0]
        inc[:, cat.resp["NXDOMAIN", "forward"]] = fwd_rc[:, 1]
        inc[:, cat.resp["SERVFAIL", "forward"]] = fwd_rc[:, 2]
        inc[:, cat.resp["SERVFAIL", ""]] = n_deadline + n_fast + n_panic
        inc[:, cat.resp["REFUSED", ""]] = n_rej_total
        cum = np.cumsum(req_b, axis=1)
        inc[:, cat.dur_b] = cum
        inc[:, cat.dur_count] = n_req
        inc[:, cat.dur_sum] = (req_b * _MIDS).sum(axis=1) + n_deadline * (t_fail - _MIDS[b_fail])
        inc[:, cat.cache_req] = n_req - n_rej_total + n_rejects
        inc[:, cat.cache_hit_s] = n_hits - n_hit_d
        inc[:, cat.cache_hit_d] = n_hit_d
        inc[:, cat.cache_miss] = n_req - n_rej_total + n_rejects - n_hits
        inc[:, cat.px_b.reshape(-1)] = np.cumsum(px, axis=3).reshape(n, -1)
        inc[:, cat.px_cnt.reshape(-1)] = px.sum(axis=3).reshape(n, -1)
        inc[:, cat.px_sum.reshape(-1)] = (px * _MIDS).sum(axis=3).reshape(n, -1)
        # Health checks run every 0.5 s while an upstream fails; a slow one fails each 1 s check.
        hc_rate = np.where(down, 2.0, 0.0) + np.where(
            healthy & (p_to_u > 0.01), 0.8 * np.clip(3.0 * (1.0 - _norm_cdf(-np.log(up_med) / up_sig)), 0, 1), 0.0
        )
        hc_rate = np.where(bh, 0.8, hc_rate)
        inc[:, cat.hc] = rng.poisson(hc_rate * dt)
        inc[:, cat.rejects] = n_rejects
        inc[:, cat.broken] = np.where(all_down, n_fast, 0.0)
        inc[:, cat.panics] = n_panic
        cpu_rate = np.minimum(self.cpu_base + self.cpu_per_query * n_req / dt, self.cores)
        inc[:, cat.cpu] = cpu_rate * dt * rng.gamma(50.0, 1 / 50.0, n)
        n_gc = rng.poisson(dt * (0.05 + n_req / dt / 2000.0))
        inc[:, cat.gc_count] = n_gc
        inc[:, cat.gc_sum] = n_gc * rng.uniform(50e-6, 300e-6, n)
        n_health = rng.poisson(dt, n).astype(float)
        inc[:, cat.health_count] = n_health
        inc[:, cat.health_sum] = n_health * 0.0004
        inc[:, cat.health_b] = np.outer(n_health, [0, 0.9, 1, 1, 1, 1])
        inc[~up] = 0.0
        self.counts += np.round(inc * 1e6) / 1e6
        # Lazily created series exist from their first increment.
        trig = self.counts[:, cat.lazy_trig] > 0
        self.exists[:, cat.lazy_cols] |= trig
        self._limit_upstream_columns()

        # Gauges.
        ent_tgt_d = np.where(nx_extra > 0, 9984.0, self.cache_target * self.nx_share)
        k = 1.0 - np.exp(-dt / self.cache_tau)
        k_d = np.where(nx_extra > 0, 1.0 - np.exp(-dt / 20.0), k)
        self.ent_s = np.where(up, self.ent_s + (self.cache_target - self.ent_s) * k, 0.0)
        self.ent_d = np.where(up, self.ent_d + (ent_tgt_d - self.ent_d) * k_d, 0.0)
        ent_s = np.round(self.ent_s * np.exp(0.02 * rng.standard_normal(n)))
        ent_d = np.round(self.ent_d * np.exp(0.05 * rng.standard_normal(n)))
        phi_m = np.exp(-dt / 300.0)
        self.ar_mem = self.ar_mem * phi_m + np.sqrt(1 - phi_m**2) * rng.standard_normal(n)
        rss = (
            self.rss_base
            + (ent_s + ent_d) * self.rss_per_entry
            + np.minimum(lam, 50_000) * self.rss_per_qps
            + self.leak_bytes
        ) * np.exp(0.02 * self.ar_mem + 0.003 * rng.standard_normal(n))
        in_flight = (req_b * _MIDS).sum(axis=1) / dt + n_deadline * (t_fail - _MIDS[b_fail]) / dt
        gor = (
            self.g_base
            + 2 * self.n_up
            + rng.poisson(np.minimum(in_flight, 1e6))
            + g_extra
            + self.leak_goroutines
            + rng.poisson(3.0, n)
        )
        self._gauges = {
            cat.cache_ent_s: ent_s,
            cat.cache_ent_d: ent_d,
            cat.rss: np.round(rss / 4096) * 4096,
            cat.goroutines: gor,
            cat.threads: 8 + np.round(np.log2(1 + lam)) + self.cores,
            cat.alloc: rss * rng.uniform(0.3, 0.6, n),
            cat.heap: rss * rng.uniform(0.4, 0.7, n),
            cat.fds: 10 + 2 * self.n_up + rng.poisson(np.minimum(in_flight, 1e5) * 0.1),
            cat.max_fds: np.full(n, 1048576.0),
            cat.start_time: np.round(self.process_start, 2),
            cat.build: np.ones(n),
        }
        for q, v in zip(cat.gc_q, (30e-6, 60e-6, 90e-6, 150e-6, 800e-6), strict=True):
            self._gauges[int(q)] = v * rng.uniform(0.7, 1.3, n)
        for p in cat.plugins:
            self._gauges[int(p)] = np.ones(n)
        return up

    def _limit_upstream_columns(self) -> None:
        cols = _CAT.upstream >= 0
        self.exists[:, cols] &= _CAT.upstream[cols][None, :] < self.n_up[:, None]

    def _reset(self, i: int, t: float) -> None:
        cat = _CAT
        self.counts[i] = 0.0
        self.exists[i] = ~cat.lazy | (not self.lazy_series)
        self.exists[i, cat.upstream >= self.n_up[i]] = False
        self.ent_s[i] = 0.0
        self.ent_d[i] = 0.0
        self.leak_bytes[i] = 0.0
        self.leak_goroutines[i] = 0.0
        self.process_start[i] = self.start_ms / 1000.0 + t
        # Stamped with the scrape that first sees the new process (or its absence).
        self.restarts.append(Restart(self.keys[i], self.start_ms + int(self.offset_ms[i]) + round(t * 1000)))

    # ---- output -------------------------------------------------------------------------------

    def scrape(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance one scrape interval: (timestamps_ms (N,), values (N, S), emitted (N, S) mask)."""
        cat = _CAT
        up = self._step(self.interval_s)
        self.scrapes += 1
        ts = self.start_ms + self.offset_ms + self.scrapes * self.interval_ms
        values = self.counts.copy()
        cpu = values[:, cat.cpu]
        values[:, cat.cpu] = np.floor(cpu * 100.0 + 1e-9) / 100.0  # clock ticks
        for c, v in self._gauges.items():
            values[:, c] = v
        emitted = self.exists & up[:, None]
        n_series = emitted.sum(axis=1)
        values[:, cat.up] = up.astype(float)
        values[:, cat.scrape_dur] = np.where(up, 0.002 + n_series * 2e-5 * self.rng.uniform(0.8, 1.5, self.n), 0.0)
        values[:, cat.scraped] = np.where(up, n_series - len(cat.synthetic), 0.0)
        values[:, cat.post_relabel] = values[:, cat.scraped]
        values[:, cat.added] = 0.0
        emitted[:, cat.synthetic] = True
        # A failed scrape (the process is restarting) marks the series it had as stale, once.
        stale = self.was_emitted & ~up[:, None]
        stale[:, cat.synthetic] = False
        values_bits = values.view(np.uint64)
        values_bits[stale] = STALE_NAN_BITS
        out_mask = emitted | stale
        self.was_emitted = np.where(up[:, None], emitted, False)
        return ts.astype(np.int64), values, out_mask

    def scrape_payloads(self, max_samples: int = MAX_SAMPLES_PER_SEND, shards: int = 0) -> list[bytes]:
        """One scrape of the whole fleet as serialized `prometheus.WriteRequest`s (not compressed).

        shards = 0: one kind of series at a time (every instance's, then the next kind's), so
        consecutive series are of different instances: the hardest order for a receiver's caches.
        shards >= 1: in the order Prometheus's remote-write queue sends them with that many shards.
        A scrape is one WAL record, each target's series together in exposition order; the targets
        come in a fixed order of their own (Prometheus spreads scrapes over the interval by a hash
        of the target). A series goes to shard `ref % shards`, refs in first-scrape order, and each
        shard cuts its queue into requests, sent side by side: so a request holds runs of about
        series-per-target / shards series of one instance.
        """
        ts, values, mask = self.scrape()
        return _encoder(self).encode(ts, values, mask, max_samples, shards)

    def write_requests(self, duration_s: float, max_samples: int = MAX_SAMPLES_PER_SEND) -> Iterator[pb1.WriteRequest]:
        """Scrape for `duration_s` seconds, yielding the WriteRequests Prometheus would send."""
        for _ in range(round(duration_s / self.interval_s)):
            for payload in self.scrape_payloads(max_samples):
                yield pb1.WriteRequest.FromString(payload)


class _Layout:
    """Where each record of one scrape's payload goes: a byte template plus value/timestamp slots."""

    __slots__ = ("bounds", "rec_col", "rec_inst", "starts", "template", "ts_len", "ts_off", "val_off")

    def __init__(
        self,
        template: np.ndarray,
        rec_inst: np.ndarray,
        rec_col: np.ndarray,
        starts: np.ndarray,
        val_off: np.ndarray,
        ts_off: np.ndarray,
        ts_len: int,
        bounds: list[tuple[int, int]],
    ) -> None:
        self.template, self.rec_inst, self.rec_col, self.starts = template, rec_inst, rec_col, starts
        self.val_off, self.ts_off, self.ts_len, self.bounds = val_off, ts_off, ts_len, bounds


class _Encoder:
    """Serializes samples straight to WriteRequest wire bytes with numpy (no protobuf objects).

    A record (one TimeSeries) is: tag, length, label bytes (fixed per instance and column),
    then one Sample (double value, varint timestamp). Which series a scrape carries changes
    rarely (a new rcode, a restart), so the byte layout is built once per set of series and
    each scrape only writes its values and timestamps into a copy of the template.
    """

    def __init__(self, fleet: SyntheticFleet) -> None:
        cat = _CAT
        self.n = fleet.n
        job_lb = _label_bytes("job", fleet.job)
        # Per column: label bytes before the instance label, and after it (job and the rest);
        # "to" sorts last among the labels of the columns that carry it, so it is appended.
        self.pre: list[bytes] = []
        self.post: list[bytes] = []
        for col in cat.cols:
            labels = sorted([("__name__", col.name), *col.labels])
            if any("instance" < k < "job" for k, _ in labels):
                raise AssertionError("a label sorts between instance and job")  # pragma: no cover
            self.pre.append(b"".join(_label_bytes(k, v) for k, v in labels if k < "instance"))
            self.post.append(job_lb + b"".join(_label_bytes(k, v) for k, v in labels if k > "job" and k != "to"))
        self.col_upstream = np.array([c.upstream for c in cat.cols])
        inst_lb = [_label_bytes("instance", v) for v in fleet.instances]
        self.inst_len = np.array([len(b) for b in inst_lb])
        self.inst_arr = np.zeros((self.n, int(self.inst_len.max())), dtype=np.uint8)
        for i, b in enumerate(inst_lb):
            self.inst_arr[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        vocab = sorted({name for names in fleet.upstream_names for name in names})
        self.to_vocab = [_label_bytes("to", name) for name in vocab]
        self.to_ids = np.array([[vocab.index(name) for name in names] for names in fleet.upstream_names])
        # The order targets' scrapes land in the WAL: by a hash of the target, as Prometheus offsets
        # each target's scrapes within the interval.
        hashes = np.array([zlib.crc32(inst.encode()) for inst in fleet.instances], dtype=np.int64)
        self.target_rank = np.empty(self.n, dtype=np.int64)
        self.target_rank[np.argsort(hashes, kind="stable")] = np.arange(self.n)
        self._layout: _Layout | None = None
        self._layout_key: bytes = b""

    def encode(
        self, ts: np.ndarray, values: np.ndarray, mask: np.ndarray, max_samples: int, shards: int = 0
    ) -> list[bytes]:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if shards < 0:
            raise ValueError(f"shards must be >= 0, got {shards}")
        ts_var = [_varint(int(t)) for t in ts]
        tl = len(ts_var[0])
        if any(len(v) != tl for v in ts_var):
            raise ValueError("timestamps of one scrape must have varints of one length (keep them in 1971..2109)")
        key = mask.tobytes() + np.array([tl, max_samples, shards], dtype=np.int64).tobytes()
        if self._layout is None or key != self._layout_key:
            self._layout = self._build(mask, tl, max_samples)
            if shards:
                self._layout = self._sharded(self._layout, shards, max_samples)
            self._layout_key = key
        lay = self._layout
        buf = lay.template.copy()
        vb = np.ascontiguousarray(values[lay.rec_inst, lay.rec_col]).view(np.uint8).reshape(-1, 8)
        for j in range(8):
            buf[lay.val_off + j] = vb[:, j]
        ts_arr = np.frombuffer(b"".join(ts_var), dtype=np.uint8).reshape(self.n, tl)[lay.rec_inst]
        for j in range(tl):
            buf[lay.ts_off + j] = ts_arr[:, j]
        return [buf[a:b].tobytes() for a, b in lay.bounds]

    def _build(self, mask: np.ndarray, tl: int, max_samples: int) -> _Layout:
        blocks: list[np.ndarray] = []
        rec_inst: list[np.ndarray] = []
        rec_col: list[np.ndarray] = []
        rec_start: list[np.ndarray] = []
        val_off: list[np.ndarray] = []
        ts_off: list[np.ndarray] = []
        offset = 0
        for c in range(len(self.pre)):
            rows_c = np.flatnonzero(mask[:, c])
            if rows_c.size == 0:
                continue
            u = self.col_upstream[c]
            # Records of one block share their layout: same instance label length and `to` label.
            sub = self.inst_len[rows_c] * 1000 + (self.to_ids[rows_c, u] if u >= 0 else 0)
            for k in np.unique(sub):
                sel = rows_c[sub == k]
                to = self.to_vocab[int(k) % 1000] if u >= 0 else b""
                blk, vpos, tpos = self._block(c, sel, int(k) // 1000, tl, to)
                starts = offset + blk.shape[1] * np.arange(sel.size)
                blocks.append(blk.reshape(-1))
                rec_inst.append(sel)
                rec_col.append(np.full(sel.size, c))
                rec_start.append(starts)
                val_off.append(starts + vpos)
                ts_off.append(starts + tpos)
                offset += blk.size
        if not blocks:
            empty = np.zeros(0, dtype=np.int64)
            return _Layout(np.zeros(0, dtype=np.uint8), empty, empty, empty, empty, empty, tl, [])
        first = np.concatenate(rec_start)
        cuts = range(0, first.size, max_samples)
        bounds = [
            (int(first[a]), int(first[a + max_samples]) if a + max_samples < first.size else offset) for a in cuts
        ]
        return _Layout(
            np.concatenate(blocks),
            np.concatenate(rec_inst),
            np.concatenate(rec_col),
            first,
            np.concatenate(val_off),
            np.concatenate(ts_off),
            tl,
            bounds,
        )

    def _sharded(self, lay: _Layout, shards: int, max_samples: int) -> _Layout:
        """`lay`'s records in Prometheus's order with `shards` shards (see scrape_payloads)."""
        n = lay.rec_inst.size
        if n == 0:
            return lay
        rank = self.target_rank[lay.rec_inst]
        shard = (rank * len(self.pre) + lay.rec_col) % shards
        by_shard = np.lexsort((lay.rec_col, rank, shard))
        sh = shard[by_shard]
        request = (np.arange(n) - np.searchsorted(sh, sh)) // max_samples  # within its shard
        # The shards' requests side by side: each shard's first, then each one's second, ...
        sent = np.lexsort((np.arange(n), sh, request))
        order = by_shard[sent]
        lengths = np.diff(np.append(lay.starts, lay.template.size))[order]
        starts = np.cumsum(lengths) - lengths
        template = np.empty_like(lay.template)
        records = lay.template.data
        for a in range(0, n, _GATHER):  # a slice of records at a time: bounded memory
            src = lay.starts[order[a : a + _GATHER]]
            ends = src + lengths[a : a + _GATHER]
            chunk = b"".join([records[x:y] for x, y in zip(src.tolist(), ends.tolist(), strict=True)])
            template[int(starts[a]) : int(starts[a]) + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        edges = [0, *(np.flatnonzero(np.diff((request * shards + sh)[sent])) + 1).tolist(), n]
        bounds = [(int(starts[a]), int(starts[b]) if b < n else template.size) for a, b in itertools.pairwise(edges)]
        shift = starts - lay.starts[order]
        return _Layout(
            template,
            lay.rec_inst[order],
            lay.rec_col[order],
            starts,
            lay.val_off[order] + shift,
            lay.ts_off[order] + shift,
            lay.ts_len,
            bounds,
        )

    def _block(self, c: int, sel: np.ndarray, il: int, tl: int, to: bytes) -> tuple[np.ndarray, int, int]:
        pre, post = self.pre[c], self.post[c] + to
        sample_len = 1 + 8 + 1 + tl
        body_len = len(pre) + il + len(post) + 2 + sample_len
        tag = b"\x0a" + _varint(body_len)
        head = tag + pre
        tail = post + b"\x12" + bytes([sample_len]) + b"\x09"
        out = np.empty((sel.size, len(tag) + body_len), dtype=np.uint8)
        p = len(head)
        out[:, :p] = np.frombuffer(head, dtype=np.uint8)
        out[:, p : p + il] = self.inst_arr[sel, :il]
        p += il
        out[:, p : p + len(tail)] = np.frombuffer(tail, dtype=np.uint8)
        p += len(tail)
        out[:, p : p + 8] = 0
        out[:, p + 8] = 0x10
        out[:, p + 9 :] = 0
        return out, p, p + 9


def _encoder(fleet: SyntheticFleet) -> _Encoder:
    if fleet._enc is None:
        fleet._enc = _Encoder(fleet)
    return fleet._enc


@dataclass
class Synthetic:
    """A generated recording: its WriteRequests (lazily), the injected spans and the restarts."""

    fleet: SyntheticFleet
    duration_s: float
    spans: list[Span] = field(default_factory=list)

    def requests(self) -> Iterator[pb1.WriteRequest]:
        return self.fleet.write_requests(self.duration_s)

    @property
    def restarts(self) -> list[Restart]:
        return self.fleet.restarts


def generate(
    n_instances: int,
    duration_s: float,
    *,
    seed: int = 0,
    scrape_interval_s: float = 15.0,
    faulty: int = 0,
    faults_per_instance: int = 2,
    fault_len_s: tuple[float, float] = (120.0, 1800.0),
    classes: Sequence[FaultClass] = FAULT_CLASSES,
    severity: tuple[float, float] = (0.2, 1.0),
    **fleet_kwargs: object,
) -> Synthetic:
    """A fleet of `n_instances`, the first `faulty` of which get random faults."""
    fleet = SyntheticFleet(n_instances, seed=seed, scrape_interval_s=scrape_interval_s, **fleet_kwargs)  # type: ignore[arg-type]
    spans = fleet.inject_random(
        range(faulty),
        duration_s=duration_s,
        per_instance=faults_per_instance,
        classes=classes,
        min_len_s=fault_len_s[0],
        max_len_s=fault_len_s[1],
        severity=severity,
        margin_s=min(0.2 * duration_s, 64 * scrape_interval_s),
    )
    return Synthetic(fleet, duration_s, spans)

"""The C feature accumulator (_fastfeatures) against features.py's own loop, the reference: the
same rows, counts and per-instance state over the committed recordings, a synthetic fleet, and
streams mutated the ways Prometheus and hostile writers send them."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import struct
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
import snappy

from detectord.ingest import features as features_mod
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest.features import FeatureExtractor, FeatureRow, IngestStats
from detectord.ingest.remote_write import STALE_NAN, Version, decode
from detectord.recordings.format import read_records
from lab.synthetic import SyntheticFleet
from tests.support import REPO, cache_state, v1_body, v2_body

pytestmark = pytest.mark.skipif(
    features_mod._fastfeatures is None,  # type: ignore[attr-defined]
    reason="the C feature accumulator is not built here (no compiler at install time)",
)

MiB = 1024 * 1024
STEP_MS = 15_000
Series = tuple[dict[str, str], list[tuple[int, float]]]


def _row(r: FeatureRow) -> tuple[object, ...]:
    return (r.instance, r.step_ts_ms, r.values.tobytes(), r.gap, r.restart, r.process_restart, r.upstream)


def _plain(x: Any) -> Any:
    """State comparable with ==: floats by repr (NaN equals NaN, the stale marker's bits show),
    an instance's label block and packed numbers as the series they hold."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict):
        if isinstance(x.get("labels"), bytes):
            x = {**x, "series": features_mod._unpack_series(x.pop("labels"), x["series"])}
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


class Pair:
    """A native extractor and a reference one, fed the same bodies, each decoding with its own cache
    (a series' state lives on its cache's key)."""

    def __init__(self, step_ms: int = STEP_MS, **kw: Any) -> None:
        self.native = FeatureExtractor(step_ms, native=True, **kw)
        self.python = FeatureExtractor(step_ms, native=False, **kw)
        assert self.native._accumulate is not None and self.python._accumulate is None
        assert self.native._bind_known is not None and self.python._bind_known is None
        assert self.native.labels.native and not self.python.labels.native
        self.rows = 0
        self.stats = IngestStats()

    def feed(self, body: bytes, version: Version, now: float) -> list[tuple[object, ...]]:
        """The rows both made (as `_row`s)."""
        out = []
        for ext in (self.native, self.python):
            w = decode(body, version, ext.labels, max_decoded=16 * MiB, keep=ext.series_names)
            stats = IngestStats()
            rows = ext.ingest(w, stats, now)
            out.append(([_row(r) for r in rows], dataclasses.asdict(stats)))
        assert out[0] == out[1]
        self.rows += len(out[0][0])
        for k, v in out[0][1].items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        return out[0][0]

    def turn(self) -> None:
        """Both label caches turn (the older generation goes, series seen again come back from it)."""
        for ext in (self.native, self.python):
            ext.labels.turn()
        assert cache_state(self.native.labels) == cache_state(self.python.labels)

    def same_state(self, now: float) -> None:
        native, python = self.native, self.python
        assert native.instance_keys() == python.instance_keys()
        assert cache_state(native.labels) == cache_state(python.labels)
        for key in native.instance_keys():
            assert _plain(native.instance_state(key, now)) == _plain(python.instance_state(key, now)), key

    def check_state(self, now: float) -> None:
        """The same state, then the same rows when every open step closes."""
        self.same_state(now)
        assert [_row(r) for r in self.native.flush()] == [_row(r) for r in self.python.flush()]


def test_the_recordings_give_the_same_rows_counts_and_state() -> None:
    pair = Pair(step_ms=5_000)
    now = 0.0
    for name in ("faults-1.drec.xz", "unseen-low.drec.xz"):
        for rec in itertools.islice(read_records(REPO / "data" / name), 600):
            now += 0.01
            pair.feed(rec.body, rec.version, now)
    pair.check_state(now)
    assert pair.rows > 100 and pair.stats.accepted > 50_000


def _fleet_series(instances: int, rounds: int, seed: int) -> Iterator[list[Series]]:
    """Rounds of a synthetic CoreDNS fleet (counters, gauges, histogram buckets, `up`) as series."""
    fleet = SyntheticFleet(instances, seed=seed, scrape_interval_s=STEP_MS / 1000, start_ms=1_700_000_000_000)
    for _ in range(rounds):
        out: list[Series] = []
        for payload in fleet.scrape_payloads():
            for ts in pb1.WriteRequest.FromString(payload).timeseries:
                out.append(({lb.name: lb.value for lb in ts.labels}, [(s.timestamp, s.value) for s in ts.samples]))
        yield out


def _mutate(rnd: random.Random, rounds: Iterable[list[Series]]) -> Iterator[list[list[Series]]]:
    """Each round as requests, broken the ways real writers break them: stale markers, NaN and ±Inf,
    counter resets, samples late or repeated, two samples in a series, series missing or held back
    two rounds, instances skipping steps or coming back after a long gap, rounds split and shuffled,
    requests re-sent."""
    shift: dict[str, int] = {}  # per instance: how far its clock jumped (gaps)
    sent: list[list[Series]] = []
    held: list[list[Series]] = [[], []]
    for series in rounds:
        out: list[Series] = held.pop(0)
        held.append([])
        skip = {inst for inst in {s[0].get("instance", "") for s in series} if rnd.random() < 0.05}
        for inst in list(shift) + sorted({s[0].get("instance", "") for s in series}):
            if inst not in shift or rnd.random() < 0.01:
                shift[inst] = shift.get(inst, 0) + rnd.choice((0, 0, 3, 12)) * STEP_MS
        for labels, samples in series:
            inst = labels.get("instance", "")
            if inst in skip or rnd.random() < 0.02:
                continue
            new: list[tuple[int, float]] = []
            for ts, v in samples:
                ts += shift[inst]
                x = rnd.random()
                if x < 0.02:
                    v = rnd.choice((STALE_NAN, math.nan, math.inf, -math.inf))
                elif x < 0.04:
                    v *= rnd.random() * 0.5  # a reset, or a gauge falling
                elif x < 0.06:
                    ts -= rnd.choice((1, STEP_MS, 3 * STEP_MS))  # late
                elif x < 0.08:
                    new.append((ts - STEP_MS // 2, v * 0.9))  # two samples in one request
                new.append((ts, v))
                if rnd.random() < 0.02:
                    new.append((ts, v))  # the same sample again
            (held[-1] if rnd.random() < 0.03 else out).append((labels, new))
        rnd.shuffle(out)
        cut = sorted(rnd.sample(range(1, max(2, len(out))), min(3, max(0, len(out) - 1))))
        requests = [out[a:b] for a, b in zip([0, *cut], [*cut, len(out)], strict=True) if out[a:b]]
        if sent and rnd.random() < 0.2:
            requests.append(rnd.choice(sent))  # a retry of an earlier request
        sent = requests
        yield requests


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_mutated_fleet_streams_give_the_same_rows_counts_and_state(version: Version) -> None:
    body = v1_body if version == "1.0" else v2_body
    for seed in range(3):
        rnd, turns = random.Random(seed), random.Random(seed + 100)
        pair = Pair(max_gap_steps=2)
        now = 0.0
        for requests in _mutate(rnd, _fleet_series(6, 30, seed)):
            for series in requests:
                now += 0.5
                pair.feed(body(series), version, now)
                if turns.random() < 0.1:
                    pair.turn()
        pair.check_state(now)
        counted = pair.stats
        assert counted.accepted > 5_000 and counted.duplicate > 50 and counted.late > 10
        assert counted.stale > 10 and counted.non_finite > 10
        assert pair.native.labels.turns > 5


def test_negative_and_huge_timestamps_bin_alike() -> None:
    """Python's floor division is what the C code must do for timestamps before 1970."""
    pair = Pair(step_ms=7_000)
    labels = {"__name__": "coredns_dns_requests_total", "job": "coredns", "instance": "a:9153", "server": "dns://:53"}
    now = 0.0
    for ts in (-100_000, -50_001, -7_000, -6_999, -1, 0, 1, 6_999, 7_000, 2**62, 2**62 + 1):
        now += 1
        pair.feed(v1_body([(labels, [(ts, now * 10)])]), "1.0", now)
        pair.same_state(now)
    pair.check_state(now)


def test_an_upstream_that_comes_later_is_noted_alike() -> None:
    """A second upstream's series bind where the first's made every slot already (the C binding's
    case, after another new series of the instance began the run): both extractors note it, and
    the instance's rows name both."""
    pair = Pair()
    base = {"job": "coredns", "instance": "a:9153", "server": "dns://:53"}
    now, rows = 0.0, list[tuple[object, ...]]()

    def series(to: str, step: int) -> list[Series]:
        ts = 1_700_000_000_000 + step * STEP_MS
        out: list[Series] = [({**base, "__name__": "coredns_dns_requests_total"}, [(ts, 10.0 * step)])]
        name = "coredns_proxy_request_duration_seconds"
        for le in ("0.005", "0.05", "0.5", "+Inf"):
            out.append(({**base, "__name__": f"{name}_bucket", "to": to, "le": le}, [(ts, 3.0 * step)]))
        out.append(({**base, "__name__": f"{name}_count", "to": to}, [(ts, 3.0 * step)]))
        out.append(({**base, "__name__": f"{name}_sum", "to": to}, [(ts, 0.1 * step)]))
        return out

    for step in range(6):
        now += 1
        sent = series("10.0.0.1:53", step)
        if step >= 3:
            ts = 1_700_000_000_000 + step * STEP_MS
            sent.append(({**base, "server": "dns://:5353", "__name__": "coredns_dns_requests_total"}, [(ts, 1.0)]))
            sent += series("10.0.0.2:53", step)[1:]
        rows += pair.feed(v1_body(sent), "1.0", now)
    pair.same_state(now)
    assert rows[0][-1] == "10.0.0.1:53" and rows[-1][-1] == "10.0.0.1:53,10.0.0.2:53", rows


def test_a_restored_fleet_gives_the_same_rows_counts_and_state() -> None:
    """After a restart the first round's series are new to the label cache but their keys are
    pinned by the restored instances: both paths find those keys, not new ones."""
    rounds = list(_fleet_series(8, 6, seed=4))
    before = FeatureExtractor(STEP_MS)
    now = 0.0
    for series in rounds[:3]:
        now += 1
        w = decode(v1_body(series), "1.0", before.labels, max_decoded=16 * MiB, keep=before.series_names)
        before.ingest(w, IngestStats(), now)
    states = [before.instance_state(key, now) for key in before.instance_keys()]
    pair = Pair()
    for ext in (pair.native, pair.python):
        for state in states:
            assert state is not None
            ext.restore_instance(state, now)
    pair.same_state(now)
    pinned = len(pair.native.labels._pinned)
    for series in rounds[3:]:
        now += 1
        pair.feed(v1_body(series), "1.0", now)
        pair.same_state(now)
    # Every series of the restored instances kept its key: none was made twice (only each
    # instance's `up`, which no instance pins, got one).
    assert pinned > 8 * 100 and len(pair.native.labels._pinned) == pinned
    assert pair.native.labels.interned == pinned + 8 and pair.rows >= 8 * 2
    pair.check_state(now)


def test_a_steady_round_is_accumulated_in_c_but_for_the_samples_that_close_steps() -> None:
    """Where the C accumulator stops at a series it could take, everything still comes out right
    (the tests above) but at Python's speed: once a fleet's series are bound, Python's loop gets
    only each instance's sample that closes a step, and the rest of that series' samples."""
    rounds = list(_fleet_series(20, 5, seed=5))
    ext = FeatureExtractor(STEP_MS)
    in_python = 0
    samples = ext._samples

    def counted(s: Any, tss: list[int], vals: list[float], start: int, end: int, *args: Any) -> None:
        nonlocal in_python
        in_python += end - start
        samples(s, tss, vals, start, end, *args)

    ext._samples = counted  # type: ignore[method-assign,assignment]
    stats = IngestStats()
    for i, series in enumerate(rounds):
        if i == len(rounds) - 1:
            in_python, stats = 0, IngestStats()
        w = decode(v1_body(series), "1.0", ext.labels, max_decoded=16 * MiB, keep=ext.series_names)
        ext.ingest(w, stats, float(i))
    assert stats.accepted > 20 * 100, stats
    assert 0 < in_python <= 20, in_python


def test_a_closed_steps_values_are_the_compiled_expressions_bit_for_bit() -> None:
    """_fastfeatures.row against the compiled expressions on steps no fleet sends as well as usual
    ones: NaN, ±Inf, -0.0, huge and tiny sums, buckets out of order, without +Inf, empty, repeated
    bounds, and quantiles at 0 and 1."""
    ext = FeatureExtractor(STEP_MS, native=True)
    table = ext._table
    counters, gauges, hists = list(table.counter_slot), list(table.gauge_index), list(table.hist_index)
    exprs: list[features_mod.Expr] = [features_mod.Rate(c) for c in counters]
    exprs += [features_mod.Value(g) for g in gauges]
    exprs += [features_mod.Share(a, b) for a, b in itertools.permutations(counters[:4], 2)]
    exprs += [features_mod.Quantile(q, h) for h in hists for q in (0.0, 0.25, 0.5, 0.9, 0.99, 1.0)]
    feats = [dataclasses.replace(features_mod.FEATURES[0], expr=e) for e in exprs]
    program = features_mod._program(feats, table)
    compiled = [e.compile(table) for e in exprs]
    rng = random.Random(7)
    special = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e308, 5e-324, math.inf, -math.inf, math.nan]
    bounds = [-1.0, 0.0, 0.001, 0.005, 0.1, 1.0, 2.5, 10.0, math.inf]

    def number() -> float:
        return rng.choice(special) if rng.random() < 0.3 else rng.choice([rng.uniform(0, 100), rng.expovariate(0.01)])

    checked = 0
    for _ in range(3000):
        nbuckets = rng.randint(0, 12)
        nslots = len(counters) + nbuckets
        acc = array("d", [number() for _ in range(nslots)])
        gauge_values = [number() for _ in gauges]
        orders = []
        for _ in hists:
            les = sorted(rng.choice(bounds) for _ in range(rng.randint(0, nbuckets)))
            if les and rng.random() < 0.7:
                les[-1] = math.inf
            orders.append([(le, rng.randrange(nslots)) for le in les])
        elapsed = rng.choice([15.0, 0.001, 1e-300, 60.0, rng.uniform(0.1, 100)])
        step = features_mod.Step(acc, gauge_values, [features_mod._cumulative(acc, o) for o in orders], elapsed)
        with np.errstate(over="ignore"):  # a sum beyond float32's range is +-Inf on both paths
            want = np.array([fn(step) for fn in compiled], dtype=np.float32)
        got = np.empty(len(exprs), dtype=np.float32)
        features_mod._fastfeatures.row(program, acc, gauge_values, orders, elapsed, got)  # type: ignore[attr-defined]
        assert got.tobytes() == want.tobytes(), (acc, gauge_values, orders, elapsed)
        checked += 1
    assert checked == 3000


def test_a_closed_steps_values_refuse_what_does_not_fit() -> None:
    """A slot beyond the sums, a gauge or histogram beyond the step's, a buffer of another type:
    an error, not a read out of bounds."""
    row = features_mod._fastfeatures.row  # type: ignore[attr-defined]
    out = np.empty(1, dtype=np.float32)
    rate_of = struct.pack("=iiqd", 0, 5, 0, 0.0)
    with pytest.raises(IndexError):
        row(rate_of, array("d", [1.0] * 5), [], [], 15.0, out)
    with pytest.raises(IndexError):
        row(struct.pack("=iiqd", 1, 2, 0, 0.0), array("d"), [1.0, 2.0], [], 15.0, out)
    with pytest.raises(IndexError):
        row(struct.pack("=iiqd", 3, 0, 0, 0.5), array("d", [1.0]), [], [[(math.inf, 3)]], 15.0, out)
    with pytest.raises(IndexError):
        row(struct.pack("=iiqd", 3, 1, 0, 0.5), array("d", [1.0]), [], [[(math.inf, 0)]], 15.0, out)
    with pytest.raises(TypeError):
        row(rate_of, array("f", [1.0] * 6), [], [], 15.0, out)
    with pytest.raises(TypeError):
        row(rate_of, array("d", [1.0] * 6), [], [], 15.0, np.empty(1, dtype=np.float64))
    with pytest.raises(ValueError):
        row(rate_of, array("d", [1.0] * 6), [], [], 15.0, np.empty(2, dtype=np.float32))
    # Numbers it reads from lists are floats (so no Python code runs while it walks them).
    with pytest.raises(TypeError):
        row(struct.pack("=iiqd", 3, 0, 0, 0.5), array("d", [1.0]), [], [[(1, 0)]], 15.0, out)
    with pytest.raises(TypeError):
        row(struct.pack("=iiqd", 1, 0, 0, 0.0), array("d"), [1], [], 15.0, out)
    row(rate_of, array("d", [0.0] * 5 + [30.0]), [], [], 15.0, out)
    assert out[0] == 2.0
    # An expression it has no operation for is refused when the table is made, not misread.
    odd = dataclasses.replace(features_mod.FEATURES[0], expr=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no C operation"):
        features_mod._program([odd], FeatureExtractor(STEP_MS)._table)


def test_an_instances_series_values_refuse_a_key_not_bound() -> None:
    """The C reader of an instance's series for a snapshot takes only bound series keys: anything
    else is an error naming where it is, not a read of another object's memory."""
    series_values = features_mod._fastfeatures.series_values  # type: ignore[attr-defined]
    ext = FeatureExtractor(STEP_MS, native=True)
    fleet = SyntheticFleet(2, seed=1, scrape_interval_s=15.0, start_ms=1_700_000_000_000)
    for body in fleet.scrape_payloads():
        ext.ingest(decode(snappy.compress(body), "1.0", ext.labels, max_decoded=16 * MiB, keep=ext.series_names))
    bound = ext._instances[ext.instance_keys()[0]].series
    assert len(series_values(bound)) == 40 * len(bound) and len(bound) > 100
    unbound = ext.labels.intern((("__name__", "coredns_dns_requests_total"), ("instance", "x"), ("job", "y")))
    for bad in ([*bound, unbound], [*bound[:3], object()], [bound[0], bound[0].labels]):
        with pytest.raises(TypeError, match=r"keys\[\d+\] is not a bound series"):
            series_values(bad)
    with pytest.raises(TypeError):
        series_values(tuple(bound))

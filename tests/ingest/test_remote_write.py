"""Remote-write decoding: content negotiation, limits, 1.0 and 2.0 messages, invalid series."""

from __future__ import annotations

import gc
import math
import struct

import pytest
import snappy

from detectord.errors import RemoteWriteError
from detectord.ingest import remote_write as rw
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.ingest.remote_write import (
    STALE_NAN,
    LabelCache,
    declared_length,
    decode,
    encode_v1,
    encode_v2,
    is_stale_marker,
    negotiate,
)
from tests.ingest.test_decoder_differential import decoded_outcome
from tests.support import v1_body, v2_body

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("ctype", "enc", "version"),
    [
        ("application/x-protobuf", "snappy", "1.0"),
        ("application/x-protobuf;proto=prometheus.WriteRequest", "snappy", "1.0"),
        ("application/x-protobuf; proto=io.prometheus.write.v2.Request", "snappy", "2.0"),
        (None, "snappy", "1.0"),
    ],
)
def test_negotiate(ctype: str | None, enc: str, version: str) -> None:
    assert negotiate(ctype, enc) == version


@pytest.mark.parametrize(
    ("ctype", "enc"),
    [
        ("application/json", "snappy"),
        ("image/png", "snappy"),
        ("application/x-protobuf;proto=io.prometheus.write.v3.Request", "snappy"),
        ("application/x-protobuf", "gzip"),
        ("application/x-protobuf", "deflate"),
        ("application/x-protobuf", None),
    ],
)
def test_negotiate_refuses_with_415(ctype: str, enc: str | None) -> None:
    with pytest.raises(RemoteWriteError) as info:
        negotiate(ctype, enc)
    assert info.value.status == 415


def test_declared_length_checked_before_decompressing() -> None:
    body = snappy.compress(b"\x00" * (2 * MiB))
    assert declared_length(body) == 2 * MiB
    with pytest.raises(RemoteWriteError) as info:
        decode(body, "1.0", LabelCache(), max_decoded=MiB)
    assert info.value.status == 413


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff\xff\xff", b"not snappy at all", snappy.compress(b"\xff\xff\xff")])
def test_corrupt_bodies_are_400(body: bytes) -> None:
    with pytest.raises(RemoteWriteError) as info:
        decode(body, "1.0", LabelCache(), max_decoded=MiB)
    assert info.value.status == 400


def _v1(*series: tuple[dict[str, str], list[tuple[int, float]]]) -> bytes:
    req = pb1.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k, v in labels.items():  # deliberately in the caller's order
            ts.labels.add(name=k, value=v)
        for t, x in samples:
            ts.samples.add(timestamp=t, value=x)
    return encode_v1(req)


def test_v1_repeated_series_and_sorting() -> None:
    name = {"__name__": "coredns_dns_requests_total", "job": "dns", "instance": "a"}
    w = decode(
        _v1((name, [(1000, 1.0)]), (name, [(2000, 2.0)]), (dict(reversed(name.items())), [(3000, 3.0)])),
        "1.0",
        LabelCache(),
        max_decoded=MiB,
    )
    assert w.samples == 3 and w.invalid_series == 0
    keys = {id(k) for k in w.keys}
    assert len(keys) == 1, "the same label set, in any order, is one series"
    assert w.keys[0].labels[0] == ("__name__", "coredns_dns_requests_total")


def test_v1_invalid_series_refused_rest_kept() -> None:
    good = {"__name__": "go_goroutines", "instance": "a"}
    w = decode(
        _v1(({"instance": "a"}, [(1, 1.0)]), (good, [(1, 2.0)]), ({"__name__": "x", "a": "1"}, [])),
        "1.0",
        LabelCache(),
        max_decoded=MiB,
    )
    assert len(w.keys) == 1 and w.invalid_series == 2
    assert "no __name__" in (w.first_error or "")


def test_future_samples_refused() -> None:
    w = decode(
        _v1(({"__name__": "go_goroutines"}, [(10_000, 1.0)])), "1.0", LabelCache(), max_decoded=MiB, max_ts_ms=5_000
    )
    assert w.invalid_series == 1 and "future" in (w.first_error or "")


def _v2(symbols: list[str], series: list[tuple[list[int], list[tuple[int, float]]]]) -> bytes:
    req = pb2.Request(symbols=symbols)
    for refs, samples in series:
        ts = req.timeseries.add(labels_refs=refs)
        for t, x in samples:
            ts.samples.add(timestamp=t, value=x)
    return encode_v2(req)


def test_v2_symbols_refs_unsorted_labels_and_special_values() -> None:
    symbols = ["", "job", "dns", "__name__", "coredns_dns_requests_total", "instance", "a:9153", "go_goroutines"]
    body = _v2(
        symbols,
        [
            ([5, 6, 3, 4, 1, 2], [(1000, 1.0), (2000, math.inf), (3000, -math.inf)]),  # unsorted refs
            ([3, 7, 5, 6], [(1000, float("nan")), (2000, STALE_NAN)]),
        ],
    )
    w = decode(body, "2.0", LabelCache(), max_decoded=MiB)
    assert w.invalid_series == 0 and w.samples == 5
    (k1, s1), (_k2, s2) = w.series()
    assert k1.labels == (("__name__", "coredns_dns_requests_total"), ("instance", "a:9153"), ("job", "dns"))
    assert s1[1][1] == math.inf and s1[2][1] == -math.inf
    assert math.isnan(s2[0][1]) and not is_stale_marker(s2[0][1])
    assert is_stale_marker(s2[1][1])
    assert struct.pack("<d", s2[1][1]) == struct.pack("<Q", 0x7FF0000000000002)


def test_v2_invalid_refs() -> None:
    symbols = ["", "__name__", "up"]
    body = _v2(symbols, [([1, 2], [(1, 1.0)]), ([1, 9], [(1, 1.0)]), ([1], [(1, 1.0)]), ([1, 2], [])])
    w = decode(body, "2.0", LabelCache(), max_decoded=MiB)
    assert len(w.keys) == 1 and w.invalid_series == 3


def test_v2_symbols_must_start_empty() -> None:
    with pytest.raises(RemoteWriteError) as info:
        decode(_v2(["x", "__name__", "up"], [([1, 2], [(1, 1.0)])]), "2.0", LabelCache(), max_decoded=MiB)
    assert info.value.status == 400


def test_v1_body_sent_as_v2_is_a_400_or_empty() -> None:
    """A 1.0 body labelled 2.0 parses as garbage fields; it must not crash the decoder."""
    body = _v1(({"__name__": "go_goroutines", "instance": "a"}, [(1, 1.0)]))
    try:
        w = decode(body, "2.0", LabelCache(), max_decoded=MiB)
    except RemoteWriteError as exc:
        assert exc.status == 400
    else:
        assert w.keys == []


def test_c_and_python_decoders_agree() -> None:
    from detectord.ingest import remote_write

    if remote_write._fastdecode is None:  # type: ignore[attr-defined]
        pytest.skip("the C decoder is not built here (no compiler at install time)")
    from detectord.ingest.remote_write import decode_v1_bytes

    req = pb1.WriteRequest()
    for i in range(50):
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value="coredns_dns_requests_total" if i % 5 else "")
        ts.labels.add(name="instance", value=f"i{i % 7}")
        for k in range(i % 3):
            ts.samples.add(timestamp=1000 * k + i, value=float(i * k) if i % 11 else float("nan"))
        if i % 13 == 0:
            ts.histograms.add(count_int=3, zero_count_int=3)
        if i % 19 == 0:
            ts.histograms.add(count_int=3)  # its buckets hold none of the 3: the series is refused
        if i % 17 == 0:
            ts.exemplars.add(value=1.0, timestamp=5)
    req.metadata.add(metric_family_name="x")
    raw = req.SerializeToString()
    a = decode_v1_bytes(raw, LabelCache(), max_ts_ms=1500, use_c=True)
    b = decode_v1_bytes(raw, LabelCache(), max_ts_ms=1500, use_c=False)

    assert decoded_outcome(a) == decoded_outcome(b)
    assert a.invalid_series > 0 and a.histograms > 0 and a.exemplars > 0 and a.metadata == 1
    with pytest.raises(RemoteWriteError):
        decode(snappy.compress(raw[:-3]), "1.0", LabelCache(), max_decoded=MiB)


KEEP = frozenset({"coredns_dns_requests_total", "up"})


def _whole_cluster(version: str) -> bytes:
    """A kept series, two others (one of them with labels no check would pass), and a series with
    two names, which only the full path can judge."""
    node = {"__name__": "node_cpu_seconds_total", "cpu": "0", "mode": "idle", "instance": "n1:9100"}
    bad = {"__name__": "kube_pod_info", "": "x", "uid": "u1"}
    kept = {"__name__": "coredns_dns_requests_total", "job": "dns", "instance": "a"}
    if version == "1.0":
        req = pb1.WriteRequest()
        for labels, n in ((node, 2), (bad, 1), (kept, 1)):
            ts = req.timeseries.add()
            for k, v in labels.items():
                ts.labels.add(name=k, value=v)
            for t in range(n):
                ts.samples.add(timestamp=1000 + t, value=1.0)
        twice = req.timeseries.add()
        twice.labels.add(name="__name__", value="node_load1")
        twice.labels.add(name="__name__", value="node_load5")
        twice.samples.add(timestamp=1000, value=1.0)
        return encode_v1(req)
    symbols = ["", *{s for d in (node, bad, kept) for kv in d.items() for s in kv}, "node_load1", "node_load5"]
    at = {s: i for i, s in enumerate(symbols)}
    series = [
        ([at[s] for kv in d.items() for s in kv], [(1000 + t, 1.0) for t in range(n)])
        for d, n in ((node, 2), (bad, 1), (kept, 1))
    ]
    series.append(([at["__name__"], at["node_load1"], at["__name__"], at["node_load5"]], [(1000, 1.0)]))
    return _v2(symbols, series)


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_series_of_other_metrics_are_only_counted(version: str, use_c: bool) -> None:
    """A whole cluster's remote write: what no feature reads is counted, neither checked nor cached."""
    cache = LabelCache()
    w = decode(_whole_cluster(version), version, cache, max_decoded=MiB, use_c=use_c, keep=KEEP)  # type: ignore[arg-type]
    assert [k.name for k in w.keys] == ["coredns_dns_requests_total"]
    assert w.ignored == 3, "the node series' two samples and the invalid kube series' one"
    assert w.samples == 5 and w.invalid_series == 1, "two __name__ labels: refused by the full path"
    assert "duplicate label names" in (w.first_error or "")
    assert len(cache) == 1, "only the kept series is in the label cache"
    # Without keep, every series is decoded and checked, as offline tools do.
    w = decode(_whole_cluster(version), version, LabelCache(), max_decoded=MiB, use_c=use_c)  # type: ignore[arg-type]
    assert w.ignored == 0 and len(w.keys) == 2 and w.invalid_series == 2


def _unread_but_invalid(version: str) -> bytes:
    """Series no feature reads that a receiver must still refuse: an empty metric name with an
    exemplar, and a native histogram whose buckets do not add up to its count."""
    empty = {"__name__": "", "instance": "a"}
    hist = {"__name__": "minimal_hist", "instance": "a"}
    if version == "1.0":
        req = pb1.WriteRequest()
        ts = req.timeseries.add()
        for k, v in empty.items():
            ts.labels.add(name=k, value=v)
        ts.samples.add(timestamp=1000, value=1.0)
        ts.exemplars.add(value=1.0, timestamp=1000).labels.add(name="trace_id", value="t")
        ts = req.timeseries.add()
        for k, v in hist.items():
            ts.labels.add(name=k, value=v)
        ts.histograms.add(count_int=3, timestamp=1000)
        return encode_v1(req)
    symbols = ["", *dict.fromkeys(s for d in (empty, hist) for kv in d.items() for s in kv), "trace_id", "t"]
    at = {s: i for i, s in enumerate(symbols)}
    req = pb2.Request(symbols=symbols)
    ts = req.timeseries.add(labels_refs=[at[s] for kv in empty.items() for s in kv])
    ts.samples.add(timestamp=1000, value=1.0)
    ts.exemplars.add(labels_refs=[at["trace_id"], at["t"]], value=1.0, timestamp=1000)
    ts = req.timeseries.add(labels_refs=[at[s] for kv in hist.items() for s in kv])
    ts.histograms.add(count_int=3, timestamp=1000)
    return encode_v2(req)


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_unread_series_with_an_empty_name_or_a_bad_histogram_are_refused(version: str, use_c: bool) -> None:
    """What the receiver compliance suite checks holds for metrics no feature reads, too."""
    w = decode(_unread_but_invalid(version), version, LabelCache(), max_decoded=MiB, use_c=use_c, keep=KEEP)  # type: ignore[arg-type]
    assert w.ignored == 0 and not w.keys
    assert w.invalid_series == 2, w.first_error
    assert w.refused == {"labels": 1, "histogram": 1}


@pytest.mark.parametrize(("version", "use_c"), [("1.0", True), ("1.0", False), ("2.0", False)])
def test_series_share_their_label_pairs_and_strings(version: str, use_c: bool) -> None:
    """A fleet's series repeat a few label names and values: the keys hold each pair once, so
    tracking a CoreDNS instance's hundred-odd series does not cost a copy of its labels per series."""
    series = [
        (
            {"__name__": "coredns_dns_request_duration_seconds_bucket", "instance": f"10.0.0.{i}:9153", "le": le},
            [(1000, 1.0)],
        )
        for i in (1, 2)
        for le in ("0.001", "0.01", "+Inf")
    ]
    body = v1_body(series) if version == "1.0" else v2_body(series)
    cache = LabelCache()
    w = decode(body, version, cache, max_decoded=MiB, use_c=use_c)  # type: ignore[arg-type]
    assert len(w.keys) == 6
    pairs = {id(p): p for k in w.keys for p in k.labels}
    assert len(pairs) == 6, "one __name__ pair, two instance pairs, three le pairs"
    strings = {id(s) for p in pairs.values() for s in p}
    assert len(strings) == 9, "__name__, its value, instance, two addresses, le and three bounds"
    # A label set seen again after the pairs table started afresh is still the same one key.
    first = w.keys[0]
    cache.turn()
    again = decode(body, version, cache, max_decoded=MiB, use_c=use_c)  # type: ignore[arg-type]
    assert again.keys[0] is first


@pytest.mark.skipif(rw._fastdecode is None, reason="the C decoder is not built here")  # type: ignore[attr-defined]
def test_a_requests_columns_are_not_walked_by_the_cyclic_gc() -> None:
    """A big request's columns hold hundreds of thousands of keys and numbers: tracked, every
    collection while it is ingested would walk them with the GIL held and stall the event loop
    (tests/serve/test_event_loop.py). They hold nothing that refers back to them, so no cycle."""
    cache = rw.LabelCache()
    labels = {"__name__": "coredns_dns_requests_total", "instance": "a:9153", "job": "coredns"}
    w = rw.decode(v1_body([(labels, [(1_000, 1.0), (2_000, 2.0)])]), "1.0", cache, max_decoded=2**20)
    assert w.samples == 2 and len(w.keys) == 1
    assert not any(gc.is_tracked(col) for col in (w.keys, w.counts, w.timestamps, w.values))

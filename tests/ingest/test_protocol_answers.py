"""Exact remote-write answers: native histograms validated as Prometheus's receiver does, Written
headers that count only accepted series, a body that is not the message its Content-Type names
refused, Prometheus's label and series limits, and work bounded by a request's bytes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import snappy

from detectord.config import Config, parse_config
from detectord.errors import ConfigError, RemoteWriteError
from detectord.ingest import remote_write
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.ingest.remote_write import LabelCache, WriteLimits, decode, encode_v1, encode_v2
from tests.support import V1_HEADERS, V2_HEADERS, metric, running_server, test_config

MiB = 1024 * 1024
USE_C = [True, False] if remote_write._fastdecode is not None else [False]  # type: ignore[attr-defined]

HistogramMsg = Any  # pb1.Histogram or pb2.Histogram: the same fields


def good_int(h: HistogramMsg) -> None:
    # Buckets 2, 1, 3 (deltas 2, -1, 2) in two spans, 1 in the zero bucket: 7 observations.
    h.count_int, h.zero_count_int, h.sum, h.schema = 7, 1, 12.5, 0
    h.positive_spans.add(offset=-1, length=2)
    h.positive_spans.add(offset=3, length=1)
    h.positive_deltas.extend([2, -1, 2])


def good_float(h: HistogramMsg) -> None:
    h.count_float, h.zero_count_float, h.sum, h.schema = 4.5, 0.5, 3.0, 3
    h.negative_spans.add(offset=0, length=2)
    h.negative_counts.extend([1.0, 3.0])


def bad_count(h: HistogramMsg) -> None:
    good_int(h)
    h.count_int = 8  # the compliance suite's bad_count_histogram: count disagrees with its buckets


def bad_float_count(h: HistogramMsg) -> None:
    good_float(h)
    h.count_float = 1.0


def bad_spans(h: HistogramMsg) -> None:
    good_int(h)
    h.positive_deltas.append(1)  # 4 deltas, spans covering 3


def negative_offset(h: HistogramMsg) -> None:
    good_int(h)
    h.positive_spans[1].offset = -2


def negative_bucket(h: HistogramMsg) -> None:
    good_int(h)
    del h.positive_deltas[:]
    h.positive_deltas.extend([2, -3, 5])  # absolute counts 2, -1, 4
    h.count_int = 6


def bad_schema(h: HistogramMsg) -> None:
    good_int(h)
    h.schema = 9


def nan_sum_small_count(h: HistogramMsg) -> None:
    good_int(h)
    h.sum = math.nan
    h.count_int = 6  # with a NaN sum the count may exceed the buckets, never fall short


BAD: dict[str, tuple[Callable[[Any], None], str]] = {
    "count": (bad_count, "count 8 does not match the 7 observations in its buckets"),
    "float_count": (bad_float_count, "count 1 does not match the 4.5 observations in its buckets"),
    "spans": (bad_spans, "positive spans cover 3 buckets but 4 deltas are given"),
    "offset": (negative_offset, "positive span 1 has a negative offset -2"),
    "negative": (negative_bucket, "a positive bucket count -1 is negative"),
    "schema": (bad_schema, "schema 9 is out of range (-4 to 8, or -53 for custom buckets)"),
    "nan_sum": (nan_sum_small_count, "count 6 is less than the 7 observations in its buckets"),
}


def _v1_hist(fill: Callable[[Any], None]) -> bytes:
    req = pb1.WriteRequest()
    ts = req.timeseries.add()
    ts.labels.add(name="__name__", value="rpc_seconds")
    fill(ts.histograms.add(timestamp=1000))
    return encode_v1(req)


def _v2_hist(fill: Callable[[Any], None]) -> bytes:
    req = pb2.Request(symbols=["", "__name__", "rpc_seconds"])
    ts = req.timeseries.add(labels_refs=[1, 2])
    fill(ts.histograms.add(timestamp=1000))
    return encode_v2(req)


@pytest.mark.parametrize("fill", [good_int, good_float])
def test_valid_native_histograms_are_written(fill: Callable[[Any], None]) -> None:
    for use_c in USE_C:
        w = decode(_v1_hist(fill), "1.0", LabelCache(), max_decoded=MiB, use_c=use_c)
        assert (w.histograms, w.invalid_series, w.first_error) == (1, 0, None)
    w = decode(_v2_hist(fill), "2.0", LabelCache(), max_decoded=MiB)
    assert (w.histograms, w.invalid_series, w.first_error) == (1, 0, None)


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_native_histograms_are_refused_with_the_reason(case: str) -> None:
    fill, why = BAD[case]
    want = f"series rpc_seconds{{}} has an invalid native histogram: {why}"
    for use_c in USE_C:
        w = decode(_v1_hist(fill), "1.0", LabelCache(), max_decoded=MiB, use_c=use_c)
        assert (w.histograms, w.invalid_series, w.first_error, w.refused) == (0, 1, want, {"histogram": 1})
    w = decode(_v2_hist(fill), "2.0", LabelCache(), max_decoded=MiB)
    assert (w.histograms, w.invalid_series, w.first_error, w.refused) == (0, 1, want, {"histogram": 1})


# ---- a body that is not the message its Content-Type names ----------------------------------


def _v1_body() -> bytes:
    req = pb1.WriteRequest()
    ts = req.timeseries.add()
    ts.labels.add(name="__name__", value="up")
    ts.samples.add(timestamp=int(time.time() * 1000), value=1.0)
    return encode_v1(req)


def _v2_body() -> bytes:
    req = pb2.Request(symbols=["", "__name__", "up"])
    req.timeseries.add(labels_refs=[1, 2]).samples.add(timestamp=int(time.time() * 1000), value=1.0)
    return encode_v2(req)


@pytest.mark.parametrize("use_c", USE_C)
def test_a_body_of_the_other_version_is_refused_not_dropped(use_c: bool) -> None:
    with pytest.raises(RemoteWriteError) as info:
        decode(_v2_body(), "1.0", LabelCache(), max_decoded=MiB, use_c=use_c)
    assert info.value.status == 400
    assert info.value.reason == (
        "protobuf: body is not a prometheus.WriteRequest message: it has field 4; "
        "a remote-write 2.0 body sent with the 1.0 Content-Type?"
    )
    with pytest.raises(RemoteWriteError) as info:
        decode(_v1_body(), "2.0", LabelCache(), max_decoded=MiB, use_c=use_c)
    assert info.value.status == 400
    assert info.value.reason == (
        "protobuf: body is not a io.prometheus.write.v2.Request message: it has field 1; "
        "a remote-write 1.0 body sent with the 2.0 Content-Type?"
    )


@pytest.mark.parametrize("use_c", USE_C)
def test_an_empty_request_is_valid_in_both_versions(use_c: bool) -> None:
    for version in ("1.0", "2.0"):
        w = decode(bytes(snappy.compress(b"")), version, LabelCache(), max_decoded=MiB, use_c=use_c)
        assert (w.samples, w.invalid_series, w.first_error) == (0, 0, None)


# ---- limits ----------------------------------------------------------------------------------


def test_limits_are_read_from_the_web_section_and_checked() -> None:
    cfg = parse_config("web: {label_name_length_limit: 100, label_value_length_limit: 0, label_limit: 8}")
    assert WriteLimits.of(cfg.web) == WriteLimits(label_name_length=100, label_value_length=0, labels=8)
    assert WriteLimits.of(Config().web) == WriteLimits()
    for key in ("label_name_length_limit", "label_value_length_limit", "label_limit", "remote_write_series_limit"):
        with pytest.raises(ConfigError) as info:
            parse_config(f"web: {{{key}: -1}}")
        assert info.value.key == f"web.{key}"


LIMITS = WriteLimits(label_name_length=16, label_value_length=32, labels=4, series=3)


def _v1_series(*label_sets: dict[str, str]) -> bytes:
    req = pb1.WriteRequest()
    for labels in label_sets:
        ts = req.timeseries.add()
        for k in sorted(labels):
            ts.labels.add(name=k, value=labels[k])
        ts.samples.add(timestamp=1000, value=1.0)
    return encode_v1(req)


@pytest.mark.parametrize(
    ("labels", "kind", "why"),
    [
        ({"__name__": "up", "n" * 17: "x"}, "label_name_length", "longer than label_name_length_limit 16"),
        ({"__name__": "up", "job": "v" * 33}, "label_value_length", "longer than label_value_length_limit 32"),
        ({"__name__": "up", "a": "1", "b": "2", "c": "3", "d": "4"}, "label_limit", "more than label_limit 4"),
    ],
)
def test_label_limits_refuse_the_series_and_name_the_limit(labels: dict[str, str], kind: str, why: str) -> None:
    body = _v1_series({"__name__": "up", "job": "ok"}, labels)
    for use_c in USE_C:
        w = decode(body, "1.0", LabelCache(limits=LIMITS), max_decoded=MiB, use_c=use_c)
        assert [k.labels for k in w.keys] == [(("__name__", "up"), ("job", "ok"))]
        assert w.refused == {kind: 1} and why in (w.first_error or "")


def test_a_10_mib_label_value_is_refused_by_default() -> None:
    body = _v1_series({"__name__": "up", "job": "x" * (10 * MiB)})
    for use_c in USE_C:
        w = decode(body, "1.0", LabelCache(), max_decoded=64 * MiB, use_c=use_c)
        assert w.keys == [] and w.refused == {"label_value_length": 1}
        assert len(w.first_error or "") < 400  # the reason does not quote the value back


@pytest.mark.parametrize("use_c", USE_C)
def test_the_series_limit_refuses_the_whole_request(use_c: bool) -> None:
    body = _v1_series(*({"__name__": "up", "job": str(i)} for i in range(4)))
    with pytest.raises(RemoteWriteError) as info:
        decode(body, "1.0", LabelCache(limits=LIMITS), max_decoded=MiB, use_c=use_c)
    assert info.value.status == 400
    assert info.value.reason == "request has more than 3 series, the limit per request"
    assert getattr(info.value, "kind", None) == "series_limit"


def test_an_amplification_body_costs_at_most_a_second_of_cpu_per_mib() -> None:
    # 3 MiB of snappy holding 33.5 million empty 2.0 series (it took 121 s of the ingest thread).
    raw = b"\x22\x00" + b"\x2a\x00" * 33_500_000
    body = bytes(snappy.compress(raw))
    assert 2.9 * MiB < len(body) < 3.1 * MiB
    for use_c in USE_C:
        t0 = time.process_time()
        with pytest.raises(RemoteWriteError) as info:
            decode(body, "2.0", LabelCache(), max_decoded=64 * MiB, use_c=use_c)
        cpu = time.process_time() - t0
        assert info.value.status == 400 and "more than 2000000 series" in info.value.reason
        if use_c:  # the pure-Python fallback (no compiler at install) is slower, but bounded too
            assert cpu <= len(body) / MiB, f"{cpu:.1f} s of CPU for a {len(body) / MiB:.1f} MiB body"


# ---- over HTTP: Written headers, Content-Type mismatches and the metrics ----------------------


def _v2_request(now: int) -> bytes:
    """A 2.0 request whose accepted series hold 3 samples, 2 histograms and 3 exemplars, and a
    rejected series of each of four kinds that holds samples or histograms and exemplars. The
    refused ones are of metrics detectord reads (`up`): a metric it does not read is counted and
    not judged (test_remote_write.py::test_series_of_other_metrics_are_only_counted)."""
    symbols = ["", "__name__", "up", "job", "a", "rpc_seconds", "trace_id", "abc", "x" * 100, "coredns"]
    req = pb2.Request(symbols=symbols)
    ex = {"value": 1.0, "timestamp": now, "labels_refs": [6, 7]}
    # Accepted: samples with an exemplar, and a histogram series with an exemplar.
    ok = req.timeseries.add(labels_refs=[1, 2, 3, 4])
    for i in range(3):
        ok.samples.add(timestamp=now + i, value=1.0)
    ok.exemplars.add(**ex)
    ok.exemplars.add(**ex)
    h = req.timeseries.add(labels_refs=[1, 5])
    good_int(h.histograms.add(timestamp=now))
    good_float(h.histograms.add(timestamp=now + 1))
    h.exemplars.add(**ex)
    # Refused, each with exemplars and samples or a good histogram beside the fault.
    no_name = req.timeseries.add(labels_refs=[3, 4])  # no __name__
    no_name.samples.add(timestamp=now, value=1.0)
    no_name.exemplars.add(**ex)
    bad_hist = req.timeseries.add(labels_refs=[1, 2, 3, 9])
    good_int(bad_hist.histograms.add(timestamp=now))
    bad_count(bad_hist.histograms.add(timestamp=now))
    bad_hist.exemplars.add(**ex)
    future = req.timeseries.add(labels_refs=[1, 2, 3, 9])
    future.samples.add(timestamp=now + 3_600_000, value=1.0)
    future.exemplars.add(**ex)
    too_long = req.timeseries.add(labels_refs=[1, 2, 3, 8])  # job value beyond label_value_length_limit
    good_int(too_long.histograms.add(timestamp=now))
    too_long.exemplars.add(**ex)
    return encode_v2(req)


async def _post(s: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, str]:
    async with s.post(url, data=body, headers=headers) as r:
        return r.status, r.headers, await r.text()


async def test_written_headers_count_only_accepted_series_and_mismatches_are_400() -> None:
    cfg = test_config(web={"label_value_length_limit": 64})
    async with running_server(cfg) as srv, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        now = int(time.time() * 1000)
        body = _v2_request(now)
        status, headers, text = await _post(s, url, body, V2_HEADERS)
        assert status == 400 and text.startswith('some series were refused: series {job="a"} has no __name__')
        assert headers["X-Prometheus-Remote-Write-Samples-Written"] == "3"
        assert headers["X-Prometheus-Remote-Write-Histograms-Written"] == "2"
        assert headers["X-Prometheus-Remote-Write-Exemplars-Written"] == "3"

        # The four partial rejections one at a time: each leaves the accepted counts exact.
        req = pb2.Request.FromString(snappy.uncompress(body))
        for i, why in enumerate(["no __name__", "invalid native histogram", "too far in the future", "label_value"]):
            one = pb2.Request(symbols=req.symbols)
            one.timeseries.extend([req.timeseries[0], req.timeseries[1], req.timeseries[2 + i]])
            status, headers, text = await _post(s, url, encode_v2(one), V2_HEADERS)
            assert status == 400 and why in text, (why, text)
            written = [
                headers[f"X-Prometheus-Remote-Write-{k}-Written"] for k in ("Samples", "Histograms", "Exemplars")
            ]
            assert written == ["3", "2", "3"], (why, written)

        # The other version's body under each Content-Type: 400 with a reason, never 204.
        status, headers, text = await _post(s, url, _v1_body(), V2_HEADERS)
        assert status == 400 and "a remote-write 1.0 body sent with the 2.0 Content-Type" in text
        assert headers["X-Prometheus-Remote-Write-Samples-Written"] == "0"
        status, _, text = await _post(s, url, _v2_body(), V1_HEADERS)
        assert status == 400 and "a remote-write 2.0 body sent with the 1.0 Content-Type" in text
        # An empty request is valid under both.
        for h in (V1_HEADERS, V2_HEADERS):
            status, _, _ = await _post(s, url, bytes(snappy.compress(b"")), h)
            assert status == 204

        async with s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
            text = await r.text()
        assert metric(text, "detectord_remote_write_rejected_requests_total", reason="wrong_message") == 2
        assert metric(text, "detectord_remote_write_rejected_series_total", reason="labels") == 2
        assert metric(text, "detectord_remote_write_rejected_series_total", reason="histogram") == 2
        assert metric(text, "detectord_remote_write_rejected_series_total", reason="future") == 2
        assert metric(text, "detectord_remote_write_rejected_series_total", reason="label_value_length") == 2


async def test_limits_come_from_the_config_and_are_counted() -> None:
    cfg = test_config(web={"label_name_length_limit": 8, "remote_write_series_limit": 2})
    async with running_server(cfg) as srv, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        status, _, text = await _post(s, url, _v1_series({"__name__": "up", "long_name": "x"}), V1_HEADERS)
        assert status == 400 and "longer than label_name_length_limit 8" in text
        body = _v1_series(*({"__name__": "up", "job": str(i)} for i in range(3)))
        status, _, text = await _post(s, url, body, V1_HEADERS)
        assert status == 400 and "request has more than 2 series, the limit per request" in text
        async with s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
            text = await r.text()
        assert metric(text, "detectord_remote_write_rejected_series_total", reason="label_name_length") == 1
        assert metric(text, "detectord_remote_write_rejected_requests_total", reason="series_limit") == 1

"""Small remote-write bodies for tests, built with the project's own protobuf code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.ingest.remote_write import encode_v1, encode_v2

V1_HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
              "X-Prometheus-Remote-Write-Version": "0.1.0"}
V2_HEADERS = {"Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
              "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "2.0.0"}

Series = tuple[Mapping[str, str], Iterable[tuple[int, float]]]


def v1_request(series: Iterable[Series]) -> pb1.WriteRequest:
    req = pb1.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k in sorted(labels):
            ts.labels.add(name=k, value=labels[k])
        for t, v in samples:
            ts.samples.add(timestamp=t, value=v)
    return req


def v1_body(series: Iterable[Series]) -> bytes:
    return encode_v1(v1_request(series))


def v2_body(series: Iterable[Series]) -> bytes:
    symbols: dict[str, int] = {"": 0}
    req = pb2.Request()

    def ref(s: str) -> int:
        return symbols.setdefault(s, len(symbols))

    for labels, samples in series:
        refs: list[int] = []
        for k, v in labels.items():  # v2 labels may come unsorted
            refs += [ref(k), ref(v)]
        ts = req.timeseries.add(labels_refs=refs)
        for t, v in samples:
            ts.samples.add(timestamp=t, value=v)
    req.symbols.extend(symbols)
    return encode_v2(req)


def coredns_scrape(instance: str, ts_ms: int, step: int, *, qps: float = 100.0, servfail: float = 0.0,
                   job: str = "coredns") -> list[Series]:
    """One scrape of a minimal CoreDNS at step `step` (counters = rate × step count)."""
    base = {"job": job, "instance": instance}
    total = qps * step
    fail = servfail * step
    return [
        ({**base, "__name__": "coredns_dns_requests_total", "server": "dns://:53", "type": "A"}, [(ts_ms, total)]),
        ({**base, "__name__": "coredns_dns_responses_total", "rcode": "NOERROR", "plugin": "cache"},
         [(ts_ms, total - fail)]),
        ({**base, "__name__": "coredns_dns_responses_total", "rcode": "SERVFAIL", "plugin": ""}, [(ts_ms, fail)]),
        ({**base, "__name__": "go_goroutines"}, [(ts_ms, 40.0)]),
        ({**base, "__name__": "process_resident_memory_bytes"}, [(ts_ms, 4e7)]),
    ]

"""What the tests share: remote-write bodies built with the project's own protobuf code, slices
of the committed lab data, an in-process server's config, alert-state drivers and a parser for
`/metrics` text."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from detectord.alerting.notifier import AlertmanagerNotifier
from detectord.alerting.states import Alert, AlertStates
from detectord.config import AlertingConfig, Duration
from detectord.detectors.base import Detector
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest._proto import remote_write_v2_pb2 as pb2
from detectord.ingest.remote_write import LabelCache, SeriesKey, encode_v1, encode_v2
from detectord.recordings.format import RecordingWriter, read_records
from detectord.recordings.truth import read_truth, truth_path
from detectord.serve.metrics import DaemonMetrics
from detectord.serve.sink import ScoreSink

REPO = Path(__file__).resolve().parents[1]
# Tests may be pointed at other recordings (NAME.drec[.xz] beside NAME.truth.json).
DATA = Path(os.environ.get("DETECTORD_TEST_DATA", REPO / "data"))


# ---- remote-write bodies ---------------------------------------------------------------------

V1_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
V2_HEADERS = {
    "Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "2.0.0",
}

Series = tuple[Mapping[str, str], Iterable[tuple[int, float]]]


def v1_request(series: Iterable[Series]) -> pb1.WriteRequest:
    req = pb1.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k in sorted(labels):
            ts.labels.add(name=k, value=labels[k])
        for t, x in samples:
            ts.samples.add(timestamp=t, value=x)
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
        for t, x in samples:
            ts.samples.add(timestamp=t, value=x)
    req.symbols.extend(symbols)
    return encode_v2(req)


def coredns_scrape(
    instance: str, ts_ms: int, step: int, *, qps: float = 100.0, servfail: float = 0.0, job: str = "coredns"
) -> list[Series]:
    """One scrape of a minimal CoreDNS at step `step` (counters = rate × step count)."""
    base = {"job": job, "instance": instance}
    total = qps * step
    fail = servfail * step
    return [
        ({**base, "__name__": "coredns_dns_requests_total", "server": "dns://:53", "type": "A"}, [(ts_ms, total)]),
        (
            {**base, "__name__": "coredns_dns_responses_total", "rcode": "NOERROR", "plugin": "cache"},
            [(ts_ms, total - fail)],
        ),
        ({**base, "__name__": "coredns_dns_responses_total", "rcode": "SERVFAIL", "plugin": ""}, [(ts_ms, fail)]),
        ({**base, "__name__": "go_goroutines"}, [(ts_ms, 40.0)]),
        ({**base, "__name__": "process_resident_memory_bytes"}, [(ts_ms, 4e7)]),
    ]


def metric(text: str, metric_name: str, **labels: str) -> float:
    """The value of the first sample of `metric_name` with `labels` in /metrics text, else 0."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == metric_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# ---- an in-process server --------------------------------------------------------------------


def test_config(**sections: dict[str, Any]) -> Any:
    """A Config for an in-process server on a free port, with small batches; `sections` override."""
    from detectord.config import Config

    base = Config()
    defaults: dict[str, dict[str, Any]] = {
        "web": {"listen_address": "127.0.0.1:0", "shutdown_timeout": 2.0},
        "ingest": {"step": 1.0},
        # Data time runs a step a second: the 5 s model at 1 s steps, as any_step allows.
        "model": {"path": REPO / "models/default", "any_step": True},
        "inference": {"max_batch": 64, "queue_size": 4096},
        # Nothing kept across tests unless a test gives its own state.dir.
        "state": {"dir": ""},
    }
    for name, values in sections.items():
        defaults.setdefault(name, {}).update(values)
    kwargs = {name: dataclasses.replace(getattr(base, name), **values) for name, values in defaults.items()}
    return dataclasses.replace(base, **kwargs)


test_config.__test__ = False  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def running_server(cfg: Any, **server: Any) -> AsyncIterator[Any]:
    """A started in-process `Server(cfg, **server)`, shut down on exit."""
    from detectord.serve.server import Server

    srv = Server(cfg, **server)
    await srv.startup()
    try:
        yield srv
    finally:
        await srv.shutdown()


# ---- alert states ----------------------------------------------------------------------------

LABELS = {"job": "coredns", "instance": "10.0.0.1:9153"}
KEY = ("coredns", "10.0.0.1:9153")
TOP = [("rcode_servfail_share", 12.34, 0.41), ("latency_p99_seconds", 8.1, 2.0512), ("qps", -3.0, 12345.0)]
EXTERNAL = "http://detectord.example:9464"


def config(**kw: Any) -> AlertingConfig:
    base: dict[str, Any] = {
        "for_": Duration(60),
        "keep_firing_for": Duration(120),
        "resend_interval": Duration(5),
        "resolved_resend_for": Duration(1),
        "labels": {"cluster": "eu1"},
    }
    base.update(kw)
    return AlertingConfig(**base)


def states(**kw: Any) -> AlertStates:
    return AlertStates(config(**kw), model_name="lstm-ae", external_url=EXTERNAL)


def step(
    s: AlertStates,
    ts: float,
    score: float,
    top: Sequence[tuple[str, float, float]] = TOP,
    key: tuple[str, ...] = KEY,
    labels: dict[str, str] = LABELS,
) -> list[Alert]:
    return s.observe(key, labels, ts, score, 0.042, top)


# ---- the committed lab data ------------------------------------------------------------------


def score_sink(model: Detector, cfg: AlertingConfig, registry: CollectorRegistry) -> ScoreSink:
    """The daemon's score sink on `model`, instances keyed by job and instance, its metrics on
    `registry`, no Alertmanager to send to."""
    url = "http://detectord:9464"
    return ScoreSink(
        model,
        cfg,
        instance_labels=("job", "instance"),
        metrics=DaemonMetrics(registry, ("job", "instance")),
        notifier=AlertmanagerNotifier(cfg, registry=registry, external_url=url),
        external_url=url,
        history=16,
    )


def slice_recording(src: Path, dst: Path, minutes: float, skip_minutes: float = 0.0) -> Path:
    """The records of `src` that arrived in [skip, skip + minutes) after its first, and its truth
    file with the events that start in that span."""
    truth = read_truth(truth_path(src))
    start = None
    with RecordingWriter(dst) as w:
        for rec in read_records(src):
            start = start if start is not None else rec.arrival_ns
            t = (rec.arrival_ns - start) / 60e9
            if t < skip_minutes:
                continue
            if t >= skip_minutes + minutes:
                break
            w.append(rec.body, rec.version, rec.arrival_ns)
    assert start is not None
    lo = start // 1_000_000 + int(skip_minutes * 60_000)
    hi = lo + int(minutes * 60_000)
    truth.events = [e for e in truth.events if e.start_ms and e.end_ms and lo <= e.start_ms and e.end_ms < hi]
    truth.write(truth_path(dst))
    return dst


def small_data(out: Path, *, normal_minutes: float = 30.0, fault_minutes: float = 16.0) -> Path:
    """A directory with the first minutes of the normal run and of the first fault run."""
    out.mkdir(parents=True, exist_ok=True)
    normal = sorted(DATA.glob("normal.drec*"))[0]
    faults = sorted(DATA.glob("faults-1.drec*"))[0]
    slice_recording(normal, out / "normal.drec", normal_minutes)
    slice_recording(faults, out / "faults-1.drec", fault_minutes)
    return out


# ---- peers with faults --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def slow_proxy(url: str, *, delay_s: float) -> AsyncIterator[str]:
    """`url` behind a proxy that answers each POST `delay_s` late: a slow Prometheus on demand
    (a fake only in its delay; every byte is the real server's)."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        keep = ("Content-Type", "Content-Encoding", "Accept-Encoding", "X-Prometheus-Remote-Read-Version")
        headers = {k: request.headers[k] for k in keep if k in request.headers}
        async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(url, data=body, headers=headers) as r:
            data, ctype = await r.read(), r.headers.get("Content-Type", "")
        await asyncio.sleep(delay_s)
        return web.Response(status=r.status, body=data, headers={"Content-Type": ctype})

    async with remote_read_endpoint(handle) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def remote_read_endpoint(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A remote-read endpoint (`POST /api/v1/read` on a free port) answered by `handler`: for
    faults a real Prometheus cannot be made to produce on demand."""
    app = web.Application()
    app.router.add_post("/api/v1/read", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/read"
    finally:
        await runner.cleanup()


# detectord in the end-to-end tests: a 1 s step (the default model set's nearest model), alerts
# firing after 5 s and resent every 2 s to the Alertmanager at {am}.
E2E_DETECTORD_CONFIG = """
ingest:
  step: 1s
model:
  any_step: true
alerting:
  for: 5s
  keep_firing_for: 15s
  resend_interval: 2s
  alertmanagers:
    - url: {am}
logging:
  format: console
"""


def cache_state(cache: LabelCache) -> tuple[object, ...]:
    """What a label cache holds and counts, comparable between two caches of one process (their
    digests share its key)."""

    def held(table: Mapping[Any, Any]) -> dict[Any, object]:
        return {raw: hit.labels if isinstance(hit, SeriesKey) else hit for raw, hit in table.items()}

    return (
        held(cache._raw),
        held(cache._old),
        held(cache._keys),
        held(cache._old_keys),
        held(cache._pinned),
        cache.young_bytes,
        cache.old_bytes,
        cache.pinned_bytes,
        cache.interned,
        cache.turns,
    )

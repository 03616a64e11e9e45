"""The HTTP surface of `detectord serve`: remote-write status codes, /metrics, lifecycle endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import snappy
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from detectord.children import free_port
from detectord.config import AlertmanagerConfig, Duration, load_config
from detectord.errors import ConfigError
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from detectord.ingest.remote_write import encode_v1
from detectord.serve.server import Server
from tests.support import (
    V1_HEADERS,
    V2_HEADERS,
    coredns_scrape,
    metric,
    running_server,
    states,
    step,
    test_config,
    v1_body,
    v2_body,
)

NOW = int(time.time() * 1000)


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] = V1_HEADERS
) -> tuple[int, str, Any]:
    async with session.post(url, data=body, headers=headers) as r:
        return r.status, await r.text(), r.headers


async def test_status_codes(server_factory: Callable[..., Any]) -> None:
    async with server_factory(web={"max_body_size": 64 * 1024, "max_decoded_body_size": 256 * 1024}) as srv:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        good = v1_body(coredns_scrape("a:9153", NOW, 1))
        async with aiohttp.ClientSession() as s:
            assert (await post(s, url, good))[0] == 204
            assert (await post(s, url, good, {**V1_HEADERS, "Content-Type": "application/json"}))[0] == 415
            assert (await post(s, url, good, {**V1_HEADERS, "Content-Encoding": "gzip"}))[0] == 415
            status, text, _ = await post(s, url, b"\x05garbage")
            assert status == 400 and "snappy" in text
            status, text, _ = await post(s, url, snappy.compress(b"\xff\xff\xff\xff"))
            assert status == 400 and "protobuf" in text
            # Over the compressed limit.
            status, text, _ = await post(s, url, b"\x00" * (65 * 1024))
            assert status == 413 and "limit" in text
            # A tiny body that declares 1 GiB decompressed: refused before decompressing.
            status, text, _ = await post(s, url, b"\x80\x80\x80\x80\x04" + b"\x00" * 10)
            assert status == 413 and "declared" in text
            async with s.get(url) as r:
                assert r.status == 405
            # Invalid series: 400 with a reason, the valid rest is still taken.
            mixed = v1_body([({"job": "x"}, [(NOW, 1.0)]), *coredns_scrape("b:9153", NOW, 1)])
            status, text, _ = await post(s, url, mixed)
            assert status == 400 and "__name__" in text
            async with s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
                text = await r.text()
        assert metric(text, "detectord_remote_write_requests_total", code="204", protocol="1.0") == 1
        assert metric(text, "detectord_remote_write_requests_total", code="415", protocol="unknown") == 1
        assert metric(text, "detectord_remote_write_requests_total", code="415", protocol="1.0") == 1
        assert metric(text, "detectord_remote_write_requests_total", code="413", protocol="1.0") == 2
        assert metric(text, "detectord_remote_write_requests_total", code="400", protocol="1.0") == 3
        assert metric(text, "detectord_samples_total", outcome="accepted") == 10
        assert metric(text, "detectord_samples_total", outcome="rejected") == 1


async def test_remote_write_2_written_headers(server_factory: Callable[..., Any]) -> None:
    async with server_factory() as srv:
        url = f"http://127.0.0.1:{srv.port}/api/v1/write"
        series = coredns_scrape("a:9153", NOW, 1)
        series.append(
            (
                {"__name__": "coredns_panics_total", "instance": "a:9153", "job": "coredns"},
                [(NOW, float("nan")), (NOW + 1, float("inf")), (NOW + 2, float("-inf"))],
            )
        )
        async with aiohttp.ClientSession() as s:
            status, _, headers = await post(s, url, v2_body(series), V2_HEADERS)
            assert status == 204
            assert headers["X-Prometheus-Remote-Write-Samples-Written"] == "8"
            assert headers["X-Prometheus-Remote-Write-Histograms-Written"] == "0"
            assert headers["X-Prometheus-Remote-Write-Exemplars-Written"] == "0"
            # A series without __name__ is refused (400) but the rest is written and counted.
            bad = v2_body([({"job": "x"}, [(NOW, 1.0)]), *coredns_scrape("a:9153", NOW + 1000, 1)])
            status, text, headers = await post(s, url, bad, V2_HEADERS)
            assert status == 400 and "__name__" in text
            assert headers["X-Prometheus-Remote-Write-Samples-Written"] == "5"
            # Even a 415 answers with the headers, so a 2.0 sender can tell.
            status, _, headers = await post(s, url, b"x", {**V2_HEADERS, "Content-Encoding": "zstd"})
            assert status == 415 and headers["X-Prometheus-Remote-Write-Samples-Written"] == "0"


async def test_resent_requests_and_ignored_series_are_counted(server_factory: Callable[..., Any]) -> None:
    async with server_factory() as srv:
        base = f"http://127.0.0.1:{srv.port}"
        body = v1_body([*coredns_scrape("a:9153", NOW, 1), ({"__name__": "node_load1", "instance": "n"}, [(NOW, 1.0)])])
        meta = pb1.WriteRequest()
        meta.metadata.add(
            type=pb1.MetricMetadata.COUNTER,
            metric_family_name="coredns_dns_requests_total",
            help="Counter of DNS requests made per zone, protocol and family.",
        )
        metadata_only = encode_v1(meta)
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # a 5xx-and-retry would re-send the same bytes
                assert (await post(s, f"{base}/api/v1/write", body))[0] == 204
            assert (await post(s, f"{base}/api/v1/write", metadata_only))[0] == 204
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
        assert metric(text, "detectord_samples_total", outcome="accepted") == 5
        assert metric(text, "detectord_samples_total", outcome="duplicate") == 10
        assert metric(text, "detectord_samples_total", outcome="ignored") == 3
        assert metric(text, "detectord_ignored_total", kind="metadata") == 1


async def test_lifecycle_endpoints_and_metrics(server_factory: Callable[..., Any]) -> None:
    async with server_factory() as srv:
        base = f"http://127.0.0.1:{srv.port}"
        async with aiohttp.ClientSession() as s:
            for path in ("/-/healthy", "/-/ready"):
                async with s.get(base + path) as r:
                    assert r.status == 200
            async with s.get(base + "/metrics") as r:
                text = await r.text()
            async with s.get(base + "/api/v1/instances") as r:
                assert (await r.json())["status"] == "success"
        assert metric(text, "detectord_ready") == 1
        assert metric(text, "detectord_model_threshold") > 0
        assert metric(text, "detectord_model_info", name=srv.pipeline.model.name) == 1


async def test_instances_warm_then_get_scores(server_factory: Callable[..., Any]) -> None:
    async with server_factory() as srv:
        base = f"http://127.0.0.1:{srv.port}"
        window = srv.pipeline.model.window
        t0 = NOW - (window + 10) * 1000
        async with aiohttp.ClientSession() as s:

            async def scrape(k: int) -> None:
                series = [*coredns_scrape("a:9153", t0 + k * 1000, k), *coredns_scrape("b:9153", t0 + k * 1000, k)]
                assert (await post(s, f"{base}/api/v1/write", v1_body(series)))[0] == 204

            for k in range(window // 2):
                await scrape(k)
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
            assert metric(text, "detectord_instances", state="warming") == 2
            assert "detectord_anomaly_score{" not in text
            for k in range(window // 2, window + 6):
                await scrape(k)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                async with s.get(f"{base}/metrics") as r:
                    text = await r.text()
                if metric(text, "detectord_windows_scored_total") >= 4:
                    break
                await asyncio.sleep(0.05)
        assert metric(text, "detectord_instances", state="scoring") == 2
        assert metric(text, "detectord_instances", state="warming") == 0
        for inst in ("a:9153", "b:9153"):
            assert f'detectord_anomaly_score{{instance="{inst}",job="coredns"}}' in text


async def test_idle_instances_are_evicted_and_the_cap_refuses_new_ones(server_factory: Callable[..., Any]) -> None:
    async with server_factory(ingest={"instance_ttl": 1.0, "max_instances": 2}) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        async with aiohttp.ClientSession() as s:
            body = v1_body(
                [
                    *coredns_scrape("a:9153", NOW, 1),
                    *coredns_scrape("b:9153", NOW, 1),
                    *coredns_scrape("c:9153", NOW, 1),
                ]
            )
            assert (await post(s, f"{base}/api/v1/write", body))[0] == 204
            async with s.get(f"{base}/api/v1/instances") as r:
                listed = {i["labels"]["instance"] for i in (await r.json())["data"]}
            assert listed == {"a:9153", "b:9153"}  # c was refused: the cap never evicts a live instance
            # Only b keeps sending; a goes quiet and is forgotten after instance_ttl.
            deadline = time.monotonic() + 10
            k = 2
            while (
                time.monotonic() < deadline and srv.registry.get_sample_value("detectord_instances_evicted_total") < 1
            ):
                assert (await post(s, f"{base}/api/v1/write", v1_body(coredns_scrape("b:9153", NOW + k, k))))[0] == 204
                k += 1
                await asyncio.sleep(0.2)
            async with s.get(f"{base}/api/v1/instances") as r:
                listed = {i["labels"]["instance"] for i in (await r.json())["data"]}
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
        assert listed == {"b:9153"}
        assert metric(text, "detectord_instances_evicted_total") == 1
        assert metric(text, "detectord_samples_total", outcome="instance_limit") == 5


async def test_shutdown_keeps_to_one_budget_and_says_what_it_could_not_deliver() -> None:
    # An alert queued for an Alertmanager that is down: the flush waits for it only as long as the
    # shutdown budget has left, and the log says what is lost.
    down = AlertmanagerConfig(url=f"http://127.0.0.1:{free_port()}", timeout=Duration(0.5))
    srv = Server(test_config(web={"shutdown_timeout": Duration(2.0)}, alerting={"alertmanagers": (down,)}))
    await srv.startup()
    assert srv.notifier is not None
    srv.notifier.submit(step(states(for_=Duration(0)), time.time(), 5.0))
    with capture_logs() as logs:
        t0 = time.monotonic()
        await srv.shutdown()
        took = time.monotonic() - t0
    assert 1.0 < took < 2.0 + 0.5, took
    lost = [e for e in logs if e["event"] == "alerts not delivered"]
    assert lost and lost[0]["alertmanager"] == down.url and lost[0]["count"] == 1


async def test_the_reload_endpoint_is_off_unless_lifecycle_is_enabled_and_refuses_other_sites() -> None:
    async with running_server(test_config()) as srv, aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{srv.port}/-/reload") as r:
            assert r.status == 403
            assert await r.text() == "Lifecycle API is not enabled.\n"
        assert metric(generate_latest(srv.registry).decode(), "detectord_reloads_total", result="success") == 0
    async with running_server(test_config(), enable_lifecycle=True) as srv, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{srv.port}"
        # A form on another site, posted from an operator's browser.
        evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        async with s.post(f"{base}/-/reload", data="x", headers=evil) as r:
            assert r.status == 403
            assert "cross-origin" in await r.text()
        async with s.post(f"{base}/-/reload", headers={"Origin": base}) as r:
            assert r.status == 500  # its own page may; this in-process server has no config file to reload
            assert "no config file to reload" in await r.text()
        async with s.post(f"{base}/-/reload") as r:  # curl, Prometheus-style tooling: no Origin
            assert r.status == 500


async def test_a_reload_takes_new_inference_settings_at_once(tmp_path: Path) -> None:
    path = tmp_path / "detectord.yml"
    base = "web: {listen_address: '127.0.0.1:0'}\nstate: {dir: ''}\nmodel: {any_step: true}\ningest: {step: 1s}\n"
    path.write_text(base)
    async with running_server(load_config(str(path)), config_path=str(path)) as srv:
        assert srv.pipeline.worker.max_batch != 2
        path.write_text(base + "inference: {max_batch: 2, queue_size: 3}\n")
        await srv.reload("test")
        assert srv.pipeline.worker.max_batch == 2 and srv.pipeline.worker._queue_size == 3


async def test_a_reload_that_changes_what_only_a_restart_changes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "detectord.yml"
    base = "web: {listen_address: '127.0.0.1:0'}\nstate: {dir: ''}\nmodel: {any_step: true}\n"
    path.write_text(base + "ingest: {step: 1s}\n")
    async with running_server(load_config(str(path)), config_path=str(path)) as srv:
        path.write_text(base + "ingest: {step: 1s, huge_pages: false}\n")
        with pytest.raises(ConfigError, match=r"ingest\.huge_pages.*restart detectord"):
            await srv.reload("test")
        assert srv.cfg.ingest.huge_pages
        text = generate_latest(srv.registry).decode()
        assert metric(text, "detectord_reloads_total", result="failure") == 1
        assert metric(text, "detectord_config_last_reload_successful") == 0

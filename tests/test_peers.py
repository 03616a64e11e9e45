"""The real peers work as the end-to-end tests assume: CoreDNS forwards, Prometheus scrapes it,
dnsperf loads it, and a broken upstream shows as SERVFAIL on the edge."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from tests.peers.dnsperf import run_dnsperf
from tests.peers.prometheus import run_prometheus

pytestmark = pytest.mark.e2e


async def _wait_value(prom, query: str, pred, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    value = float("nan")
    while time.monotonic() < deadline:
        result = await prom.query(query)
        if result:
            value = float(result[0]["value"][1])
            if pred(value):
                return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"{query}: last value {value}")


async def test_edge_upstream_prometheus_dnsperf(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up, edge = Ports(), Ports()
    async with (
        run_coredns(upstream_corefile(up, zone), up, workdir=tmp_path, name="up") as upstream,
        run_coredns(edge_corefile(edge, [upstream.address]), edge, workdir=tmp_path, name="edge"),
        run_prometheus({"coredns": [edge.metrics_target]}, workdir=tmp_path / "prom") as prom,
        run_dnsperf(edge.dns, qps=200, duration_s=60, workdir=tmp_path),
    ):
        await _wait_value(prom, "sum(rate(coredns_dns_requests_total[5s]))", lambda v: v > 50)
        await _wait_value(prom, "sum(rate(coredns_proxy_request_duration_seconds_count[5s]))", lambda v: v > 0)
        await _wait_value(prom, 'sum(rate(coredns_dns_responses_total{rcode="NOERROR"}[5s]))', lambda v: v > 10)
        await upstream.reconfigure(upstream_corefile(up, zone, "servfail"))
        # A reload that breaks nothing else: the edge still forwards.
        await _wait_value(prom, 'sum(rate(coredns_dns_responses_total{rcode="SERVFAIL"}[5s]))', lambda v: v > 10)

"""The real peers work as the end-to-end tests assume: CoreDNS forwards, Prometheus scrapes it,
dnsperf loads it, and an upstream slower than forward's timeout shows as SERVFAIL on the edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.peers.coredns import Ports, edge_corefile, run_coredns, upstream_corefile, zone_file
from lab.peers.dnsperf import run_dnsperf
from lab.peers.prometheus import run_prometheus

pytestmark = pytest.mark.e2e

SERVFAIL = 'sum(rate(coredns_dns_responses_total{rcode="SERVFAIL"}[5s])) or vector(0)'


@pytest.mark.timeout(90)
async def test_edge_forwards_and_a_slow_upstream_shows_as_servfail(tmp_path: Path) -> None:
    zone = zone_file(tmp_path / "example.test.zone")
    up, edge = Ports(), Ports()
    async with (
        run_coredns(upstream_corefile(up, zone), up, workdir=tmp_path, name="up") as upstream,
        run_coredns(edge_corefile(edge, [up.address]), edge, workdir=tmp_path, name="edge"),
        run_prometheus({"coredns": [edge.metrics_target]}, workdir=tmp_path / "prom") as prom,
        run_dnsperf(edge.dns, qps=200, duration_s=80, workdir=tmp_path),
    ):
        await prom.wait_for("sum(rate(coredns_dns_requests_total[5s]))", lambda v: v > 150)
        await prom.wait_for(
            'sum(rate(coredns_proxy_request_duration_seconds_count{proxy_name="forward"}[5s]))', lambda v: v > 1
        )
        await prom.wait_for('sum(rate(coredns_dns_responses_total{rcode="NXDOMAIN"}[5s]))', lambda v: v > 5)
        assert await prom.value('sum(rate(coredns_dns_responses_total{rcode="NOERROR"}[5s]))') > 100
        assert await prom.value(SERVFAIL) == 0

        await upstream.reconfigure(upstream_corefile(up, zone, "slow"), wait_ready=False)
        await prom.wait_for(SERVFAIL, lambda v: v > 10)
        await prom.wait_for("sum(coredns_proxy_healthcheck_failures_total)", lambda v: v > 0)

        await upstream.reconfigure(upstream_corefile(up, zone))
        # Once the cached SERVFAILs (5 s) and the timed-out queries have left the window.
        await prom.wait_for(
            'sum(increase(coredns_dns_responses_total{rcode="SERVFAIL"}[3s])) or vector(0)',
            lambda v: v == 0,
            timeout=30,
        )
        assert await prom.value('sum(rate(coredns_dns_responses_total{rcode="NOERROR"}[3s]))') > 100

"""The real peers work as the end-to-end tests assume: CoreDNS forwards, Prometheus scrapes it,
dnsperf loads it, and an upstream slower than forward's timeout shows as SERVFAIL on the edge."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from detectord.children import ephemeral_ports
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


@pytest.mark.timeout(120)
async def test_a_crashed_server_always_gets_its_ports_back(tmp_path: Path) -> None:
    """The lab's ports lie below the kernel's ephemeral range: however many client sockets come
    and go while a server is down, none can take its port, and it restarts on it every time."""
    zone = zone_file(tmp_path / "example.test.zone")
    ports = Ports()
    lo, _ = ephemeral_ports()
    assert all(p < lo for p in (ports.dns, ports.metrics, ports.ready, ports.health)), (ports, lo)
    for attempt in range(3):
        async with run_coredns(upstream_corefile(ports, zone), ports, workdir=tmp_path, name=f"up{attempt}") as dns:
            dns.proc.kill()  # SIGKILL, as the crash primitive does
            dns.proc.wait()
            # Clients churn through ephemeral ports while it is down.
            clients = []
            for _ in range(2000):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = socket.socket(socket.AF_INET, kind)
                    s.bind(("127.0.0.1", 0))
                    clients.append(s)
            taken = {s.getsockname()[1] for s in clients}
            for s in clients:
                s.close()
            assert not taken & {ports.dns, ports.metrics, ports.ready, ports.health}
    # And it came back each time on the same ports (run_coredns waited for /ready on them).

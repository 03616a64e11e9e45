"""What a lab fleet is made of: its topology (edges, upstreams, caches) and its base load. The
settings of a scenario file's `topology` and `load` sections, read by lab/fleet.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detectord.config import Duration


@dataclass(frozen=True)
class Topology:
    edges: int = 4
    upstreams: int = 2
    # Edges made ready but not started or discovered: the `join` primitive brings one into
    # service (a new pod the service discovery finds). Named after the edges: edge-<edges + i>.
    standby_edges: int = 0
    # A node-local DNS cache (NodeLocal DNSCache) in front of every edge: the clients ask it, it
    # forwards its misses to the edge over TCP. Named nodelocal-<i>, job node-local-dns.
    node_local: bool = False
    # The edges' cache: TTL cap in seconds and capacity (entries, success and denial each).
    cache_ttl: int = 30
    cache_capacity: int = 9984
    # Names in the upstreams' zone that the load asks for (more names than cache entries make
    # a small cache churn).
    zone_names: int = 2000
    # The path from each edge to its upstream, as a real resolver 5-50 ms away: every query is
    # delayed by upstream_rtt ± upstream_jitter (faults on the path add to it).
    upstream_rtt: Duration = Duration(0.0)
    upstream_jitter: Duration = Duration(0.0)


@dataclass(frozen=True)
class LoadSpec:
    # Mean queries a second per edge; edges differ by ±spread around it.
    qps: float = 150.0
    spread: float = 0.3
    # The rate breathes: qps * (1 + depth * sin(2 pi t / period)), out of phase across edges.
    modulation_period: Duration = Duration(600.0)
    modulation_depth: float = 0.3
    # Search-path lookups (name.<ns>.svc.cluster.local.) that end in NXDOMAIN.
    nxdomain_share: float = 0.15
    # Popularity skew of names (Zipf exponent).
    zipf: float = 1.0
    # Length of one dnsperf run (a new rate is set at each).
    segment: Duration = Duration(10.0)
    # The query types asked for besides the NXDOMAIN search-path lookups, by weight (None: A 50,
    # AAAA 25, TXT 8, SRV 7, MX 5, PTR 5).
    qtypes: Mapping[str, float] | None = None

"""What a lab fleet is made of: its topology (edges, upstreams, caches) and its base load. The
settings of a scenario file's `topology` and `load` sections, read by lab/fleet.py."""

from __future__ import annotations

from dataclasses import dataclass

from detectord.config import Duration


@dataclass(frozen=True)
class Topology:
    edges: int = 4
    upstreams: int = 2
    # The edges' cache: TTL cap in seconds and capacity (entries, success and denial each).
    cache_ttl: int = 30
    cache_capacity: int = 9984
    # Names in the upstreams' zone that the load asks for.
    zone_names: int = 2000


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

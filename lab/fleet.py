"""The lab's topology: edge CoreDNS servers (caching forwarders) and the upstream CoreDNS servers they
forward to, each edge through its own relay (lab/chaos.py), all on loopback; plus the base DNS load.

Edge i forwards to upstream i mod U. Nodes can be killed and started again (same ports, same
Corefile), reconfigured, paused and throttled; standby edges join the service discovery later
and edges leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from detectord.children import ChildError
from lab.chaos import PathFault, Relay, start_relay
from lab.load import DnsperfLoop, Modulation, RateFn
from lab.peers.coredns import (
    CoreDNS,
    Ports,
    edge_corefile,
    nodelocal_corefile,
    run_coredns,
    upstream_corefile,
    zone_file,
)
from lab.peers.dnsperf import QTYPES, query_file
from lab.topology import LoadSpec, Topology

Role = Literal["edge", "upstream", "nodelocal"]
JOBS: dict[Role, str] = {"edge": "coredns-edge", "upstream": "coredns-upstream", "nodelocal": "node-local-dns"}
# What the lab's Prometheus remote-writes: everything CoreDNS exports, its process and Go runtime
# gauges, and the series Prometheus adds per target (`up` is what the CoreDNSDown rule reads).
LAB_KEEP = "coredns_.*|process_.*|go_goroutines|go_threads|go_memstats_heap_inuse_bytes|up|scrape_duration_seconds"
QUERY_FILES_PER_EDGE = 6
QUERIES_PER_FILE = 20000


@dataclass
class Node:
    name: str
    role: Role
    ports: Ports
    workdir: Path
    upstream: str | None = None  # edges: the upstream they forward to (node-local caches: their edge's)
    edge: str | None = None  # node-local caches: the edge they forward to
    relay: Relay | None = None  # edges: the path to that upstream
    coredns: CoreDNS | None = None
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    load: DnsperfLoop | None = None
    queries: list[Path] = field(default_factory=list)
    base_qps: float = 0.0
    # In the service discovery (scraped, judged by the health check): standby edges are not
    # until they join, an edge that leaves is not any more.
    in_service: bool = True
    started: bool = False  # ever: the truth lists the nodes that ran

    @property
    def job(self) -> str:
        return JOBS[self.role]

    @property
    def labels(self) -> dict[str, str]:
        return {"job": self.job, "instance": self.name}

    @property
    def running(self) -> bool:
        return self.coredns is not None and self.coredns.child.alive

    def signal(self, sig: signal.Signals) -> None:
        if self.coredns is not None:
            self.coredns.child.signal(sig)


async def _nothing(targets: dict[str, dict[str, str]]) -> None:
    pass


def _modulated(qps: float, mod: Modulation) -> RateFn:
    return lambda t: qps * mod.factor(t)


class Fleet:
    """A real CoreDNS fleet on loopback: `topology.upstreams` upstreams, `topology.edges` edges, each
    edge forwarding through its own fault-injecting relay to upstream i mod U, and dnsperf load on
    every edge. `start`, `start_load`, `stop`; nodes can be killed, restarted, reconfigured,
    paused and throttled by the fault primitives."""

    def __init__(self, topology: Topology, load: LoadSpec, *, workdir: Path, seed: int) -> None:
        self.topology = topology
        self.load_spec = load
        self.workdir = workdir
        self.seed = seed
        self.nodes: dict[str, Node] = {}
        self.zone = workdir / "example.test.zone"
        self._t0 = 0.0
        # Awaited with metrics_targets() when an edge joins or leaves: the runner's Prometheus
        # rewrites its service discovery files and waits until it scrapes just those.
        self.on_targets_changed: Callable[[dict[str, dict[str, str]]], Awaitable[None]] = _nothing

    # ---- Corefiles --------------------------------------------------------------------------

    def corefile(self, node: Node, *, max_concurrent: int | None = None, extra: str = "") -> str:
        """The node's healthy Corefile, or a variant of it."""
        t = self.topology
        if node.role == "upstream":
            return upstream_corefile(node.ports, self.zone)
        if node.role == "nodelocal":
            assert node.edge is not None
            edge = self.nodes[node.edge]
            return nodelocal_corefile(
                node.ports, edge.ports.address, cache_ttl=t.cache_ttl, cache_capacity=t.cache_capacity
            )
        assert node.relay is not None
        return edge_corefile(
            node.ports,
            [f"127.0.0.1:{node.relay.port}"],
            cache_ttl=t.cache_ttl,
            cache_capacity=t.cache_capacity,
            max_concurrent=max_concurrent,
            loop=True,
            prefer_udp=t.node_local,
            extra=extra,
        )

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        t = self.topology
        self.workdir.mkdir(parents=True, exist_ok=True)
        zone_file(self.zone, t.zone_names)
        for u in range(t.upstreams):
            node = Node(f"upstream-{u}", "upstream", Ports(), self.workdir)
            self.nodes[node.name] = node
            await self._first_start(node)
        for e in range(t.edges + t.standby_edges):
            up = self.nodes[f"upstream-{e % t.upstreams}"]
            base = PathFault(delay_s=float(t.upstream_rtt), jitter_s=float(t.upstream_jitter))
            relay = await start_relay(0, ("127.0.0.1", up.ports.dns), seed=self.seed * 1000 + e, base=base)
            node = Node(f"edge-{e}", "edge", Ports(), self.workdir, upstream=up.name, relay=relay)
            self.nodes[node.name] = node
            if e < t.edges:
                await self._first_start(node)
            else:
                node.in_service = False
        if t.node_local:
            for e in range(t.edges):
                edge = self.nodes[f"edge-{e}"]
                node = Node(
                    f"nodelocal-{e}", "nodelocal", Ports(), self.workdir, upstream=edge.upstream, edge=edge.name
                )
                self.nodes[node.name] = node
                await self._first_start(node)

    def forward_relabel(self) -> list[dict[str, object]]:
        """metric_relabel_configs for the edges' job: forward's `to` label names the upstream's
        address, not the edge's own relay in front of it, so edges that forward to the same
        upstream share `to` as they do in a cluster (detectord groups their alerts by it)."""
        out: list[dict[str, object]] = []
        for edge in self.edges():
            assert edge.relay is not None and edge.upstream is not None
            out.append(
                {
                    "source_labels": ["to"],
                    "regex": re.escape(f"127.0.0.1:{edge.relay.port}"),
                    "target_label": "to",
                    "replacement": self.nodes[edge.upstream].ports.address,
                }
            )
        return out

    async def _first_start(self, node: Node, attempts: int = 3) -> None:
        # A port found free can be taken (by some client's ephemeral port) before CoreDNS binds it.
        for attempt in range(attempts):
            try:
                await self.start_node(node)
                return
            except ChildError:
                if attempt == attempts - 1:
                    raise
                node.ports = Ports()

    async def start_node(self, node: Node) -> None:
        await node.stack.aclose()
        node.stack = contextlib.AsyncExitStack()
        node.coredns = await node.stack.enter_async_context(
            run_coredns(self.corefile(node), node.ports, workdir=node.workdir, name=node.name)
        )
        node.started = True

    async def stop_node(self, node: Node) -> None:
        """SIGTERM: CoreDNS drains and exits, as Kubernetes stops a pod."""
        node.signal(signal.SIGTERM)
        await node.stack.aclose()
        node.coredns = None

    async def kill_node(self, node: Node) -> None:
        """SIGKILL, as the OOM killer or a fatal error would end it."""
        node.signal(signal.SIGKILL)
        await node.stack.aclose()
        node.coredns = None

    async def start_load(self) -> None:
        loop = asyncio.get_running_loop()
        edges = self.edges()
        for i, node in enumerate(edges):
            # Off the event loop: the relays carry every edge's traffic on it.
            node.queries = await loop.run_in_executor(None, self._query_files, node, i)
        self._t0 = loop.time()
        for node in edges:
            if node.in_service:
                self._start_edge_load(node)

    def _start_edge_load(self, node: Node) -> None:
        spec = self.load_spec
        edges = self.edges()
        i, n = edges.index(node), len(edges)
        # Edges differ in size, and breathe out of step with each other.
        spread = 1.0 + spec.spread * ((i / max(1, n - 1)) * 2 - 1) if n > 1 else 1.0
        node.base_qps = spec.qps * spread
        mod = Modulation(float(spec.modulation_period), spec.modulation_depth, phase=2 * math.pi * i / max(1, n))
        node.load = DnsperfLoop(
            node.name,
            self.front(node).ports.dns,
            node.queries,
            _modulated(node.base_qps, mod),
            log=self.workdir / f"dnsperf.{node.name}.log",
            segment_s=float(spec.segment),
        )
        node.load.start(self._t0)

    async def join(self, node: Node) -> None:
        """A new edge: started, found by the service discovery, and its clients' load on it."""
        if node.in_service:
            raise ValueError(f"{node.name} is already in service")
        await self._first_start(node)
        node.in_service = True
        await self.on_targets_changed(self.metrics_targets())
        self._start_edge_load(node)

    async def leave(self, node: Node) -> None:
        """An edge taken out: its clients stop, the service discovery drops it, and once Prometheus
        no longer scrapes it, SIGTERM (a scaled-down pod serves on through CoreDNS's lameduck
        while the endpoints change, so it leaves without a failed scrape)."""
        if not node.in_service:
            raise ValueError(f"{node.name} is not in service")
        if node.load is not None:
            await node.load.stop()
            node.load = None
        node.in_service = False
        await self.on_targets_changed(self.metrics_targets())
        await self.stop_node(node)

    def _query_files(self, node: Node, i: int) -> list[Path]:
        spec = self.load_spec
        return [
            query_file(
                self.workdir / f"queries.{node.name}.{k}.txt",
                seed=self.seed * 100 + i * 10 + k,
                n=QUERIES_PER_FILE,
                nxdomain_share=spec.nxdomain_share,
                n_names=self.topology.zone_names,
                qtypes=spec.qtypes or QTYPES,
                zipf=spec.zipf,
            )
            for k in range(QUERY_FILES_PER_EDGE)
        ]

    @property
    def t0(self) -> float:
        """When the load started (event-loop time)."""
        return self._t0

    def elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    def base_rate(self, node: Node, t: float) -> float:
        return node.load.rate(t) if node.load is not None else 0.0

    async def stop(self) -> None:
        for node in self.nodes.values():
            if node.load is not None:
                await node.load.stop()
        for node in reversed(list(self.nodes.values())):
            node.signal(signal.SIGCONT)
            await node.stack.aclose()
            if node.relay is not None:
                node.relay.close()

    # ---- lookups ----------------------------------------------------------------------------

    def edges(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "edge"]

    def front(self, edge: Node) -> Node:
        """The node the edge's clients ask: its node-local cache, or the edge itself."""
        return self.nodes.get(f"nodelocal-{edge.name.removeprefix('edge-')}", edge) if edge.role == "edge" else edge

    def edges_of(self, upstream: Node) -> list[Node]:
        """The edges in service that forward to `upstream`."""
        return [n for n in self.edges() if n.upstream == upstream.name and n.in_service]

    def metrics_targets(self) -> dict[str, dict[str, str]]:
        """What the service discovery lists: every node in service, by job."""
        out: dict[str, dict[str, str]] = {job: {} for job in JOBS.values()}
        for n in self.nodes.values():
            if n.in_service:
                out[n.job][n.name] = n.ports.metrics_target
        return out

    def qps(self) -> float:
        return sum(n.load.current_qps for n in self.edges() if n.load is not None)

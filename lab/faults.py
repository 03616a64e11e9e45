"""Fault primitives: what the lab can do to a node for a span of time. Scenario files compose them
into named anomaly classes; `PRIMITIVES` is the table they are picked from.

Each primitive is its parameters (a dataclass, validated when the scenario loads) plus `apply`
at the span's start, `during` until its end (for faults that repeat), and `revert` after it.
Network faults act on the edge's relay (lab/chaos.py); the rest act on the real CoreDNS process,
its Corefile, or the real dnsperf load.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from detectord.config import Duration
from lab.chaos import PathFault
from lab.fleet import Fleet, Node
from lab.load import DnsperfLoop
from lab.peers.coredns import upstream_corefile
from lab.peers.dnsperf import random_subdomain_file


@dataclass
class Primitive:
    """One thing the lab can do to a node for a span of time; its parameters are its dataclass
    fields, checked when the scenario loads. `apply` at the span's start, `during` until its end
    (repeating faults such as a crash loop), `revert` after it; `affected` is the ground truth:
    the instances whose metrics it moves."""

    roles: ClassVar[tuple[str, ...]] = ("edge", "upstream")
    # It acts on a standby edge (topology.standby_edges), bringing it into service.
    standby: ClassVar[bool] = False
    # What really happened, as it happened ({"instance", "down_ms"} / {"instance", "up_ms"}): the truth keeps it.
    marks: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def mark(self, node: Node, what: str) -> None:
        self.marks.append({"instance": node.name, what: time.time_ns() // 1_000_000})

    async def apply(self, fleet: Fleet, node: Node) -> None:
        pass

    async def during(self, fleet: Fleet, node: Node, stop: asyncio.Event) -> None:
        await stop.wait()

    async def revert(self, fleet: Fleet, node: Node) -> None:
        pass

    def affected(self, fleet: Fleet, node: Node) -> list[Node]:
        """The instances whose metrics this fault moves (the ground truth)."""
        if node.role == "upstream":
            return [node, *fleet.edges_of(node)]
        return [node]


def _paths(fleet: Fleet, node: Node) -> list[Node]:
    return fleet.edges_of(node) if node.role == "upstream" else [node]


@dataclass
class _PathPrimitive(Primitive):
    """A fault on the network path: the edge's own path, or every edge's path to an upstream.
    With `ramp`, it grows from nothing to its full strength over that long (a latency that
    creeps up, a loss rate that grows), then holds."""

    ramp: Duration = Duration(0.0)

    def fault(self, strength: float = 1.0) -> PathFault:
        raise NotImplementedError

    async def apply(self, fleet: Fleet, node: Node) -> None:
        self._set(fleet, node, 0.0 if self.ramp > 0 else 1.0)

    async def during(self, fleet: Fleet, node: Node, stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        while self.ramp > 0:
            strength = min(1.0, (time.monotonic() - t0) / float(self.ramp))
            self._set(fleet, node, strength)
            if strength >= 1.0 or await _wait(stop, 1.0):
                break
        await stop.wait()

    def _set(self, fleet: Fleet, node: Node, strength: float) -> None:
        for edge in _paths(fleet, node):
            assert edge.relay is not None
            edge.relay.fault = self.fault(strength)

    async def revert(self, fleet: Fleet, node: Node) -> None:
        for edge in _paths(fleet, node):
            assert edge.relay is not None
            edge.relay.fault = PathFault()

    def affected(self, fleet: Fleet, node: Node) -> list[Node]:
        return _paths(fleet, node)  # the upstream itself sees fewer queries, nothing else


@dataclass
class UpstreamDelay(_PathPrimitive):
    """Queries reach the upstream `delay` ± `jitter` late; beyond 2 s, forward times out."""

    delay: Duration = Duration(0.5)
    jitter: Duration = Duration(0.0)

    def fault(self, strength: float = 1.0) -> PathFault:
        return PathFault(delay_s=strength * float(self.delay), jitter_s=strength * float(self.jitter))


@dataclass
class UpstreamDrop(_PathPrimitive):
    """A share of the queries to the upstream is lost."""

    probability: float = 1.0

    def fault(self, strength: float = 1.0) -> PathFault:
        if not 0 < self.probability <= 1:
            raise ValueError(f"probability must be in (0, 1], got {self.probability}")
        return PathFault(drop_p=strength * self.probability)


@dataclass
class UpstreamServfail(Primitive):
    """The upstream answers SERVFAIL for the names `match` (a regex; default all) selects."""

    roles: ClassVar[tuple[str, ...]] = ("upstream",)
    match: str = ".*"

    async def apply(self, fleet: Fleet, node: Node) -> None:
        re.compile(self.match)
        assert node.coredns is not None
        await node.coredns.reconfigure(upstream_corefile(node.ports, fleet.zone, servfail_match=self.match))

    async def revert(self, fleet: Fleet, node: Node) -> None:
        assert node.coredns is not None
        await node.coredns.reconfigure(fleet.corefile(node))


@dataclass
class UpstreamStop(Primitive):
    """SIGSTOP: the server keeps its sockets and answers nothing; SIGCONT at the end."""

    roles: ClassVar[tuple[str, ...]] = ("upstream",)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        node.signal(signal.SIGSTOP)

    async def revert(self, fleet: Fleet, node: Node) -> None:
        node.signal(signal.SIGCONT)


@dataclass
class Crash(Primitive):
    """SIGKILL, then started again after `down` (counters reset); with `every`, a crash loop."""

    down: Duration = Duration(5.0)
    every: Duration | None = None

    async def apply(self, fleet: Fleet, node: Node) -> None:
        await self._kill(fleet, node)

    async def during(self, fleet: Fleet, node: Node, stop: asyncio.Event) -> None:
        while True:
            if await _wait(stop, float(self.down)):
                return
            await self._start(fleet, node)
            if self.every is None:
                await stop.wait()
                return
            if await _wait(stop, max(0.0, float(self.every) - float(self.down))):
                return
            await self._kill(fleet, node)

    async def revert(self, fleet: Fleet, node: Node) -> None:
        if not node.running:
            await self._start(fleet, node)

    async def _kill(self, fleet: Fleet, node: Node) -> None:
        await fleet.kill_node(node)
        self.mark(node, "down_ms")

    async def _start(self, fleet: Fleet, node: Node) -> None:
        # On its own ports (below the ephemeral range: no client socket can have taken them); the
        # mark is when it answered again (start_node waits for /ready).
        await fleet.start_node(node)
        self.mark(node, "up_ms")


@dataclass
class QueryFlood(Primitive):
    """The edge's clients send `factor` times their usual rate (the same mix of names). With
    `ramp`, the extra load grows over that long (traffic that doubles over an hour)."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)
    factor: float = 5.0
    ramp: Duration = Duration(0.0)
    _extra: DnsperfLoop | None = field(default=None, init=False, repr=False)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        if self.factor <= 1:
            raise ValueError(f"factor must be > 1, got {self.factor}")
        t0 = asyncio.get_running_loop().time() - fleet.elapsed()
        begun, ramp = fleet.elapsed(), float(self.ramp)

        def share(t: float) -> float:
            return 1.0 if ramp <= 0 else min(1.0, max(0.0, (t - begun) / ramp))

        self._extra = DnsperfLoop(
            f"{node.name}-flood",
            fleet.front(node).ports.dns,
            node.queries,
            lambda t: fleet.base_rate(node, t) * (self.factor - 1) * share(t),
            log=fleet.workdir / f"dnsperf.{node.name}.flood.log",
            segment_s=float(fleet.load_spec.segment),
        )
        self._extra.start(t0)

    async def revert(self, fleet: Fleet, node: Node) -> None:
        if self._extra is not None:
            await self._extra.stop()


@dataclass
class RandomSubdomainFlood(Primitive):
    """`qps` queries a second for unique random names under the zone: all NXDOMAIN, all cache misses."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)
    qps: float = 300.0
    _flood: DnsperfLoop | None = field(default=None, init=False, repr=False)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        span = 3600.0
        path = fleet.workdir / f"random.{node.name}.{random.randrange(10**9)}.txt"
        # Two minutes of unique names (dnsperf then loops over them, by when they have left the
        # denial cache); more would only delay the fault's start while the file is written.
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: random_subdomain_file(path, n=int(self.qps * 120) + 1, seed=random.randrange(10**9))
        )
        self._flood = DnsperfLoop(
            f"{node.name}-random",
            fleet.front(node).ports.dns,
            [path],
            lambda t: self.qps,
            log=fleet.workdir / f"dnsperf.{node.name}.random.log",
            segment_s=span,
        )
        self._flood.start(asyncio.get_running_loop().time())

    async def revert(self, fleet: Fleet, node: Node) -> None:
        if self._flood is not None:
            await self._flood.stop()


@dataclass
class Reload(Primitive):
    """A good Corefile is pushed (the same service, one more hosts entry nobody asks for) and the
    reload plugin loads it: what a config rollout does. CoreDNS sets its plugins up anew."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        # A real change (the reload plugin ignores comments): a name nobody asks for.
        rollout = f"rollout-{time.time_ns()}.invalid"
        hosts = f"\n    hosts {{\n      127.0.0.1 {rollout}\n      fallthrough\n    }}"
        await _reload_edge(fleet, node, fleet.corefile(node, extra=hosts))

    async def revert(self, fleet: Fleet, node: Node) -> None:
        await _reload_edge(fleet, node, fleet.corefile(node))


@dataclass
class Restart(Primitive):
    """SIGTERM, and started again at once on its own ports, as a rolling restart or an upgrade
    does (counters start from 0, the cache empty)."""

    async def apply(self, fleet: Fleet, node: Node) -> None:
        await fleet.stop_node(node)
        self.mark(node, "down_ms")
        await fleet.start_node(node)
        self.mark(node, "up_ms")


@dataclass
class CacheFlush(Reload):
    """The edge's cache is emptied the way operators do it, a Corefile reload (CoreDNS keeps no
    cache across one); the truth marks how many entries it held before and just after. It is
    not undone: the cache fills again by itself."""

    # CoreDNS updates its entries gauge only when it next caches an answer.
    within: Duration = Duration(10.0)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        before = await _cache_entries(node)
        await super().apply(fleet, node)
        deadline = time.monotonic() + float(self.within)
        while True:
            after = await _cache_entries(node)
            flushed = after < max(1.0, before / 4)
            if flushed or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        self.marks.append(
            {
                "instance": node.name,
                "flushed_ms": time.time_ns() // 1_000_000,
                "entries_before": before,
                "entries_after": after,
            }
        )
        if not flushed:
            raise RuntimeError(f"{node.name}: the cache still holds {after:.0f} entries (had {before:.0f})")

    async def revert(self, fleet: Fleet, node: Node) -> None:
        pass


@dataclass
class Join(Primitive):
    """A standby edge is started and comes into the service discovery with its clients' load, as
    a new CoreDNS pod does. It stays."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)
    standby: ClassVar[bool] = True

    async def apply(self, fleet: Fleet, node: Node) -> None:
        await fleet.join(node)
        self.mark(node, "up_ms")


@dataclass
class Leave(Primitive):
    """An edge is taken out of the service discovery and stopped, as a scaled-down pod is. It
    stays out: its series end without a failed scrape."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        await fleet.leave(node)
        self.mark(node, "down_ms")


@dataclass
class ReloadFailure(Primitive):
    """A broken Corefile is pushed (again every `every`, as a config loop retries); the reload
    plugin fails to load it and keeps the old config. The good Corefile is restored at the end."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)
    every: Duration = Duration(10.0)

    async def apply(self, fleet: Fleet, node: Node) -> None:
        self._push(fleet, node, 0)

    async def during(self, fleet: Fleet, node: Node, stop: asyncio.Event) -> None:
        n = 1
        while not await _wait(stop, float(self.every)):
            self._push(fleet, node, n)
            n += 1

    @staticmethod
    def _push(fleet: Fleet, node: Node, n: int) -> None:
        assert node.coredns is not None
        node.coredns.corefile.write_text(fleet.corefile(node, extra=f"\n    no_such_plugin_{n}"))

    async def revert(self, fleet: Fleet, node: Node) -> None:
        await _reload_edge(fleet, node, fleet.corefile(node))


@dataclass
class MaxConcurrent(Primitive):
    """forward's max_concurrent set to `limit`: queries beyond it are REFUSED (with a slow
    upstream, this is the saturation incident)."""

    roles: ClassVar[tuple[str, ...]] = ("edge",)
    limit: int = 10

    async def apply(self, fleet: Fleet, node: Node) -> None:
        await _reload_edge(fleet, node, fleet.corefile(node, max_concurrent=self.limit))

    async def revert(self, fleet: Fleet, node: Node) -> None:
        await _reload_edge(fleet, node, fleet.corefile(node))


@dataclass
class CpuStarvation(Primitive):
    """The process may run `share` of every `period` (SIGSTOP/SIGCONT), as a CFS quota (a
    Kubernetes CPU limit) throttles a container."""

    share: float = 0.2
    period: Duration = Duration(0.1)

    async def during(self, fleet: Fleet, node: Node, stop: asyncio.Event) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"share must be in (0, 1), got {self.share}")
        run, pause = float(self.period) * self.share, float(self.period) * (1 - self.share)
        try:
            while not stop.is_set():
                node.signal(signal.SIGCONT)
                await asyncio.sleep(run)
                node.signal(signal.SIGSTOP)
                await asyncio.sleep(pause)
        finally:
            node.signal(signal.SIGCONT)

    async def revert(self, fleet: Fleet, node: Node) -> None:
        node.signal(signal.SIGCONT)


PRIMITIVES: dict[str, type[Primitive]] = {
    "upstream_delay": UpstreamDelay,
    "upstream_drop": UpstreamDrop,
    "upstream_servfail": UpstreamServfail,
    "upstream_stop": UpstreamStop,
    "crash": Crash,
    "query_flood": QueryFlood,
    "random_subdomain_flood": RandomSubdomainFlood,
    "reload_failure": ReloadFailure,
    "reload": Reload,
    "restart": Restart,
    "cache_flush": CacheFlush,
    "join": Join,
    "leave": Leave,
    "max_concurrent": MaxConcurrent,
    "cpu_starvation": CpuStarvation,
}


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _cache_entries(node: Node) -> float:
    """The edge's cache entries (success and denial) from its own metrics."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(f"http://{node.ports.metrics_target}/metrics") as r,
    ):
        text = await r.text()
    return sum(
        sample.value
        for fam in text_string_to_metric_families(text)
        for sample in fam.samples
        if sample.name == "coredns_cache_entries"
    )


async def _reload_edge(fleet: Fleet, node: Node, text: str) -> None:
    """Write an edge's Corefile and wait until its reload plugin has loaded it."""
    assert node.coredns is not None
    if node.coredns.corefile.read_text() == text:
        return
    await node.coredns.reconfigure(text)

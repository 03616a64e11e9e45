"""A lab run proves its healthy periods were healthy. Every `window` it asks its own Prometheus, and
each edge's relay, how every instance not touched by a fault did over that window, against the
criteria of the scenario's `health` section; the verdict goes into the truth, and data sets
refuse a run whose verdict is invalid.

A window of an instance is judged when no fault that touches its fault domain (an upstream and
the edges behind it) was active in it or in the `recovery` before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from detectord.config import Duration

if TYPE_CHECKING:
    from lab.fleet import Fleet, Node
    from lab.peers.prometheus import Prometheus

CHECKS = ("servfail_share", "refused_share", "load", "up", "relay_dropped", "relay_failed")


@dataclass(frozen=True)
class HealthCriteria:
    """The scenario's `health` section: what a healthy instance does in a window."""

    # SERVFAIL and REFUSED answers, as a share of all answers.
    max_servfail_share: float = 0.01
    max_refused_share: float = 0.01
    # An edge's achieved query rate within this share of its target.
    load_tolerance: float = 0.10
    # Queries the relay dropped or could not send (no socket: EMFILE) outside path faults.
    max_relay_dropped: int = 0
    max_relay_failed: int = 0
    # The run is invalid when any check fails in more than this share of its judged windows.
    max_bad_windows_share: float = 0.02
    window: Duration = Duration(30.0)
    recovery: Duration = Duration(120.0)
    # Windows in the first `settle` after the load starts are not judged (caches fill, rates settle).
    settle: Duration = Duration(30.0)


@dataclass
class Violation:
    instance: str
    check: str
    end_ms: int
    value: float
    limit: float


@dataclass
class HealthVerdict:
    valid: bool
    criteria: dict[str, Any]
    judged_windows: dict[str, int] = field(default_factory=dict)  # per check
    bad_windows: dict[str, int] = field(default_factory=dict)
    # Per check, the worst judged window: the largest share, load deviation (|achieved/target - 1|)
    # or relay loss; for `up`, the lowest.
    worst: dict[str, float] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)  # the first ones of each check, for the reader
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_VIOLATIONS_KEPT = 20


class HealthMonitor:
    """Judges every instance's healthy windows while the run goes on; `verdict()` at the end.

    `faulted(start_ms, end_ms)` names the instances a fault touched in that span (plus their fault
    domains); `target(node, t0, t1)` is an edge's target query rate over that span of run time."""

    def __init__(
        self,
        fleet: Fleet,
        prometheus: Prometheus,
        criteria: HealthCriteria,
        *,
        faulted: Callable[[int, int], set[str]],
        target: Callable[[Node, float, float], float],
        step_s: float,
    ) -> None:
        self.fleet = fleet
        self.prometheus = prometheus
        self.c = criteria
        self.faulted = faulted
        self.target = target
        # A rate needs several scrapes in its window.
        self.window_s = max(float(criteria.window), 6 * step_s)
        self.judged = dict.fromkeys(CHECKS, 0)
        self.bad = dict.fromkeys(CHECKS, 0)
        self.worst: dict[str, float] = {}
        self.violations: list[Violation] = []
        self.errors: list[str] = []
        self._relay_last: dict[str, tuple[int, int]] = {}

    async def run(self, t0: float) -> None:
        """Judge a window every `window_s` of run time (t0: the load's start, loop time)."""
        loop = asyncio.get_running_loop()
        self._snapshot_relays()
        k = 1
        while True:
            await asyncio.sleep(max(0.0, t0 + k * self.window_s - loop.time()))
            elapsed = loop.time() - t0
            try:
                await self.judge(elapsed)
            except Exception as exc:  # a Prometheus that does not answer fails the verdict, not the run
                self.errors.append(f"{elapsed:.0f}s: {exc.__class__.__name__}: {exc}")
            k += 1

    async def judge(self, elapsed: float) -> None:
        """One window, ending now, `elapsed` seconds into the run's load."""
        now_ms = time.time_ns() // 1_000_000
        w = self.window_s
        relays = self._relay_deltas()
        if elapsed < float(self.c.settle) + w:
            return
        busy = self.faulted(now_ms - int((w + float(self.c.recovery)) * 1000), now_ms)
        judged = [n for n in self.fleet.nodes.values() if n.in_service and n.name not in busy]
        if not judged:
            return
        r = f"[{w:g}s]"
        answers = await self._by_instance(f"sum by (instance) (rate(coredns_dns_responses_total{r}))")
        shares = {
            rcode: await self._by_instance(
                f'sum by (instance) (rate(coredns_dns_responses_total{{rcode="{rcode}"}}{r}))'
                f" / sum by (instance) (rate(coredns_dns_responses_total{r}))"
            )
            for rcode in ("SERVFAIL", "REFUSED")
        }
        rates = await self._by_instance(
            f'sum by (instance) (rate(coredns_dns_requests_total{{job=~"coredns-edge|node-local-dns"}}{r}))'
        )
        up = await self._by_instance(f"min by (instance) (min_over_time(up{r}))")
        for node in judged:
            name = node.name
            self._check(name, "up", up.get(name, 0.0), 1.0, now_ms, ok=up.get(name, 0.0) >= 1.0)
            if answers.get(name, 0.0) > 0:
                for rcode, check, limit in (
                    ("SERVFAIL", "servfail_share", self.c.max_servfail_share),
                    ("REFUSED", "refused_share", self.c.max_refused_share),
                ):
                    v = shares[rcode].get(name, 0.0)
                    self._check(name, check, v, limit, now_ms, ok=not v > limit)
            if node.role != "edge":
                continue
            # Where its clients' load arrives: its node-local cache, when it has one.
            want = self.target(node, elapsed - w, elapsed)
            got = rates.get(self.fleet.front(node).name, 0.0)
            off = abs(got / want - 1.0) if want > 0 else 0.0
            self._check(name, "load", got, want, now_ms, ok=off <= self.c.load_tolerance, badness=off)
            dropped, failed = relays.get(name, (0, 0))
            self._check(
                name, "relay_dropped", dropped, self.c.max_relay_dropped, now_ms, ok=dropped <= self.c.max_relay_dropped
            )
            self._check(
                name, "relay_failed", failed, self.c.max_relay_failed, now_ms, ok=failed <= self.c.max_relay_failed
            )

    def verdict(self) -> HealthVerdict:
        reasons = list(self.errors[:5])
        for check in CHECKS:
            n, bad = self.judged[check], self.bad[check]
            if n and bad > self.c.max_bad_windows_share * n:
                reasons.append(
                    f"{check}: {bad} of {n} healthy windows failed (at most {self.c.max_bad_windows_share:.0%} may)"
                )
        if not any(self.judged.values()) and not self.errors:
            reasons.append("no window could be judged (every instance was in a fault, or the run was too short)")
        criteria = {k: float(v) if isinstance(v, Duration) else v for k, v in asdict(self.c).items()}
        criteria["window"] = self.window_s
        worst = {k: round(_finite(v), 4) for k, v in self.worst.items()}
        return HealthVerdict(
            not reasons, criteria, dict(self.judged), dict(self.bad), worst, list(self.violations), reasons
        )

    def _check(
        self,
        instance: str,
        check: str,
        value: float,
        limit: float,
        end_ms: int,
        *,
        ok: bool,
        badness: float | None = None,
    ) -> None:
        self.judged[check] += 1
        b = value if badness is None else badness
        if check == "up":
            self.worst[check] = min(self.worst.get(check, b), b)
        else:
            self.worst[check] = max(self.worst.get(check, b), b)
        if ok:
            return
        self.bad[check] += 1
        if sum(v.check == check for v in self.violations) < MAX_VIOLATIONS_KEPT:
            self.violations.append(Violation(instance, check, end_ms, _finite(value), _finite(limit)))

    async def _by_instance(self, promql: str) -> dict[str, float]:
        out = {}
        for s in await self.prometheus.query(promql):
            with contextlib.suppress(KeyError, ValueError, IndexError):
                out[s["metric"]["instance"]] = float(s["value"][1])
        return out

    def _snapshot_relays(self) -> None:
        self._relay_last = {n.name: (n.relay.dropped, n.relay.failed) for n in self.fleet.edges() if n.relay}

    def _relay_deltas(self) -> dict[str, tuple[int, int]]:
        before = self._relay_last
        self._snapshot_relays()
        return {
            k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1]) for k, v in self._relay_last.items()
        }


def _finite(v: float) -> float:
    return float(v) if math.isfinite(v) else -1.0


def domain(fleet: Fleet, names: Sequence[str]) -> set[str]:
    """The fault domains of `names`: each instance, its upstream, that upstream's edges and the
    node-local caches in front of them."""
    out: set[str] = set()
    for name in names:
        node = fleet.nodes.get(name)
        if node is None:
            continue
        up = fleet.nodes.get(node.upstream) if node.upstream else node
        if up is None:
            continue
        out |= {up.name, *(n.name for e in fleet.edges_of(up) for n in (e, fleet.front(e)))}
        out.add(name)
    return out

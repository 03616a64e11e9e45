"""Scenario files: topology, load and a timeline of faults, typed and validated once.

A fault is a named anomaly class made of primitive actions (lab/faults.py) on chosen nodes for a
time span. Errors name the offending key, e.g. `faults[2].actions[0].targets: no node edge-7`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detectord.config import Duration, from_mapping
from detectord.errors import ConfigError
from lab.faults import PRIMITIVES
from lab.health import HealthCriteria
from lab.peers.dnsperf import QTYPES
from lab.topology import LoadSpec, Topology


@dataclass(frozen=True)
class Action:
    primitive: str
    targets: tuple[str, ...]
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Fault:
    cls: str
    start: float
    duration: float
    severity: str
    actions: tuple[Action, ...]
    # A change operators make every day (a reload, a rolling restart, traffic growth): the data
    # sets judge its instances normal, and count the alerts on it apart.
    benign: bool = False


@dataclass(frozen=True)
class _FaultYaml:
    start: Duration
    duration: Duration
    severity: str = ""
    benign: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    duration: float
    step: float
    seed: int
    topology: Topology
    load: LoadSpec
    faults: tuple[Fault, ...] = field(default=())
    # A run no model trains or calibrates on (detectord's data sets put all of it in the test role).
    test_only: bool = False
    # Of a test-only run, lanes (upstreams, with their edges) held for validation instead.
    validation_lanes: tuple[str, ...] = ()
    # What its healthy periods must show (lab/health.py); the verdict goes into the truth.
    health: HealthCriteria = HealthCriteria()
    # It needs the machine to itself: it refuses to start beside another lab run, and they beside it.
    exclusive: bool = False

    def node_names(self) -> list[str]:
        t = self.topology
        edges = [f"edge-{i}" for i in range(t.edges + t.standby_edges)]
        return [f"upstream-{i}" for i in range(t.upstreams)] + edges


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), f"cannot read scenario: {exc}") from exc
    return parse_scenario(raw, default_name=path.stem)


def parse_scenario(raw: Any, *, default_name: str = "scenario") -> Scenario:
    if not isinstance(raw, Mapping):
        raise ConfigError("<top level>", "a scenario must be a mapping")
    known = {
        "name",
        "description",
        "duration",
        "step",
        "seed",
        "topology",
        "load",
        "faults",
        "test_only",
        "validation_lanes",
        "health",
        "exclusive",
    }
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), f"unknown key (known: {', '.join(sorted(known))})")
    if "duration" not in raw:
        raise ConfigError("duration", "is required")
    duration = _duration(raw["duration"], "duration")
    step = _duration(raw.get("step", "1s"), "step")
    if step < 0.1:
        raise ConfigError("step", "must be >= 100ms")
    topology: Topology = from_mapping(Topology, raw.get("topology") or {}, "topology")
    if topology.edges < 1 or topology.upstreams < 1:
        raise ConfigError("topology", "needs at least one edge and one upstream")
    if topology.standby_edges < 0:
        raise ConfigError("topology.standby_edges", "must be >= 0")
    if topology.node_local and topology.standby_edges:
        raise ConfigError("topology.node_local", "node-local caches are not made for standby edges (standby_edges: 0)")
    load: LoadSpec = from_mapping(LoadSpec, raw.get("load") or {}, "load")
    if load.qps <= 0:
        raise ConfigError("load.qps", "must be > 0")
    if not 0 <= load.modulation_depth < 1:
        raise ConfigError("load.modulation_depth", "must be in [0, 1)")
    if not 0 <= load.spread < 1:
        raise ConfigError("load.spread", "must be in [0, 1)")
    if not 0 <= load.nxdomain_share <= 0.95:
        raise ConfigError("load.nxdomain_share", "must be in [0, 0.95]")
    if load.qtypes is not None:
        unknown = sorted(set(load.qtypes) - set(QTYPES))
        if unknown or not load.qtypes or any(w < 0 for w in load.qtypes.values()) or not sum(load.qtypes.values()):
            raise ConfigError("load.qtypes", f"weights >= 0 for some of {', '.join(QTYPES)} (unknown: {unknown})")
    if not 1 <= topology.cache_capacity <= 10_000_000:
        raise ConfigError("topology.cache_capacity", "must be in 1..10000000")
    if not 0 <= topology.upstream_jitter <= topology.upstream_rtt <= 2.0:
        raise ConfigError("topology.upstream_rtt", "needs 0 <= upstream_jitter <= upstream_rtt <= 2s")
    test_only = raw.get("test_only", False)
    if not isinstance(test_only, bool):
        raise ConfigError("test_only", f"must be true or false, got {test_only!r}")
    lanes = raw.get("validation_lanes", [])
    if not isinstance(lanes, list) or not all(isinstance(x, str) for x in lanes) or (lanes and not test_only):
        raise ConfigError("validation_lanes", f"a list of upstreams of a test_only run, got {lanes!r}")
    exclusive = raw.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise ConfigError("exclusive", f"must be true or false, got {exclusive!r}")
    health: HealthCriteria = from_mapping(HealthCriteria, raw.get("health") or {}, "health")
    if float(health.window) < 1:
        raise ConfigError("health.window", "must be >= 1s")
    scenario = Scenario(
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
        duration=duration,
        step=step,
        seed=_int(raw.get("seed", 0), "seed"),
        topology=topology,
        load=load,
        test_only=test_only,
        validation_lanes=tuple(lanes),
        health=health,
        exclusive=exclusive,
    )
    nodes = set(scenario.node_names())
    if not set(lanes) <= {n for n in nodes if n.startswith("upstream-")}:
        raise ConfigError("validation_lanes", f"names upstreams this scenario does not have: {lanes}")
    faults = []
    raw_faults = raw.get("faults") or []
    if not isinstance(raw_faults, list):
        raise ConfigError("faults", "must be a list")
    for i, rf in enumerate(raw_faults):
        key = f"faults[{i}]"
        if not isinstance(rf, Mapping):
            raise ConfigError(key, "must be a mapping")
        rest = {k: v for k, v in rf.items() if k not in ("class", "actions")}
        if "class" not in rf:
            raise ConfigError(f"{key}.class", "is required (the anomaly class this fault is an instance of)")
        timing: _FaultYaml = from_mapping(_FaultYaml, rest, key)
        if timing.duration <= 0:
            raise ConfigError(f"{key}.duration", "must be > 0")
        if timing.start + timing.duration > duration:
            raise ConfigError(key, f"ends at {timing.start + timing.duration:g}s, after the scenario ({duration:g}s)")
        actions = []
        raw_actions = rf.get("actions")
        if not isinstance(raw_actions, list) or not raw_actions:
            raise ConfigError(f"{key}.actions", "must be a non-empty list of primitive actions")
        for j, ra in enumerate(raw_actions):
            akey = f"{key}.actions[{j}]"
            if not isinstance(ra, Mapping) or "primitive" not in ra:
                raise ConfigError(akey, "must be a mapping with a `primitive` key")
            prim = PRIMITIVES.get(str(ra["primitive"]))
            if prim is None:
                raise ConfigError(
                    f"{akey}.primitive",
                    f"unknown primitive {ra['primitive']!r} (known: {', '.join(sorted(PRIMITIVES))})",
                )
            targets = ra.get("targets")
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets:
                raise ConfigError(f"{akey}.targets", "must name at least one node, e.g. [edge-0]")
            for t in targets:
                if t not in nodes:
                    raise ConfigError(f"{akey}.targets", f"no node {t!r} (nodes: {', '.join(sorted(nodes))})")
                role = str(t).split("-")[0]
                if prim.standby and not _standby(str(t), topology):
                    raise ConfigError(
                        f"{akey}.targets",
                        f"{ra['primitive']} brings a standby edge into service; {t!r} is in service from the start",
                    )
                if role not in prim.roles:
                    raise ConfigError(
                        f"{akey}.targets", f"{ra['primitive']} applies to {' or '.join(prim.roles)} nodes, not {t!r}"
                    )
            params = {k: v for k, v in ra.items() if k not in ("primitive", "targets")}
            parsed = from_mapping(prim, params, akey)  # validates the parameters now, not mid-run
            actions.append(
                Action(
                    str(ra["primitive"]),
                    tuple(map(str, targets)),
                    {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed) if f.init},
                )
            )
        faults.append(
            Fault(
                str(rf["class"]),
                float(timing.start),
                float(timing.duration),
                timing.severity,
                tuple(actions),
                bool(timing.benign),
            )
        )
    faults.sort(key=lambda f: f.start)
    joined: dict[str, float] = {}
    for i, f in enumerate(faults):
        for a in f.actions:
            for t in a.targets:
                if PRIMITIVES[a.primitive].standby:
                    joined.setdefault(t, f.start)
                elif _standby(t, topology) and not (t in joined and joined[t] < f.start):
                    raise ConfigError(
                        f"faults (by start)[{i}]", f"{t!r} is a standby edge: a `join` must bring it in before {f.cls}"
                    )
    return dataclasses.replace(scenario, faults=tuple(faults))


def _standby(name: str, topology: Topology) -> bool:
    role, _, index = name.partition("-")
    return role == "edge" and int(index) >= topology.edges


def _duration(value: Any, key: str) -> float:
    try:
        return float(Duration.parse(value) if isinstance(value, str) else Duration(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from None


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return value

"""Runs a scenario: starts `detectord record`, the fleet and a Prometheus that scrapes it and
remote-writes to the recorder, drives the load and the fault timeline, prints progress, and
writes the ground truth beside the recording. Interrupted, it stops everything it started.

    lab/run lab/scenarios/smoke.yaml --out /tmp/run1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from detectord.errors import ConfigError
from detectord.recordings.truth import Truth, TruthEvent, TruthInstance
from lab.faults import PRIMITIVES, Primitive
from lab.fleet import JOBS, LAB_KEEP, Fleet, Node
from lab.health import HealthMonitor, domain
from lab.peers.detectord import run_recorder
from lab.peers.prometheus import Prometheus, run_prometheus
from lab.scenario import Fault, Scenario, load_scenario

RECORDING = "recording.drec"
TRUTH = "truth.json"


@dataclass
class EventRecord:
    fault: Fault
    instances: list[dict[str, str]] = field(default_factory=list)
    start_ms: int | None = None
    end_ms: int | None = None
    error: str | None = None
    marks: list[dict[str, Any]] = field(default_factory=list)
    scheduled_ms: int | None = None  # when it is due to start

    def to_truth(self, i: int) -> TruthEvent:
        return TruthEvent(
            i,
            self.fault.cls,
            self.fault.severity,
            self.start_ms,
            self.end_ms,
            self.instances,
            [
                {
                    "primitive": a.primitive,
                    "targets": list(a.targets),
                    "params": {k: (float(v) if isinstance(v, float) else v) for k, v in a.params.items()},
                }
                for a in self.fault.actions
            ],
            self.error,
            sorted(self.marks, key=lambda m: m.get("down_ms", m.get("up_ms", 0))),
            self.fault.benign,
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Run:
    def __init__(
        self,
        scenario: Scenario,
        out: Path,
        *,
        source: Path | None = None,
        progress_interval: float = 10.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.out = out.resolve()
        self.source = source
        self.progress_interval = progress_interval
        self.say = say or (lambda line: print(line, flush=True))
        self.events = [EventRecord(f) for f in scenario.faults]
        self.fleet: Fleet | None = None
        self.prometheus: Prometheus | None = None
        self.record_url = ""
        self.started_ms = 0
        self.ended_ms = 0
        self.interrupted = False
        self.health: HealthMonitor | None = None

    async def run(self) -> None:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        sc = self.scenario
        try:
            async with contextlib.AsyncExitStack() as stack:
                recorder = await stack.enter_async_context(run_recorder(out / RECORDING, log=work / "record.log"))
                self.record_url = recorder.url
                self.fleet = fleet = Fleet(sc.topology, sc.load, workdir=work, seed=sc.seed)
                stack.push_async_callback(fleet.stop)
                await fleet.start()
                self.prometheus = await stack.enter_async_context(
                    run_prometheus(
                        fleet.metrics_targets(),
                        workdir=work / "prometheus",
                        remote_write_url=f"{self.record_url}/api/v1/write",
                        scrape_interval=f"{sc.step:g}s",
                        keep=LAB_KEEP,
                        extra_remote_write_config={"queue_config": {"batch_send_deadline": "1s", "max_backoff": "5s"}},
                        file_sd=True,
                        metric_relabel={JOBS["edge"]: fleet.forward_relabel()},
                    )
                )
                fleet.on_targets_changed = self._targets_changed
                await fleet.start_load()
                self.started_ms = _now_ms()
                self.say(
                    f"lab: {sc.name}: {sc.topology.edges} edges, {sc.topology.upstreams} upstreams, "
                    f"{sc.load.qps:g} qps per edge, {len(sc.faults)} faults, {sc.duration:g}s; recording to "
                    f"{out / RECORDING}"
                )
                t0 = asyncio.get_running_loop().time()
                tasks = [asyncio.ensure_future(self._fault(ev, t0)) for ev in self.events]
                progress = asyncio.ensure_future(self._progress(t0))
                self.health = HealthMonitor(
                    fleet, self.prometheus, sc.health, faulted=self._faulted, target=_target_rate, step_s=sc.step
                )
                tasks.append(asyncio.ensure_future(self.health.run(fleet.t0)))
                try:
                    await asyncio.sleep(sc.duration)
                    await asyncio.gather(*tasks[: len(self.events)])
                finally:
                    progress.cancel()
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(progress, *tasks, return_exceptions=True)
                    self.ended_ms = _now_ms()
                    for node in fleet.edges():
                        if node.load is not None:
                            await node.load.stop()
                    # The last scrapes reach the recorder before Prometheus stops.
                    await asyncio.sleep(min(3.0, 2 * sc.step + 1))
        except asyncio.CancelledError:
            self.interrupted = True
            self.ended_ms = self.ended_ms or _now_ms()
            raise
        finally:
            self.write_truth()
            shutil.rmtree(work / "prometheus" / "tsdb", ignore_errors=True)

    async def _targets_changed(self, targets: dict[str, dict[str, str]]) -> None:
        assert self.prometheus is not None
        self.prometheus.set_targets(targets)
        await self.prometheus.wait_targets({name for t in targets.values() for name in t})

    async def _fault(self, ev: EventRecord, t0: float) -> None:
        loop = asyncio.get_running_loop()
        fleet = self.fleet
        assert fleet is not None
        f = ev.fault
        await asyncio.sleep(max(0.0, t0 + f.start - loop.time()))
        applied: list[tuple[Primitive, Node]] = []
        affected: dict[str, Node] = {}
        ev.scheduled_ms = self.started_ms + int(f.start * 1000)
        try:
            for action in f.actions:
                for target in action.targets:
                    prim = PRIMITIVES[action.primitive](**action.params)
                    node = fleet.nodes[target]
                    applied.append((prim, node))
                    for n in prim.affected(fleet, node):
                        # A node-local cache in front of an affected edge forwards into the fault.
                        for m in (n, fleet.front(n)):
                            affected[m.name] = m
        except Exception as exc:
            ev.error = f"{exc.__class__.__name__}: {exc}"
            self.say(f"lab: fault {f.cls} not applied: {ev.error}")
            return
        ev.instances = [affected[k].labels for k in sorted(affected)]
        stop = asyncio.Event()
        during: list[asyncio.Future[None]] = []
        try:
            try:
                await asyncio.gather(*(p.apply(fleet, n) for p, n in applied))
            finally:
                # Even a failed apply may have changed something: the span counts from here.
                ev.start_ms = _now_ms()
            targets = ", ".join(sorted({n.name for _, n in applied}))
            self.say(f"lab: +{loop.time() - t0:6.0f}s fault {f.cls} ({f.severity or '-'}) on {targets}")
            during = [asyncio.ensure_future(p.during(fleet, n, stop)) for p, n in applied]
            await asyncio.sleep(max(0.0, t0 + f.start + f.duration - loop.time()))
        except Exception as exc:
            ev.error = f"{exc.__class__.__name__}: {exc}"
            self.say(f"lab: fault {f.cls} failed: {ev.error} (kept in the truth file)")
        finally:
            stop.set()
            for r in await asyncio.gather(*during, return_exceptions=True):
                if isinstance(r, Exception) and ev.error is None:
                    ev.error = f"{r.__class__.__name__}: {r}"
            await asyncio.shield(asyncio.gather(*(p.revert(fleet, n) for p, n in applied), return_exceptions=True))
            for p, _ in applied:
                ev.marks.extend(p.marks)
            if ev.start_ms is not None:
                ev.end_ms = _now_ms()
                self.say(f"lab: +{loop.time() - t0:6.0f}s fault {f.cls} over")

    async def _progress(self, t0: float) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                await asyncio.sleep(self.progress_interval)
                self.say(await self.progress_line(session, loop.time() - t0))

    async def progress_line(self, session: aiohttp.ClientSession, elapsed: float) -> str:
        assert self.fleet is not None
        qps = "?"
        if self.prometheus is not None:
            # A rate needs a few scrapes in its window, whatever the step.
            window = max(10.0, 4 * self.scenario.step)
            clients = JOBS["nodelocal" if self.scenario.topology.node_local else "edge"]
            with contextlib.suppress(Exception):
                v = await self.prometheus.value(
                    f'sum(rate(coredns_dns_requests_total{{job="{clients}"}}[{window:g}s]))'
                )
                qps = f"{v:.0f}"
        samples = size = "?"
        with contextlib.suppress(Exception):
            async with session.get(f"{self.record_url}/metrics") as r:
                text = await r.text()
            samples = _metric(text, "detectord_record_samples_total")
            size = f"{float(_metric(text, 'detectord_record_file_bytes')) / 1e6:.1f}MB"
        now = _now_ms()
        active = [
            f"{e.fault.cls}@{','.join(i['instance'] for i in e.instances)}"
            for e in self.events
            if e.start_ms is not None and e.end_ms is None and e.start_ms <= now
        ]
        return (
            f"lab: {elapsed:6.0f}/{self.scenario.duration:.0f}s  qps {qps} (target {self.fleet.qps():.0f})  "
            f"samples {samples}  recording {size}  faults: {' '.join(active) or 'none'}"
        )

    def write_truth(self) -> Path:
        sc = self.scenario
        fleet = self.fleet
        truth = Truth(
            scenario=sc.name,
            description=sc.description,
            test_only=sc.test_only,
            validation_lanes=list(sc.validation_lanes),
            source=str(self.source) if self.source else None,
            recording=RECORDING,
            started_ms=self.started_ms,
            ended_ms=self.ended_ms,
            interrupted=self.interrupted,
            step_seconds=sc.step,
            instances=[
                TruthInstance(n.job, n.name, n.role, n.upstream, n.relay.counts() if n.relay else None)
                for n in (fleet.nodes.values() if fleet else [])
                if n.started
            ],
            events=[ev.to_truth(i) for i, ev in enumerate(self.events) if ev.start_ms is not None or ev.error],
            health=self.health.verdict().to_json() if self.health is not None else None,
        )
        return truth.write(self.out / TRUTH)

    def _faulted(self, start_ms: int, end_ms: int) -> set[str]:
        """The fault domains of every fault active (or being applied) between the two times."""
        assert self.fleet is not None
        names: set[str] = set()
        for ev in self.events:
            began = ev.start_ms if ev.start_ms is not None else ev.scheduled_ms
            if began is None or began > end_ms or (ev.end_ms is not None and ev.end_ms < start_ms):
                continue
            names |= {i["instance"] for i in ev.instances}
            names |= {t for a in ev.fault.actions for t in a.targets}
        return domain(self.fleet, sorted(names))


def _target_rate(node: Node, t0: float, t1: float) -> float:
    """An edge's base load over [t0, t1] seconds of load time: what its dnsperf was asked to send."""
    return node.load.requested(t0, t1) if node.load is not None else 0.0


def _metric(text: str, name: str) -> str:
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return f"{float(m.group(1)):.0f}" if m else "?"


# Every lab run holds this lock: shared for an ordinary run, exclusive for one that needs the
# machine to itself (`exclusive: true`), so neither starts beside the other. Machine-wide, not
# per clone: runs from two checkouts starve each other just the same.
LOCK = Path(os.environ.get("DETECTORD_LAB_LOCK", "/tmp/detectord-lab.lock"))


class MachineBusy(Exception):
    pass


@contextlib.contextmanager
def machine_lock(exclusive: bool, path: Path = LOCK) -> Iterator[None]:
    """Hold the lab's machine lock; raise MachineBusy at once if it cannot be had."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MachineBusy(
                "another lab run is using this machine"
                + (" (this one needs it to itself: exclusive: true)" if exclusive else " and needs it to itself")
                + f"; lock {path}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def _main(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    try:
        with machine_lock(scenario.exclusive):
            return await _run(scenario, args)
    except MachineBusy as exc:
        print(f"lab/run: {args.scenario}: not started: {exc}", file=sys.stderr, flush=True)
        return 3


async def _run(scenario: Scenario, args: argparse.Namespace) -> int:
    run = Run(scenario, Path(args.out).resolve(), source=Path(args.scenario), progress_interval=args.progress_interval)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await run.run()
    except asyncio.CancelledError:
        print(f"lab: interrupted; stopped everything; truth of what ran in {Path(args.out) / TRUTH}", flush=True)
        return 130
    verdict = run.health.verdict() if run.health is not None else None
    if verdict is not None and not verdict.valid:
        print(
            f"lab: the healthy periods were not healthy: {'; '.join(verdict.reasons)} (the truth says so; data "
            "sets refuse this run)",
            flush=True,
        )
    elif verdict is not None:
        print(
            f"lab: healthy periods checked: {sum(verdict.judged_windows.values())} instance windows, all within "
            "the health criteria",
            flush=True,
        )
    print(f"lab: done; {len(run.events)} faults; truth in {Path(args.out) / TRUTH}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab/run", description="Run a lab scenario and record it.")
    p.add_argument("scenario", help="scenario YAML (see lab/scenarios/)")
    p.add_argument("--out", required=True, help="directory for the recording, truth.json and logs")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(f"lab/run: {args.scenario}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

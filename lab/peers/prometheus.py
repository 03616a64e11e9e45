"""A real Prometheus (Debian's 2.42) scraping given targets and remote-writing to detectord,
with a PromQL client for assertions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from detectord import children
from lab.peers import missing_peer

# What detectord needs; the README's remote_write example keeps the same.
KEEP = "coredns_.*|process_.*|go_goroutines|up"
# Tests wait on what arrives: send within a second, retry quickly.
TEST_QUEUE = {"batch_send_deadline": "500ms", "min_backoff": "50ms", "max_backoff": "1s"}


@dataclass
class Prometheus:
    url: str
    port: int
    config: Path
    log: Path
    # With file-based service discovery: the directory of one targets file per job.
    sd_dir: Path | None = None
    child: children.Child | None = None

    def add_remote_write(self, url: str, keep: str = KEEP) -> None:
        """Send to one more remote-write receiver from now on (the config is reloaded, as on
        SIGHUP): Prometheus sends it only samples scraped after the reload."""
        config = yaml.safe_load(self.config.read_text())
        entry = {
            "url": url,
            "write_relabel_configs": [{"source_labels": ["__name__"], "regex": keep, "action": "keep"}],
            # One shard: Prometheus sizes its shards by the time a sample took to send, retries
            # included, so the refusals and 503s before this receiver is ready can make it
            # reshard. Shards send in parallel, each series on one, so an instance's series then
            # arrive seconds apart: more than a step at the 1 s steps tests use (a step closes
            # once a sample two steps later arrives), though well within one at a real 15 s.
            "queue_config": {**TEST_QUEUE, "max_shards": 1},
        }
        config["remote_write"] = [*config.get("remote_write", []), entry]
        _write_atomic(self.config, config)
        assert self.child is not None
        self.child.signal(signal.SIGHUP)

    def set_targets(self, targets: Mapping[str, Sequence[str] | Mapping[str, str]]) -> None:
        """Replace the discovered targets (file_sd=True), as a Kubernetes endpoint list changes:
        a job left out has no targets any more. Prometheus picks the files up within seconds."""
        if self.sd_dir is None:
            raise RuntimeError("this Prometheus was started with static targets (file_sd=False)")
        for f in self.sd_dir.glob("*.json"):
            if f.stem not in targets:
                _write_atomic(f, [])
        for job, t in targets.items():
            _write_atomic(self.sd_dir / f"{job}.json", _static_configs(t))

    async def wait_targets(self, instances: set[str], *, timeout: float = 60.0) -> None:
        """Until Prometheus scrapes exactly these `instance`s (a rewritten discovery file is
        taken in within seconds: Prometheus updates its scrape pools at most every 5 s)."""
        deadline = time.monotonic() + timeout
        while True:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
                s.get(f"{self.url}/api/v1/targets", params={"state": "active"}) as r,
            ):
                body = await r.json()
            active = {t["labels"].get("instance", "") for t in body["data"]["activeTargets"]}
            if active == instances:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus scrapes {sorted(active)}, not {sorted(instances)}, after {timeout}s")
            await asyncio.sleep(0.5)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: the `data.result` vector of /api/v1/query."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.get(f"{self.url}/api/v1/query", params={"query": promql}) as r,
        ):
            body = await r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{promql}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float:
        """The first sample of `promql`'s result, or NaN when it is empty."""
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else math.nan

    async def wait_for(self, promql: str, pred: Callable[[float], bool], *, timeout: float = 30.0) -> float:
        """Poll `promql` until `pred` holds for its value; fail with the last value seen."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.value(promql)
            if not math.isnan(value) and pred(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: last value {value} after {timeout}s")
            await asyncio.sleep(0.5)


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or shutil.which("/usr/bin/prometheus")
    if path is None:
        missing_peer("prometheus is not installed: run `make system-deps`")
    return path


def _static_configs(targets: Sequence[str] | Mapping[str, str]) -> list[dict[str, Any]]:
    if isinstance(targets, Mapping):
        return [{"targets": [addr], "labels": {"instance": name}} for name, addr in targets.items()]
    return [{"targets": list(targets)}]


def _write_atomic(path: Path, content: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@contextlib.asynccontextmanager
async def run_prometheus(
    targets: Mapping[str, Sequence[str] | Mapping[str, str]],
    *,
    workdir: Path,
    remote_write_url: str | None = None,
    scrape_interval: str = "1s",
    extra_remote_write_config: dict[str, Any] | None = None,
    enable_receiver: bool = False,
    keep: str = KEEP,
    file_sd: bool = False,
    jobs: Sequence[str] = (),
    metric_relabel: Mapping[str, list[dict[str, Any]]] | None = None,
    remote_writes: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[Prometheus]:
    """Scrape `targets` every `scrape_interval`, remote-writing the series matching `keep` to
    `remote_write_url`; `extra_remote_write_config` is merged into that entry.

    `targets` maps a job to host:port addresses, or to {instance name: host:port} to set the
    `instance` label (stable names instead of ephemeral ports). With `file_sd`, the targets are
    discovered from files that `Prometheus.set_targets` rewrites (targets join and leave); `jobs`
    names jobs that have no target yet. `metric_relabel` holds a job's metric_relabel_configs.
    `remote_writes` are more remote_write entries, as written (`detectord remote-write` makes them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = children.free_port()
    sd_dir = workdir / "targets" if file_sd else None
    scrape_configs = []
    for job in dict.fromkeys([*targets, *jobs]):
        sc: dict[str, Any] = {"job_name": job}
        if sd_dir is not None:
            sc["file_sd_configs"] = [{"files": [str(sd_dir / f"{job}.json")], "refresh_interval": "5s"}]
        else:
            sc["static_configs"] = _static_configs(targets.get(job, []))
        if metric_relabel and job in metric_relabel:
            sc["metric_relabel_configs"] = metric_relabel[job]
        scrape_configs.append(sc)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": scrape_configs,
    }
    if remote_write_url:
        remote_write = {
            "url": remote_write_url,
            "write_relabel_configs": [{"source_labels": ["__name__"], "regex": keep, "action": "keep"}],
            "queue_config": dict(TEST_QUEUE),
        }
        config["remote_write"] = [_merge(remote_write, extra_remote_write_config or {})]
    if remote_writes:
        config["remote_write"] = [*config.get("remote_write", []), *remote_writes]
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    prom = Prometheus(f"http://127.0.0.1:{port}", port, cfg, workdir / "prometheus.log", sd_dir)
    if sd_dir is not None:
        sd_dir.mkdir(exist_ok=True)
        prom.set_targets(targets)
    argv = [
        prometheus_binary(),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    if enable_receiver:
        argv.append("--web.enable-remote-write-receiver")
    async with children.run(
        argv, log=prom.log, cwd=workdir, name="prometheus", ready_url=f"{prom.url}/-/ready", ready_timeout=60
    ) as child:
        prom.child = child
        yield prom


async def write_history(url: str, instances: int, seconds: float, *, step_s: float = 15.0) -> None:
    """Write the last `seconds` of a synthetic fleet of `instances` CoreDNS into a Prometheus
    through its remote-write receiver (`url`), a scrape round at a time, oldest first (the TSDB
    takes a sample only within an hour of the newest it has)."""
    import snappy

    from lab.synthetic import SyntheticFleet

    rounds = int(seconds // step_s)
    start = int(time.time() * 1000) - rounds * int(step_s * 1000)
    fleet = SyntheticFleet(instances, seed=1, scrape_interval_s=step_s, start_ms=start, restarts_per_hour=0.0)
    headers = {
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "snappy",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
    }
    async with aiohttp.ClientSession() as s:

        async def post(body: bytes) -> None:
            async with s.post(url, data=snappy.compress(body), headers=headers) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"Prometheus answered {resp.status}: {await resp.text()}")

        for _ in range(rounds):
            await asyncio.gather(*(post(p) for p in fleet.scrape_payloads()))

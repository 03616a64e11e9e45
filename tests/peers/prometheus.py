"""A real Prometheus (Debian's 2.42) scraping given targets and remote-writing to detectord."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.peers import free_port, run_process, wait_http_ok

KEEP = "coredns_.*|process_.*|go_goroutines"


@dataclass
class Prometheus:
    url: str
    port: int

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/api/v1/query", params={"query": promql}) as r:
            body = await r.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run `make system-deps`")
    return path


@contextlib.asynccontextmanager
async def run_prometheus(
    targets: dict[str, list[str]],
    *,
    workdir: Path,
    remote_write_url: str | None = None,
    scrape_interval: str = "1s",
    enable_receiver: bool = False,
) -> AsyncIterator[Prometheus]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()],
    }
    if remote_write_url:
        config["remote_write"] = [{
            "url": remote_write_url,
            "write_relabel_configs": [{"source_labels": ["__name__"], "regex": KEEP, "action": "keep"}],
            "queue_config": {"batch_send_deadline": "500ms", "min_backoff": "50ms", "max_backoff": "1s"},
        }]
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    argv = [prometheus_binary(), f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]
    if enable_receiver:
        argv.append("--web.enable-remote-write-receiver")
    log = workdir / "prometheus.log"
    async with run_process(argv, log=log, cwd=workdir) as proc:
        await wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=60, proc=proc, log=log)
        yield Prometheus(f"http://127.0.0.1:{port}", port)

"""`detectord serve` itself as a process, the way users run it, for end-to-end tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import subprocess

from lab.peers import REPO, free_port, run_process, wait_http_ok


@dataclass
class Detectord:
    url: str
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    async def instances(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/api/v1/instances") as r:
            body = await r.json()
        data: list[dict[str, Any]] = body["data"]
        return data

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/metrics") as r:
            return await r.text()


@contextlib.asynccontextmanager
async def run_detectord(config: str, *, workdir: Path) -> AsyncIterator[Detectord]:
    """Start `detectord serve` with `config` (YAML; its web.listen_address is set here)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = workdir / "detectord.yml"
    model = "" if "\nmodel:" in f"\n{config}" else f"model:\n  path: {REPO / 'models/default'}\n"
    path.write_text(f"web:\n  listen_address: 127.0.0.1:{port}\n{model}{config}")
    log = workdir / "detectord.log"
    argv = [sys.executable, "-m", "detectord", "serve", "--config.file", str(path)]
    async with run_process(argv, log=log, cwd=REPO) as proc:
        await wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=120, proc=proc, log=log)
        yield Detectord(f"http://127.0.0.1:{port}", path, proc, log)

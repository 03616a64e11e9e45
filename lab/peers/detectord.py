"""detectord itself as a process, the way users run it: `detectord serve` and `detectord record`.
The one way every test, benchmark and lab run starts the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from detectord import children
from lab.peers import REPO

DEFAULT_MODEL = REPO / "models/default"


@dataclass
class Detectord:
    url: str
    port: int
    config: Path
    child: children.Child
    model: Path
    # With --web.config.file: how a client gets in (TLS context, Authorization header).
    ssl: ssl.SSLContext | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def session(self) -> aiohttp.ClientSession:
        """A client session that gets past the web config (if any)."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else True), headers=self.headers
        )

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    @property
    def log(self) -> Path:
        return self.child.log

    def write_config(self, config: str | Mapping[str, Any]) -> None:
        """Replace the config file (keeping the listen address and the model), e.g. before a reload."""
        write_config(self.config, config, port=self.port, model=self.model)

    async def instances(self) -> list[dict[str, Any]]:
        async with self.session() as s, s.get(f"{self.url}/api/v1/instances", params={"limit": "0"}) as r:
            body = await r.json()
        data: list[dict[str, Any]] = body["data"]
        return data

    async def scores(self, instance: str) -> list[tuple[int, float]]:
        """The latest scores (step timestamp in ms, score) of the instance with label value `instance`."""
        async with (
            self.session() as s,
            s.get(f"{self.url}/api/v1/scores", params={"instance": instance}) as r,
        ):
            body = await r.json()
        return [(int(t), float(v)) for d in body["data"] for t, v in d["scores"]]

    async def metrics(self) -> str:
        async with self.session() as s, s.get(f"{self.url}/metrics") as r:
            return await r.text()

    def rss(self) -> int:
        """The daemon's resident memory, bytes."""
        for line in Path(f"/proc/{self.child.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time the daemon has used (user and system), seconds."""
        fields = Path(f"/proc/{self.child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def settle(self, timeout: float = 120.0, idle: float = 0.05) -> None:
        """Wait until the daemon is idle (under `idle` of a core over half a second): once ready it
        compiles the model's other batch sizes while nothing else is to do, for a few seconds,
        which a benchmark of what comes next would count."""
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = self.cpu_seconds()
            if now - before < idle * 0.5:
                return
            before = now
        raise TimeoutError(f"detectord still busy {timeout:g}s after it was ready")


def write_config(path: Path, config: str | Mapping[str, Any], *, port: int, model: Path) -> None:
    """`config` (YAML text or a mapping) with web.listen_address set to 127.0.0.1:`port`,
    model.path defaulting to `model` and state.dir to `state` beside the file."""
    raw: dict[str, Any] = dict(yaml.safe_load(config) or {}) if isinstance(config, str) else dict(config)
    raw["web"] = {**(raw.get("web") or {}), "listen_address": f"127.0.0.1:{port}"}
    raw["model"] = {"path": str(model), **(raw.get("model") or {})}
    # Each run remembers only its own state (the default, under the working directory, would be shared).
    raw["state"] = {"dir": str(path.parent / "state"), **(raw.get("state") or {})}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@contextlib.asynccontextmanager
async def run_detectord(
    config: str | Mapping[str, Any] = "",
    *,
    workdir: Path,
    model: Path = DEFAULT_MODEL,
    cwd: Path = REPO,
    ready_timeout: float = 120.0,
    args: Sequence[str] = (),
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    web_config: Path | None = None,
    client_ssl: ssl.SSLContext | None = None,
    client_headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Detectord]:
    """`detectord serve` on `port` (a free one if None) with `config` and `env` added to the
    environment, until it is ready; stopped on exit. With `web_config` (--web.config.file), the
    daemon is reached over HTTPS with `client_ssl` and `client_headers` (e.g. Authorization)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else children.free_port()
    path = workdir / "detectord.yml"
    write_config(path, config, port=port, model=model)
    argv = [sys.executable, "-m", "detectord", "serve", "--config.file", str(path), *args]
    if web_config is not None:
        argv += ["--web.config.file", str(web_config)]
    url = f"{'https' if client_ssl is not None else 'http'}://127.0.0.1:{port}"
    secured = web_config is not None
    async with children.run(
        argv,
        log=workdir / "detectord.log",
        cwd=cwd,
        env=env,
        name="detectord serve",
        ready_url=None if secured else f"{url}/-/ready",
        ready_timeout=ready_timeout,
    ) as child:
        det = Detectord(url, port, path, child, model, client_ssl, dict(client_headers or {}))
        if secured:  # /-/ready needs the web config's credentials
            await child.wait_http_ok(
                f"{url}/-/ready", timeout=ready_timeout, ssl=client_ssl, headers=dict(client_headers or {})
            )
        yield det


@dataclass
class Recorder:
    url: str
    out: Path
    child: children.Child

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"


@contextlib.asynccontextmanager
async def run_recorder(out: Path, *, log: Path, args: Sequence[str] = ()) -> AsyncIterator[Recorder]:
    """`detectord record --out OUT` on a free port, until it is ready; stopped on exit."""
    port = children.free_port()
    argv = [
        sys.executable,
        "-m",
        "detectord",
        "record",
        "--out",
        str(out),
        "--web.listen-address",
        f"127.0.0.1:{port}",
        *args,
    ]
    url = f"http://127.0.0.1:{port}"
    async with children.run(
        argv, log=log, cwd=REPO, name="detectord record", ready_url=f"{url}/-/ready", ready_timeout=60
    ) as child:
        yield Recorder(url, out, child)

"""The container image (Containerfile), built by scripts/build-image.sh with podman from Debian's
packages and run as a user would run it: read-only root, a volume, a mounted config, a published
port; it scores a remote-written fleet, reports healthy, runs as 65532 and stops cleanly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

import detectord
from detectord.children import free_port, wait_http_ok
from tests.support import REPO, V1_HEADERS, coredns_scrape, v1_body

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PODMAN = REPO / "scripts" / "podman"
IMAGE = f"docker.io/detectord/detectord:{detectord.__version__}"
STEP_S = 5
INSTANCES = ("10.0.0.1:9153", "10.0.0.2:9153", "10.0.0.3:9153")
CONFIG = f"""
web:
  listen_address: "0.0.0.0:9464"
ingest:
  step: {STEP_S}s
state:
  dir: /var/lib/detectord/state
logging:
  format: json
"""


def _script(name: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / name)], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built (or found up to date) by the project's scripts; the first build takes minutes."""
    deps = _script("install-container-deps.sh", 900)
    if deps.returncode != 0:
        pytest.skip(f"podman and mmdebstrap cannot be installed here: {deps.stderr.strip()[-1000:]}")
    build = _script("build-image.sh", 1800)
    assert build.returncode == 0, f"scripts/build-image.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    return IMAGE


async def podman(*args: str, check: bool = True, timeout: float = 120, stderr: bool = False) -> str:
    """podman's output (with its stderr, where `stderr`), through the project's engine settings."""
    proc = await asyncio.create_subprocess_exec(
        str(PODMAN),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if stderr else asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    err = err or b""
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {proc.returncode}\n{err.decode()[-2000:]}")
    return out.decode()


@dataclass
class Container:
    name: str
    volume: str
    url: str

    async def logs(self) -> str:
        return await podman("logs", self.name, check=False, stderr=True)


@pytest.fixture
async def container(image: str, tmp_path: Path) -> AsyncIterator[Container]:
    """The image run with its root read-only (and no tmpfs on /tmp: nothing may write outside the
    volume), a named volume on /var/lib/detectord and this test's config mounted over the default."""
    name = f"detectord-test-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "detectord.yml"
    config.write_text(CONFIG)
    port = free_port()
    await podman("volume", "create", name)
    try:
        await podman(
            "run", "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
            "--volume", f"{name}:/var/lib/detectord",
            "--volume", f"{config}:/etc/detectord/detectord.yml:ro",
            "--publish", f"127.0.0.1:{port}:9464",
            image,
        )  # fmt: skip
        c = Container(name, name, f"http://127.0.0.1:{port}")
        try:
            await wait_http_ok(c.url + "/-/ready", timeout=120)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{await c.logs()}") from exc
        yield c
    finally:
        await podman("rm", "--force", "--time", "5", name, check=False)
        await podman("volume", "rm", "--force", name, check=False)


async def _remote_write_fleet(base: str, steps: int) -> None:
    """`steps` scrapes of every instance, STEP_S apart, ending now: one remote-write request each."""
    t0 = int(time.time() * 1000) - steps * STEP_S * 1000
    async with aiohttp.ClientSession() as s:
        for k in range(steps):
            series = [x for inst in INSTANCES for x in coredns_scrape(inst, t0 + k * STEP_S * 1000, k)]
            async with s.post(base + "/api/v1/write", data=v1_body(series), headers=V1_HEADERS) as r:
                assert r.status == 204, await r.text()


def _score_series(inst: str) -> str:
    return f'detectord_anomaly_score{{instance="{inst}",job="coredns"}}'


async def _scores(base: str, timeout: float = 60) -> str:
    """/metrics once every instance has a score (or at the deadline)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(base + "/metrics") as r:
                text = await r.text()
            if all(_score_series(i) in text for i in INSTANCES) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)


@pytest.mark.timeout(1800)
async def test_the_image_scores_a_fleet_as_65532_on_a_read_only_root_and_stops_cleanly(
    container: Container,
) -> None:
    window = json.loads((REPO / "models/default/5s/detectord-model.json").read_text())["window"]
    await _remote_write_fleet(container.url, window + 6)
    text = await _scores(container.url)
    for inst in INSTANCES:
        assert _score_series(inst) in text, await container.logs()

    top = await podman("top", container.name, "user", "group", "args")
    daemon = [line.split() for line in top.splitlines() if "detectord serve" in line]
    assert daemon and daemon[0][:2] == ["65532", "65532"], top

    await podman("healthcheck", "run", container.name)
    assert (await podman("inspect", "--format", "{{.State.Health.Status}}", container.name)).strip() == "healthy"
    # Nothing was written to the root filesystem (it is read-only; this says nothing failed quietly).
    assert (await podman("diff", container.name)).strip() == ""

    # `podman stop` sends the image's STOPSIGNAL (SIGTERM), and SIGKILL only past --time: exit 0
    # means the daemon shut down on SIGTERM by itself.
    await podman("stop", "--time", "60", container.name, timeout=90)
    rc = (await podman("inspect", "--format", "{{.State.ExitCode}}", container.name)).strip()
    assert rc == "0", await container.logs()
    mountpoint = Path((await podman("volume", "inspect", "--format", "{{.Mountpoint}}", container.volume)).strip())
    snapshot = mountpoint / "state" / "snapshot.dsnap"
    assert snapshot.is_file() and snapshot.stat().st_size > 0, sorted(str(p) for p in mountpoint.rglob("*"))

    # Started again on the same volume, it knows the fleet before anything is written to it.
    await podman("start", container.name)
    await wait_http_ok(container.url + "/-/ready", timeout=120)
    async with aiohttp.ClientSession() as s, s.get(container.url + "/api/v1/instances") as r:
        known = {i["labels"]["instance"] for i in (await r.json())["data"]}
    assert known == set(INSTANCES), await container.logs()

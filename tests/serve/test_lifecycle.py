"""`detectord serve` as a process: SIGHUP and /-/reload with broken models and configs, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lab.peers.detectord import Detectord, run_detectord
from tests.support import REPO, V1_HEADERS, coredns_scrape, metric, v1_body

pytestmark = pytest.mark.slow

CONFIG = """
web:
  max_body_size: 64MiB
  max_decoded_body_size: 256MiB
ingest:
  step: 1s
model:
  any_step: true
inference:
  max_batch: 64
logging:
  format: json
"""


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Detectord]:
    """`detectord serve` on a copy of the default model (the tests break it), run from elsewhere."""
    model = tmp_path / "model"
    shutil.copytree(REPO / "models/default/5s", model)
    async with run_detectord(
        CONFIG, workdir=tmp_path, model=model, cwd=tmp_path, args=["--web.enable-lifecycle"]
    ) as det:
        yield det


async def _get(base: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(base + path) as r:
        return r.status, await r.text()


async def _wait_metric(base: str, name: str, value: float, timeout: float = 60, **labels: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, text = await _get(base, "/metrics")
        if metric(text, name, **labels) >= value or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.1)


async def test_sighup_with_broken_model_keeps_the_old_one(daemon: Detectord) -> None:
    proc, base, model = daemon.child.proc, daemon.url, daemon.model
    (model / "model.weights.h5").write_bytes(b"this is not an HDF5 file")
    proc.send_signal(signal.SIGHUP)
    text = await _wait_metric(base, "detectord_reloads_total", 1, result="failure")
    assert metric(text, "detectord_reloads_total", result="failure") == 1
    assert proc.poll() is None
    assert (await _get(base, "/-/ready"))[0] == 200
    # Still ingesting and scoring with the old model.
    async with aiohttp.ClientSession() as s:
        body = v1_body(coredns_scrape("a:9153", int(time.time() * 1000), 1))
        async with s.post(base + "/api/v1/write", data=body, headers=V1_HEADERS) as r:
            assert r.status == 204


async def test_reload_endpoint_refuses_a_bad_config_then_applies_a_good_one(daemon: Detectord) -> None:
    proc, base = daemon.child.proc, daemon.url
    daemon.write_config(CONFIG + "alerting:\n  sevrity: page\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/-/reload") as r:
            assert r.status == 500
            assert "alerting.sevrity" in await r.text()
        assert metric((await _get(base, "/metrics"))[1], "detectord_config_last_reload_successful") == 0
        daemon.write_config(CONFIG + "alerting:\n  severity: page\n")
        async with s.post(base + "/-/reload") as r:
            assert r.status == 200, await r.text()
    text = await _wait_metric(base, "detectord_reloads_total", 1, result="success")
    assert metric(text, "detectord_reloads_total", result="failure") == 1
    assert metric(text, "detectord_config_last_reload_successful") == 1
    assert metric(text, "detectord_config_last_reload_success_timestamp_seconds") > time.time() - 60
    assert proc.poll() is None


async def test_sigterm_finishes_in_flight_requests_and_exits_0(daemon: Detectord) -> None:
    proc, base = daemon.child.proc, daemon.url
    now = int(time.time() * 1000)
    series = []
    for i in range(20000):
        series += coredns_scrape(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:9153", now, 1)
    body = v1_body(series)
    async with aiohttp.ClientSession() as s:
        post = asyncio.ensure_future(s.post(base + "/api/v1/write", data=body, headers=V1_HEADERS))
        await asyncio.sleep(0.3)  # the request is being decoded
        proc.send_signal(signal.SIGTERM)
        resp = await post
        assert resp.status == 204
        resp.release()
    rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    assert rc == 0


def test_a_taken_listen_address_is_one_log_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "detectord.yml"
        cfg.write_text(f'web: {{listen_address: "127.0.0.1:{port}"}}\nstate: {{dir: ""}}\n')
        got = subprocess.run(
            [sys.executable, "-m", "detectord", "serve", "--config.file", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert got.returncode == 1, got.stderr[-2000:]
    lines = got.stderr.splitlines()
    assert all(line.startswith("{") for line in lines), got.stderr[-2000:]  # no traceback
    (failed,) = [json.loads(line) for line in lines if '"cannot start"' in line]
    assert "address already in use" in failed["error"]

"""What a new user does: build the sdist, build the wheel from it, `pip install` the wheel into a
fresh venv outside the repository, run `detectord serve` with no config from an empty directory.
It serves the packaged default model set, prints only JSON log lines, and scores a fleet."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import aiohttp
import pytest

from detectord import __version__, children
from tests.support import V1_HEADERS, coredns_scrape, metric, v1_body

REPO = Path(__file__).resolve().parents[1]
NOW = int(time.time() * 1000)
# The venv's own environment: nothing of the test run's (KERAS_BACKEND, PYTHONPATH) leaks into it.
CLEAN_ENV = ["env", "-u", "KERAS_BACKEND", "-u", "TF_CPP_MIN_LOG_LEVEL", "-u", "PYTHONPATH", "-u", "VIRTUAL_ENV"]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user")
    assert not root.is_relative_to(REPO)
    dist = root / "dist"
    # The sdist first, then the wheel from it: a file the sdist lacks fails here, as on PyPI.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob(f"detectord-{__version__}-*.whl")
    (sdist,) = dist.glob(f"detectord-{__version__}.tar.gz")
    with tarfile.open(sdist) as tar:
        assert f"detectord-{__version__}/models/default/15s/model.weights.h5" in tar.getnames()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    pip = [str(root / "venv/bin/pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*CLEAN_ENV, *pip, str(wheel)], check=True, cwd=root)
    return root / "venv"


def test_the_wheel_carries_the_default_model_set_and_no_backend_but_jax(venv: Path) -> None:
    site = next((venv / "lib").glob("python3*/site-packages"))
    models = site / "detectord/_models/default"
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["10s", "15s", "1m", "30s", "5s"]
    assert (models / "15s/model.weights.h5").is_file()
    assert (site / "jax").is_dir()
    assert not (site / "tensorflow").exists()


def test_a_backend_that_is_not_installed_is_named_with_what_to_install(venv: Path, tmp_path: Path) -> None:
    got = subprocess.run(
        [*CLEAN_ENV, "KERAS_BACKEND=tensorflow", str(venv / "bin/detectord"), "check", "config", "/dev/null"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 2
    assert "KERAS_BACKEND=tensorflow but tensorflow is not installed: pip install 'detectord[tf]'" in got.stderr


async def test_serve_with_no_config_scores_a_fleet_on_the_packaged_model(venv: Path, tmp_path: Path) -> None:
    port = children.free_port()
    log = tmp_path / "serve.log"
    argv = [*CLEAN_ENV, str(venv / "bin/detectord"), "serve", "--web.listen-address", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"
    instances = [f"10.0.0.{i}:9153" for i in range(1, 4)]
    async with (
        children.run(argv, log=log, cwd=tmp_path, name="detectord", ready_url=f"{base}/-/ready", ready_timeout=180),
        aiohttp.ClientSession() as s,
    ):
        # No config: the model set's 1m model (Prometheus's default scrape interval).
        step_ms, window = 60_000, 8
        t0 = NOW - (window + 12) * step_ms
        for k in range(window + 10):
            series = [x for inst in instances for x in coredns_scrape(inst, t0 + k * step_ms, k)]
            async with s.post(f"{base}/api/v1/write", data=v1_body(series), headers=V1_HEADERS) as r:
                assert r.status == 204, await r.text()
        text = ""
        for _ in range(100):
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
            if all(f'detectord_anomaly_score{{instance="{i}",job="coredns"}}' in text for i in instances):
                break
            await asyncio.sleep(0.1)
        assert metric(text, "detectord_instances", state="scoring") == len(instances)
        for inst in instances:
            assert f'detectord_anomaly_score{{instance="{inst}",job="coredns"}}' in text
        # The pages come with the wheel.
        for path, kind in [("/", "text/html"), ("/ui/status.js", "text/javascript"), ("/ui/style.css", "text/css")]:
            async with s.get(base + path) as r:
                assert r.status == 200 and r.content_type == kind, path
    lines = log.read_text().splitlines()
    assert lines, "detectord logged nothing"
    records = [json.loads(line) for line in lines]  # every line is JSON: no backend noise between them
    started = next(r for r in records if r["event"] == "detectord started")
    assert started["model"] == "default" and started["step"] == 60.0
    assert (tmp_path / "detectord-state").is_dir()  # the state directory, relative to where it runs

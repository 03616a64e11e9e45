"""A Prometheus that is down, hangs or is asked something it cannot parse delays the start by at
most `backfill.timeout`: the daemon starts cold and says why (the working case, against a real
Prometheus, is tests/test_backfill.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from detectord import children
from detectord.errors import ConfigError
from detectord.serve.server import Server
from lab.peers.prometheus import run_prometheus, write_history
from tests.support import remote_read_endpoint, running_server, slow_proxy, test_config


async def _hang(request: web.Request) -> web.Response:
    """A remote-read endpoint that takes the request and never answers (no real Prometheus can be
    made to hang on demand)."""
    await request.read()
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


def _cfg(url: str, timeout: float = 2.0) -> object:
    return test_config(backfill={"url": url, "timeout": timeout})


async def _start(cfg: object) -> tuple[float, list[Any], Server]:
    t0 = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as srv:
            took = time.monotonic() - t0
            assert srv.ready
    return took, logs, srv


async def test_a_prometheus_that_is_down_means_a_cold_start_that_says_so() -> None:
    _, logs, srv = await _start(_cfg(f"http://127.0.0.1:{children.free_port()}/api/v1/read"))
    failed = [e for e in logs if e["event"].startswith("backfill from Prometheus failed")]
    assert len(failed) == 1 and "127.0.0.1" in str(failed[0]["error"]), logs
    assert srv.metrics.backfills.labels("failure")._value.get() == 1


async def test_a_prometheus_that_hangs_delays_the_start_by_the_timeout_at_most() -> None:
    async with remote_read_endpoint(_hang) as url:
        took, logs, srv = await _start(_cfg(url, timeout=2.0))
    assert any(e["event"].startswith("backfill from Prometheus timed out") for e in logs), logs
    assert srv.metrics.backfills.labels("timeout")._value.get() == 1
    # Loading the model takes its own time; the backfill adds at most its timeout to it.
    cold_took, _, _ = await _start(test_config())
    assert took < cold_took + 2.0 + 1.5, (took, cold_took)


async def test_a_bad_selector_is_a_config_error_naming_the_key() -> None:
    srv = Server(test_config(backfill={"url": "http://127.0.0.1:9/api/v1/read", "match": '{job="x"'}))
    with pytest.raises(ConfigError, match=r"backfill\.match"):
        await srv.startup()
    await srv.shutdown()


async def test_history_that_does_not_fit_the_timeout_is_cut_from_its_oldest_end(tmp_path: Path) -> None:
    """A slow Prometheus (each read answered 1.5 s late) and two hours to read in 12 chunks, within
    6 s: the oldest chunks are skipped, the newest read, and every instance scores when ready."""
    async with run_prometheus({}, workdir=tmp_path / "prom", enable_receiver=True) as prom:
        await write_history(f"{prom.url}/api/v1/write", 3, 1800.0)
        async with slow_proxy(f"{prom.url}/api/v1/read", delay_s=1.5) as url:
            cfg = test_config(
                ingest={"step": 15.0},
                model={"any_step": False},
                backfill={"url": url, "lookback": 7200.0, "timeout": 6.0},
            )
            with structlog.testing.capture_logs() as logs:
                async with running_server(cfg) as srv:
                    keys = srv.ingestor.extractor.instance_keys()
                    warming = [k for k in keys if srv.ingestor.is_warming(k)]
    done = [e for e in logs if e["event"] == "backfilled from Prometheus"]
    assert len(done) == 1, logs
    assert 0 < done[0]["skipped_seconds"] < 7200
    assert done[0]["seconds"] < 6.0
    assert len(keys) == 3 and warming == []

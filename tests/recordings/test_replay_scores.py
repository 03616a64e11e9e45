"""A committed lab recording replayed into a running `detectord serve` gets, window for window,
the scores `detectord score` computes offline: one decoding, feature and window path."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import numpy as np

from detectord.config import ModelConfig
from detectord.detectors import load_model
from detectord.recordings.replay import replay
from detectord.recordings.scoring import recording_windows, score_windows
from lab.peers.detectord import run_detectord
from tests.support import REPO

RECORDING = REPO / "data/faults-1.drec.xz"
STEP_S = 5


async def _live_scores(url: str, want: int, timeout: float = 120.0) -> dict[tuple[str, ...], list[list[float]]]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{url}/api/v1/scores") as r:
                data = (await r.json())["data"]
            live: dict[tuple[str, ...], list[list[float]]] = {
                (d["labels"]["job"], d["labels"]["instance"]): d["scores"] for d in data
            }
            if sum(map(len, live.values())) >= want or time.monotonic() > deadline:
                return live
            await asyncio.sleep(0.5)


async def test_replay_into_serve_scores_like_offline(tmp_path: Path) -> None:
    model = load_model(ModelConfig(path=REPO / "models/default"), STEP_S)
    loop = asyncio.get_running_loop()
    got = await loop.run_in_executor(
        None, lambda: recording_windows(RECORDING, step_seconds=STEP_S, window=model.window, inputs=model.inputs)
    )
    offline = score_windows(got.requests, model)
    assert got.read.torn_bytes == 0 and got.bad_requests == 0
    assert len(offline) >= 4 and all(len(s.scores) > 20 for s in offline.values())

    config = (
        f"ingest:\n  step: {STEP_S}s\n  instance_ttl: 1h\ninference:\n  score_history: 100000\n  queue_size: 1000000\n"
    )
    async with run_detectord(config, workdir=tmp_path) as d:
        stats = await replay(RECORDING, d.write_url, speed=0)
        assert stats.sent == got.read.records and not stats.refused and not stats.failed
        live = await _live_scores(d.url, want=len(got.requests))
        metrics = await d.metrics()
    dropped = re.findall(r"^detectord_windows_dropped_total\{.*\} (\S+)$", metrics, re.MULTILINE)
    assert all(float(v) == 0 for v in dropped), dropped

    assert set(live) == {k for k in offline}
    for key, want in offline.items():
        pairs: np.ndarray = np.array(live[key])
        np.testing.assert_array_equal(pairs[:, 0].astype(np.int64), want.timestamps_ms, err_msg=str(key))
        # Batches are padded differently live and offline: float32 sums may differ in the last bits.
        np.testing.assert_allclose(pairs[:, 1], want.scores, rtol=1e-4, atol=1e-5, err_msg=str(key))
    # The recording holds faults: the comparison covers anomalous windows, not only quiet ones.
    assert max(float(s.scores.max()) for s in offline.values()) > 1.0

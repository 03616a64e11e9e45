"""A firing alert links to the evidence: its generatorURL, as a real Alertmanager 0.25 holds it,
is the page of that instance on detectord (web.external_url), and that page's data is the
instance's."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from detectord.children import free_port
from detectord.ingest.features import parse_url_key
from detectord.recordings.replay import replay
from detectord.serve.pages import UI
from lab.peers.alertmanager import run_alertmanager
from lab.peers.detectord import run_detectord
from tests.serve.test_api import CUT_MINUTES, SOURCE, faulted_at_cut
from tests.support import slice_recording

pytestmark = [pytest.mark.e2e]


async def test_a_firing_alerts_generator_url_is_its_instance_page(tmp_path: Path) -> None:
    recording = slice_recording(SOURCE, tmp_path / "faults-1.drec", CUT_MINUTES)
    job, instance = faulted_at_cut()
    port = free_port()
    async with run_alertmanager(tmp_path / "am") as am:
        config = {
            "web": {"external_url": f"http://127.0.0.1:{port}/"},
            "ingest": {"step": "5s"},
            "inference": {"queue_size": 100_000},
            "alerting": {
                "for": "10s",
                "keep_firing_for": "1m",
                "resend_interval": "2s",
                "alertmanagers": [{"url": am.url}],
            },
        }
        async with run_detectord(config, workdir=tmp_path / "detectord", port=port) as det:
            stats = await replay(recording, det.write_url, speed=0)
            assert stats.sent and not stats.refused and not stats.failed

            deadline = time.monotonic() + 60
            mine: list[dict[str, Any]] = []
            while not mine:
                assert time.monotonic() < deadline, f"no alert for {instance} in Alertmanager: {await am.alerts()}"
                await asyncio.sleep(0.5)
                mine = await am.alerts(filter=['alertname="CoreDNSAnomaly"', f'instance="{instance}"'])
            [alert] = mine
            url = alert["generatorURL"]
            assert url.startswith(f"http://127.0.0.1:{port}/instances/")

            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    assert r.status == 200 and r.content_type == "text/html"
                    assert await r.text() == (UI / "instance.html").read_text()
                key = url.rsplit("/", 1)[1]
                assert parse_url_key(key) == (job, instance)
                async with s.get(f"{det.url}/api/v1/instances/{key}") as r:
                    data = (await r.json())["data"]
            assert data["labels"] == {"job": job, "instance": instance}
            assert data["alert"] == "firing"
            [shown] = [a for a in data["alerts"] if a["state"] == "firing"]
            assert round(datetime.fromisoformat(alert["startsAt"]).timestamp() * 1000) == shown["starts_at"]
            # The page shows the alert as Alertmanager has it, once the last step's is re-sent.
            while alert["annotations"]["description"] != shown["description"]:
                assert time.monotonic() < deadline, (alert["annotations"], shown)
                await asyncio.sleep(0.5)
                [alert] = await am.alerts(filter=['alertname="CoreDNSAnomaly"', f'instance="{instance}"'])
            assert f"Top contributing features: {data['top_features'][0]['name']} " in shown["description"]

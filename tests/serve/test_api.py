"""The JSON API behind the pages, on a live server fed the first minutes of a lab recording: the
fleet and model, instances sorted, filtered and paged, one instance's scores, window against its
baseline and alerts; the pages and their files; keys in URLs; bad queries answered 400."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from detectord.alerting.states import Alert
from detectord.config import Duration
from detectord.ingest.features import parse_url_key, url_key
from detectord.recordings.replay import replay
from detectord.recordings.truth import read_truth, truth_path
from detectord.serve.api import key_matcher
from detectord.serve.history import RECENT_ALERTS, InstanceScores
from tests.support import DATA, running_server, slice_recording, test_config

# faults-1 cut 6.5 minutes in: event 3 (forward_saturation on edge-3, 5.8–6.8 min) is under way,
# and edge-3 has had the fleet's highest score for 40 s (found with `detectord score` offline).
CUT_MINUTES = 6.5


@pytest.mark.parametrize(
    "key",
    [
        ("coredns-edge", "edge-0"),
        ("kube-system/coredns", "10.0.0.1:9153"),
        ("", "a,b~c%2F d"),
        ("köln", "ünïcode ☃"),
        ("x",),
    ],
)
def test_instance_keys_are_one_readable_url_segment_and_round_trip(key: tuple[str, ...]) -> None:
    text = url_key(key)
    assert parse_url_key(text) == key
    assert all(c.isascii() and (c.isalnum() or c in "._:-~,") for c in text)
    assert text.count(",") == len(key) - 1


def test_plain_keys_read_as_they_are_and_bad_ones_are_refused() -> None:
    assert url_key(("coredns-edge", "10.0.0.1:9153")) == "coredns-edge,10.0.0.1:9153"
    assert url_key(("kube-system/coredns",)) == "kube-system~2Fcoredns"
    for bad in ("a~2", "a~zz", "a b", "a/b", "é"):
        with pytest.raises(ValueError):
            parse_url_key(bad)


def test_filter_terms() -> None:
    names = ["job", "instance"]
    keys: list[tuple[str, ...]] = [
        ("coredns-edge", "edge-0"),
        ("coredns-edge", "edge-1"),
        ("coredns-upstream", "upstream-0"),
    ]

    def matching(text: str) -> list[tuple[str, ...]]:
        m = key_matcher(text, names)
        return keys if m is None else [k for k in keys if m(k)]

    assert matching("") == keys
    assert matching("job=coredns-edge") == keys[:2]
    assert matching("EDGE-1") == [keys[1]]
    assert matching("job=coredns-edge 0") == [keys[0]]
    assert matching("job=coredns") == []
    assert matching("pod=x") == []


def test_score_history_keeps_the_newest_steps_in_order() -> None:
    h = InstanceScores(4)
    assert h.step is None and h.pairs() == []
    for i in range(6):
        h.add(1000 * i, i / 2)
    assert h.pairs() == [(2000, 1.0), (3000, 1.5), (4000, 2.0), (5000, 2.5)]
    assert h.last(2)[1].tolist() == [2.0, 2.5] and h.step == 5000
    assert h.resized(2).pairs() == [(4000, 2.0), (5000, 2.5)]


def test_an_instance_page_keeps_its_newest_alerts_once_each() -> None:
    h = InstanceScores(4)
    alerts = [Alert({"alertname": "CoreDNSAnomaly", "n": str(i)}, {}, float(i), 1.0, 0.5) for i in range(7)]
    for a in alerts:
        h.remember(a)
        h.remember(a)  # updated in place while it fires: the same alert again
    assert h.alerts == tuple(alerts[-RECENT_ALERTS:])
    assert h.resized(2).alerts == h.alerts
    assert InstanceScores(4).alerts == ()


SOURCE = sorted(DATA.glob("faults-1.drec*"))[0]


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slice_recording(SOURCE, tmp_path_factory.mktemp("rec") / "faults-1.drec", CUT_MINUTES)


def faulted_at_cut() -> tuple[str, str]:
    """The instance of the fault under way where the recording was cut (from its truth file)."""
    truth = read_truth(truth_path(SOURCE))
    cut = truth.started_ms + CUT_MINUTES * 60_000
    [event] = [e for e in truth.events if e.start_ms and e.end_ms and e.start_ms < cut < e.end_ms]
    [instance] = event.instances
    return instance["job"], instance["instance"]


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as r:
        return r.status, await r.json()


async def test_the_api_shows_the_faulted_instance_first_with_its_window_and_baseline(recording: Path) -> None:
    faulted = faulted_at_cut()
    cfg = test_config(
        ingest={"step": Duration(5)},
        model={"any_step": False},
        alerting={"for_": Duration(10), "keep_firing_for": Duration(30)},
        inference={"queue_size": 100_000},
    )
    async with running_server(cfg) as srv, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{srv.port}"
        stats = await replay(recording, f"{base}/api/v1/write", speed=0)
        assert stats.sent and not stats.refused and not stats.failed

        async def settled() -> dict[str, Any]:
            # Every window of the replay scored and delivered, then the listing of that end state.
            deadline = time.monotonic() + 60
            while not srv.pipeline.worker.idle():
                assert time.monotonic() < deadline, "the inference worker never caught up"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            for _ in range(200):
                status, body = await _get(s, f"{base}/api/v1/instances?limit=0")
                if status == 200 and body["data"] and body["data"][0]["alert"] == "firing":
                    listing: dict[str, Any] = body
                    return listing
                await asyncio.sleep(0.1)
            raise AssertionError(f"no firing instance: {body}")

        listing = await settled()
        rows = listing["data"]
        assert listing["total"] == len(rows) == 6
        assert all(r["score"] is not None and r["state"] == "scoring" and r["sparkline"] for r in rows)
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        top = rows[0]
        assert tuple(top["labels"].values()) == faulted and top["score"] > 1
        assert top["alert"] == "firing" and top["alert_since"] <= top["step"]
        assert top["key"] == url_key(faulted) and len(top["top_features"]) == 3
        assert top["looks_like"] is None or isinstance(top["looks_like"], str)

        # The alert's state per instance, as Prometheus's ALERTS: only the firing one has a series.
        text = srv.metrics_text().decode()
        states = re.findall(r"^detectord_alert_state\{(.*)\} 1\.0$", text, re.MULTILINE)
        assert states == [f'instance="{faulted[1]}",job="{faulted[0]}",state="firing"'], states

        # Per-instance series for all instances, the anomalous ones, or those and the top N.
        def scored(export: str, top: int = 0) -> list[str]:
            srv.exports.export, srv.exports.top = export, top
            text = srv.metrics_text().decode()
            return re.findall(r'^detectord_anomaly_score\{instance="([^"]*)",job="[^"]*"\}', text, re.MULTILINE)

        assert sorted(scored("all")) == sorted(r["labels"]["instance"] for r in rows)
        assert scored("anomalous") == [faulted[1]]
        assert sorted(scored("top", 2)) == sorted(r["labels"]["instance"] for r in rows[:2])
        srv.exports.export = "all"

        status, body = await _get(s, f"{base}/api/v1/status")
        assert status == 200
        data = body["data"]
        assert data["model"]["window"] == srv.pipeline.model.window and data["model"]["step_seconds"] == 5
        assert data["fleet"]["tracked"] == 6 and data["fleet"]["scoring"] == 6 and data["fleet"]["firing"] >= 1
        assert data["latest_step"] == max(r["step"] for r in rows)

        _, edges = await _get(s, f"{base}/api/v1/instances?filter=job%3Dcoredns-edge&sort=labels")
        assert [r["labels"]["instance"] for r in edges["data"]] == ["edge-0", "edge-1", "edge-2", "edge-3"]
        _, page = await _get(s, f"{base}/api/v1/instances?sort=labels&order=desc&offset=1&limit=2")
        assert page["total"] == 6 and [r["labels"]["instance"] for r in page["data"]] == ["upstream-0", "edge-3"]
        _, scores = await _get(s, f"{base}/api/v1/scores?filter=job%3Dcoredns-edge&offset=1&limit=2")
        assert scores["total"] == 4 and [d["labels"]["instance"] for d in scores["data"]] == ["edge-1", "edge-2"]
        assert all(d["scores"] and d["scores"][-1][0] == rows[0]["step"] for d in scores["data"])
        _, by_alert = await _get(s, f"{base}/api/v1/instances?sort=alert&spark=0")
        assert by_alert["data"][0]["alert"] == "firing" and by_alert["data"][0]["sparkline"] == []
        for bad, reason in [
            ("sort=size", "sort must be one of"),
            ("limit=5000", "limit must be in"),
            ("offset=x", "offset"),
        ]:
            async with s.get(f"{base}/api/v1/instances?{bad}") as r:
                assert r.status == 400 and reason in (await r.json())["error"], bad

        status, body = await _get(s, f"{base}/api/v1/instances/{top['key']}")
        assert status == 200
        one = body["data"]
        assert one["labels"] == top["labels"] and one["score"] == top["score"]
        steps = [t for t, _ in one["scores"]]
        assert steps == sorted(steps) and steps[-1] == top["step"] and one["scores"][-1][1] > 1
        [alert] = [a for a in one["alerts"] if a["state"] == "firing"]
        assert alert["starts_at"] == top["alert_since"] and top["top_features"][0]["name"] in alert["description"]
        assert alert["generator_url"].endswith(f"/instances/{top['key']}")
        assert alert["top_features"] == [t["name"] for t in top["top_features"]]
        assert all(r["looks_like"] is None for r in rows if r["score"] < 1 and r["alert"] == "inactive")
        w = one["window"]
        model = srv.pipeline.model
        assert w["features"] == list(model.features) and w["top"] == [t["name"] for t in top["top_features"]]
        assert len(w["timestamps"]) == model.window and w["timestamps"][-1] == top["step"]
        assert set(np.diff(w["timestamps"]).tolist()) == {5000}
        assert all(len(v) == model.window for v in w["values"])
        for lo, med, hi in zip(w["low"], w["median"], w["high"], strict=True):
            assert lo <= med <= hi
        # The window is in the features' own units: its newest row is the latest raw value.
        for t in top["top_features"]:
            i = w["features"].index(t["name"])
            assert math.isclose(w["values"][i][-1], t["value"], rel_tol=1e-3, abs_tol=1e-6), t
            assert math.isclose(w["deviation"][i], t["deviation"], rel_tol=1e-6), t

        for path, status_want in [("instances/no,such", 404), ("instances/x", 404), ("instances/a~ZZ", 400)]:
            async with s.get(f"{base}/api/v1/{path}") as r:
                assert r.status == status_want, path

        for path, kind in [
            ("/", "text/html"),
            (f"/instances/{top['key']}", "text/html"),
            ("/ui/style.css", "text/css"),
        ]:
            async with s.get(base + path) as r:
                assert r.status == 200 and r.content_type == kind, path
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        for path in ("/ui/nothing.js", "/ui/..%2Fapi.py", "/ui/.hidden.js"):
            async with s.get(base + path) as r:
                assert r.status == 404, path
        async with s.get(f"{base}/model/card") as r:
            assert r.status == 200 and model.kind in await r.text()

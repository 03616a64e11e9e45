"""The status page and the instance pages in a real browser (headless Debian Chromium), served by
a real `detectord serve`: a lab recording replayed into it up to the middle of a fault, and a
fleet of 10,000 instances. The pages must work with nothing but detectord on the network."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from selenium.webdriver.common.by import By

from detectord.recordings.replay import replay
from detectord.recordings.truth import read_truth, truth_path
from lab.peers.detectord import Detectord, run_detectord
from tests.support import DATA, V1_HEADERS, coredns_scrape, slice_recording, v1_body
from tests.ui.browser import Browser, chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECORDING = DATA / "faults-1.drec.xz"
STEP_S = 5
# The first CUT_MINUTES of the recording end during fault 3 (forward_saturation on edge-3,
# 346–407 s after the run started). Found offline as tests/recordings/test_replay_scores.py
# scores (recording_windows + score_windows, the 5s model at a 5 s step): from the step 345 s
# in, edge-3 scores 2.3 rising to 4.3 while every other instance stays below 1, so with
# `for: 0s` its alert fires at once and it is the top scorer until the cut. The last step served
# lands about 384 s in, well inside the fault; which instance is faulted is read from the truth file.
CUT_MINUTES = 6.5
CONFIG = f"""
ingest:
  step: {STEP_S}s
  instance_ttl: 1h
alerting:
  for: 0s
"""


async def _api(d: Detectord, path: str, **params: str) -> Any:
    async with d.session() as s, s.get(f"{d.url}/api/v1/{path}", params=params) as r:
        assert r.status == 200, (path, r.status, await r.text())
        return (await r.json())["data"]


async def _settled(d: Detectord, timeout: float = 120.0) -> dict[str, Any]:
    """/api/v1/status once a step has been scored and no new one came for two seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        status: dict[str, Any] = await _api(d, "status")
        if status["latest_step"] != last:
            last, since = status["latest_step"], time.monotonic()
        elif last is not None and time.monotonic() - since >= 2.0:
            return status
        assert time.monotonic() < deadline, f"no settled step within {timeout}s: {status}"
        await asyncio.sleep(0.25)


def _row_labels(row: Any) -> dict[str, str]:
    names = [e.text for e in row.find_elements(By.CSS_SELECTOR, ".label-name")]
    values = [e.text for e in row.find_elements(By.CSS_SELECTOR, ".label-value")]
    return dict(zip(names, values, strict=True))


def _cell(row: Any, selector: str) -> str:
    return str(row.find_element(By.CSS_SELECTOR, selector).text)


def _rows(b: Browser) -> list[Any]:
    return b.css("#instances tbody tr[data-key]")


def _sorted_by(b: Browser, sort: str, order: str) -> bool:
    th = b.one(f'#instances th[data-sort="{sort}"]')
    return bool(th.get_attribute("aria-sort") == order)


def _only_detectord(b: Browser, d: Detectord) -> None:
    """Every request the pages made went to detectord; none failed in the console."""
    urls = b.requests()
    assert urls, "no requests recorded"
    elsewhere = [u for u in urls if urlsplit(u).scheme != "data" and urlsplit(u).netloc != f"127.0.0.1:{d.port}"]
    assert not elsewhere, f"the pages fetched from beyond detectord: {elsewhere}"
    assert b.console_errors() == []


def _top_feature_named(description: str, features: list[str]) -> str:
    """The first feature the description names (the longest name where one holds another)."""
    found = [(description.find(f), -len(f), f) for f in features if f in description]
    assert found, f"the alert names no feature: {description!r}"
    return min(found)[2]


async def test_status_and_instance_pages_during_a_fault(tmp_path: Path) -> None:
    cut = slice_recording(RECORDING, tmp_path / "cut.drec", CUT_MINUTES)
    truth = read_truth(truth_path(RECORDING))
    async with run_detectord(CONFIG, workdir=tmp_path / "detectord") as d:
        stats = await replay(cut, d.write_url, speed=0)
        assert stats.sent > 0 and not stats.refused and not stats.failed
        status = await _settled(d)
        now = status["latest_step"]
        faults = [e for e in truth.events if e.start_ms and e.end_ms and e.start_ms <= now <= e.end_ms]
        assert len(faults) == 1, f"the cut should end during one fault, at {now}: {faults}"
        faulted = [{"job": i["job"], "instance": i["instance"]} for i in faults[0].instances]
        everyone = [{"job": i.job, "instance": i.instance} for i in truth.instances]

        # What the instance pages are drawn from (the data no longer moves): each faulted instance's
        # newest alert and the top feature it names.
        listing = await _api(d, "instances", limit="0")
        keys = {tuple(i["labels"].items()): i["key"] for i in listing}
        details = {k: await _api(d, f"instances/{k}") for k in (keys[tuple(i.items())] for i in faulted)}

        def scenario() -> None:
            with chromium() as b:
                b.get(f"{d.url}/")
                b.wait(lambda: len(_rows(b)) == len(everyone), message="a row per instance")
                rows = _rows(b)
                # Every instance of the recording, each with a score.
                shown = {tuple(_row_labels(r).items()): _cell(r, "td.score") for r in rows}
                assert sorted(shown) == sorted(tuple(i.items()) for i in everyone)
                assert all(float(score) >= 0 for score in shown.values()), shown

                # Sorted by labels, then by score (descending): the faulted instance comes first.
                b.one('#instances th[data-sort="labels"] button').click()
                b.wait(lambda: _sorted_by(b, "labels", "ascending"), message="sorted by labels")
                by_labels = [tuple(_row_labels(r).values()) for r in _rows(b)]
                assert by_labels == sorted(by_labels)
                b.one('#instances th[data-sort="score"] button').click()
                b.wait(lambda: _sorted_by(b, "score", "descending"), message="sorted by score")
                rows = _rows(b)
                scores = [float(_cell(r, "td.score")) for r in rows]
                assert scores == sorted(scores, reverse=True)
                first = rows[0]
                assert _row_labels(first) in faulted, (_row_labels(first), faulted)
                assert first.get_attribute("data-alert") == "firing"
                assert _cell(first, "td.alert").startswith("firing")
                key = str(first.get_attribute("data-key"))
                b.screenshot("status.png")

                # Its link opens its page.
                first.find_element(By.CSS_SELECTOR, "td.labels a").click()
                b.wait(lambda: b.css("#raw-values tbody tr"), message="the instance page")
                assert urlsplit(b.driver.current_url).path == f"/instances/{key}"
                inst = details[key]
                alert = inst["alerts"][-1]
                assert alert["state"] == "firing"
                features = inst["window"]["features"]
                top = (alert.get("top_features") or [None])[0] or _top_feature_named(alert["description"], features)
                # The score plot with the threshold line and the firing alert shaded.
                assert b.css("#score-plot .score-line")
                assert b.css("#score-plot line.threshold")
                assert b.css("#score-plot .alert-span.firing")
                # The alert's description, and its top feature named, listed first and highlighted.
                assert b.one("#alerts .description").text == alert["description"]
                assert b.css(f'#top-features li[data-feature="{top}"]'), top
                assert b.one("#features .feature.top").get_attribute("data-feature") == top
                assert _cell(b.one(f'#features .feature.top[data-feature="{top}"]'), "figcaption").startswith(top)
                # A small multiple and a raw-value row for every feature of the window.
                assert len(b.css("#features .feature")) == len(features)
                assert [r.get_attribute("data-feature") for r in b.css("#raw-values tbody tr")] == features
                assert len(b.css("#raw-values thead th")) == 2 + len(inst["window"]["timestamps"])
                b.screenshot("instance.png")
                b.one("#back").click()
                b.wait(lambda: _rows(b), message="back to the status page")
                assert urlsplit(b.driver.current_url).path == "/"
                _only_detectord(b, d)

                # An instance detectord does not track: the page says so (its 404 is the one error logged).
                b.get(f"{d.url}/instances/coredns-edge,no-such-edge")
                b.wait(lambda: b.one("#banner").is_displayed(), message="the banner")
                assert "no such instance" in b.one("#banner").text

        await asyncio.to_thread(scenario)


FLEET = 10_000


async def test_status_page_at_ten_thousand_instances(tmp_path: Path) -> None:
    config = f"ingest:\n  step: {STEP_S}s\n  max_instances: {2 * FLEET}\n"
    async with run_detectord(config, workdir=tmp_path) as d:
        ts = int(time.time() * 1000)
        series = [s for i in range(FLEET) for s in coredns_scrape(f"dns-{i:05d}", ts, STEP_S, job="fleet")]
        async with aiohttp.ClientSession() as s, s.post(d.write_url, data=v1_body(series), headers=V1_HEADERS) as r:
            assert r.status == 204, await r.text()
        deadline = time.monotonic() + 60
        while (await _api(d, "status"))["fleet"]["tracked"] < FLEET:
            assert time.monotonic() < deadline, "the fleet was not all tracked"
            await asyncio.sleep(0.5)

        def scenario() -> float:
            with chromium() as b:
                start = time.monotonic()
                b.get(f"{d.url}/")
                b.wait(lambda: b.one("#pager .range").text == "1–100 of 10,000", message="the first page")
                elapsed = time.monotonic() - start
                # One page of rows, not the fleet; unscored instances come in label order.
                rows = _rows(b)
                assert len(rows) == 100
                assert _row_labels(rows[0]) == {"job": "fleet", "instance": "dns-00000"}
                assert _cell(rows[0], "td.state") == "warming"
                b.screenshot("status-10k.png")

                b.one('#pager [data-page="next"]').click()
                b.wait(lambda: b.one("#pager .range").text == "101–200 of 10,000", message="the next page")
                assert _row_labels(_rows(b)[0])["instance"] == "dns-00100"
                assert b.one('#pager [data-page="prev"]').is_enabled()
                # The page refreshes itself and stays where it is: one more instance shows in the count.
                more = coredns_scrape(f"dns-{FLEET:05d}", int(time.time() * 1000), STEP_S, job="fleet")
                req = urllib.request.Request(d.write_url, data=v1_body(more), headers=V1_HEADERS)
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert resp.status == 204
                b.wait(lambda: b.one("#pager .range").text == "101–200 of 10,001", message="the refreshed page")

                b.one("#filter").send_keys("dns-04242")
                b.wait(lambda: b.one("#pager .range").text == "1–1 of 1", message="the filtered page")
                assert [_row_labels(r)["instance"] for r in _rows(b)] == ["dns-04242"]
                _only_detectord(b, d)
                return elapsed

        elapsed = await asyncio.to_thread(scenario)
        # Loose: the benchmark (bench/status_page.py) measures; this only catches a page that crawls.
        assert elapsed < 10.0, f"the status page took {elapsed:.1f}s at {FLEET} instances"

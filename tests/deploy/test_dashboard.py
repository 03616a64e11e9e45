"""The Grafana dashboard (deploy/grafana/) and detectord's health rules (deploy/prometheus/, the
PrometheusRule): kube-prometheus-stack's dashboard conventions, the ConfigMap and the provisioning
file carrying the one dashboard, the rules file equal to the PrometheusRule and clean under
promtool, and every PromQL expression of both answered by a real Prometheus that scrapes a real
`detectord serve` fed a lab recording."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from detectord.recordings.replay import replay
from lab.peers.alertmanager import run_alertmanager
from lab.peers.detectord import Detectord, run_detectord
from lab.peers.prometheus import Prometheus, run_prometheus
from tests.deploy.kube import KUBE, install_kube_tools, kustomize_build
from tests.support import DATA, REPO, V1_HEADERS, slice_recording, v1_body

DASHBOARD = REPO / "deploy" / "grafana" / "detectord.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "detectord.yaml"
RULES = REPO / "deploy" / "prometheus" / "detectord-rules.yml"
RULES_TESTS = Path(__file__).with_name("detectord-rules.test.yml")
PROMETHEUS_RULE = KUBE / "components" / "prometheus-operator" / "prometheusrule.yaml"
EXAMPLE_PROMETHEUS = REPO / "deploy" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables (https://grafana.com/docs/grafana/latest/dashboards/variables/add-template-variables/#global-variables).
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__data", "__field", "__value", "__all"}

Obj = dict[str, Any]


def _dashboard() -> Obj:
    dashboard: Obj = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: Obj) -> Iterator[Obj]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def _variables(dashboard: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _targets(dashboard: Obj) -> list[tuple[str, Obj]]:
    """(where, target) of every panel target."""
    return [
        (f"panel {p['id']} {p['title']!r} target {t['refId']}", t)
        for p in _panels(dashboard)
        for t in p.get("targets", [])
    ]


def _exprs(dashboard: Obj) -> list[tuple[str, str]]:
    return [(where, t["expr"]) for where, t in _targets(dashboard)]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps)")
    return promtool


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# ---- the dashboard, as files --------------------------------------------------------------------


def test_the_dashboard_follows_kube_prometheus_stacks_conventions() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "detectord"
    assert dashboard["id"] is None  # Grafana gives it one on import
    assert dashboard["schemaVersion"] >= 39  # kube-prometheus-stack's dashboards, Grafana 11
    assert "detectord" in dashboard["tags"]
    assert dashboard["refresh"] and dashboard["time"]["from"].startswith("now-")
    variables = _variables(dashboard)
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]
            assert v["refresh"] == 2, v["name"]  # on time range change, as the mixins do
    assert {"cluster", "namespace", "job", "instance"} <= set(variables)

    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap"
                cells[(x, y)] = p["id"]
        assert p["title"], p["id"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, (p["title"], t["refId"])
            assert t["expr"].strip(), (p["title"], t["refId"])

    # Every variable used is defined: in queries, titles, links and the variables' own queries.
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(dashboard)))
    assert used - set(variables) - GRAFANA_VARIABLES == set()


def test_the_dashboard_has_the_panels_an_sre_needs() -> None:
    dashboard = _dashboard()
    by_type: dict[str, list[str]] = {}
    for p in _panels(dashboard):
        by_type.setdefault(p["type"], []).extend(t["expr"] for t in p.get("targets", []))
    [heatmap] = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    assert "detectord_anomaly_score_distribution_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert any("topk(" in e and "detectord_anomaly_score" in e for e in by_type["table"])
    assert any("detectord_alert_state{" in e for e in by_type["state-timeline"])
    one = [e for _, e in _exprs(dashboard) if 'exported_instance="$instance"' in e]
    for metric in ("detectord_anomaly_score", "detectord_feature_deviation", "detectord_feature_value"):
        assert any(metric + "{" in e for e in one), metric
    exprs = "\n".join(e for _, e in _exprs(dashboard))
    for metric in (
        "detectord_remote_write_requests_total",
        "detectord_samples_total",
        "detectord_remote_write_rejected_requests_total",
        "detectord_remote_write_rejected_series_total",
        "detectord_remote_write_decode_seconds_bucket",
        "detectord_inference_batch_seconds_bucket",
        "detectord_inference_queue_depth",
        "detectord_windows_dropped_total",
        "detectord_alerts_sent_total",
        "detectord_alert_send_failures_total",
        "detectord_alerts_dropped_total",
        "detectord_notification_queue_length",
        "detectord_notification_latency_seconds_bucket",
        "detectord_instances_refused",
    ):
        assert metric + "{" in exprs, metric
    for latency in ("decode_seconds", "batch_seconds", "notification_latency_seconds"):
        assert re.search(rf"histogram_quantile\(0\.99, .*detectord_\w*{latency}_bucket", exprs), latency


def test_the_provisioning_file_loads_the_dashboard_from_a_folder() -> None:
    config = yaml.safe_load(PROVISIONING.read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
    assert "deploy/grafana/detectord.json" in PROVISIONING.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["prometheus-operator", "sharded-prometheus-operator"])
def test_the_operator_overlays_carry_the_dashboard_for_grafanas_sidecar(overlay: str) -> None:
    objects = kustomize_build(install_kube_tools(), KUBE / "overlays" / overlay)
    [configmap] = [o for o in objects if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == "detectord-grafana-dashboard"  # fixed: no hash suffix
    assert configmap["data"] == {"detectord.json": DASHBOARD.read_text()}


# ---- the rules, as files --------------------------------------------------------------------------


def test_the_rules_file_has_the_prometheus_rules_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert plain == {"groups": operator["spec"]["groups"]}


def test_the_rules_and_the_example_config_pass_promtool() -> None:
    promtool = _promtool()
    proc = _run([promtool, "check", "rules", "--lint=all", "--lint-fatal", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The example config loads the rules file by its relative path.
    proc = _run([promtool, "check", "config", "--lint=all", "--lint-fatal", str(EXAMPLE_PROMETHEUS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_the_rules_fire_when_they_should() -> None:
    proc = _run([_promtool(), "test", "rules", str(RULES_TESTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- every expression against a real Prometheus -------------------------------------------------

STEP_S = 5
# 6.5 minutes of faults-1: the windows fill after 160 s, and the last minute is inside a
# forward_saturation on edge-3, whose CoreDNSAnomaly fires (so the top-feature gauges exist).
MAIN_MINUTES = 6.5
# The label values only Kubernetes service discovery (or external labels) gives; the test's
# Prometheus scrapes static targets.
DISCOVERY_LABELS = {"cluster", "namespace"}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def _variable_value(dashboard: Obj, variable: str, overrides: dict[str, str]) -> str:
    """The value Grafana puts in for `variable` with its default selection."""
    if variable in overrides:
        return overrides[variable]
    v = _variables(dashboard)[variable]
    current = v["current"]["value"]
    if current == "$__all":
        return str(v["allValue"])
    return str(current)


def _substitute(dashboard: Obj, expr: str, overrides: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        return _variable_value(dashboard, m.group(1) or m.group(2), overrides)

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


@contextlib.asynccontextmanager
async def _rules_loaded(prom: Prometheus) -> AsyncIterator[None]:
    """Prometheus with the rules file, as `rule_files:` loads it (the config reloaded on SIGHUP)."""
    config = yaml.safe_load(prom.config.read_text())
    config["rule_files"] = [str(RULES)]
    prom.config.write_text(yaml.safe_dump(config))
    assert prom.child is not None
    prom.child.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not await _rule_groups(prom):
        assert time.monotonic() < deadline, f"rules not loaded: {prom.log.read_text()[-2000:]}"
        await asyncio.sleep(0.5)
    yield


async def _rule_groups(prom: Prometheus) -> list[Obj]:
    async with aiohttp.ClientSession() as s, s.get(f"{prom.url}/api/v1/rules") as r:
        body = await r.json()
    groups: list[Obj] = body["data"]["groups"]
    return groups


async def _query_range(prom: Prometheus, promql: str, start: float, end: float) -> list[Obj]:
    """A range query every second, as a Grafana panel over [start, end] runs its targets."""
    params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
    async with aiohttp.ClientSession() as s, s.get(f"{prom.url}/api/v1/query_range", params=params) as r:
        body = await r.json()
    if body.get("status") != "success":
        raise AssertionError(f"{promql}: {body}")
    result: list[Obj] = body["data"]["result"]
    return result


async def _post(url: str, body: bytes) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=V1_HEADERS) as r:
        return r.status


async def _metric_lines(d: Detectord, name: str) -> list[str]:
    """The series of `name` that have counted something (known labels are there at 0 from the start)."""
    return [
        line
        for line in (await d.metrics()).splitlines()
        if line.startswith(name + "{") and float(line.rsplit(" ", 1)[1]) != 0
    ]


async def _scrapes_since(prom: Prometheus, since: float, n: int) -> bool:
    window = max(1, int(time.time() - since))
    counts = await prom.query(f'count_over_time(up{{job="detectord"}}[{window}s])')
    return len(counts) == 2 and all(int(c["value"][1]) >= n for c in counts)


async def _until(what: str, cond: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.5)


@pytest.mark.e2e
@pytest.mark.slow
async def test_every_dashboard_query_and_rule_expression_returns_data(tmp_path: Path) -> None:
    source = sorted(DATA.glob("faults-1.drec*"))[0]
    recording = slice_recording(source, tmp_path / "faults-1.drec", MAIN_MINUTES)
    dashboard = _dashboard()
    async with run_alertmanager(tmp_path / "alertmanager") as am:
        main_config = {
            "ingest": {"step": f"{STEP_S}s", "instance_ttl": "1h"},
            "alerting": {
                # The second one answers 404 (no such path): its posts fail and their alerts are
                # dropped as rejected, which is what the delivery panels and rules read.
                "alertmanagers": [{"url": am.url}, {"url": am.url, "path_prefix": "/missing"}],
            },
            "logging": {"format": "console"},
        }
        # A second replica in the same job, with an inference queue of one window: a request that
        # completes two instances' windows at once drops one (windows_dropped_total{queue_full}).
        tiny_config = {
            "ingest": {"step": f"{STEP_S}s", "instance_ttl": "1h"},
            "inference": {"max_batch": 1, "queue_size": 1},
            "logging": {"format": "console"},
        }
        async with (
            run_detectord(main_config, workdir=tmp_path / "main") as main,
            run_detectord(tiny_config, workdir=tmp_path / "tiny") as tiny,
            run_prometheus(
                {"detectord": {"detectord-0": f"127.0.0.1:{main.port}", "detectord-1": f"127.0.0.1:{tiny.port}"}},
                workdir=tmp_path / "prometheus",
            ) as prom,
            _rules_loaded(prom),
        ):

            async def scraping() -> bool:
                return len(await prom.query('up{job="detectord"} == 1')) == 2

            # Prometheus takes in new targets every 5 s: the rates below start before the events.
            await _until("Prometheus's first scrapes", scraping)
            start = time.time()
            # Rejects: a body that is not snappy, and a series whose label value is over the limit.
            assert await _post(main.write_url, b"not a snappy body") == 400
            too_long = {"__name__": "coredns_dns_requests_total", "job": "x", "instance": "y", "server": "s" * 5000}
            assert await _post(main.write_url, v1_body([(too_long, [(int(time.time() * 1000), 1.0)])])) == 400

            main_stats, tiny_stats = await asyncio.gather(
                replay(recording, main.write_url, speed=0), replay(recording, tiny.write_url, speed=0)
            )
            assert not main_stats.refused and not main_stats.failed, main_stats
            assert not tiny_stats.failed, tiny_stats

            async def delivered() -> bool:
                sent = await _metric_lines(main, "detectord_alerts_sent_total")
                dropped = await _metric_lines(main, "detectord_alerts_dropped_total")
                return bool(sent) and bool(dropped)

            await _until("alerts sent to one Alertmanager and dropped by the other", delivered)
            assert await _metric_lines(tiny, "detectord_windows_dropped_total"), "the tiny queue dropped nothing"

            # Prometheus has scraped the end state: the last windows scored, the top features.
            async def scraped() -> bool:
                text = await main.metrics()
                want = re.search(r"^detectord_windows_scored_total (\S+)$", text, re.MULTILINE)
                assert want is not None
                got = await prom.value('detectord_windows_scored_total{instance="detectord-0"}')
                return got == float(want.group(1)) and bool(await prom.query("detectord_feature_deviation"))

            await _until("Prometheus to scrape detectord's end state", scraped)
            # Two more scrapes: every rate over the end has samples on both sides of it.
            end = time.time()
            await _until("two scrapes after the end", lambda: _scrapes_since(prom, end, 2))
            end = time.time()
            firing = await prom.query("detectord_feature_deviation")
            instance = firing[0]["metric"]["exported_instance"]
            # The dashboard's time range is the run. Grafana's $__rate_interval with a 1 s scrape is
            # 4 s; 1m holds every event of the run at every step.
            overrides = {
                "instance": instance,
                "__rate_interval": "1m",
                "__interval": "1s",
                "__range": f"{int(end - start) + 1}s",
            }

            empty: list[str] = []
            for where, target in _targets(dashboard):
                query = _substitute(dashboard, target["expr"], overrides)
                if target.get("instant"):
                    result = await prom.query(query)
                else:
                    result = await _query_range(prom, query, start, end)
                if not result:
                    empty.append(f"{where}: {query}")
            for v in _variables(dashboard).values():
                if v["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"])
                assert m is not None, v["query"]
                selector, label = _substitute(dashboard, m.group(1), overrides), m.group(2)
                result = await prom.query(selector)
                if not result or (label not in DISCOVERY_LABELS and not any(r["metric"].get(label) for r in result)):
                    empty.append(f"variable {v['name']}: label {label} of {selector}")

            groups = await _rule_groups(prom)
            rules = [r for g in groups for r in g["rules"]]
            assert {r["name"] for r in rules} == {
                r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            }
            for rule in rules:
                # An alert's expression is empty while detectord is healthy; each series it reads is not.
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
                selectors = SELECTOR.findall(rule["query"])
                names = {name for name, _ in selectors}
                assert set(re.findall(r"\bdetectord_\w+", rule["query"])) <= names, (
                    f"a selector without matchers: {rule['query']}"
                )
                for name, matchers in selectors:
                    if not await prom.query(f"{name}{{{matchers}}}"):
                        empty.append(f"rule {rule['name']}: {name}{{{matchers}}}")
            assert empty == [], "\n".join(empty)

"""The per-instance series on /metrics: which instances `inference.export_instances` exports, read
from the live per-instance state at scrape time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from detectord.serve import exports as exports_module
from detectord.serve.exports import InstanceExports
from detectord.serve.history import InstanceScores

LABELS = ("job", "instance")
NEEDS_C = pytest.mark.skipif(
    exports_module._fastexports is None,  # type: ignore[attr-defined]
    reason="the C renderer is not built",
)


def _fleet() -> SimpleNamespace:
    """The two things the collector reads of the score sink (its `history` and `phases`): ten
    scored instances, one anomalous and firing, one anomalous and pending, one not scored yet."""
    history: dict[tuple[str, str], InstanceScores] = {}
    for i in range(10):
        h = history[("coredns", f"10.0.0.{i}:9153")] = InstanceScores(8)
        h.add(1_000, 0.05 * i)
        h.anomalous = False
    hot = history[("coredns", "10.0.0.9:9153")]
    hot.add(2_000, 3.5)
    hot.anomalous = True
    hot.top = [("servfail_share", 9.0, 0.4)]
    history[("coredns", "10.0.0.8:9153")].anomalous = True
    history[("coredns", "warming:9153")] = InstanceScores(8)
    phases = {("coredns", "10.0.0.9:9153"): "firing", ("coredns", "10.0.0.8:9153"): "pending"}
    return SimpleNamespace(history=history, phases=phases)


def _scrape(export: str, top: int = 0) -> dict[str, set[str]]:
    registry = CollectorRegistry()
    fleet = _fleet()
    registry.register(InstanceExports(lambda: fleet, LABELS, export, top))  # type: ignore[arg-type,return-value]
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).add(s.labels["instance"])
    return out


def test_all_exports_every_scored_instance() -> None:
    got = _scrape("all")
    assert len(got["detectord_anomaly_score"]) == 10, "the one not scored yet has no score series"
    assert got["detectord_anomaly"] == got["detectord_anomaly_score"]
    assert got["detectord_alert_state"] == {"10.0.0.9:9153", "10.0.0.8:9153"}
    assert got["detectord_feature_value"] == got["detectord_feature_deviation"] == {"10.0.0.9:9153"}


def test_anomalous_exports_only_what_is_anomalous_or_alerting() -> None:
    got = _scrape("anomalous")
    assert got["detectord_anomaly_score"] == {"10.0.0.9:9153", "10.0.0.8:9153"}
    assert got["detectord_alert_state"] == {"10.0.0.9:9153", "10.0.0.8:9153"}
    assert got["detectord_feature_value"] == {"10.0.0.9:9153"}


@pytest.mark.parametrize(("top", "also"), [(3, {"10.0.0.7:9153"}), (0, set())])
def test_top_adds_the_highest_scores_to_the_anomalous(top: int, also: set[str]) -> None:
    got = _scrape("top", top)
    assert got["detectord_anomaly_score"] == {"10.0.0.9:9153", "10.0.0.8:9153"} | also


def _odd_fleet(labels: tuple[str, ...]) -> SimpleNamespace:
    """Label values that need escaping, scores that are not plain numbers, every alert phase."""
    values = ['quo"te', "back\\slash", "new\nline", "ünï©ødé", "", "plain"]
    history: dict[tuple[str, ...], InstanceScores] = {}
    phases: dict[tuple[str, ...], str] = {}
    scores = [float("nan"), float("inf"), -float("inf"), 1e-300, 123456789.5, 0.1, 2.0, -0.0]
    # Around where Go's format turns to an exponent and Python's does not.
    scores += [999999.9999999999, 1e6, 1e16, 1e21, -1e7, 5e-05, 123456.0]
    for i, score in enumerate(scores * 2):
        key = tuple(f"{values[(i + j) % len(values)]}{i}" for j in range(len(labels)))
        h = history[key] = InstanceScores(4)
        if i % 5:
            h.add(1_000 * i, score)
        h.anomalous = None if i % 7 == 0 else bool(i % 2)
        if i % 3 == 0:
            h.top = [("servfail_share", 9.0 + i, 0.4), ('we"ird\\', float("nan"), 1e22)]
        if i % 4 == 0:
            phases[key] = ("pending", "firing")[i % 8 == 0]
    return SimpleNamespace(history=history, phases=phases)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=NEEDS_C)], ids=["python", "c"])
@pytest.mark.parametrize("labels", [LABELS, ("cluster", "namespace", "pod"), ("zone",)])
@pytest.mark.parametrize(("export", "top"), [("all", 0), ("anomalous", 0), ("top", 3)])
def test_the_text_served_is_what_prometheus_client_renders(
    labels: tuple[str, ...], export: str, top: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics renders the per-instance series straight to text (no sample objects: 100,000
    instances in a fraction of the time), in C where it is built; it must be what generate_latest
    makes of the same families, byte for byte, escaping, odd values and label order included
    (instance labels that sort before and after `feature` and `state`)."""
    # The C renderer writes a slice of instances a call: here several, the last one short or full.
    monkeypatch.setattr(exports_module, "NATIVE_SLICE", 5)
    for fleet in (_fleet(), _odd_fleet(labels)) if labels == LABELS else (_odd_fleet(labels),):
        exports = InstanceExports(lambda f=fleet: f, labels, export, top, native=native)  # type: ignore[misc]
        registry = CollectorRegistry()
        registry.register(exports)
        expected = generate_latest(registry)
        assert exports.text() == expected
        assert b"detectord_anomaly_score{" in expected
        # Scraped again (instances rendered before), after instances left and new ones came.
        assert exports.text() == expected
        for gone in list(fleet.history)[::3]:
            del fleet.history[gone]
            fleet.phases.pop(gone, None)
        for i, (key, h) in enumerate(_odd_fleet(labels).history.items()):
            fleet.history[tuple(f"new {v}" for v in key)] = h
            h.add(10**9, 1e6 * i)
        assert exports.text() == generate_latest(registry)


def test_the_text_with_no_sink_yet_is_the_families_alone() -> None:
    exports = InstanceExports(lambda: None, LABELS, "all", 0)
    registry = CollectorRegistry()
    registry.register(exports)
    assert exports.text() == generate_latest(registry)
    assert exports.text().count(b"# TYPE") == 5


def test_a_histogram_observed_by_the_batch_reads_as_one_observed_by_the_value() -> None:
    """The step delays and the score distribution are counted a scored batch at a time; what
    Prometheus scrapes is what a prometheus_client Histogram fed value by value would show."""
    import re

    import numpy as np
    from prometheus_client import Histogram

    from detectord.serve.metrics import BatchHistogram

    bounds = (0.01, 0.1, 1.0, 5.0)
    by_value, by_batch = CollectorRegistry(), CollectorRegistry()
    h = Histogram("detectord_x_seconds", "x", buckets=bounds, registry=by_value)
    b = BatchHistogram("detectord_x_seconds", "x", bounds, by_batch)
    batches = [[0.0, 0.01, 0.0100001, 0.1], [], [0.5, 1.0, 7.0, -1.0, 3.0, 5.0, 5.0000001]]
    for values in batches:
        for v in values:
            h.observe(v)
        b.observe_many(np.array(values))

    def shown(registry: CollectorRegistry) -> str:
        return re.sub(r"_created \S+", "_created T", generate_latest(registry).decode())

    assert shown(by_batch) == shown(by_value)
    assert 'detectord_x_seconds_bucket{le="0.01"} 3.0' in shown(by_batch)

"""The mixin baseline: the published rules and the tuned ones, evaluated by a real Prometheus on a
synthetic recording where one of two edges answers 10 % SERVFAIL for 12 minutes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from detectord.offline.comparisons.mixin import RULESETS, RuleResult, evaluate_rules, hold_for
from detectord.recordings.format import RecordingWriter
from lab.peers.prometheus import prometheus_binary
from tests.support import Series, v1_body

STEP_S = 5
DURATION_S = 20 * 60
FAULT_S = (3 * 60, 15 * 60)  # seconds into the recording
QPS = 100
SERVFAIL_SHARE = 0.1
HEALTHY, FAULTY = ("coredns-edge", "edge-0"), ("coredns-edge", "edge-1")
SERVERS = {HEALTHY: "dns://:5300", FAULTY: "dns://:5301"}
BUCKETS = (("0.001", 0.9), ("0.01", 0.99), ("0.1", 1.0), ("8.192", 1.0), ("+Inf", 1.0))


def _scrape(key: tuple[str, str], ts_ms: int, requests: float, servfails: float) -> list[Series]:
    """One scrape of a minimal CoreDNS 1.11: counters as they stand at `ts_ms`."""
    base = {"job": key[0], "instance": key[1]}
    dns = {**base, "server": SERVERS[key], "zone": "."}
    series: list[Series] = [
        ({**base, "__name__": "up"}, [(ts_ms, 1.0)]),
        ({**base, "__name__": "coredns_panics_total"}, [(ts_ms, 0.0)]),
        (
            {**dns, "__name__": "coredns_dns_requests_total", "type": "A", "proto": "udp", "family": "1"},
            [(ts_ms, requests)],
        ),
        (
            {**dns, "__name__": "coredns_dns_responses_total", "rcode": "NOERROR", "plugin": "cache"},
            [(ts_ms, requests - servfails)],
        ),
        ({**dns, "__name__": "coredns_dns_responses_total", "rcode": "SERVFAIL", "plugin": ""}, [(ts_ms, servfails)]),
    ]
    bucket = {**dns, "__name__": "coredns_dns_request_duration_seconds_bucket"}
    series += [({**bucket, "le": le}, [(ts_ms, share * requests)]) for le, share in BUCKETS]
    return series


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A recording as the lab's Prometheus would have sent it (one request per 1 s scrape), ending a
    minute ago; returns its path and the fault's start (ms)."""
    path = tmp_path_factory.mktemp("mixin") / "recording.drec"
    start_ms = (int(time.time()) - DURATION_S - 60) * 1000
    totals = {key: [0.0, 0.0] for key in SERVERS}
    with RecordingWriter(path) as writer:
        for s in range(DURATION_S):
            ts_ms = start_ms + s * 1000
            series: list[Series] = []
            for key, counts in totals.items():
                counts[0] += QPS
                if key == FAULTY and FAULT_S[0] <= s < FAULT_S[1]:
                    counts[1] += QPS * SERVFAIL_SHARE
                series += _scrape(key, ts_ms, *counts)
            writer.append(v1_body(series), "1.0", arrival_ns=(ts_ms + 300) * 1_000_000)
    return path, start_ms + FAULT_S[0] * 1000


@pytest.fixture(scope="module")
def results(recording: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> dict[str, RuleResult]:
    binary = prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    out = evaluate_rules(recording[0], rulesets=tuple(RULESETS), step_s=STEP_S, prometheus=binary, workdir=workdir)
    assert list(out) == list(RULESETS)
    assert list(workdir.iterdir()) == [], "the temporary Prometheus directory was left behind"
    return out


def _first_firing(result: RuleResult, key: tuple[str, str], rule: str) -> int | None:
    firing = result.instances[key].by_rule[rule]
    return int(result.timestamps_ms[np.argmax(firing)]) if firing.any() else None


@pytest.mark.e2e
def test_tuned_rules_fire_for_the_faulty_instance_within_two_minutes(
    results: dict[str, RuleResult], recording: tuple[Path, int]
) -> None:
    tuned, fault_ms = results["mixin_tuned"], recording[1]
    assert set(tuned.instances) == {HEALTHY, FAULTY}
    assert tuned.timestamps_ms[0] % (STEP_S * 1000) == 0
    first = _first_firing(tuned, FAULTY, "CoreDNSErrorsHigh/critical")
    assert first is not None and fault_ms <= first <= fault_ms + 120_000, (first, fault_ms)
    assert not tuned.instances[HEALTHY].firing.any()
    fired = {span.rule for span in tuned.spans()}
    assert fired == {"CoreDNSErrorsHigh/critical", "CoreDNSErrorsHigh/warning"}


@pytest.mark.e2e
def test_published_rules_fire_fleet_wide_only_after_their_ten_minutes(
    results: dict[str, RuleResult], recording: tuple[Path, int]
) -> None:
    published, fault_ms = results["mixin"], recording[1]
    for key in (HEALTHY, FAULTY):
        first = _first_firing(published, key, "CoreDNSErrorsHigh/warning")
        # The fleet's SERVFAIL share (5 %) crosses 1 % within the 5m window's first minute; then `for: 10m`.
        assert first is not None and fault_ms + 600_000 <= first <= fault_ms + 780_000, (key, first, fault_ms)
        assert _first_firing(published, key, "CoreDNSErrorsHigh/critical") is not None
    assert {span.rule for span in published.spans()} == {"CoreDNSErrorsHigh/critical", "CoreDNSErrorsHigh/warning"}


@pytest.mark.e2e
def test_nothing_fires_before_the_fault(results: dict[str, RuleResult], recording: tuple[Path, int]) -> None:
    for result in results.values():
        before = result.timestamps_ms < recording[1]
        assert before.sum() >= FAULT_S[0] // STEP_S - 1
        for key, alerts in result.instances.items():
            assert not alerts.firing[before].any(), (result.ruleset, key)


def test_for_holds_an_alert_pending_until_it_has_been_returned_that_long() -> None:
    ts = np.arange(12, dtype=np.int64) * 5000
    active = np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert hold_for(active, ts, 10).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert hold_for(active, ts, 0).tolist() == active.tolist()
    assert not hold_for(active, ts, 60).any()
    assert hold_for(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), 10).shape == (0,)


def test_rule_keys_are_unique_within_a_set() -> None:
    for rules in RULESETS.values():
        assert len({rule.key for rule in rules}) == len(rules)

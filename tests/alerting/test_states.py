"""Alert states step by step: pending, firing, keep_firing_for, resolved, descriptions, reconfiguration."""

from __future__ import annotations

from typing import TypeVar

from detectord.alerting.states import rfc3339
from detectord.config import Duration
from tests.support import EXTERNAL, KEY, LABELS, TOP, config, states, step

T = TypeVar("T")

# ---- the state machine ----------------------------------------------------------------------


def test_pending_then_firing_after_for() -> None:
    s = states()
    for ts in (0, 15, 30, 45):
        assert step(s, ts, 3.0) == []
        assert s.state_of(KEY) == "pending"
    assert s.counts() == {"pending": 1, "firing": 0}
    [alert] = step(s, 60, 3.0)
    assert s.state_of(KEY) == "firing" and s.is_firing(KEY)
    assert s.firing() == [alert]
    assert s.counts() == {"pending": 0, "firing": 1}
    assert alert.starts_at == 60 and not alert.resolved
    assert alert.labels == {
        "alertname": "CoreDNSAnomaly",
        "job": "coredns",
        "instance": "10.0.0.1:9153",
        "severity": "warning",
        "model": "lstm-ae",
        "cluster": "eu1",
    }
    assert alert.annotations["summary"] == "CoreDNS 10.0.0.1:9153 (job coredns) is behaving anomalously"
    assert step(s, 75, 3.0) == []  # still firing: nothing new to send


def test_for_zero_fires_at_once() -> None:
    s = states(for_=Duration(0))
    [alert] = step(s, 100, 1.5)
    assert alert.starts_at == 100


def test_description_says_what_the_incident_looks_like() -> None:
    s = states(for_=Duration(0))
    [alert] = s.observe(KEY, LABELS, 0, 3.0, 0.042, TOP, "upstream_timeout")
    assert "Looks like upstream timeout." in alert.annotations["description"]
    assert alert.annotations["looks_like"] == "upstream_timeout"
    s.observe(KEY, LABELS, 5, 3.0, 0.042, TOP, None)  # a model without classes, or after a reload
    assert "Looks like" not in alert.annotations["description"] and "looks_like" not in alert.annotations


def test_the_class_named_is_the_one_the_incident_resembled_most_often() -> None:
    # A window that has just turned anomalous is mostly healthy rows: its class is a guess.
    s = states(for_=Duration(0))
    [alert] = s.observe(KEY, LABELS, 0, 3.0, 0.042, TOP, "upstream_timeout")
    s.observe(KEY, LABELS, 5, 3.0, 0.042, TOP, "upstream_servfail")
    assert alert.annotations["looks_like"] == "upstream_servfail"  # a tie goes to the latest
    s.observe(KEY, LABELS, 10, 3.0, 0.042, TOP, "upstream_servfail")
    s.observe(KEY, LABELS, 15, 3.0, 0.042, TOP, "upstream_servfail")
    s.observe(KEY, LABELS, 20, 3.0, 0.042, TOP, "upstream_timeout")
    assert alert.annotations["looks_like"] == "upstream_servfail"  # one odd step does not flip it
    assert "Looks like upstream servfail." in alert.annotations["description"]
    s.observe(KEY, LABELS, 25, 0.5, 0.042, TOP, "upstream_down")  # normal steps count for nothing
    assert alert.annotations["looks_like"] == "upstream_servfail"


def test_blip_while_pending_never_fires() -> None:
    s = states()
    for ts in (0, 15, 30, 45):
        assert step(s, ts, 3.0) == []
    assert step(s, 60, 0.5) == []
    assert s.state_of(KEY) == "inactive"
    # Pending starts over: `for` counts from the next anomalous step, not the first one.
    for ts in (75, 90, 105, 120):
        assert step(s, ts, 3.0) == []
    [alert] = step(s, 135, 3.0)
    assert alert.starts_at == 135


def test_keep_firing_for_then_resolved() -> None:
    s = states(for_=Duration(0))
    [alert] = step(s, 0, 3.0)
    for ts in range(15, 135, 15):  # normal from 15 s; keep_firing_for 120 s
        assert step(s, ts, 0.2) == [], ts
        assert s.is_firing(KEY)
    [resolved] = step(s, 135, 0.2)
    assert resolved is alert and alert.resolved_at == 135
    assert s.state_of(KEY) == "inactive" and s.firing() == []


def test_anomalous_step_during_keep_firing_for_keeps_it_firing() -> None:
    s = states(for_=Duration(0))
    [_alert] = step(s, 0, 3.0)
    for ts in (15, 30, 45, 60):
        assert step(s, ts, 0.2) == []
    assert step(s, 75, 2.0) == []  # anomalous again: the 120 s count restarts
    for ts in range(90, 210, 15):
        assert step(s, ts, 0.2) == [], ts
    [resolved] = step(s, 210, 0.2)
    assert resolved.resolved_at == 210 and resolved.starts_at == 0


def test_keep_firing_for_zero_resolves_at_first_normal_step() -> None:
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    step(s, 0, 3.0)
    [resolved] = step(s, 15, 0.9)
    assert resolved.resolved_at == 15


def test_anomalous_again_after_resolution_is_a_new_alert() -> None:
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    [first] = step(s, 0, 3.0)
    step(s, 15, 0.1)
    [second] = step(s, 30, 3.0)
    assert second is not first and second.starts_at == 30 and first.resolved


def test_forget_resolves_a_firing_alert() -> None:
    s = states(for_=Duration(0))
    [alert] = step(s, 0, 3.0)
    step(s, 15, 3.0)
    assert s.forget(KEY) == [alert]
    assert alert.resolved_at == 15
    assert s.state_of(KEY) == "inactive"
    assert s.forget(KEY) == []


def test_forget_a_pending_instance_sends_nothing() -> None:
    s = states()
    step(s, 0, 3.0)
    assert s.forget(KEY) == []
    assert s.counts() == {"pending": 0, "firing": 0}


def test_instances_are_independent() -> None:
    s = states(for_=Duration(30))
    other_labels = {"job": "coredns", "instance": "10.0.0.2:9153"}
    other = ("coredns", "10.0.0.2:9153")
    step(s, 0, 3.0)
    step(s, 0, 3.0, key=other, labels=other_labels)
    step(s, 15, 0.1, key=other, labels=other_labels)
    step(s, 15, 3.0)
    [alert] = step(s, 30, 3.0)
    assert alert.labels["instance"] == "10.0.0.1:9153"
    assert s.state_of(other) == "inactive"


def test_description_names_top_features_and_follows_them_while_firing() -> None:
    s = states(for_=Duration(0), top_features=2)
    [alert] = step(s, 0, 3.0)
    desc = alert.annotations["description"]
    assert "rcode_servfail_share +12.3σ (0.41), latency_p99_seconds +8.1σ (2.05)" in desc
    assert "qps" not in desc  # only top_features of them
    assert alert.annotations["score"] == "3" and alert.annotations["threshold"] == "0.042"
    step(s, 15, 4.5, top=[("qps", -6.25, 12345.0), ("latency_p99_seconds", 5.0, 1.5)])
    desc = alert.annotations["description"]
    assert "qps -6.2σ (12345), latency_p99_seconds +5.0σ (1.5)" in desc
    assert "rcode_servfail_share" not in desc
    assert alert.score == 4.5
    # A normal step while kept firing does not overwrite what made it fire.
    step(s, 30, 0.3, top=[("cache_hit_ratio", 0.1, 0.9)])
    assert "qps -6.2σ" in alert.annotations["description"]


def test_reconfigured_keeps_states_and_resolves_alerts_whose_labels_change() -> None:
    s = states(for_=Duration(0))
    [old] = step(s, 0, 3.0)
    s2 = s.reconfigured(config(for_=Duration(0), severity="critical"), model_name="lstm-ae")
    [new] = s2.firing()
    assert new.labels["severity"] == "critical" and new.starts_at == old.starts_at
    assert s2.observe(KEY, LABELS, 15, 3.0, 0.042, TOP) == [old]
    assert old.resolved_at == 0
    assert s2.is_firing(KEY) and not new.resolved
    same = s2.reconfigured(config(for_=Duration(0), severity="critical"), model_name="lstm-ae")
    assert same.firing() == [new]


def test_to_api_matches_alertmanager_v2() -> None:
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    [alert] = step(s, 1_700_000_000.25, 3.0)
    body = alert.to_api(now=1_700_000_100.0, resend_interval=60.0)
    assert body["startsAt"] == "2023-11-14T22:13:20.250Z"
    assert body["endsAt"] == rfc3339(1_700_000_100.0 + 240.0)
    assert body["generatorURL"] == f"{EXTERNAL}/instances/coredns,10.0.0.1:9153"
    assert body["labels"] == alert.labels and body["annotations"] == alert.annotations
    step(s, 1_700_000_015.0, 0.1)
    assert alert.to_api(now=1_700_000_100.0, resend_interval=60.0)["endsAt"] == "2023-11-14T22:13:35.000Z"


# ---- delivery to real Alertmanagers ---------------------------------------------------------

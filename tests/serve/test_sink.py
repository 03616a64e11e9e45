"""The score sink on the shipped model: what a firing alert says about its upstream's fleet stays
right, batch after batch, while alerts fire and resolve and instances change upstream."""

from __future__ import annotations

import copy
import random
import re
from collections import Counter

import numpy as np
from prometheus_client import CollectorRegistry

from detectord.alerting.states import Alert
from detectord.config import AlertingConfig, Duration, ModelConfig
from detectord.detectors import load_model
from detectord.ingest.pipeline import ScoreRequest
from detectord.serve.inference import ScoredBatch
from tests.support import REPO, score_sink


def test_every_firing_alert_counts_its_upstreams_anomalous_instances_after_every_batch() -> None:
    """Batches of a few instances each, as a request of Prometheus's shards closes them: each
    firing alert's `fleet` annotation (and its description's last sentence) says how many of the
    instances forwarding to its upstream fire, out of how many forward there, also for alerts the
    batch did not touch; `detectord_alerts` counts the pending and firing ones."""
    model = load_model(ModelConfig(path=REPO / "models/default", any_step=True), 15.0)
    cfg = AlertingConfig(for_=Duration(30.0))  # pending for two steps: some clear before they fire
    registry = CollectorRegistry()
    sink = score_sink(model, cfg, registry)
    rng = random.Random(3)
    keys = [("coredns", f"10.0.0.{i}:9153") for i in range(60)]
    upstream = {k: f"10.1.0.{i % 4}:53" for i, k in enumerate(keys)}
    nf = len(model.features)
    seen_counts = set()
    pending_seen = False
    resolved: dict[int, tuple[Alert, dict[str, str]]] = {}
    for step in range(80):
        ts_ms = 1_700_000_000_000 + step * 15_000
        order = keys[:]
        rng.shuffle(order)
        for a in range(0, len(order), 7):  # every instance once a step, a few a batch
            if rng.random() < 0.05:  # an instance moves to another upstream
                upstream[rng.choice(keys)] = f"10.1.0.{rng.randrange(4)}:53"
            chunk = order[a : a + 7]
            requests = [
                ScoreRequest(k, ts_ms, np.zeros((1, nf), np.float32), np.ones(nf, np.float32), upstream[k])
                for k in chunk
            ]
            # A third of the fleet is anomalous now and then: alerts fire, stay and resolve.
            scores = [5.0 if (int(k[1].split(".")[3].split(":")[0]) + step // 10) % 3 == 0 else 0.1 for k in chunk]
            scores = [s if rng.random() < 0.9 else 0.1 for s in scores]
            deviation = np.asarray([[rng.uniform(-3, 3) for _ in range(nf)] for _ in chunk], np.float32)
            firing_before = sink.alerts.firing()
            sink.deliver(ScoredBatch(requests, scores, deviation, [None] * len(chunk)))

            firing = sink.alerts.firing()
            anomalous = Counter(al.labels["upstream"] for al in firing)
            forwarding = Counter(sink.upstream_of.values())
            for al in firing:
                up = al.labels["upstream"]
                total = max(forwarding[up], anomalous[up])
                want = f"{anomalous[up]} of {total} instances forwarding to {up} are anomalous."
                shown = al.to_api(0.0, 60.0)["annotations"]  # what Alertmanager gets
                assert shown.get("fleet") == want, (step, al.labels, shown)
                assert shown["description"].endswith(" " + want)
                assert shown["description"].count(" are anomalous.") == 1
                seen_counts.add((anomalous[up], up))
            # A resolved alert keeps the count it had when it resolved, itself among the anomalous,
            # however the counts move while it is re-sent.
            for al in firing_before:
                if al.resolved and id(al) not in resolved:
                    shown = al.to_api(0.0, 60.0)["annotations"]
                    up = al.labels["upstream"]
                    assert re.fullmatch(
                        rf"[1-9]\d* of \d+ instances forwarding to {re.escape(up)} are anomalous\.", shown["fleet"]
                    )
                    assert shown["description"].endswith(" " + shown["fleet"])
                    resolved[id(al)] = (al, shown)
            for al, shown in resolved.values():
                assert al.to_api(0.0, 60.0)["annotations"] == shown
            tracked = len(sink.alerts.tracked())
            pending_seen |= tracked > len(firing)
            assert registry.get_sample_value("detectord_alerts", {"state": "firing"}) == len(firing)
            assert registry.get_sample_value("detectord_alerts", {"state": "pending"}) == tracked - len(firing)
    # The run saw alerts fire and resolve on every upstream, at several counts each.
    assert len({up for _, up in seen_counts}) == 4 and len(seen_counts) > 12, seen_counts
    assert pending_seen
    assert len(resolved) > 20


def test_a_restart_shows_each_firing_alerts_fleet_as_before_also_from_an_earlier_detectords_state() -> None:
    """What a firing alert says about its upstream's fleet survives a restart: from the state
    this detectord saves, and from an earlier detectord's, which saved the sentence written into
    the description (it must not be said twice)."""
    model = load_model(ModelConfig(path=REPO / "models/default", any_step=True), 15.0)
    cfg = AlertingConfig(for_=Duration(0.0))
    sink = score_sink(model, cfg, CollectorRegistry())
    nf = len(model.features)
    keys = [("coredns", f"10.0.0.{i}:9153") for i in range(12)]
    for step in range(3):
        requests = [
            ScoreRequest(
                k,
                1_700_000_000_000 + step * 15_000,
                np.zeros((1, nf), np.float32),
                np.ones(nf, np.float32),
                f"u{i % 2}",
            )
            for i, k in enumerate(keys)
        ]
        scores = [5.0 if i % 3 == 0 else 0.1 for i in range(len(keys))]
        sink.deliver(ScoredBatch(requests, scores, np.ones((len(keys), nf), np.float32), [None] * len(keys)))
    shown = {a.key: a.to_api(0.0, 60.0)["annotations"] for a in sink.alerts.firing()}
    assert len(shown) == 4 and {s["fleet"] for s in shown.values()} == {
        "2 of 6 instances forwarding to u0 are anomalous.",
        "2 of 6 instances forwarding to u1 are anomalous.",
    }
    saved = sink.state()
    earlier = copy.deepcopy(saved)
    for st in earlier["alerts"]:
        st["alert"]["annotations"] = shown[tuple(sorted(st["alert"]["labels"].items()))]
    for state in (saved, earlier):
        again = score_sink(model, cfg, CollectorRegistry())
        assert again.restore(state) == 4
        assert {a.key: a.to_api(0.0, 60.0)["annotations"] for a in again.alerts.firing()} == shown
        assert again.alerts.counts() == {"pending": 0, "firing": 4}
    # An evicted instance's alert resolves: one fewer fires, on its upstream's count too.
    sink.forget([keys[0]])
    assert sink.alerts.counts() == {"pending": 0, "firing": 3}
    assert {a.to_api(0.0, 60.0)["annotations"]["fleet"] for a in sink.alerts.firing()} == {
        "1 of 5 instances forwarding to u0 are anomalous.",
        "2 of 6 instances forwarding to u1 are anomalous.",
    }

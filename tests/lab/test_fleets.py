"""Fleets that change as operators change them, on real parts: a standby edge joins the service
discovery and an edge leaves it (a real Prometheus following file-based discovery), an edge's
cache is flushed, and edges that forward to the same upstream share forward's `to` label."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from detectord.ingest.remote_write import LabelCache
from detectord.recordings.format import read_writes
from tests.lab.test_lab import _features, _need_peers, run_scenario

pytestmark = pytest.mark.e2e


def _series(out: Path) -> Iterator[tuple[dict[str, str], list[int], list[float]]]:
    """Every series of the run's recording, request by request: labels, timestamps, values."""
    for _, w in read_writes(out / "recording.drec", LabelCache()):
        i = 0
        for key, n in zip(w.keys, w.counts, strict=True):
            yield dict(key.labels), w.timestamps[i : i + n], w.values[i : i + n]
            i += n


def test_edges_join_and_leave_the_discovery_and_a_flushed_cache_is_proven(tmp_path: Path) -> None:
    _need_peers()
    out, _ = run_scenario(
        {
            "name": "changes",
            "duration": "100s",
            "topology": {"edges": 3, "upstreams": 1, "standby_edges": 1},
            "load": {"qps": 40, "segment": "5s"},
            "health": {"window": "10s", "settle": "10s", "recovery": "10s"},
            "faults": [
                {
                    "class": "edge_joins",
                    "benign": True,
                    "start": "25s",
                    "duration": "10s",
                    "actions": [{"primitive": "join", "targets": ["edge-3"]}],
                },
                {
                    "class": "cache_flush",
                    "benign": True,
                    "start": "40s",
                    "duration": "10s",
                    "actions": [{"primitive": "cache_flush", "targets": ["edge-0"]}],
                },
                {
                    "class": "edge_leaves",
                    "benign": True,
                    "start": "55s",
                    "duration": "10s",
                    "actions": [{"primitive": "leave", "targets": ["edge-1"]}],
                },
            ],
        },
        tmp_path,
    )
    truth = json.loads((out / "truth.json").read_text())
    assert truth["health"]["valid"] is True, truth["health"]
    events = {e["class"]: e for e in truth["events"]}
    assert not [e.get("error") for e in events.values() if e.get("error")], events
    assert {i["instance"] for i in truth["instances"]} == {"upstream-0", "edge-0", "edge-1", "edge-2", "edge-3"}

    # The flush is proven by the edge's own gauge, read before and just after.
    [flush] = events["cache_flush"]["marks"]
    assert flush["entries_before"] > 50 and flush["entries_after"] < flush["entries_before"] / 4, flush

    # The new edge's series begin when it joined; the one that left ends when it left, with no
    # failed scrape (it left the discovery; it did not die).
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    up_zero: set[str] = set()
    tos: dict[str, set[str]] = {}
    servers: dict[str, str] = {}
    for labels, ts, vs in _series(out):
        inst = labels.get("instance", "")
        first[inst] = min(first.get(inst, ts[0]), ts[0])
        last[inst] = max(last.get(inst, ts[-1]), ts[-1])
        if labels.get("__name__") == "up" and 0.0 in vs:
            up_zero.add(inst)
        if labels.get("__name__") == "coredns_dns_requests_total":
            servers[inst] = labels["server"]
        if "to" in labels and labels.get("__name__", "").startswith("coredns_"):
            tos.setdefault(inst, set()).add(labels["to"])
    join, leave = events["edge_joins"], events["edge_leaves"]
    assert first["edge-3"] >= join["start_ms"] - 1_000 and first["edge-0"] < join["start_ms"] - 10_000
    assert last["edge-1"] <= leave["end_ms"] and last["edge-0"] > leave["end_ms"] + 10_000
    assert "edge-1" not in up_zero, "the edge that left had failing scrapes"
    # Every edge forwards through its own relay, yet `to` names the upstream they share (its
    # address: the port its own series name as their server).
    upstream_port = servers["upstream-0"].rsplit(":", 1)[1]
    assert {e: t for e, t in tos.items() if e.startswith("edge")} == {
        e: {f"127.0.0.1:{upstream_port}"} for e in ("edge-0", "edge-1", "edge-2", "edge-3")
    }
    series, _ = _features(out)
    assert {key[1] for key in series} == {"upstream-0", "edge-0", "edge-1", "edge-2", "edge-3"}


def test_node_local_caches_take_the_clients_and_forward_misses_to_their_edge_over_tcp(tmp_path: Path) -> None:
    _need_peers()
    out, _ = run_scenario(
        {
            "name": "nodelocal",
            "duration": "80s",
            "topology": {"edges": 2, "upstreams": 1, "node_local": True},
            "load": {"qps": 60, "segment": "5s"},
            "health": {"window": "10s", "settle": "10s", "recovery": "10s"},
            "faults": [
                {
                    "class": "upstream_latency",
                    "start": "45s",
                    "duration": "20s",
                    "actions": [{"primitive": "upstream_delay", "targets": ["edge-0"], "delay": "300ms"}],
                }
            ],
        },
        tmp_path,
    )
    truth = json.loads((out / "truth.json").read_text())
    # The load check reads the clients' rate where it arrives: at the node-local caches.
    assert truth["health"]["valid"] is True, truth["health"]
    assert truth["health"]["judged_windows"]["load"] >= 2, truth["health"]
    roles = {i["instance"]: (i["job"], i["role"], i.get("upstream")) for i in truth["instances"]}
    assert roles["nodelocal-0"] == ("node-local-dns", "nodelocal", "upstream-0")
    assert roles["edge-1"][:2] == ("coredns-edge", "edge")
    # A fault on an edge's path reaches the cache in front of it, which the truth says.
    [event] = truth["events"]
    assert {i["instance"] for i in event["instances"]} == {"edge-0", "nodelocal-0"}

    requests: dict[tuple[str, str], float] = {}
    for labels, _, vs in _series(out):
        if labels.get("__name__") == "coredns_dns_requests_total" and labels.get("type") != "other":
            k = (labels["instance"], labels["proto"])
            requests[k] = max(requests.get(k, 0.0), *vs)
    for e in ("0", "1"):
        # The edge hears only its cache's misses, and only over TCP (force_tcp); the clients ask
        # the cache over UDP.
        assert requests.get((f"edge-{e}", "udp"), 0.0) == 0.0, requests
        assert 0 < requests[(f"edge-{e}", "tcp")] < requests[(f"nodelocal-{e}", "udp")] / 2, requests
    series, _ = _features(out)
    assert {key[1] for key in series} >= {"nodelocal-0", "nodelocal-1", "edge-0", "edge-1", "upstream-0"}

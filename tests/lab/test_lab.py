"""The lab: scenario files are validated before anything starts, and a short real run (CoreDNS,
dnsperf, Prometheus, `detectord record`) records a fault that shows on the faulted instances only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from detectord.errors import ConfigError
from detectord.ingest.features import FEATURE_NAMES, FeatureSeries, extract
from detectord.ingest.remote_write import LabelCache
from detectord.offline.dataset import DatasetError, load_datasets
from detectord.recordings.format import ReadStats, read_writes
from lab.peers.coredns import coredns_binary
from lab.peers.dnsperf import dnsperf_binary
from lab.peers.prometheus import prometheus_binary
from lab.runner import MachineBusy, machine_lock
from lab.scenario import load_scenario, parse_scenario
from tests.support import REPO

SCENARIOS = REPO / "lab/scenarios"
IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


def _base(**extra: Any) -> dict[str, Any]:
    return {"duration": "60s", "topology": {"edges": 2, "upstreams": 1}, **extra}


def _fault(**action: Any) -> dict[str, Any]:
    return {"class": "x", "start": "10s", "duration": "20s", "actions": [action]}


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        (
            _base(faults=[_fault(primitive="upstream_delay", targets=["edge-7"])]),
            "faults[0].actions[0].targets",
            "no node 'edge-7'",
        ),
        (
            _base(faults=[_fault(primitive="teleport", targets=["edge-0"])]),
            "faults[0].actions[0].primitive",
            "unknown primitive 'teleport'",
        ),
        (
            _base(faults=[_fault(primitive="upstream_delay", targets=["edge-0"], dealy="1s")]),
            "faults[0].actions[0].dealy",
            "unknown key",
        ),
        (
            _base(faults=[_fault(primitive="upstream_delay", targets=["edge-0"], delay="soon")]),
            "faults[0].actions[0].delay",
            "not a duration",
        ),
        (
            _base(faults=[_fault(primitive="query_flood", targets=["upstream-0"])]),
            "faults[0].actions[0].targets",
            "applies to edge nodes",
        ),
        (
            _base(faults=[{**_fault(primitive="crash", targets=["edge-0"]), "start": "50s"}]),
            "faults[0]",
            "after the scenario",
        ),
        (
            _base(
                faults=[{"start": "1s", "duration": "1s", "actions": [{"primitive": "crash", "targets": ["edge-0"]}]}]
            ),
            "faults[0].class",
            "is required",
        ),
        (_base(load={"qps": 0}), "load.qps", "must be > 0"),
        (_base(topology={"edgez": 3}), "topology.edgez", "unknown key"),
        ({"topology": {"edges": 1}}, "duration", "is required"),
        (_base(test_only="yes"), "test_only", "must be true or false"),
        (_base(exclusive="yes"), "exclusive", "must be true or false"),
        (_base(validation_lanes=["upstream-0"]), "validation_lanes", "of a test_only run"),
        (_base(test_only=True, validation_lanes=["upstream-9"]), "validation_lanes", "does not have"),
        (_base(health={"load_tolerance": "lots"}), "health.load_tolerance", "must be a number"),
        (_base(health={"windw": "10s"}), "health.windw", "unknown key"),
        (_base(load={"nxdomain_share": 0.99}), "load.nxdomain_share", "must be in [0, 0.95]"),
        (_base(load={"qtypes": {"A": 1, "HINFO": 1}}), "load.qtypes", "unknown: ['HINFO']"),
        (_base(load={"qtypes": {"A": "many"}}), "load.qtypes.A", "must be a number"),
        (_base(topology={"upstream_rtt": "10ms", "upstream_jitter": "20ms"}), "topology.upstream_rtt", "jitter"),
    ],
)
def test_scenario_errors_name_the_key(raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(raw)
    assert err.value.key == key
    assert message in err.value.reason


def test_shipped_scenarios_are_valid() -> None:
    files = sorted(SCENARIOS.glob("*.yaml"))
    assert len(files) >= 5
    classes: dict[str, set[str]] = {}
    for path in files:
        sc = load_scenario(path)
        for f in sc.faults:
            if not f.benign:
                classes.setdefault(f.cls, set()).add(f.severity)
    # The fleets at load levels no training data has are test data only.
    assert {p.stem for p in files if load_scenario(p).test_only} == {
        "unseen-low",
        "unseen-high",
        "unseen-rtt",
        "unseen-nxdomain",
        "unseen-cache-small",
        "unseen-cache-large",
        "unseen-nodelocal",
        "unseen-qtypes",
        "durations",
        "benign",
    }
    # Benign changes are what operators do every day, in the benign-change fleet only.
    benign = {p.stem for p in files if any(f.benign for f in load_scenario(p).faults)}
    assert benign == {"benign"}
    # The data sets' fault runs cover every class at three severities.
    assert len(classes) >= 11
    for c, sev in classes.items():
        assert sev >= {"low", "medium", "high"}, (c, sev)


def _need_peers() -> None:
    coredns_binary()
    prometheus_binary()
    dnsperf_binary()


def run_scenario(scenario: dict[str, Any], tmp_path: Path, *, timeout: float = 400) -> tuple[Path, str]:
    """lab/run on `scenario` (written to a file); the run's directory and what it printed."""
    path = tmp_path / f"{scenario.get('name', 'scenario')}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(REPO / "lab/run"), str(path), "--out", str(out), "--progress-interval", "5"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def _features(run: Path, step_s: float = 5.0) -> tuple[dict[tuple[str, ...], FeatureSeries], ReadStats]:
    stats = ReadStats()
    writes = (w for _, w in read_writes(run / "recording.drec", LabelCache(), read_stats=stats))
    return extract(writes, int(step_s * 1000)), stats


@pytest.mark.e2e
def test_smoke_scenario_records_the_fault_on_the_faulted_instances_only(tmp_path: Path) -> None:
    """lab/run on lab/scenarios/smoke.yaml: upstream-0 answers SERVFAIL for 40 s. The recording's
    features show it on upstream-0 and edge-0 (which forwards to it) and nowhere else."""
    _need_peers()
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(REPO / "lab/run"), str(SCENARIOS / "smoke.yaml"), "--out", str(out), "--progress-interval", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fault upstream_servfail (high) on upstream-0" in proc.stdout
    assert "samples" in proc.stdout and "qps" in proc.stdout  # progress lines

    truth = json.loads((out / "truth.json").read_text())
    assert truth["interrupted"] is False and truth["test_only"] is False
    # Every edge's relay accounts for its queries; none was lost for want of a socket.
    relays = {i["instance"]: i["relay"] for i in truth["instances"] if i["role"] == "edge"}
    assert set(relays) == {"edge-0", "edge-1"}
    assert all(r["queries"] > 0 and r["answers"] > 0 and r["failed"] == 0 for r in relays.values()), relays
    # The run checked its own healthy periods (the lane the fault did not touch) and found them healthy.
    health = truth["health"]
    assert health["valid"] is True, health
    assert health["judged_windows"]["load"] >= 1 and health["judged_windows"]["servfail_share"] >= 2, health
    assert "healthy periods checked" in proc.stdout
    [event] = truth["events"]
    assert event["class"] == "upstream_servfail"
    assert {i["instance"] for i in event["instances"]} == {"upstream-0", "edge-0"}
    assert event["end_ms"] - event["start_ms"] == pytest.approx(40_000, abs=2_000)

    series, stats = _features(out)
    assert stats.torn_bytes == 0
    by_name = {key[1]: s for key, s in series.items()}
    assert set(by_name) == {"edge-0", "edge-1", "upstream-0", "upstream-1"}
    servfail = IDX["rcode_servfail_share"]
    for name, s in by_name.items():
        t = s.timestamps_ms
        before = (t < event["start_ms"] - 5_000) & (t > truth["started_ms"] + 10_000)
        # Edges cache good answers for up to 30 s: look at the second half of the span.
        during = (t > event["start_ms"] + 20_000) & (t < event["end_ms"])
        assert before.sum() >= 4 and during.sum() >= 3, name
        assert np.nanmax(s.values[before, servfail]) < 0.01, name
        if name in ("edge-0", "upstream-0"):
            assert np.nanmean(s.values[during, servfail]) > 0.5, name
        else:
            assert np.nanmax(s.values[:, servfail]) < 0.01, name
            rate = s.values[during, IDX["request_rate"]]
            assert np.all(rate > 10), name  # it kept answering its load


@pytest.mark.e2e
def test_interrupted_run_leaves_no_process_and_keeps_the_truth_so_far(tmp_path: Path) -> None:
    _need_peers()
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        yaml.safe_dump(
            _base(
                duration="5m",
                faults=[
                    {
                        "class": "edge_crash",
                        "start": "5s",
                        "duration": "2m",
                        "actions": [{"primitive": "crash", "targets": ["edge-1"], "down": "2s", "every": "5s"}],
                    }
                ],
            )
        )
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [str(REPO / "lab/run"), str(scenario), "--out", str(out), "--progress-interval", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    # Interrupt mid-fault once Prometheus has delivered at least twice (a cold Prometheus may take
    # longer than the fault's start to send its first batch).
    seen: set[str] = set()
    for line in proc.stdout:
        m = re.search(r"samples (\d+) .*faults: .*edge_crash", line)
        if m and int(m.group(1)) > 0:
            seen.add(m.group(1))
            if len(seen) >= 2:
                break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    truth = json.loads((out / "truth.json").read_text())
    assert truth["interrupted"] is True
    [event] = truth["events"]
    assert event["end_ms"] is not None and event["end_ms"] >= event["start_ms"]
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left behind: {leftovers}"
    assert list(_features(out)[0])  # what was recorded reads back


@pytest.mark.e2e
def test_an_overloaded_run_is_flagged_invalid_and_refused_by_data_sets(tmp_path: Path) -> None:
    """One edge asked for far more queries than this machine can send and answer: the lab notices
    its "healthy" traffic is not what the scenario asked for, says so, and data sets refuse it."""
    _need_peers()
    out, printed = run_scenario(
        {
            "name": "overload",
            "duration": "45s",
            "topology": {"edges": 1, "upstreams": 1},
            "load": {"qps": 200000, "modulation_depth": 0, "segment": "5s"},
            "health": {"window": "10s", "settle": "10s"},
        },
        tmp_path,
        timeout=300,
    )
    assert "were not healthy" in printed, printed
    health = json.loads((out / "truth.json").read_text())["health"]
    assert health["valid"] is False and any(r.startswith("load:") for r in health["reasons"]), health
    bad = [v for v in health["violations"] if v["check"] == "load"]
    assert bad and all(v["instance"] == "edge-0" and v["value"] < 0.9 * v["limit"] for v in bad), bad
    # As a data set: refused unless asked for.
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(out / "recording.drec", data / "overload.drec")
    shutil.copy(out / "truth.json", data / "overload.truth.json")
    with pytest.raises(DatasetError, match=r"healthy periods were not healthy.*load:"):
        load_datasets([data], window=8, step_s=5.0)
    assert load_datasets([data], window=8, step_s=5.0, allow_invalid=True).series


def test_a_run_that_needs_the_machine_refuses_to_start_beside_another(tmp_path: Path) -> None:
    lock = tmp_path / "lab.lock"
    # Ordinary runs share the machine; one that needs it to itself does not start beside them.
    with (
        machine_lock(False, lock),
        machine_lock(False, lock),
        pytest.raises(MachineBusy, match="needs it to itself"),
        machine_lock(True, lock),
    ):
        pass
    with machine_lock(True, lock), pytest.raises(MachineBusy, match="another lab run"), machine_lock(False, lock):
        pass
    # lab/run says so and starts nothing.
    scenario = tmp_path / "big.yaml"
    scenario.write_text(yaml.safe_dump({"duration": "10s", "exclusive": True}))
    with machine_lock(False, lock):
        proc = subprocess.run(
            [str(REPO / "lab/run"), str(scenario), "--out", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DETECTORD_LAB_LOCK": str(lock)},
        )
    assert proc.returncode == 3 and "not started: another lab run" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()

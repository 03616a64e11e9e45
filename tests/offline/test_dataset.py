"""Data sets from recordings: labels from the ground truth, a 70/15/15 split by contiguous time
blocks that no window straddles, held-out classes kept out of training, engineers' labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detectord.offline.dataset import DatasetError, Label, load_datasets, load_labels
from tests.support import small_data

W = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data(tmp_path_factory.mktemp("data"))


def test_split_by_blocks_no_window_straddles_roles(data_dir: Path) -> None:
    data = load_datasets([data_dir], window=W, step_s=5.0, heldout=("cpu_starvation",))
    counts = data.description["counts"]
    total = sum(c["windows"] for c in counts.values())
    assert 0.5 < counts["train"]["windows"] / total < 0.85
    assert counts["train"]["anomalous"] > 0 and counts["test"]["incidents"] > 0
    for info in data.series:
        for e in np.flatnonzero(info.scored):
            role = info.role[e]
            if role is not None:
                # Every step of a window that has a role lies in one block of that role.
                steps = slice(e - W + 1, e + 1)
                assert all(r in (role, None) for r in info.role[steps])
    train_series: dict[int, set[tuple[str, int]]] = {s: set() for s in range(len(data.series))}
    for role in ("train", "validation", "test"):
        m = data.role == role
        for sid, end in zip(data.all.series_id[m], data.all.end_ms[m], strict=True):
            train_series[sid].add((role, int(end)))
    # No window end is in two roles.
    for ends in train_series.values():
        assert len({e for _, e in ends}) == len(ends)


def test_a_test_only_recording_is_all_test_data(data_dir: Path, tmp_path: Path) -> None:
    for f in data_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    truth = tmp_path / "faults-1.truth.json"
    truth.write_text(json.dumps({**json.loads(truth.read_text()), "test_only": True}))
    data = load_datasets([tmp_path], window=W, step_s=5.0)
    by_rec = {r.name: r.test_only for r in data.recordings}
    assert by_rec == {"faults-1": True, "normal": False}
    faults = np.array([data.series[i].recording == "faults-1" for i in data.all.series_id], dtype=bool)
    assert set(data.role[faults]) <= {"test", None} and "test" in set(data.role[faults])
    assert "train" in set(data.role[~faults])  # the other recording is still split

    # One of its lanes held for validation: validation there (calibration, the default's choice),
    # never training; the other lanes stay test.
    truth.write_text(json.dumps({**json.loads(truth.read_text()), "validation_lanes": ["upstream-1"]}))
    data = load_datasets([tmp_path], window=W, step_s=5.0)
    rec = next(r for r in data.recordings if r.name == "faults-1")
    held = {"/".join(("faults-1", *k)) for k, lane in rec.lanes.items() if lane == "upstream-1"}
    assert held and len(held) < len(rec.series)
    lane1 = np.array([data.all.series[i] in held for i in data.all.series_id], dtype=bool)
    # (Held-out classes' incidents stay test data wherever they are.)
    assert "train" not in set(data.role[faults & lane1]) and "validation" in set(data.role[faults & lane1])
    assert set(data.role[faults & ~lane1]) <= {"test", None}
    val = data.validation
    assert any(s.startswith("faults-1/") for s in val.series)


def test_heldout_class_never_reaches_training_or_validation(data_dir: Path) -> None:
    data = load_datasets([data_dir], window=W, step_s=5.0, heldout=("cpu_starvation", "edge_crash"))
    assert "cpu_starvation" not in data.train.classes() and "edge_crash" not in data.validation.classes()
    assert {"cpu_starvation", "edge_crash"} <= set(data.test.classes())
    assert set(data.seen).isdisjoint(data.heldout)


def test_windows_are_labelled_by_their_last_step(data_dir: Path) -> None:
    data = load_datasets([data_dir], window=W, step_s=5.0)
    lab, clean = data.all.label, data.all.clean
    assert clean is not None
    # In an incident's aftermath: unlabelled. Normal again, with the incident still in the window:
    # normal (an alert there would be a false one), but not clean enough to learn normal from.
    assert any(lb is None for lb in lab)
    assert (data.all.normal & ~clean).any() and (data.all.normal & clean).any()
    assert not (data.all.anomalous & clean).any()
    assert data.train.normal.sum() > 0 and all(lb is not None for lb in data.train.label)


def test_labels_file_errors_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "labels.yaml"
    f.write_text(
        "- {labels: {job: coredns-edge, instance: edge-0}, start: 2026-11-23T10:00:00Z, end: 1, verdict: ok}\n"
    )
    with pytest.raises(DatasetError, match=r"labels.yaml\[0\].verdict: must be 'anomaly' or 'normal'"):
        load_labels(f)
    f.write_text("- {labels: {job: coredns-edge}, start: 0, end: 1, verdict: normal}\n")
    with pytest.raises(DatasetError, match=r"\[0\].labels: must give job, instance"):
        load_labels(f)
    f.write_text("- {labels: {job: a, instance: b}, start: 0, end: 1, verdict: normal, klass: x}\n")
    with pytest.raises(DatasetError, match=r"unknown keys \['klass'\]"):
        load_labels(f)


def test_an_engineers_labels_change_what_is_learned(data_dir: Path) -> None:
    base = load_datasets([data_dir], window=W, step_s=5.0)
    info = next(i for i in base.series if i.instance == ("coredns-edge", "edge-1") and i.recording == "normal")
    t = info.timestamps_ms
    # Call ten minutes of healthy edge-1 a "cache_poisoning" incident; and the first incident normal.
    a, b = int(t[200]), int(t[320])
    first = min(base.events.values(), key=lambda e: e["start_ms"])
    inst = tuple(first["instances"][0].split("/")[1:])
    labels = [
        Label("normal", ("coredns-edge", "edge-1"), a, b, anomalous=True, cls="cache_poisoning"),
        Label("*", inst, first["start_ms"] - 1, first["end_ms"] + 1, anomalous=False),
    ]
    data = load_datasets([data_dir], window=W, step_s=5.0, labels=labels)
    info2 = next(i for i in data.series if i.name == info.name)
    assert (info2.label[201:320] == "cache_poisoning").all()
    assert "cache_poisoning" in data.all.label
    inst_info = next(i for i in data.series if i.instance == inst and i.recording == "faults-1")
    ts = inst_info.timestamps_ms
    inside = (ts > first["start_ms"]) & (ts <= first["end_ms"])
    assert (inst_info.label[inside] == "").all()


def test_every_instance_is_judged_an_upstream_by_whether_its_traffic_moved() -> None:
    """The upstream beside a hit edge is part of the incident when its query rate moved (a flood's
    misses reach it), normal when it did not (an alert there is false), unjudged when only some
    steps moved (a crash loop's bursts) or the recording cannot say."""
    from detectord.ingest.features import FEATURE_NAMES, FeatureSeries
    from detectord.ingest.normalise import BaselineSeries, InputPlan, baseline_series
    from detectord.offline.dataset import Span, _judge_upstreams

    plan = InputPlan.default(FEATURE_NAMES)

    def upstream(factor: float, bursts: bool = False, refused: float = 0.0) -> BaselineSeries:
        ts = np.arange(0, 600_000, 5_000, dtype=np.int64)
        raw = np.zeros((len(ts), len(FEATURE_NAMES)), np.float32)
        during = (ts > 300_000) & (ts <= 360_000)
        if bursts:  # a crash loop's restarts: a few steps of misses, the rest as before
            during &= ts % 30_000 == 0
        raw[:, FEATURE_NAMES.index("request_rate")] = np.where(during, 100 * factor, 100)
        raw[:, FEATURE_NAMES.index("rcode_refused_share")] = np.where(during, refused, 0.0)
        return baseline_series(FeatureSeries(ts, raw, np.zeros(len(ts), bool)), plan, 5.0)

    edge = Span(("lab", "edge-0"), 300_000, 360_000, "query_flood", "r#1", "medium")
    up = Span(("lab", "up-0"), 300_000, 360_000, "", "r#1", judged=False)
    assert _judge_upstreams([edge, up], {("lab", "up-0"): upstream(3.0, bursts=True)}, plan) == [edge, up]
    # Forward's health checks under loss: the upstream answers some REFUSED, its rate unchanged.
    out = _judge_upstreams([edge, up], {("lab", "up-0"): upstream(1.0, refused=0.03)}, plan)
    assert [s.cls for s in out if s.instance == ("lab", "up-0")] == ["query_flood"]
    for factor, want in ((2.0, "query_flood"), (0.5, "query_flood"), (1.1, None)):
        up = Span(("lab", "up-0"), 300_000, 360_000, "", "r#1", judged=False)
        out = _judge_upstreams([edge, up], {("lab", "up-0"): upstream(factor)}, plan)
        judged = [s for s in out if s.instance == ("lab", "up-0")]
        if want is None:
            assert judged == [], factor  # normal: no span at all
        else:
            assert [(s.cls, s.judged, s.severity) for s in judged] == [(want, True, "medium")], factor
    up = Span(("lab", "up-0"), 300_000, 360_000, "", "r#1", judged=False)
    assert _judge_upstreams([edge, up], {}, plan) == [edge, up]  # no series: left unjudged

"""Evaluation semantics: alerts as detectord raises them, incidents caught, detection delay in
steps, false alerts per instance-day, thresholds for a target false-alert rate."""

from __future__ import annotations

import numpy as np
import pytest

from detectord.alerting.timing import AlertRule, firing
from detectord.detectors.quality import threshold_for_rate
from detectord.detectors.windowset import WindowSet
from detectord.offline.dataset import Data, SeriesInfo, Span, step_labels
from detectord.offline.evaluation import Timeline, evaluate, notifications

STEP_MS = 5000


def test_alert_fires_after_for_and_resolves_after_keep_firing() -> None:
    a = np.array([0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    ts = np.arange(len(a)) * STEP_MS
    assert firing(ts, a, AlertRule(0, 0)).tolist() == a.tolist()
    # As in Prometheus: pending at the first anomalous step, firing once `for` has passed since it:
    # at `for: 10s` and 5 s steps, the third; at `for: 15s` this run of three never fires.
    assert firing(ts, a, AlertRule(10, 0)).astype(int).tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert not firing(ts, a, AlertRule(15, 0)).any()
    # keep_firing_for merges the flap at step 6 into one alert, then resolves 10 s into the quiet.
    assert firing(ts, a, AlertRule(0, 10)).astype(int).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_step_labels_mark_incident_and_recovery() -> None:
    ts = np.arange(1, 41) * STEP_MS
    sp = Span(("j", "a"), start_ms=10 * STEP_MS + 2000, end_ms=20 * STEP_MS, cls="upstream_timeout", event="r#0")
    label, event = step_labels(ts, STEP_MS, [sp], recovery_s=30)
    assert label[:10].tolist() == [""] * 10
    assert label[10:20].tolist() == ["upstream_timeout"] * 10 and event[10] == "r#0"  # (50 s, 55 s] overlaps
    assert label[20:26].tolist() == [None] * 6 and label[26:].tolist() == [""] * 14
    # The upstream of a flooded edge sees the flood: its steps then are not judged at all.
    collateral = Span(("j", "up"), sp.start_ms, sp.end_ms, "", "r#0", judged=False)
    label, _ = step_labels(ts, STEP_MS, [collateral], recovery_s=30)
    assert label[10:26].tolist() == [None] * 16 and label[26:].tolist() == [""] * 14
    # An engineer's "normal" verdict wins over the lab's truth where they overlap.
    label, _ = step_labels(ts, STEP_MS, [sp, Span(("j", "a"), 12 * STEP_MS, 14 * STEP_MS, "", "label:0")])
    assert label[11:14].tolist() == ["upstream_timeout", "", ""]


def _data(labels: list[object], events: dict[str, list[int]], roles: str = "test") -> Data:
    n = len(labels)
    ts = np.arange(1, n + 1, dtype=np.int64) * STEP_MS
    lab = np.array(labels, dtype=object)
    ev = np.full(n, "", dtype=object)
    meta = {}
    for e, (a, b) in events.items():
        ev[a:b] = e
        meta[e] = {
            "class": lab[a],
            "severity": "",
            "recording": "r",
            "start_ms": int(ts[a] - STEP_MS),
            "end_ms": int(ts[b - 1]),
            "instances": ["r/j/a"],
        }
    info = SeriesInfo("r/j/a", "r", ("j", "a"), ts, lab, ev, np.full(n, roles, dtype=object), np.ones(n, bool))
    empty = WindowSet(
        np.zeros((0, 8, 1), np.float32),
        np.zeros(0, object),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        ["r/j/a"],
        STEP_MS / 1000,
    )
    return Data(empty, np.zeros(0, object), [info], meta, heldout=("cpu_starvation",), seen=("upstream_timeout",))


def test_incidents_caught_delays_and_false_alerts() -> None:
    n = 17280  # a day of 5 s steps
    labels: list[object] = [""] * n
    for i in range(100, 112):
        labels[i] = "upstream_timeout"
    for i in range(500, 512):
        labels[i] = "cpu_starvation"
    data = _data(labels, {"r#0": [100, 112], "r#1": [500, 512]})
    scores = np.full(n, 0.5, np.float32)
    scores[103:110] = 3.0  # caught 3 steps late
    scores[2000] = 1.5  # one false alert
    scores[2002] = 1.5  # the same alert, kept firing over the gap
    scores[9000] = 2.0  # another
    ev = evaluate("m", {"r/j/a": Timeline(data.series[0].timestamps_ms, scores)}, data, rule=AlertRule(0, 60))
    assert ev.event["events"] == 2 and ev.event["caught"] == 1 and ev.event["false_alerts"] == 2
    assert ev.event["delay_steps_median"] == 3.0
    assert ev.event["false_alerts_per_instance_day"] == pytest.approx(2 / (n - 24) * 17280, rel=1e-6)
    assert ev.event["precision"] == pytest.approx(1 / 3) and ev.event["recall"] == 0.5
    assert ev.groups["seen"]["recall"] == 1.0 and ev.groups["heldout"]["recall"] == 0.0
    assert ev.classes["cpu_starvation"]["heldout"] is True
    w = ev.window["confusion"]
    assert (w["tp"], w["fn"], w["fp"]) == (7, 17, 3)


def test_the_class_named_when_the_alert_fires_and_at_the_incident_end() -> None:
    labels: list[object] = [""] * 200
    for i in range(100, 112):
        labels[i] = "upstream_timeout"
    data = _data(labels, {"r#0": [100, 112]})
    scores = np.full(200, 0.5, np.float32)
    scores[101:110] = 3.0
    like = np.full(200, None, dtype=object)
    like[101:103] = "upstream_down"
    like[103:110] = "upstream_timeout"
    ev = evaluate("m", {"r/j/a": Timeline(data.series[0].timestamps_ms, scores, like)}, data, rule=AlertRule(0, 60))
    c = ev.classes["upstream_timeout"]
    assert (c["named"], c["named_right"], c["named_right_at_end"]) == (1, 0, 1)
    assert ev.events[0]["looks_like"] == "upstream_down" and ev.events[0]["looks_like_at_end"] == "upstream_timeout"


def test_steps_outside_the_role_are_not_judged() -> None:
    labels: list[object] = [""] * 300
    data = _data(labels, {}, roles="train")
    scores = np.full(300, 5.0, np.float32)
    ev = evaluate("m", {"r/j/a": Timeline(data.series[0].timestamps_ms, scores)}, data)
    assert ev.event["false_alerts"] == 0 and ev.window["windows"] == 0


def test_threshold_for_a_target_false_alert_rate() -> None:
    rng = np.random.default_rng(0)
    n = 17280 * 4  # four instance-days of normal windows
    raw = rng.random(n).astype(np.float32)
    spikes = rng.choice(n, 20, replace=False)
    raw[spikes] = 5.0 + rng.random(20)
    series = np.repeat(np.arange(4), n // 4)
    end = np.tile(np.arange(n // 4) * STEP_MS, 4)
    t, achieved = threshold_for_rate(raw, series, end, 5.0, target_per_day=0.5)
    # At most 2 alerts in 4 days: the threshold sits among the spikes, above the noise.
    assert achieved <= 0.5 and (raw > t).sum() <= 2 and t > 1.0
    t0, a0 = threshold_for_rate(raw, series, end, 5.0, target_per_day=0.0)
    assert a0 == 0.0 and t0 == raw.max()


def test_long_incidents_firing_share_resolve_steps_and_benign_changes() -> None:
    """A 30-minute incident: the share of its steps with an alert firing, and steps from its end
    to the resolve; an alert on a benign change is a false alert, counted apart too; every rate
    comes with its 95 % upper bound."""
    n = 2000
    labels: list[object] = [""] * n
    for i in range(100, 460):  # 30 minutes of 5 s steps
        labels[i] = "upstream_latency"
    data = _data(labels, {"r#0": [100, 460]})
    data.series[0].event[1000:1024] = "benign:rolling_restart@r#1"  # a restart and its aftermath: normal
    data.series[0].event[1500:1524] = "benign:cache_flush@r#2"
    scores = np.full(n, 0.5, np.float32)
    scores[102:424] = 3.0  # fires from the third step, drops out for the last 36
    scores[1010] = 2.0  # an alert on the benign change
    ev = evaluate("m", {"r/j/a": Timeline(data.series[0].timestamps_ms, scores)}, data, rule=AlertRule(0, 60))
    (row,) = ev.events
    assert row["duration_s"] == 1800.0 and row["delay_steps"] == 2
    # Firing from step 102 to 435 (keep_firing_for 60 s = 12 steps after the last anomalous one).
    assert row["firing_share"] == pytest.approx((436 - 102) / 360)
    assert row["resolve_steps"] == 0  # it had resolved before the incident ended
    assert ev.event["false_alerts"] == 1 and ev.event["false_alerts_on_benign_changes"] == 1
    assert ev.event["benign_changes"] == 2
    assert ev.event["benign_by_class"] == {
        "cache_flush": {"changes": 1, "false_alerts": 0},
        "rolling_restart": {"changes": 1, "false_alerts": 1},
    }
    upper = ev.event["false_alerts_per_instance_day_upper95"]
    assert upper == pytest.approx(4.7439 / ev.event["normal_instance_days"], rel=1e-3)
    # Firing to its end: it resolves keep_firing_for (12 steps) after it.
    scores[424:460] = 3.0
    ev = evaluate("m", {"r/j/a": Timeline(data.series[0].timestamps_ms, scores)}, data, rule=AlertRule(0, 60))
    assert ev.events[0]["firing_share"] == pytest.approx(358 / 360) and ev.events[0]["resolve_steps"] == 12


def test_notifications_are_counted_as_alertmanager_groups_alerts_by_upstream() -> None:
    """Alerts that share an upstream go out together: one notification after group_wait for all
    that fired by then, one more per group_interval that brings new ones; other upstreams are
    other groups."""
    s = 1000
    assert notifications([]) == 0
    # Three edges of one upstream within its 30 s group_wait: one notification.
    assert notifications([("up-0", 0), ("up-0", 10 * s), ("up-0", 30 * s)]) == 1
    # A fourth 2 minutes on: at the next group_interval tick; a fifth before that tick joins it.
    assert notifications([("up-0", 0), ("up-0", 120 * s), ("up-0", 200 * s)]) == 2
    # And one 6 minutes on needs the tick after.
    assert notifications([("up-0", 0), ("up-0", 120 * s), ("up-0", 360 * s)]) == 3
    # Another upstream's edge is another group.
    assert notifications([("up-0", 0), ("up-1", 5 * s)]) == 2


def test_a_benign_change_and_its_aftermath_are_normal_steps_marked_as_the_change() -> None:
    ts = np.arange(1, 41) * STEP_MS
    restart = Span(("j", "a"), 10 * STEP_MS, 12 * STEP_MS, "", "benign:rolling_restart@r#3", benign=True)
    label, event = step_labels(ts, STEP_MS, [restart], recovery_s=30)
    assert label.tolist() == [""] * 40
    assert event[10:18].tolist() == ["benign:rolling_restart@r#3"] * 8 and event[18] == "" and event[9] == ""
    # An incident on the same steps is still an incident.
    sp = Span(("j", "a"), 11 * STEP_MS, 13 * STEP_MS, "upstream_timeout", "r#4")
    label, event = step_labels(ts, STEP_MS, [restart, sp], recovery_s=30)
    assert label[11:13].tolist() == ["upstream_timeout"] * 2 and event[11] == "r#4"


def test_a_failed_scrape_alerts_as_serving_s_liveness_does() -> None:
    """An edge that crashes: its model scores stay low, but `up == 0` alerts at once in serving,
    and so in the evaluation; a failed scrape before it was ever scored does not."""
    labels: list[object] = [""] * 300
    for i in range(200, 212):
        labels[i] = "edge_crash"
    data = _data(labels, {"r#0": [200, 212]})
    info = data.series[0]
    info.scored[:50] = False
    info.down = np.zeros(300, bool)
    info.down[[10, 203]] = True
    scores = np.full(300, 0.5, np.float32)
    ev = evaluate("m", {"r/j/a": Timeline(info.timestamps_ms, scores)}, data, rule=AlertRule(0, 60))
    assert ev.event["caught"] == 1 and ev.event["delay_steps_median"] == 3.0
    assert ev.event["false_alerts"] == 0


def test_the_evaluation_sees_the_failed_scrapes_serving_would() -> None:
    """Offline, as in serving: down from the second failed scrape in a row, and a recording made
    at a finer scrape is cut as a Prometheus scraping once a step sees it (each step's last `up`):
    a restart 3 s long that no 5 s scrape caught is no outage."""
    from detectord.offline.dataset import _down_steps

    ts = np.arange(1, 21) * 5000  # steps (T - 5 s, T]
    up_ms = np.arange(1, 101) * 1000  # a 1 s scrape: sample i at (i + 1) s
    up = np.ones(100, np.float32)
    up[[21, 22, 23]] = 0.0  # 22-24 s: inside the step ending at 25 s, whose last scrape succeeded
    up[[44, 49]] = 0.0  # the last scrapes of the steps ending at 45 s and 50 s: two in a row
    up[[64]] = 0.0  # one alone (the step ending at 65 s)
    up[[79, 84, 89, 94]] = 0.0  # four in a row
    down = _down_steps(ts, up_ms, up, failed_scrapes=2)
    assert (np.flatnonzero(down) * 5000 + 5000).tolist() == [50_000, 85_000, 90_000, 95_000]
    assert _down_steps(ts, up_ms, up, failed_scrapes=1).sum() == 7


def test_the_evaluation_sees_the_crash_loops_serving_would() -> None:
    """A CoreDNS crashing for 10 s once a minute, scraped every 15 s: a scrape may never fail, only
    its counters reset. Offline, as in serving (`CrashLoops`, ingest.crash_loop_* defaults: 3
    restarts within 10 minutes): a crash loop from the third restart until it has run 1.5 times
    its longest interval without one; a rollout and a rollback (two restarts) are none."""
    from detectord.offline.dataset import _crash_loop_steps

    ts = np.arange(1, 121) * 15_000  # 30 minutes of 15 s steps
    loop = [20, 24, 28, 32, 36]  # restarts once a minute, from the step ending at 5 min
    steps = _crash_loop_steps(("coredns", "a"), ts, [*loop, 80])
    # The third restart is the loop's first step; 90 s (6 steps) after the last of the minute's
    # restarts it is over, and one more restart 11 minutes on starts none.
    assert np.flatnonzero(steps).tolist() == list(range(28, 36 + 6 + 1))
    assert not _crash_loop_steps(("coredns", "a"), ts, [40, 44]).any()

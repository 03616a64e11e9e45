"""Evaluation: score timelines against the ground truth, at window level and at event level.

Every detector and comparison is judged the same way: its per-step scores (> 1.0 anomalous) on each
instance become alerts as detectord raises them (fire after `for`, resolve after
`keep_firing_for`); an incident is caught when an alert fires on one of its instances while it
lasts; an alert that starts on a normal step is a false alert.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detectord.alerting.timing import FIRING, AlertRule, Resemblance, phases
from detectord.detectors.quality import EVALUATION_RULE, episode_starts, prf, window_metrics
from detectord.offline.dataset import benign_class

if TYPE_CHECKING:
    from detectord.offline.dataset import Data


@dataclass
class Timeline:
    """One instance's scores, step by step (NaN where nothing was scored)."""

    timestamps_ms: np.ndarray  # int64 (T,)
    scores: np.ndarray  # float32 (T,)
    looks_like: np.ndarray | None = None  # object (T,): class guesses, where the detector makes them


@dataclass
class _Caught:
    fired: bool = False
    delay_steps: int | None = None
    looks_like: str | None = None  # what the alert named when it began firing
    looks_like_end: str | None = None  # what it named at the incident's last firing step
    steps: set[int] = field(default_factory=set)  # the incident's steps (timestamps), on any instance
    firing: set[int] = field(default_factory=set)  # those with an alert firing on one of its instances
    resolve_steps: int | None = None  # steps after its end until no alert of its instances fires


@dataclass
class Evaluation:
    """Everything measured for one detector on one role of the data."""

    name: str
    window: dict[str, Any]
    event: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    classes: dict[str, dict[str, Any]]
    recordings: dict[str, dict[str, Any]]
    rule: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    false_alerts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alert_rule": self.rule,
            "window": self.window,
            "event": self.event,
            "groups": self.groups,
            "classes": self.classes,
            "recordings": self.recordings,
            "events": self.events,
            "false_alerts": self.false_alerts,
        }


def evaluate(
    name: str,
    timelines: Mapping[str, Timeline],
    data: Data,
    *,
    role: str = "test",
    rule: AlertRule = EVALUATION_RULE,
    step_s: float | None = None,
) -> Evaluation:
    """Judge `timelines` (by series name) on the steps of `data` that have `role`. Incidents that
    began before an instance's first scored window (while it warmed) are not judged on it."""
    step_s = step_s or data.all.step_s
    pred_w: list[np.ndarray] = []
    lab_w: list[np.ndarray] = []
    like_w: list[np.ndarray] = []
    caught: dict[str, _Caught] = {}
    in_role: dict[str, int] = {}
    event_steps: dict[str, int] = {}
    false: list[dict[str, Any]] = []
    normal_steps: dict[str, int] = {}
    first_step: dict[str, int] = {}
    benign_changes: set[str] = set()
    # Per incident: (notification group, when an alert of it began firing) for each instance.
    fired_at: dict[str, list[tuple[str, int]]] = {}
    lanes = {"/".join((r.name, *k)): f"{r.name}/{r.lanes[k]}" for r in data.recordings for k in r.series}
    for info in data.series:
        tl = timelines.get(info.name)
        if tl is None:
            continue
        ts = info.timestamps_ms
        scores = aligned(tl, ts)
        like = _aligned_like(tl, ts)
        if info.down is not None and info.down.any() and info.scored.any():
            # Serving's liveness: a scoring instance whose scrapes fail (up == 0), or that is in a
            # crash loop, alerts whatever the score.
            down = info.down & (np.arange(len(ts)) >= int(np.argmax(info.scored)))
            scores = np.where(down, np.inf, scores)
        anomalous = np.nan_to_num(scores, nan=0.0, posinf=np.inf) > 1.0
        fire = alert_phases(scores, ts, rule) == FIRING
        shown = alert_names(anomalous, fire, like)
        role_ok = np.array([r == role for r in info.role], dtype=bool)
        scored = info.scored & ~np.isnan(scores)
        sel = role_ok & scored
        pred_w.append(anomalous[sel])
        lab_w.append(info.label[sel])
        like_w.append(like[sel])
        normal_steps[info.recording] = normal_steps.get(info.recording, 0) + int(
            sum(1 for lb in info.label[sel] if lb == "")
        )
        # Incidents: the steps of each event on this instance.
        first_scored = int(np.argmax(info.scored)) if info.scored.any() else len(ts)
        for ev in {e for e in info.event[sel] if e and not e.startswith("benign:")}:
            steps = np.flatnonzero(info.event == ev)
            if steps[0] < first_scored:
                continue  # it began while the instance was still warming: no detector could judge it
            event_steps[ev] = event_steps.get(ev, 0) + len(steps)
            in_role[ev] = in_role.get(ev, 0) + int(role_ok[steps].sum())
            c = caught.setdefault(ev, _Caught())
            first = int(steps[0])
            first_step[ev] = min(first_step.get(ev, first), first)
            hits = steps[fire[steps] & scored[steps]]
            c.steps.update(ts[steps].tolist())
            c.firing.update(ts[hits].tolist())
            if len(hits):
                fired_at.setdefault(ev, []).append((lanes.get(info.name, info.name), int(ts[hits[0]])))
                after = fire[steps[-1] + 1 :]
                quiet = np.flatnonzero(~after)
                n = int(quiet[0]) if len(quiet) else len(after)
                c.resolve_steps = n if c.resolve_steps is None else max(c.resolve_steps, n)
                delay = int(hits[0] - first)
                if not c.fired or (c.delay_steps is not None and delay < c.delay_steps):
                    c.delay_steps = delay
                    c.looks_like, c.looks_like_end = shown[hits[0]], shown[hits[-1]]
                c.fired = True
        for i in episode_starts(fire & sel):
            if info.label[i] == "":
                change = benign_class(str(info.event[i]))
                false.append(
                    {"series": info.name, "start_ms": int(ts[i]), "benign": change is not None, "change": change}
                )
        for ev in {e for e in info.event[sel] if e and e.startswith("benign:")}:
            benign_changes.add(ev)
    events = {e: ev for e, ev in data.events.items() if e in caught and in_role.get(e, 0) > 0}
    days = {rec: n * step_s / 86400.0 for rec, n in normal_steps.items()}
    total_days = sum(days.values())
    pred = np.concatenate(pred_w) if pred_w else np.zeros(0, bool)
    lab = np.concatenate(lab_w) if lab_w else np.zeros(0, object)
    lk = np.concatenate(like_w) if like_w else np.zeros(0, object)
    has_like = any(x is not None for x in lk)
    window = window_metrics(
        pred, lab, lk.tolist() if has_like else None, classes=sorted({str(x) for x in lk if x is not None})
    )

    def group(evs: Iterable[str], fa: int, days_: float) -> dict[str, Any]:
        evs = list(evs)
        tp = sum(caught[e].fired for e in evs)
        delays = [d for e in evs if caught[e].fired and (d := caught[e].delay_steps) is not None]
        return {
            "events": len(evs),
            "caught": tp,
            "false_alerts": fa,
            **prf(tp, fa, len(evs) - tp),
            "delay_steps_median": float(np.median(delays)) if delays else None,
            "delay_steps_p90": float(np.quantile(delays, 0.9)) if delays else None,
            "false_alerts_per_instance_day": fa / days_ if days_ > 0 else None,
            "false_alerts_per_instance_day_upper95": poisson_upper95(fa) / days_ if days_ > 0 else None,
            "normal_instance_days": round(days_, 4),
        }

    fa_all = len(false)
    ev_all = group(events, fa_all, total_days)
    # Benign changes (reloads, restarts, traffic growth) are normal: the alerts on them are false
    # alerts like any other, counted here apart as well.
    ev_all["benign_changes"] = len(benign_changes)
    ev_all["false_alerts_on_benign_changes"] = sum(1 for f in false if f.get("benign"))
    ev_all["benign_by_class"] = {
        c: {
            "changes": sum(1 for e in benign_changes if benign_class(e) == c),
            "false_alerts": sum(1 for f in false if f.get("change") == c),
        }
        for c in sorted({str(benign_class(e)) for e in benign_changes})
    }
    notes = {e: notifications(fired_at.get(e, [])) for e in events}
    multi = [notes[e] for e in events if len(data.events[e].get("instances") or []) > 1 and caught[e].fired]
    ev_all["notifications_per_incident"] = float(np.mean(multi)) if multi else None
    ev_all["notifications_per_incident_max"] = max(multi) if multi else None
    groups = {
        "seen": group([e for e in events if events[e]["class"] in data.seen], fa_all, total_days),
        "heldout": group([e for e in events if events[e]["class"] in data.heldout], fa_all, total_days),
    }
    classes = {}
    for c in sorted({ev["class"] for ev in events.values()}):
        evs = [e for e in events if events[e]["class"] == c]
        g = group(evs, 0, 0.0)
        named = [caught[e] for e in evs if caught[e].fired and caught[e].looks_like is not None]
        classes[c] = {
            "events": g["events"],
            "caught": g["caught"],
            "recall": g["recall"],
            "delay_steps_median": g["delay_steps_median"],
            "heldout": c in data.heldout,
            **(
                {
                    "named": len(named),
                    "named_right": sum(n.looks_like == c for n in named),
                    "named_right_at_end": sum(n.looks_like_end == c for n in named),
                }
                if named
                else {}
            ),
        }
    recordings = {}
    test_only = {r.name for r in data.recordings if r.test_only}
    for rec in sorted({ev["recording"] for ev in events.values()} | set(days)):
        evs = [e for e in events if events[e]["recording"] == rec]
        fa = sum(1 for f in false if f["series"].split("/")[0] == rec)
        recordings[rec] = {**group(evs, fa, days.get(rec, 0.0)), "test_only": rec in test_only}
    ev_rows = [
        {
            "id": e,
            "class": events[e]["class"],
            "severity": events[e]["severity"],
            "recording": events[e]["recording"],
            "caught": caught[e].fired,
            "delay_steps": caught[e].delay_steps,
            "looks_like": caught[e].looks_like,
            "looks_like_at_end": caught[e].looks_like_end,
            "duration_s": (events[e]["end_ms"] - events[e]["start_ms"]) / 1000.0,
            "firing_share": len(caught[e].firing) / len(caught[e].steps) if caught[e].steps else None,
            "resolve_steps": caught[e].resolve_steps,
            "notifications": notes[e],
        }
        for e in sorted(events)
    ]
    return Evaluation(
        name,
        window,
        ev_all,
        groups,
        classes,
        recordings,
        {"for_seconds": rule.for_s, "keep_firing_for_seconds": rule.keep_firing_for_s, "step_seconds": step_s},
        ev_rows,
        false,
    )


# Alertmanager's defaults: a new group waits `group_wait` for more alerts before its first
# notification; alerts that join it later go out at the next `group_interval` tick.
GROUP_WAIT_MS = 30_000
GROUP_INTERVAL_MS = 300_000


def notifications(alerts: Iterable[tuple[str, int]]) -> int:
    """How many firing notifications Alertmanager sends for alerts (group key, when it began
    firing) grouped by that key, the way alerts carrying the same `upstream` label are: each
    group's first at group_wait, one more at each group_interval tick that brings a new alert."""
    by_group: dict[str, list[int]] = {}
    for group, t in alerts:
        by_group.setdefault(group, []).append(t)
    total = 0
    for times in by_group.values():
        first = min(times) + GROUP_WAIT_MS
        ticks = {0 if t <= first else -(-(t - first) // GROUP_INTERVAL_MS) for t in times}
        total += len(ticks)
    return total


def poisson_upper95(k: int) -> float:
    """The one-sided 95 % upper confidence bound of a Poisson mean after `k` events (Garwood):
    3.0 after none. A false-alert rate is only as low as its exposure can show."""
    from scipy.stats import chi2

    return float(chi2.ppf(0.95, 2 * (k + 1)) / 2)


def alert_phases(scores: np.ndarray, timestamps_ms: np.ndarray, rule: AlertRule) -> np.ndarray:
    """The alert's phase after each step of one instance's scores (NaN: not scored, as while it
    warms), exactly as serving's `AlertStates` would have it."""
    return phases(timestamps_ms, np.nan_to_num(scores, nan=0.0) > 1.0, rule, observed=~np.isnan(scores))


def _steps_of(tl: Timeline, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of the timeline's points falls among the steps `ts`, and which points fall on one."""
    idx = np.searchsorted(ts, tl.timestamps_ms)
    ok = (idx < len(ts)) & (ts[np.minimum(idx, len(ts) - 1)] == tl.timestamps_ms)
    return idx[ok], ok


def aligned(tl: Timeline, ts: np.ndarray) -> np.ndarray:
    """The timeline's scores on the steps `ts` (NaN where it has none)."""
    out = np.full(len(ts), np.nan, dtype=np.float32)
    idx, ok = _steps_of(tl, ts)
    out[idx] = tl.scores[ok]
    return out


def _aligned_like(tl: Timeline, ts: np.ndarray) -> np.ndarray:
    out = np.full(len(ts), None, dtype=object)
    if tl.looks_like is None:
        return out
    idx, ok = _steps_of(tl, ts)
    out[idx] = np.asarray(tl.looks_like, dtype=object)[ok]
    return out


def precision_recall(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every cut of `scores` (highest first), and which cuts add a true positive."""
    order = np.argsort(-scores)
    hit = truth[order]
    tp = np.cumsum(hit)
    return tp / np.arange(1, len(tp) + 1), tp / max(1, int(truth.sum())), hit


def alert_names(anomalous: np.ndarray, fire: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The class a serving alert names at each firing step (None elsewhere): its `Resemblance`
    over the anomalous steps since it became pending."""
    out = np.full(len(fire), None, dtype=object)
    if not any(x is not None for x in like):
        return out
    tally: Resemblance | None = None
    name = None
    for t in range(len(fire)):
        if not fire[t] and not anomalous[t]:
            tally = name = None
            continue
        tally = tally or Resemblance()
        if anomalous[t]:  # normal steps while the alert keeps firing leave its description as it was
            name = tally.add(like[t])
        if fire[t]:
            out[t] = name
    return out


def timelines_from_windows(data: Data, scores: np.ndarray, looks_like: list[str] | None = None) -> dict[str, Timeline]:
    """Per-window scores of `data.all` as a Timeline per series."""
    out = {}
    sid = data.all.series_id
    likes = np.asarray(looks_like, dtype=object) if looks_like is not None else None
    for i, info in enumerate(data.series):
        m = sid == i
        like = likes[m] if likes is not None else None
        out[info.name] = Timeline(data.all.end_ms[m], scores[m].astype(np.float32), like)
    return out


def aligned_scores(timelines: Mapping[str, Timeline], data: Data, role: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Scores and truth (anomalous or not) of every labelled, scored step with `role`."""
    scores, truth = [], []
    for info in data.series:
        tl = timelines.get(info.name)
        if tl is None:
            continue
        s = aligned(tl, info.timestamps_ms)
        m = (
            np.array([r == role for r in info.role], dtype=bool)
            & info.scored
            & ~np.isnan(s)
            & np.array([lb is not None for lb in info.label], dtype=bool)
        )
        scores.append(s[m])
        truth.append(np.array([bool(lb) for lb in info.label[m]], dtype=bool))
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(scores), np.concatenate(truth)

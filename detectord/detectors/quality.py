"""How good a detector is on labelled windows: precision, recall, F1 and the confusion matrix of
its verdicts, and the threshold that meets a false-alert target (alerts timed as serving times
them, by `detectord.alerting.timing`). Used by the detector API and by the offline evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detectord.alerting.timing import AlertRule, firing

# How every evaluation and calibration alerts: at the first anomalous step, resolved after a
# minute without one (the shipped alerting config's defaults).
EVALUATION_RULE = AlertRule(for_s=0.0, keep_firing_for_s=60.0)


def episode_starts(fire: np.ndarray) -> np.ndarray:
    """Indexes where a firing alert starts."""
    prev = np.concatenate([[False], fire[:-1]])
    return np.flatnonzero(fire & ~prev)


def _breaks(end_ms: np.ndarray, series: np.ndarray, step_ms: int) -> np.ndarray:
    """True where a window does not directly follow the previous one of its series."""
    first = np.ones(len(end_ms), dtype=bool)
    first[1:] = (series[1:] != series[:-1]) | (end_ms[1:] - end_ms[:-1] > step_ms)
    return first


def threshold_for_rate(
    raw: np.ndarray,
    series: np.ndarray,
    end_ms: np.ndarray,
    step_s: float,
    target_per_day: float,
    rule: AlertRule = EVALUATION_RULE,
) -> tuple[float, float]:
    """The lowest raw threshold at which normal windows raise at most `target_per_day` alerts per
    instance-day (alerting with `rule`), and the rate achieved there. Windows are taken in
    (series, time) order."""
    order = np.lexsort((end_ms, series))
    raw, series, end_ms = raw[order], series[order], end_ms[order]
    days = len(raw) * step_s / 86400.0
    brk = _breaks(end_ms, series, round(step_s * 1000))
    segments = np.split(np.arange(len(raw)), np.flatnonzero(brk)[1:])

    def rate(t: float) -> float:
        n = sum(len(episode_starts(firing(end_ms[seg], raw[seg] > t, rule))) for seg in segments)
        return n / days if days > 0 else 0.0

    cands = np.unique(raw)[::-1][:4000]
    lo, hi = 0, len(cands) - 1  # cands[lo] satisfies (the max: nothing above it); find the last that does
    if rate(float(cands[hi])) <= target_per_day:
        return float(cands[hi]), rate(float(cands[hi]))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rate(float(cands[mid])) <= target_per_day:
            lo = mid
        else:
            hi = mid
    return float(cands[lo]), rate(float(cands[lo]))


def window_metrics(
    predicted: np.ndarray, label: np.ndarray, looks_like: Sequence[str] | None = None, classes: Sequence[str] = ()
) -> dict[str, Any]:
    """Precision, recall, F1 and the confusion matrix of window verdicts (unlabelled windows skipped);
    recall per class; with class guesses, how often an anomalous window's class was named right."""
    known = np.array([lb is not None for lb in label], dtype=bool)
    truth = np.array([bool(lb) for lb in label], dtype=bool)
    p, t = predicted[known], truth[known]
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
    out: dict[str, Any] = {
        "windows": int(known.sum()),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        **prf(tp, fp, fn),
    }
    per: dict[str, Any] = {}
    for c in sorted({str(lb) for lb in label if lb}):
        m = np.array([lb == c for lb in label], dtype=bool)
        per[c] = {"windows": int(m.sum()), "recall": float(predicted[m].mean())}
    out["classes"] = per
    if looks_like is not None and classes:
        ll = np.asarray(looks_like, dtype=object)
        hit = predicted & truth
        named = np.array([lb in classes for lb in label], dtype=bool) & hit
        if named.any():
            out["class_accuracy"] = float((ll[named] == label[named]).mean())
            out["class_confusion"] = _class_confusion(label[named], ll[named])
    return out


def _class_confusion(truth: np.ndarray, guess: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for a, b in zip(truth.tolist(), guess.tolist(), strict=True):
        row = out.setdefault(str(a), {})
        row[str(b)] = row.get(str(b), 0) + 1
    return out


def prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else (0.0 if precision is not None and recall is not None else None)
    )
    return {"precision": precision, "recall": recall, "f1": f1}

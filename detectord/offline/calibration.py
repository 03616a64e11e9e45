"""Calibrating a model on a fleet's own history: its recordings → the serving feature path
(dataset.py) → scores → the threshold whose false alerts, counted as `detectord evaluate` counts
them, meet a target per instance-day → a new artifact that records how it was set.

    detectord calibrate models/default --data week.drec --target-false-alerts 0.5/day --out models/ours
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import re
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectord.alerting.timing import AlertRule
from detectord.config import Duration
from detectord.detectors import Detector, load_detector
from detectord.detectors.artifact import WEIGHTS_FILE, read_meta, write_meta
from detectord.detectors.model_set import check_step, fmt_step, model_set, pick
from detectord.detectors.quality import EVALUATION_RULE
from detectord.errors import DetectordError
from detectord.ingest.features import FEATURE_NAMES
from detectord.ingest.remote_write import LabelCache
from detectord.offline.dataset import Data, DatasetError, Label, find_recordings, load_datasets, load_labels
from detectord.offline.evaluation import Evaluation, evaluate, timelines_from_windows
from detectord.recordings.format import RecordingError, read_writes

Log = Callable[[str], None]

# Every scored step of a fleet's own data is judged (none is held back for training).
ROLE = "test"
# The threshold is this many times the lowest that meets the target on the data: headroom for the
# weeks to come, smaller than training's (validation data there is another fleet).
DEFAULT_MARGIN = 1.1
QUANTILES: dict[str, float] = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999, "max": 1.0}
# Per instance-day, per unit a target may be given in.
_UNITS = {"h": 24.0, "hour": 24.0, "d": 1.0, "day": 1.0, "w": 1 / 7, "week": 1 / 7}
# How many of a recording's first requests show its scrape interval.
_SCRAPE_PROBE_REQUESTS = 400


class CalibrationError(DetectordError):
    """A calibration that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """False alerts per instance and period, as given (`0.5/day`), and per instance-day."""

    text: str
    per_day: float

    @classmethod
    def parse(cls, text: str) -> Target:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([a-z]+)\s*", text.lower())
        if m is None or m.group(2) not in _UNITS:
            raise CalibrationError(
                f"--target-false-alerts {text!r}: give false alerts per instance and period, e.g. 0.5/day, "
                "2/week, 0.1/h"
            )
        value = float(m.group(1))
        if not value > 0:
            raise CalibrationError(f"--target-false-alerts {text!r}: must be above 0")
        return cls(text.strip(), value * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Judged:
    """One threshold on the data: its false alerts as the evaluation counts them, and the score
    distribution (score / threshold) of the normal steps."""

    threshold: float
    evaluation: Evaluation
    quantiles: dict[str, float]

    @property
    def false_alerts(self) -> int:
        return int(self.evaluation.event["false_alerts"])

    @property
    def per_day(self) -> float:
        return float(self.evaluation.event["false_alerts_per_instance_day"] or 0.0)

    @property
    def upper95(self) -> float:
        return float(self.evaluation.event["false_alerts_per_instance_day_upper95"] or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "false_alerts": self.false_alerts,
            "false_alerts_per_instance_day": round(self.per_day, 4),
            "false_alerts_per_instance_day_upper95": round(self.upper95, 4),
            "score_quantiles": {k: round(v, 4) for k, v in self.quantiles.items()},
        }


@dataclass
class Calibration:
    """What `calibrate` found: the detector with its new threshold, before and after, and the
    record saved with it."""

    detector: Detector
    before: Judged
    after: Judged
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def scrape_interval_s(path: Path | str) -> float | None:
    """The interval between a recording's samples of one series (the median over its first
    requests), or None where no series has two."""
    last: dict[object, int] = {}
    gaps: list[int] = []
    try:
        for i, (_, w) in enumerate(read_writes(path, LabelCache())):
            pos = 0
            for key, n in zip(w.keys, w.counts, strict=True):
                for t in w.timestamps[pos : pos + n]:
                    prev = last.get(key)
                    if prev is not None and t > prev:
                        gaps.append(t - prev)
                    last[key] = t
                pos += n
            if i >= _SCRAPE_PROBE_REQUESTS:
                break
    except (OSError, RecordingError) as exc:
        raise CalibrationError(f"{path}: cannot read it: {exc}") from None
    return statistics.median(gaps) / 1000.0 if gaps else None


def check_resample(step_s: float, scrape_s: float, where: str) -> None:
    """A model's steps can be cut from data scraped every `scrape_s` if each step holds whole
    scrapes: a multiple of the scrape interval (each step takes the scrape at its end)."""
    ratio = step_s / scrape_s
    if ratio < 0.9 or abs(ratio - round(ratio)) > 0.1:
        raise CalibrationError(
            f"{where} is scraped every {fmt_step(scrape_s)}; a model for {fmt_step(step_s)} steps cannot be fed "
            f"from it (a step must be a multiple of the scrape interval); calibrate a model for "
            f"{fmt_step(scrape_s)} or a multiple of it (--step)"
        )


def resolve_model(path: Path, step_s: float | None, scrape_s: float | None) -> Path:
    """The artifact to calibrate, as `serve` resolves `model.path` at `ingest.step`: `path`
    itself, or the member of the model set made for `step_s` (by default the data's scrape
    interval)."""
    members = model_set(path)
    if members is None:
        return path
    want = step_s if step_s is not None else scrape_s
    if want is None:
        raise CalibrationError(f"{path} is a model set and the data show no scrape interval: pass --step")
    return pick(path, want)


def calibration_data(
    paths: Sequence[Path | str],
    det: Detector,
    *,
    labels: Sequence[Label] = (),
    allow_invalid: bool = False,
    log: Log | None = None,
) -> Data:
    """The recordings through the features, baselines and windows `serve` scores, at the model's
    step and inputs, with every scored step judged: incidents (a lab truth's, or labelled by an
    engineer) and their aftermath are neither normal nor false alerts, the rest is normal.

    Except each recording's own start: the instances it holds from its first steps have young
    baselines there only because the recording began (a `serve` that has run for long knows
    them), so their first `young_seconds` are not judged. An instance that appears later is
    judged from its first score, as serving meets a new one. Nor is any instance's last step:
    the recording may have stopped in the middle of it, and `serve` scores a step only once the
    next begins."""
    data = load_datasets(
        paths,
        window=det.window,
        step_s=det.step_seconds,
        inputs=det.inputs,
        heldout=(),
        labels=labels,
        log=log,
        allow_invalid=allow_invalid,
    )
    young_ms = round(young_seconds(det) * 1000)
    bucket_ms = round(det.inputs.baseline.bucket_steps * det.step_seconds * 1000)
    starts: dict[str, int] = {}
    for info in data.series:
        if len(info.timestamps_ms):
            t0 = int(info.timestamps_ms[0])
            starts[info.recording] = min(starts.get(info.recording, t0), t0)
    for info in data.series:
        role = np.full(len(info.scored), None, dtype=object)
        role[info.scored] = ROLE
        ts = info.timestamps_ms
        if len(ts) and ts[0] - starts[info.recording] <= bucket_ms:
            role[ts < ts[0] + young_ms] = None
        role[-1:] = None
        info.role = role
    # Each window takes its end step's role.
    data.role = np.full(len(data.all), None, dtype=object)
    for sid, info in enumerate(data.series):
        m = data.all.series_id == sid
        data.role[m] = info.role[np.searchsorted(info.timestamps_ms, data.all.end_ms[m])]
    return data


def young_seconds(det: Detector) -> float:
    """How long a baseline is young: until it holds `hold_after` buckets (see BaselineConfig)."""
    b = det.inputs.baseline
    return b.hold_after * b.bucket_steps * det.step_seconds


def judge(det: Detector, raw: np.ndarray, data: Data, threshold: float, *, rule: AlertRule = EVALUATION_RULE) -> Judged:
    """The data's windows scored at `threshold` (raw units) as serving scores them, and judged as
    `detectord evaluate` judges them."""
    scores = (raw / np.float32(threshold)).astype(np.float32, copy=False)
    ev = evaluate(det.name, timelines_from_windows(data, scores), data, role=ROLE, rule=rule)
    normal = scores[_normal(data)]
    q = {k: float(np.quantile(normal, v)) for k, v in QUANTILES.items()} if len(normal) else {}
    return Judged(float(threshold), ev, q)


def _normal(data: Data) -> np.ndarray:
    normal: np.ndarray = np.array([lb == "" for lb in data.all.label], dtype=bool) & (data.role == ROLE)
    return normal


def calibrate(
    det: Detector,
    data: Data,
    target: Target,
    *,
    margin: float = DEFAULT_MARGIN,
    rule: AlertRule = EVALUATION_RULE,
) -> Calibration:
    """Set `det`'s threshold from the normal steps of `data` (see `calibration_data`).

    The threshold is `margin` × the lowest raw score t at which those steps raise at most
    floor(target × instance-days) false alerts, alerts timed by `rule` and counted as the
    evaluation counts them (an alert that starts on a normal step). Alerts no threshold changes
    (failed scrapes, crash loops) count too; where they alone exceed the target, t is the lowest
    at which the score adds none. t is one of the normal steps' scores, searched from the highest
    down (the count mostly rises as t falls, until alerts merge into ever longer ones)."""
    if not margin >= 1.0:
        raise CalibrationError(f"--margin must be >= 1, got {margin}")
    normal = _normal(data)
    if not normal.any():
        raise CalibrationError("the data hold no normal steps to calibrate on (too short, or all labelled incidents)")
    raw = det.raw_scores_batched(data.all.x)[0]
    before = judge(det, raw, data, det.threshold, rule=rule)
    days = float(before.evaluation.event["normal_instance_days"])
    allowed = math.floor(target.per_day * days + 1e-9)
    liveness = judge(det, raw, data, math.inf, rule=rule).false_alerts
    budget = max(allowed, liveness)
    cands = np.unique(raw[normal])[::-1]  # highest first: the first raises only `liveness`

    def ok(i: int) -> bool:
        return judge(det, raw, data, float(cands[i]), rule=rule).false_alerts <= budget

    # Downwards from the top, in doubling strides, to the first that raises too many, then
    # bisect: far below, alerts merge into ever longer ones and the count falls again.
    lo, hi = 0, 1
    while hi < len(cands) and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, len(cands))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    lowest = float(cands[lo])
    loose = lo == len(cands) - 1 and len(cands) > 1
    floor = det.threshold_floor()
    old = det.threshold
    det.threshold = max(lowest * margin, floor, 1e-6)
    after = judge(det, raw, data, det.threshold, rule=rule)

    warnings = []
    too_short = target.per_day * days < 1.0
    if too_short:
        warnings.append(
            f"{days * 24:.1f} instance-hours of normal data are too few for {target.text}: the target allows no "
            f"false alert on them, so the threshold sits just above the highest normal score; it takes "
            f"{1 / target.per_day:.1f} instance-days to allow one (a week of the fleet gives more)"
        )
    if loose:
        warnings.append(
            f"{target.text} is looser than this model alerts on these data: down to their lowest normal score it "
            f"raises at most {budget} false alerts"
        )
    if liveness > allowed:
        warnings.append(
            f"{liveness} false alerts on these data come from failed scrapes or crash loops, which no threshold "
            "changes; the threshold adds none to them"
        )
    n_incidents = len(data.events)
    record = {
        "method": "own fleet",
        "how": (
            f"{margin:g} × the lowest raw score at which the normal steps of the data raise at most "
            f"floor({target.per_day:g}/instance-day × {days:.4g} instance-days) = {budget} false alerts, "
            f"alerts timed with for {rule.for_s:g}s and keep_firing_for {rule.keep_firing_for_s:g}s and counted "
            "as `detectord evaluate` counts them (the first "
            f"{fmt_step(young_seconds(det))} of a recording's instances, young baselines, and each instance's last "
            "step, perhaps cut short, are not judged)"
        ),
        "calibrated_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "data": _sources(data),
        "step_seconds": det.step_seconds,
        "instance_hours": round(days * 24, 3),
        "normal_windows": int(normal.sum()),
        "instance_days": round(days, 4),
        "incidents_left_out": n_incidents,
        "target": target.text,
        "target_false_alerts_per_instance_day": target.per_day,
        "allowed_false_alerts": allowed,
        "liveness_false_alerts": liveness,
        "margin": margin,
        "floor": floor,
        "raw_threshold_before_margin": lowest,
        "threshold_before": old,
        "threshold_after": det.threshold,
        "before": before.to_json(),
        "after": after.to_json(),
        "too_short": too_short,
        "warnings": warnings,
        "alert_rule": {"for_seconds": rule.for_s, "keep_firing_for_seconds": rule.keep_firing_for_s},
        "not_judged": {
            "young_baseline_seconds_at_recording_start": young_seconds(det),
            "last_step_of_each_instance": True,
        },
        "previous": det.meta.calibration,
    }
    det.meta.calibration = record
    return Calibration(det, before, after, record, warnings)


def _sources(data: Data) -> list[dict[str, Any]]:
    out = []
    for r in data.recordings:
        ts = [s.timestamps_ms for s in r.series.values() if len(s.timestamps_ms)]
        lo = int(min(int(t[0]) for t in ts)) if ts else None
        hi = int(max(int(t[-1]) for t in ts)) if ts else None
        out.append(
            {
                "file": str(r.path),
                "instances": len(r.series),
                "start": _iso(lo),
                "end": _iso(hi),
                "hours": round((hi - lo) / 3.6e6, 3) if lo is not None and hi is not None else 0.0,
                "incidents": len({s.event for s in r.spans if s.cls}),
            }
        )
    return out


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def write_calibrated(src: Path, out: Path, cal: Calibration, *, command: str = "") -> None:
    """The calibrated artifact in `out`: `src`'s weights, its metadata with the new threshold and
    calibration record, and a model card that starts with the calibration."""
    if out.resolve() == src.resolve():
        raise CalibrationError(f"--out {out} is the model itself; write the calibrated model elsewhere")
    det = cal.detector
    meta = dataclasses.replace(det.meta, version=f"{det.meta.version}+calibrated")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / WEIGHTS_FILE, out / WEIGHTS_FILE)
    write_meta(out, meta)
    card = src / "MODEL_CARD.md"
    shipped = card.read_text(encoding="utf-8") if card.is_file() else ""
    (out / "MODEL_CARD.md").write_text(model_card(src, cal, shipped, command=command), encoding="utf-8")


def model_card(src: Path, cal: Calibration, shipped: str, *, command: str = "") -> str:
    r = cal.record
    lines = [
        f"# {cal.detector.name}: {cal.detector.kind} calibrated on its fleet's own data",
        "",
        f"`{src}` with a threshold set on {r['instance_hours']:.1f} instance-hours of this fleet's normal data "
        f"on {r['calibrated_at']}" + (f" by `{command}`" if command else "") + ". The weights are the model's own.",
        "",
        "## Calibration",
        "",
        f"Raw threshold {r['threshold_before']:.4g} → {r['threshold_after']:.4g}: {r['how']}; target "
        f"{r['target']} ({r['target_false_alerts_per_instance_day']:g} per instance-day). Incidents left out: "
        f"{r['incidents_left_out']} (labelled, or in a lab recording's truth), with their aftermath.",
        "",
        "| data | instances | from | to | hours |",
        "|---|---|---|---|---|",
        *(f"| {d['file']} | {d['instances']} | {d['start']} | {d['end']} | {d['hours']:.1f} |" for d in r["data"]),
        "",
        *summary_table(cal.before, cal.after),
    ]
    if cal.warnings:
        lines += ["", *(f"- Warning: {w}." for w in cal.warnings)]
    if shipped:
        demoted = "\n".join("#" + ln if ln.startswith("#") else ln for ln in shipped.strip().splitlines())
        lines += [
            "",
            "## The model as it came",
            "",
            "Its card follows; its threshold and the numbers measured with it are the ones before this calibration.",
            "",
            demoted,
        ]
    return "\n".join(lines) + "\n"


def summary_table(before: Judged, after: Judged) -> list[str]:
    """False alerts per instance-day and the normal steps' scores (score / threshold), before and after."""
    head = "| | threshold | false alerts | per instance-day (≤ 95 %) | " + " | ".join(QUANTILES) + " |"
    rows = [head, "|" + "---|" * (4 + len(QUANTILES))]
    for name, j in (("before", before), ("after", after)):
        q = " | ".join(f"{j.quantiles.get(k, float('nan')):.3f}" for k in QUANTILES)
        rows.append(f"| {name} | {j.threshold:.4g} | {j.false_alerts} | {j.per_day:.2f} (≤ {j.upper95:.2f}) | {q} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="detectord calibrate",
        description="Set a model's threshold from your own fleet's normal history, for a target of false alerts "
        "per instance and period, and write it as a new model (weights copied). Spans labelled as incidents "
        "(--labels, the format `train --labels` reads; a lab recording's truth) are left out. Alerts are "
        "counted as `detectord evaluate` counts them (for 0s, keep_firing_for 1m).",
    )
    p.add_argument("model", type=Path, help="model directory, or a model set (its model for --step)")
    p.add_argument("--data", nargs="+", required=True, help="recordings (NAME.drec[.xz]) or directories of them")
    p.add_argument("--labels", default=None, help="engineers' labels (YAML/JSON): incidents to leave out")
    p.add_argument(
        "--target-false-alerts",
        default="0.5/day",
        help="false alerts per instance allowed on the data: 0.5/day, 2/week, 0.1/h (default %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the calibrated model")
    p.add_argument(
        "--step",
        default=None,
        help="the ingest.step you serve at, for a model set (default: the data's scrape interval)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="threshold = margin × the lowest that meets the target (default %(default)s)",
    )
    p.add_argument("--allow-invalid-runs", action="store_true", help="use lab runs whose own health check failed")
    args = p.parse_args(argv)
    command = "detectord calibrate " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        run(args, command)
    except (DetectordError, DatasetError) as exc:
        print(f"detectord calibrate: {exc}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, command: str, log: Log = print) -> Calibration:
    target = Target.parse(args.target_false_alerts)
    try:
        step_s = float(Duration.parse(args.step)) if args.step else None
    except ValueError as exc:
        raise CalibrationError(f"--step: {exc}") from None
    recordings = find_recordings(args.data)
    scrape = scrape_interval_s(recordings[0])
    path = resolve_model(args.model, step_s, scrape)
    if args.out.resolve() == path.resolve():
        raise CalibrationError(f"--out {args.out} is the model itself; write the calibrated model elsewhere")
    meta = read_meta(path)
    check_step(path, meta.step_seconds, step_s)
    for rec in recordings:
        s = scrape if rec == recordings[0] else scrape_interval_s(rec)
        if s is not None:
            check_resample(meta.step_seconds, s, str(rec))
    labels = load_labels(args.labels) if args.labels else []
    det = load_detector(path, features=FEATURE_NAMES)
    log(f"{path}: {det.kind}, {fmt_step(det.step_seconds)} steps, window {det.window}, threshold {det.threshold:.4g}")
    data = calibration_data(recordings, det, labels=labels, allow_invalid=args.allow_invalid_runs, log=log)
    cal = calibrate(det, data, target, margin=args.margin)
    cal.record["scrape_interval_seconds"] = scrape
    cal.record["labels"] = str(args.labels) if args.labels else None
    write_calibrated(path, args.out, cal, command=command)
    r = cal.record
    log(
        f"{r['instance_hours']:.1f} instance-hours of normal data, {r['incidents_left_out']} incidents left out; "
        f"target {target.text}: at most {r['allowed_false_alerts']} false alerts here"
    )
    for line in summary_table(cal.before, cal.after):
        log(line)
    for w in cal.warnings:
        log(f"warning: {w}")
    log(f"wrote {args.out}: set model.path to it and reload (SIGHUP, or POST /-/reload)")
    return cal


if __name__ == "__main__":
    sys.exit(main())

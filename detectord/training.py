"""Training the default model: synthetic fleets → remote-write → features → windows → detector.

Data goes through `detectord.features.extract`, the path serving uses, never around it.
Run as `python -m detectord.training --out models/default` (or `detectord train --out DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_NAMES, extract
from .synthetic import FAULT_CLASSES, Fleet, Span

DEFAULT_WINDOW = 32
DEFAULT_STEP_SECONDS = 15.0
# Below this many consecutive anomalous steps no alert fires (alerting.for = 60 s by default).
ALERT_FOR_SECONDS = 60.0


@dataclass(frozen=True)
class Segment:
    """One simulated fleet: what part of the data set it is, and how it is generated."""

    role: str  # "train", "calibrate", "test"
    step_s: float
    instances: int
    hours: float
    seed: int
    faulty: bool = False
    cold_start: bool = False
    load_start_fraction: float = 0.0
    fault_len_s: tuple[float, float] = (600.0, 3600.0)
    fault_classes: tuple[str, ...] = FAULT_CLASSES
    severity: tuple[float, float] = (0.2, 1.0)
    qps_range: tuple[float, float] = (5.0, 20_000.0)
    low_qps_fraction: float = 0.15
    name: str = ""


@dataclass
class InstanceData:
    key: tuple[str, ...]
    timestamps_ms: np.ndarray
    values: np.ndarray
    restarts: list[int]
    spans: list[Span] = field(default_factory=list)


@dataclass
class SegmentData:
    segment: Segment
    instances: list[InstanceData]
    samples: int
    seconds: float


def simulate(seg: Segment) -> SegmentData:
    """Generate one segment's remote-write stream and extract its features (runs in a worker)."""
    t0 = time.perf_counter()
    fleet = Fleet(seg.instances, seed=seg.seed, scrape_interval_s=seg.step_s, cold_start=seg.cold_start,
                  load_start_fraction=seg.load_start_fraction, qps_range=seg.qps_range,
                  low_qps_fraction=seg.low_qps_fraction,
                  instances=[f"10.{seg.seed % 200}.{i // 250}.{i % 250 + 1}:9153" for i in range(seg.instances)])
    duration = seg.hours * 3600.0
    if seg.faulty:
        fleet.inject_random(range(seg.instances), duration_s=duration, per_instance=2,
                            classes=seg.fault_classes,  # type: ignore[arg-type]
                            min_len_s=seg.fault_len_s[0], max_len_s=seg.fault_len_s[1],
                            severity=seg.severity, margin_s=2 * DEFAULT_WINDOW * seg.step_s)
    samples = 0

    def counted() -> Any:
        nonlocal samples
        for req in fleet.write_requests(duration):
            samples += len(req.timeseries)
            yield req

    series = extract(counted(), int(seg.step_s * 1000))
    out = []
    for key, fs in series.items():
        spans = [s for s in fleet.spans if s.instance == key]
        out.append(InstanceData(key, fs.timestamps_ms, fs.values, list(fs.restarts), spans))
    return SegmentData(seg, out, samples, time.perf_counter() - t0)


def windows_of(values: np.ndarray, window: int, stride: int = 1,
               restarts: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows (N, W, F) over rows (T, F) and the row index each ends at; none spans a restart."""
    starts = [0, *sorted(r for r in restarts if 0 < r < len(values)), len(values)]
    wins, ends = [], []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if b - a < window:
            continue
        v = np.lib.stride_tricks.sliding_window_view(values[a:b], window, axis=0)  # (n, F, W)
        idx = np.arange(0, v.shape[0], stride)
        wins.append(np.transpose(v[idx], (0, 2, 1)))
        ends.append(a + idx + window - 1)
    if not wins:
        return np.zeros((0, window, values.shape[1]), np.float32), np.zeros(0, np.int64)
    return np.concatenate(wins).astype(np.float32), np.concatenate(ends)


@dataclass
class Labelled:
    windows: np.ndarray
    label: np.ndarray  # "" normal, a fault class, or "mixed" (part fault, part not: not scored)
    instance: np.ndarray  # int id of the instance (for runs of consecutive windows)
    span: np.ndarray  # int id of the fault span the label comes from, -1 for none
    step_s: float


def label_windows(data: Sequence[SegmentData], window: int, stride: int, last_steps: int) -> Labelled:
    """Windows with their truth: a fault class if its last `last_steps` rows lie inside that fault's span,
    "" if the whole window is clear of every span, else "mixed"."""
    wins, labels, insts, span_ids = [], [], [], []
    step_s = data[0].segment.step_s if data else DEFAULT_STEP_SECONDS
    uid = sid = 0
    for seg in data:
        step_ms = int(seg.segment.step_s * 1000)
        for inst in seg.instances:
            w, e = windows_of(inst.values, window, stride, inst.restarts)
            ts = inst.timestamps_ms
            lab = np.full(len(e), "", dtype=object)
            sp_id = np.full(len(e), -1)
            for sp in inst.spans:
                first = ts[e - window + 1] - step_ms
                tail_first = ts[e - last_steps + 1] - step_ms
                last = ts[e]
                overlaps = (first < sp.end_ms) & (last > sp.start_ms)
                inside = (tail_first >= sp.start_ms) & (last <= sp.end_ms)
                lab[overlaps & (lab == "")] = "mixed"
                lab[inside] = sp.cls
                sp_id[inside] = sid
                sid += 1
            wins.append(w)
            labels.append(lab)
            insts.append(np.full(len(e), uid))
            span_ids.append(sp_id)
            uid += 1
    F = len(FEATURE_NAMES)
    return Labelled(
        np.concatenate(wins) if wins else np.zeros((0, window, F), np.float32),
        np.concatenate(labels) if labels else np.zeros(0, dtype=object),
        np.concatenate(insts) if insts else np.zeros(0, np.int64),
        np.concatenate(span_ids) if span_ids else np.zeros(0, np.int64),
        step_s,
    )


def _runs_at_least(flags: np.ndarray, inst: np.ndarray, n: int) -> int:
    """Number of runs of >= n consecutive True flags within one instance (alerts that would fire)."""
    count, run, prev = 0, 0, -1
    for f, i in zip(flags, inst, strict=True):
        if i != prev:
            run, prev = 0, i
        run = run + 1 if f else 0
        if run == n:
            count += 1
    return count


def evaluate(scores: np.ndarray, lab: Labelled, step_s: float) -> dict[str, Any]:
    """Window-level recall per class and false-alarm rate, and alert-level (`for` 60 s) counterparts."""
    anomalous = scores > 1.0
    normal = lab.label == ""
    out: dict[str, Any] = {"normal_windows": int(normal.sum())}
    out["false_alarm_rate"] = float(anomalous[normal].mean()) if normal.any() else None
    for_steps = max(1, math.ceil(ALERT_FOR_SECONDS / step_s))
    # False alerts: runs of anomalous windows in fault-free stretches.
    runs = _runs_at_least(anomalous & normal, np.where(normal, lab.instance, -1), for_steps)
    days = normal.sum() * step_s / 86400.0
    out["false_alerts_per_instance_day"] = float(runs / days) if days > 0 else None
    per_class: dict[str, Any] = {}
    for cls in FAULT_CLASSES:
        m = lab.label == cls
        if not m.any():
            continue
        # Alert recall: the fault's windows contain a run long enough for the alert to fire.
        spans = np.unique(lab.span[m])
        fired = 0
        for i in spans:
            sel = lab.span == i
            fired += _runs_at_least(anomalous[sel], lab.instance[sel], for_steps) > 0
        per_class[cls] = {"windows": int(m.sum()), "recall": float(anomalous[m].mean()),
                          "faulty_instances": int(len(spans)), "alert_recall": float(fired / len(spans))}
    out["classes"] = per_class
    fault = np.isin(lab.label, FAULT_CLASSES)
    out["recall"] = float(anomalous[fault].mean()) if fault.any() else None
    return out


def _segments(seed: int, hours: float, instances: int) -> list[Segment]:
    """The default data set: fleets at 15 s steps (a common scrape interval) and at 1 s steps
    (where few queries per step make every share and quantile noisy, and where a CoreDNS that
    just started, with a cold cache and load arriving, is scraped most closely)."""
    ss = np.random.SeedSequence(seed)
    seeds = iter(int(s.generate_state(1)[0] % 2**31) for s in ss.spawn(256))
    segs: list[Segment] = []
    h1 = max(0.25, min(0.5, hours / 3))

    def fleets(role: str, step: float, n: int, h: float, per_fleet: int, **kw: Any) -> None:
        n = max(1, n)
        for a in range(0, n, per_fleet):
            segs.append(Segment(role, step, min(per_fleet, n - a), h, next(seeds), **kw))

    cold = {"cold_start": True, "load_start_fraction": 0.3}
    for role, scale in (("train", 1), ("calibrate", 2), ("test", 2)):
        fleets(role, 15.0, instances // scale, hours, 16)
        fleets(role, 1.0, instances // (8 * scale), h1, 4, **cold)
        fleets(role, 1.0, instances // (8 * scale), h1, 4)
    fleets("test", 15.0, instances // 2, hours, 16, faulty=True, fault_len_s=(900.0, 3600.0))
    fleets("test", 1.0, instances // 8, h1, 4, faulty=True, fault_len_s=(180.0, 900.0))
    # What the end-to-end test does: a healthy, freshly started CoreDNS under steady load whose
    # upstream then turns slower than forward's 2 s read timeout, scraped every second.
    fleets("test", 1.0, max(4, instances // 16), h1, 4, faulty=True, fault_len_s=(180.0, 600.0),
           fault_classes=("upstream_slow",), severity=(0.7, 1.0), name="upstream_slow_1s", cold_start=True,
           qps_range=(50.0, 5000.0), low_qps_fraction=0.0)
    return segs


def _simulate_all(segs: Sequence[Segment], workers: int, log: Callable[[str], None]) -> list[SegmentData]:
    out: list[SegmentData] = []
    if workers <= 1:
        for s in segs:
            out.append(simulate(s))
            log(f"  {s.role:9s} step {s.step_s:>4g}s {s.instances} instances × {s.hours:g} h: "
                f"{out[-1].samples:,} samples in {out[-1].seconds:.1f}s")
        return out
    # Spawned (not forked) workers: they never import Keras, and the parent may already have.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for s, d in zip(segs, pool.map(simulate, segs), strict=True):
            out.append(d)
            log(f"  {s.role:9s} step {s.step_s:>4g}s {s.instances} instances × {s.hours:g} h: "
                f"{d.samples:,} samples in {d.seconds:.1f}s")
    return out


def train_default(
    out_dir: Path,
    *,
    seed: int = 0,
    hours: float = 0.75,
    instances: int = 256,
    epochs: int = 10,
    window: int = DEFAULT_WINDOW,
    stride: int = 1,
    quantile: float = 0.9999,
    margin: float = 1.5,
    # The 99.99th percentile of ~50k windows from ~150 instances rests on a handful of them:
    # across trainings on the same data it moved between 1.1 and 2.5. Below 1.5 a restart of
    # a real CoreDNS (about 1 here) comes too close.
    min_threshold: float = 1.5,
    workers: int | None = None,
    command: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Regenerate synthetic data, train, calibrate, evaluate and write the artifact to `out_dir`."""
    if hours <= 0 or instances < 1 or epochs < 1 or stride < 1:
        raise ValueError("hours must be > 0 and instances, epochs and stride >= 1")
    t_start = time.perf_counter()
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    segs = _segments(seed, hours, instances)
    log(f"simulating {len(segs)} fleets on {workers} worker(s)")
    data = _simulate_all(segs, workers, log)
    t_data = time.perf_counter() - t_start

    from .detectors import ConvAutoencoder
    from .detectors.conv_autoencoder import ConvAutoencoderConfig

    cfg = ConvAutoencoderConfig()
    by: dict[tuple[str, float, bool], list[SegmentData]] = {}
    for d in data:
        by.setdefault((d.segment.role, d.segment.step_s, d.segment.faulty), []).append(d)

    def windows_for(role: str, faulty: bool = False, name: str = "") -> dict[float, Labelled]:
        out = {}
        for step in (15.0, 1.0):
            segs_ = [d for d in by.get((role, step, faulty), []) if d.segment.name == name]
            if segs_:
                out[step] = label_windows(segs_, window, stride, cfg.score_steps)
        return out

    train = windows_for("train")
    calib = windows_for("calibrate")
    x_train = np.concatenate([lab.windows for lab in train.values()])
    x_cal = np.concatenate([lab.windows for lab in calib.values()])
    rng = np.random.default_rng(seed)
    x_train = x_train[rng.permutation(len(x_train))]
    log(f"windows: train {len(x_train):,}, calibrate {len(x_cal):,} (W={window}, stride {stride}); "
        f"data took {t_data:.0f}s")

    det = ConvAutoencoder(FEATURE_NAMES, window=window, step_seconds=DEFAULT_STEP_SECONDS, config=cfg)
    t0 = time.perf_counter()
    val = x_cal[rng.choice(len(x_cal), min(len(x_cal), 20000), replace=False)]
    fit = det.fit(x_train, validation=val, epochs=epochs, seed=seed, verbose=0,
                  callbacks=[_epoch_logger(log, epochs)])
    t_fit = time.perf_counter() - t0
    log(f"trained {det.count_params():,} parameters in {t_fit:.0f}s: loss {fit['loss']:.4f}, "
        f"val_loss {fit.get('val_loss', float('nan')):.4f}")

    q_raw = float(np.quantile(det.raw_scores_batched(x_cal), quantile))
    threshold = det.infer_threshold(x_cal, quantile=quantile, margin=margin, floor=min_threshold)
    log(f"threshold {threshold:.4f} = max({margin} × quantile {quantile} ({q_raw:.4f}) of {len(x_cal):,} "
        f"held-out normal windows, {min_threshold})")

    metrics: dict[str, Any] = {"threshold_quantile": quantile, "threshold_margin": margin,
                               "threshold_floor": min_threshold, "calibration_quantile_score": q_raw}
    test_normal, test_faulty = windows_for("test"), windows_for("test", True)
    scenario = windows_for("test", True, "upstream_slow_1s")
    cases = [(f"step_{int(step)}s", step, [lab for lab in (test_normal.get(step), test_faulty.get(step)) if lab])
             for step in (15.0, 1.0)]
    cases += [("upstream_slow_1s", 1.0, [lab]) for lab in scenario.values()]
    for key, step, labs in cases:
        if not labs:
            continue
        merged = Labelled(np.concatenate([lab.windows for lab in labs]), np.concatenate([lab.label for lab in labs]),
                          np.concatenate([lab.instance + 10_000 * k for k, lab in enumerate(labs)]),
                          np.concatenate([np.where(lab.span >= 0, lab.span + 10_000 * k, -1)
                                          for k, lab in enumerate(labs)]), step)
        scores = det.raw_scores_batched(merged.windows) / det.threshold
        m = evaluate(scores, merged, step)
        metrics[key] = m
        log(f"{key}: recall {_fmt(m['recall'], '.3f')}, false-alarm rate {_fmt(m['false_alarm_rate'], '.2e')}, "
            f"false alerts/instance-day {_fmt(m['false_alerts_per_instance_day'], '.3f')}")
        for cls, cm in m["classes"].items():
            log(f"    {cls:20s} recall {cm['recall']:.3f}  alert recall {cm['alert_recall']:.2f} "
                f"({cm['faulty_instances']} faults, {cm['windows']} windows)")

    samples = sum(d.samples for d in data)
    det.meta.training_data = {
        "source": "detectord.synthetic fleets (CoreDNS 1.12 forward+cache series as Prometheus 2.42 "
                  "remote-writes them), through detectord.features.extract",
        "seed": seed,
        "steps_seconds": sorted({s.step_s for s in segs}),
        "fleets": [{"role": s.role, "step_seconds": s.step_s, "instances": s.instances, "hours": s.hours,
                    "faulty": s.faulty, "cold_start": s.cold_start, "seed": s.seed} for s in segs],
        "remote_write_samples": samples,
        "train_windows": int(len(x_train)),
        "calibration_windows": int(len(x_cal)),
        "window_stride": stride,
        "epochs": int(fit["epochs"]),
        "final_loss": fit["loss"],
        "final_val_loss": fit.get("val_loss"),
        "command": command,
        "seconds": {"data": round(t_data, 1), "fit": round(t_fit, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    serving = measure_throughput(det)
    metrics["serving"] = serving
    log(f"serving: {serving['windows_per_second']:,.0f} windows/s at batch {serving['batch']} "
        f"({serving['backend']}, {serving['cpu_count']} CPUs)")
    det.meta.metrics = metrics
    det.meta.version = time.strftime("%Y%m%d", time.gmtime()) + f"-seed{seed}"
    out_dir = Path(out_dir)
    det.save(out_dir)
    write_model_card(out_dir, det.meta.__dict__, det.count_params())
    log(f"wrote {out_dir} in {time.perf_counter() - t_start:.0f}s total")
    return {"threshold": threshold, "metrics": metrics, "training_data": det.meta.training_data}


def measure_throughput(det: Any, batch: int = 1024, seconds: float = 3.0) -> dict[str, Any]:
    """Windows scored per second by `score_batch` at one batch size (after a warm-up call)."""
    import keras

    x = np.zeros((batch, det.window, len(det.features)), dtype=np.float32)
    det.score_batch(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.score_batch(x)
        n += 1
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "windows_per_second": round(n * batch / elapsed), "ms_per_batch":
            round(1000 * elapsed / n, 2), "backend": keras.backend.backend(), "cpu_count": os.cpu_count()}


def _epoch_logger(log: Callable[[str], None], epochs: int) -> Any:
    """A Keras callback printing one line per epoch (Keras' own progress bar is off)."""
    import keras

    t0 = time.perf_counter()

    class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            log(f"  epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f} "
                f"val_loss {logs.get('val_loss', float('nan')):.4f} ({time.perf_counter() - t0:.0f}s)")

    return EpochLog()


def write_model_card(out_dir: Path, meta: dict[str, Any], params: int) -> None:
    td, m = meta["training_data"], meta["metrics"]
    lines = [
        f"# {meta['name']} — {meta['kind']} {meta['version']}",
        "",
        f"Trained {meta['trained_at']} with `{td.get('command') or 'detectord.training.train_default'}`.",
        "",
        "## What it is",
        f"A 1-D convolutional autoencoder ({params:,} parameters, config {json.dumps(meta['config'])}) over "
        f"windows of {meta['window']} feature rows × {len(meta['features'])} features "
        f"({', '.join(meta['features'])}).",
        "Features are scaled per feature (log1p of rates, counts, bytes and ms latencies; 2·asin√p of shares) and "
        "standardised with the training mean/std (std floored). The score reads the newest "
        f"{meta['config'].get('score_steps')} rows: each feature's squared reconstruction error in training standard "
        "deviations (shares and latency quantiles weighted by n/(n+"
        f"{meta['config'].get('count_half')}), n = the step's query rate; each term capped at "
        f"{meta['config'].get('residual_cap')}), averaged per row; the {meta['config'].get('trim')} worst rows are "
        f"dropped and the rest averaged, then divided by the threshold ({meta['threshold']:.4g}): "
        "above 1 is anomalous.",
        f"`step_seconds` is {meta['step_seconds']:g}; it was trained on 1 s and 15 s steps alike "
        "(every feature is per second or a share), so set `ingest.step` to the scrape interval.",
        "",
        "## Data",
        f"Synthetic only: {td['source']}. Seed {td['seed']}; {td['remote_write_samples']:,} remote-write samples; "
        f"{td['train_windows']:,} training windows (normal only), {td['calibration_windows']:,} calibration "
        "windows (normal, other fleets). Normal behaviour includes per-instance base rates from 0.2 to 20,000 "
        "qps, periodic load, traffic shifts, cold caches, idle instances whose load starts mid-run, and process "
        "restarts (counter resets, missed scrapes).",
        f"Faults for evaluation only: {', '.join(FAULT_CLASSES)}, severities 0.2–1.",
        "",
        "## Metrics (held-out synthetic fleets)",
        f"Threshold: {m['threshold_margin']} × the {m['threshold_quantile']} quantile of calibration scores "
        f"({m.get('calibration_quantile_score', float('nan')):.4g}), but at least {m.get('threshold_floor', 0)}.",
        "",
        "| data | false-alarm rate (windows) | false alerts / instance-day (for 60 s) | recall (windows) |",
        "|---|---|---|---|",
    ]
    evals = {k: v for k, v in m.items() if isinstance(v, dict) and "classes" in v}
    for key, s in evals.items():
        lines.append(f"| {key} | {_fmt(s['false_alarm_rate'], '.2e')} | "
                     f"{_fmt(s['false_alerts_per_instance_day'], '.3f')} | {_fmt(s['recall'], '.3f')} |")
    lines += ["", "| class | data | window recall | alert recall (faults) |", "|---|---|---|---|"]
    for key, s in evals.items():
        for cls, c in s["classes"].items():
            lines.append(f"| {cls} | {key} | {c['recall']:.3f} | {c['alert_recall']:.2f} "
                         f"({c['faulty_instances']}) |")
    lines += [
        "",
        "Window recall counts windows whose last score rows lie inside a fault; alert recall counts faults "
        "during which the score stayed above 1 long enough for a 60 s `for` to fire.",
        "",
        "## Limits",
        "- Trained on simulated CoreDNS fleets, never on real traffic: retrain or recalibrate "
        "(`model.threshold`) on your own fleet's normal data where it alerts too often.",
        "- A level that persists for a whole window becomes the new normal unless the combination of features "
        "is itself unusual: query floods, NXDOMAIN floods and slow leaks are caught, if at all, while they change.",
        "- CPU training is not bit-reproducible: over trainings on the same data the calibrated quantile moved "
        "between about 0.8 and 1.7, hence the threshold floor. Faults scored far above any of these thresholds; "
        "the faint ones (a few percent SERVFAIL, a slow upstream behind a 99 % cache) are where recall moves.",
        "- A steady state no training fleet had (a profile the autoencoder reconstructs poorly) scores high for "
        "as long as it lasts; raise `model.threshold` or retrain with such servers in the synthetic fleet.",
        "",
        f"Training took {td['seconds']['total']:.0f} s ({td['seconds']['data']:.0f} s simulating and extracting, "
        f"{td['seconds']['fit']:.0f} s fitting) on {m.get('serving', {}).get('cpu_count', '?')} CPUs. Serving: "
        f"{m.get('serving', {}).get('windows_per_second', 0):,} windows/s through `score_batch` at batch "
        f"{m.get('serving', {}).get('batch', '?')} ({m.get('serving', {}).get('backend', '?')} backend).",
    ]
    (Path(out_dir) / "MODEL_CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detectord train",
                                description="Train the default anomaly model on regenerated synthetic data.")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hours", type=float, default=0.75,
                   help="hours simulated per 15 s instance (1 s instances: a third of it, 0.25 to 0.5 h)")
    p.add_argument("--instances", type=int, default=256,
                   help="15 s training instances; 1 s, calibration and test fleets are sized from it")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--stride", type=int, default=1, help="step between training windows")
    p.add_argument("--workers", type=int, default=None, help="simulation processes (default: up to 2)")
    if argv and argv[0] == "--":  # `detectord train -- --out DIR` hands the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    command = "python -m detectord.training " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        train_default(args.out, seed=args.seed, hours=args.hours, instances=args.instances, epochs=args.epochs,
                      stride=args.stride, workers=args.workers, command=command)
    except ValueError as exc:
        print(f"detectord train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter search with Optuna: window, depth, filters, latent size and learning rate of one
detector kind, judged by event-level F1 on validation data (never on test data). Trials are kept in
an SQLite study, so an interrupted search resumes where it stopped.

    detectord tune --kind conv_autoencoder --trials 30 --data data
    detectord train --config .cache/tune/best-conv_autoencoder.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from detectord.detectors import DETECTORS
from detectord.offline.dataset import Data, DatasetError
from detectord.offline.evaluation import aligned_scores, precision_recall
from detectord.offline.training import Settings, detector_timelines, judge, load_data, train_detector


def suggest(trial: Any, kind: str) -> tuple[int, dict[str, Any], float]:
    """(window, detector settings, learning rate) for one trial."""
    window = trial.suggest_categorical("window", [16, 32, 64])
    depth = trial.suggest_int("depth", 1, 3)
    filters = trial.suggest_categorical("filters", [8, 16, 32, 64])
    lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    cfg: dict[str, Any] = {
        "filters": [filters] * depth,
        "kernel_size": trial.suggest_categorical("kernel_size", [3, 5, 7]),
    }
    latent = trial.suggest_categorical("latent", [4, 8, 16, 32])
    if kind == "conv_autoencoder":
        cfg["latent"] = latent
    elif kind == "conv_classifier":
        cfg["dense"] = latent
    elif kind == "siamese":
        cfg["embedding"] = latent
    return window, cfg, lr


def objective_value(data: Data, timelines: Any) -> float:
    """Event-level F1 on validation data, plus a tenth of the window-level average precision to
    break ties between trials that catch the same incidents."""
    ev = judge({"trial": timelines}, data, "validation")["trial"]
    f1 = ev.event.get("f1") or 0.0
    scores, truth = aligned_scores(timelines, data, "validation")
    ap = 0.0
    if truth.any():
        precision, _, hit = precision_recall(scores, truth)
        ap = float((precision * hit).sum() / truth.sum())
    return float(f1) + 0.1 * ap


def tune(
    kind: str, base: Settings, *, trials: int, storage: str, study_name: str, epochs: int, out: Path, log: Any = print
) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, direction="maximize")
    # Seeded by how far the study got: a resumed study draws new points, not its first ones again.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    log(f"study {study_name} in {storage}: {done} trials done, {max(0, trials - done)} to go")
    cache: dict[int, Data] = {}

    def objective(trial: Any) -> float:
        window, cfg, lr = suggest(trial, kind)
        if kind == "conv_autoencoder" and window % 2 ** len(cfg["filters"]):
            raise optuna.TrialPruned(f"window {window} does not halve {len(cfg['filters'])} times")
        if window not in cache:
            s = Settings(**{**base.to_json(), "window": window})
            cache[window] = load_data(s)
        data = cache[window]
        s = Settings(
            **{
                **base.to_json(),
                "window": window,
                "learning_rate": lr,
                "configs": {kind: {**base.configs.get(kind, {}), **cfg}},
                "epochs": {kind: epochs},
                "tensorboard": None,
                "phases": [],
            }
        )
        t0 = time.perf_counter()
        det = train_detector(kind, data, s, log=lambda _: None)
        value = objective_value(data, detector_timelines(det, data))
        log(f"trial {trial.number}: {value:.4f} (window {window}, {cfg}, lr {lr:.2g}; {time.perf_counter() - t0:.0f}s)")
        return value

    study.optimize(objective, n_trials=max(0, trials - done), catch=(ValueError,))
    best = study.best_trial
    window, cfg, lr = suggest(optuna.trial.FixedTrial(best.params), kind)
    result = {
        "kind": kind,
        "value": best.value,
        "trial": best.number,
        "window": window,
        "learning_rate": lr,
        "config": {kind: cfg},
        "trials": len(study.trials),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"best-{kind}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"best: trial {best.number}, value {best.value:.4f}: window {window}, {cfg}, learning rate {lr:.3g}; "
        f"written to {path} (use: detectord train --kinds {kind} --window {window} --config {path})"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detectord tune", description="Search a detector's hyperparameters (Optuna).")
    p.add_argument("--kind", required=True, choices=list(DETECTORS))
    p.add_argument("--data", nargs="+", default=["data"])
    p.add_argument("--trials", type=int, default=30, help="trials in the study in all (resumed studies count theirs)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per trial")
    p.add_argument("--storage", default="sqlite:///.cache/tune/optuna.db", help="Optuna storage URL")
    p.add_argument("--study", default=None, help="study name (default: the kind)")
    p.add_argument("--step", type=float, default=Settings.step_s, help="seconds per step (its recipe's settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(".cache/tune"))
    args = p.parse_args(argv)
    if args.storage.startswith("sqlite:///"):
        Path(args.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    base = Settings.for_step(args.data, args.step, kinds=[args.kind], seed=args.seed)
    try:
        tune(
            args.kind,
            base,
            trials=args.trials,
            storage=args.storage,
            study_name=args.study or args.kind,
            epochs=args.epochs,
            out=args.out,
        )
    except DatasetError as exc:
        print(f"detectord tune: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

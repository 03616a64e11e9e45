"""Training and judging the detectors: recordings → labelled, split windows (dataset.py) → the three
detectors → thresholds calibrated on validation data → evaluation beside the comparisons on test data
→ artifacts with model cards; the best on validation data becomes the default (`pick_default`).

    detectord train --data data --out models            # all three, then models/default
    detectord train --data data --out models --kinds conv_classifier --labels my-labels.yaml
    detectord train --data week.drec --init models/default/15s --out models/ours   # fine-tune a model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectord.config import Duration
from detectord.detectors import DETECTORS, Detector
from detectord.detectors.quality import EVALUATION_RULE
from detectord.detectors.windowset import WindowSet
from detectord.errors import DetectordError
from detectord.ingest.features import FEATURE_NAMES
from detectord.ingest.normalise import BaselineConfig, InputPlan
from detectord.offline.comparisons import COMPARISONS
from detectord.offline.dataset import (
    DEFAULT_HELDOUT,
    Data,
    DatasetError,
    Label,
    load_datasets,
    load_labels,
    phase_windows,
)
from detectord.offline.evaluation import Evaluation, Timeline, evaluate, timelines_from_windows
from detectord.offline.recipes import RECIPES, SHIPPED_STEPS, recipe_for, step_name

Log = Callable[[str], None]

DEFAULT_WINDOW = RECIPES[5.0].window
# What every model is judged beside: all of them.
DEFAULT_COMPARISONS = tuple(COMPARISONS)
DEFAULT_STEP_SECONDS = 5.0


@dataclass
class Settings:
    """Everything a training run depends on; saved with each model so `detectord evaluate` rebuilds
    the same data and split."""

    data: list[str]
    kinds: list[str] = field(default_factory=lambda: list(DETECTORS))
    window: int = DEFAULT_WINDOW
    step_s: float = DEFAULT_STEP_SECONDS
    epochs: dict[str, int] = field(
        default_factory=lambda: {"conv_autoencoder": 40, "conv_classifier": 30, "siamese": 30}
    )
    batch_size: int = 256
    learning_rate: float = 2e-3
    seed: int = 0
    phases: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    heldout: list[str] = field(default_factory=lambda: list(DEFAULT_HELDOUT))
    labels: str | None = None
    target_per_day: float = 0.5
    margin: float | None = None  # None: each kind's own calibration_margin
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensorboard: str | None = None
    # Use lab runs whose own health check failed (data sets refuse them otherwise).
    allow_invalid_runs: bool = False
    # How inputs are made (BaselineConfig fields) and how soon a window is scored; see recipes.py.
    baseline: dict[str, Any] = field(default_factory=dict)
    min_rows: int | None = None
    # An artifact to fine-tune instead of training afresh (`train --init`): its kind, window, step
    # and input plan are kept.
    init: str | None = None

    @classmethod
    def for_step(cls, data: list[str], step_s: float, **kw: Any) -> Settings:
        """Settings made by the step's recipe (window, baseline, partial windows, per-kind
        settings, phases); keyword arguments override them, and `configs` goes over the recipe's."""
        r = recipe_for(step_s)
        tuned = kw.pop("configs", {})
        configs = {k: {**r.configs.get(k, {}), **tuned.get(k, {})} for k in {*r.configs, *tuned}}
        base: dict[str, Any] = {
            "window": r.window,
            "phases": list(r.phases),
            "baseline": dataclasses.asdict(r.baseline),
            "min_rows": r.min_rows,
        }
        return cls(data=data, step_s=step_s, configs=configs, **{**base, **kw})

    def input_plan(self) -> InputPlan:
        if self.init:
            from detectord.detectors.artifact import read_meta

            return InputPlan.from_dict(read_meta(self.init).inputs)
        return InputPlan.default(FEATURE_NAMES, BaselineConfig(**self.baseline), self.min_rows)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_data(
    settings: Settings,
    *,
    inputs: InputPlan | None = None,
    labels: Sequence[Label] | None = None,
    log: Log | None = None,
) -> Data:
    if labels is None:
        labels = load_labels(settings.labels) if settings.labels else []
    return load_datasets(
        settings.data,
        window=settings.window,
        step_s=settings.step_s,
        inputs=inputs or settings.input_plan(),
        heldout=settings.heldout,
        labels=labels,
        seed=settings.seed,
        log=log,
        allow_invalid=settings.allow_invalid_runs,
    )


@dataclass(frozen=True)
class Hyperparameters:
    configs: dict[str, dict[str, Any]]  # per kind
    learning_rate: float | None = None
    window: int | None = None


def read_hyperparameters(path: Path) -> Hyperparameters:
    """`train --config FILE`: per-kind settings ({"conv_classifier": {...}}), or a `detectord tune`
    result, whose learning rate and window come with it."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read hyperparameters: {exc}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: hyperparameters are a JSON object")
    tuned = "config" in raw and "kind" in raw
    configs = raw["config"] if tuned else raw
    unknown = sorted(k for k in configs if k not in DETECTORS)
    if unknown or not all(isinstance(v, dict) for v in configs.values()):
        raise DatasetError(
            f"{path}: keys must be detector kinds ({', '.join(DETECTORS)}) with their settings; "
            f"got {unknown or sorted(configs)}"
        )
    if not tuned:
        return Hyperparameters(configs)
    return Hyperparameters(configs, float(raw["learning_rate"]), int(raw["window"]))


def new_detector(kind: str, settings: Settings, *, name: str | None = None) -> Detector:
    cls = DETECTORS.get(kind)
    if cls is None:
        raise ValueError(f"unknown detector kind {kind!r}; known: {', '.join(DETECTORS)}")
    config = cls.config_class.from_dict(settings.configs.get(kind, {}))
    return cls(
        FEATURE_NAMES,
        window=settings.window,
        step_seconds=settings.step_s,
        inputs=settings.input_plan(),
        config=config,
        name=name or kind,
        version=time.strftime("%Y%m%d", time.gmtime()) + f"-seed{settings.seed}",
    )


# Fine-tuning (`train --init`) runs this many epochs unless told, at this share of the learning rate.
FINE_TUNE_EPOCHS = 5
FINE_TUNE_LEARNING_RATE = 0.1


def fine_tuned(path: str, kind: str, settings: Settings) -> Detector:
    """The artifact `path`, to be trained on from its weights (see `train --init`)."""
    from detectord.detectors import load_detector

    det = load_detector(path, features=FEATURE_NAMES)
    if det.kind != kind or det.window != settings.window or det.step_seconds != settings.step_s:
        raise ValueError(
            f"{path} is a {det.kind} of window {det.window} at {step_name(det.step_seconds)} steps; "
            f"fine-tuning keeps them, got {kind}, window {settings.window}, {step_name(settings.step_s)}"
        )
    det.meta.name = kind
    det.meta.version = f"{det.meta.version}+tuned-{time.strftime('%Y%m%d', time.gmtime())}-seed{settings.seed}"
    return det


def train_detector(
    kind: str, data: Data, settings: Settings, *, extra: WindowSet | None = None, log: Log = print
) -> Detector:
    """Train and calibrate one detector on `data` (plus `extra` training windows)."""
    train = data.train if extra is None or not len(extra) else WindowSet.concat([data.train, extra])
    if settings.init:
        det = fine_tuned(settings.init, kind, settings)
    else:
        det = new_detector(kind, settings)
        det.initialize_new_weights(settings.seed)
    callbacks = []
    if settings.tensorboard:
        callbacks.append(tensorboard_callback(Path(settings.tensorboard) / kind, log))
    t0 = time.perf_counter()
    stats = det.train(
        settings.epochs.get(kind, 20),
        settings.batch_size,
        train,
        validation=data.validation,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        callbacks=callbacks,
        log=log,
    )
    fit_s = time.perf_counter() - t0
    det.calibrate(data.validation, target_per_day=settings.target_per_day, margin=settings.margin)
    log(
        f"{kind}: {det.count_params():,} parameters, trained in {fit_s:.0f}s; threshold {det.threshold:.4g} (raw units)"
    )
    det.meta.training_data = {
        **data.description,
        "settings": settings.to_json(),
        "fit": stats,
        "fit_seconds": round(fit_s, 1),
        "augmented_windows": len(extra) if extra is not None else 0,
    }
    return det


def tensorboard_callback(logdir: Path, log: Log) -> Any:
    import keras

    logdir.mkdir(parents=True, exist_ok=True)
    try:
        import tensorflow  # noqa: F401  (Keras writes TensorBoard summaries through it)
    except ImportError:
        log(f"TensorBoard needs TensorFlow; writing per-epoch CSV to {logdir / 'training.csv'} instead")
        return keras.callbacks.CSVLogger(str(logdir / "training.csv"))
    log(f"TensorBoard logs: {logdir} (tensorboard --logdir {logdir.parent})")
    return keras.callbacks.TensorBoard(log_dir=str(logdir), write_graph=False)


# Detectors whose weights can be scored two ways (the 2020 proposal names both): the setting.
SCORE_CHOICES: dict[str, tuple[str, ...]] = {
    "conv_autoencoder": ("reconstruction", "latent"),
    "siamese": ("centroids", "normal_distance"),
}


def variant_name(det: Detector, primary: bool) -> str:
    """A detector's name in reports: its kind, or for the other ways to score its weights, which."""
    return det.kind if primary else f"{det.kind} ({det.config.score.replace('_', ' ')} score)"


def variants(det: Detector, data: Data, settings: Settings) -> list[tuple[str, Detector]]:
    """The detector as saved, and the same weights scored the other way (calibrated alike)."""
    out: list[tuple[str, Detector]] = [(variant_name(det, True), det)]
    for score in SCORE_CHOICES.get(det.kind, ()):
        if score == det.config.score:
            continue
        twin = type(det)(
            det.features,
            window=det.window,
            step_seconds=det.step_seconds,
            inputs=det.inputs,
            config=dataclasses.replace(det.config, score=score),
            meta=dataclasses.replace(det.meta, state=dict(det.meta.state)),
        )
        twin.network = det.network
        twin.calibrate(data.validation, target_per_day=settings.target_per_day, margin=settings.margin)
        out.append((variant_name(twin, False), twin))
    return out


def pick_score(
    det: Detector, data: Data, settings: Settings, log: Log
) -> list[tuple[str, Detector, dict[str, Timeline]]]:
    """The ways to score a detector's weights, each calibrated, with its timelines on `data`: first
    the one with the best event-level F1 on validation data (window-level F1 breaks ties), named
    by the kind, then the others."""
    options = variants(det, data, settings)
    timelines = {name: detector_timelines(d, data) for name, d in options}
    if len(options) == 1:
        return [(options[0][0], det, timelines[options[0][0]])]
    evs = judge(timelines, data, "validation")
    ranked = sorted(options, key=lambda o: (_f1(evs[o[0]]), evs[o[0]].window.get("f1") or 0.0), reverse=True)
    best = ranked[0][1]
    log(
        f"{det.kind}: scored by {best.config.score} (validation F1 "
        + ", ".join(f"{n} {_f1(e):.3f}" for n, e in evs.items())
        + ")"
    )
    best.meta.config = best.config.to_dict()
    return [(variant_name(d, d is best), d, timelines[name]) for name, d in ranked]


def detector_timelines(det: Detector, data: Data) -> dict[str, Timeline]:
    out = det.score(data.all)
    return timelines_from_windows(data, out.scores, out.looks_like)


def comparison_timelines(
    data: Data, names: Sequence[str], settings: Settings, log: Log
) -> dict[str, dict[str, Timeline]]:
    """Each comparison's timelines on `data`, fitted on its training role and calibrated on its
    validation role like the models."""
    out = {}
    for name in names:
        t0 = time.perf_counter()
        out[name] = COMPARISONS[name](data, settings.target_per_day)
        log(f"comparison {name}: {time.perf_counter() - t0:.0f}s")
    return out


def judge(named: dict[str, dict[str, Timeline]], data: Data, role: str = "test") -> dict[str, Evaluation]:
    return {name: evaluate(name, tl, data, role=role, rule=EVALUATION_RULE) for name, tl in named.items()}


def train_all(
    settings: Settings,
    out_dir: Path,
    *,
    comparisons: Sequence[str] = DEFAULT_COMPARISONS,
    command: str = "",
    log: Log = print,
    default_dir: Path | None = None,
) -> dict[str, Any]:
    """Train every kind in `settings`, evaluate each beside the comparisons, write the artifacts and
    the report to `out_dir`, and the best on validation data to `default_dir` (out_dir/default)."""
    from detectord.offline.report import write_model_card, write_report

    t0 = time.perf_counter()
    log(f"data: {', '.join(settings.data)} at {settings.step_s:g}s steps, window {settings.window}")
    labels = load_labels(settings.labels) if settings.labels else []
    data = load_data(settings, labels=labels, log=log)
    c = data.description["counts"]
    log(
        "windows: "
        + ", ".join(
            f"{r} {c[r]['windows']:,} ({c[r]['anomalous']:,} anomalous, {c[r]['incidents']} incidents)" for r in c
        )
        + f"; held out: {', '.join(data.heldout)}"
    )
    extra = None
    if settings.phases:
        extra = phase_windows(
            settings.data,
            data,
            window=settings.window,
            step_s=settings.step_s,
            inputs=settings.input_plan(),
            phases=settings.phases,
            labels=labels,
            allow_invalid=settings.allow_invalid_runs,
        )
        # Held-out classes stay out of training in every phase.
        extra = extra.subset(np.array([lb is not None and lb not in data.heldout for lb in extra.label], dtype=bool))
        log(f"phase-shifted training windows: {len(extra):,} (phases {settings.phases} s)")
    data_s = time.perf_counter() - t0
    _device(log)
    trained: dict[str, Detector] = {}
    models: dict[str, Detector] = {}
    timelines: dict[str, dict[str, Timeline]] = {}
    for kind in settings.kinds:
        options = pick_score(train_detector(kind, data, settings, extra=extra, log=log), data, settings, log)
        trained[kind] = options[0][1]
        for name, d, tl in options:
            models[name], timelines[name] = d, tl
    timelines.update(comparison_timelines(data, comparisons, settings, log))
    test = judge(timelines, data, "test")
    validation = judge({k: timelines[k] for k in trained}, data, "validation")
    best = pick_default(validation)
    log(
        f"default: {best} (event-level F1 on validation data: "
        + ", ".join(f"{k} {_f1(v):.3f}" for k, v in validation.items())
        + ")"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir = out_dir / "report"
    write_report(
        report_dir,
        test,
        data,
        timelines,
        primary=best,
        title="Detectors and comparisons on the test data",
        command=command,
    )
    for kind, det in trained.items():
        det.meta.metrics = {
            "test": {name: test[name].to_json() for name in test if name == kind or name.startswith(kind + " ")},
            "validation_event_f1": _f1(validation[kind]),
            "comparisons": {name: _summary(test[name]) for name in test if name not in models},
            "others": {name: _summary(test[name]) for name in models if not name.startswith(kind)},
            "evaluation": {
                "alert_for_seconds": EVALUATION_RULE.for_s,
                "keep_firing_seconds": EVALUATION_RULE.keep_firing_for_s,
                "role": "test",
            },
        }
        det.meta.training_data["command"] = command
        det.meta.training_data["data_seconds"] = round(data_s, 1)
        path = out_dir / kind
        det.save(path)
        write_model_card(path, det, test, data, default=kind == best)
        log(f"wrote {path}")
    default = default_dir or out_dir / "default"
    if default.exists():
        shutil.rmtree(default)
    trained[best].meta.name = "default"
    trained[best].save(default)
    write_model_card(default, trained[best], test, data, default=True)
    log(f"wrote {default} ({best}) and {report_dir}/report.md in {time.perf_counter() - t0:.0f}s")
    return {
        "default": best,
        "step_s": settings.step_s,
        "window": settings.window,
        "first_score_s": recipe_for(settings.step_s).first_score_s,
        "evaluations": test,
    }


def train_steps(
    steps: Sequence[float],
    out_dir: Path,
    make_settings: Callable[[float], Settings],
    *,
    comparisons: Sequence[str] = DEFAULT_COMPARISONS,
    command: str = "",
    log: Log = print,
) -> dict[str, Any]:
    """`train_all` at every step: out_dir/STEP/{kinds, report}, and the model set out_dir/default
    with the best of each step in out_dir/default/STEP (what `serve` picks from by `ingest.step`)."""
    from detectord.offline.report import write_model_set_card

    results = {}
    for step in steps:
        name = step_name(step)
        log(f"== step {name}")
        results[name] = train_all(
            make_settings(step),
            out_dir / name,
            comparisons=comparisons,
            command=command,
            log=log,
            default_dir=out_dir / "default" / name,
        )
    write_model_set_card(out_dir / "default", results, command=command)
    return results


# Kinds in the order the default is taken from when validation cannot tell them apart: the
# classifier's alerts name the incident class ("looks like upstream timeout"); the autoencoder
# needs no incident labels; the siamese network is the least proven.
PREFERENCE: tuple[str, ...] = ("conv_classifier", "conv_autoencoder", "siamese")


def pick_default(validation: Mapping[str, Evaluation]) -> str:
    """The default of a step: the best event-level F1 on validation data. Validation holds a few
    incidents and a couple of instance-hours of normal, so a difference of one incident is
    noise: every kind within one incident's worth of F1 (1 / incidents) of the best is as good,
    and the first of those in PREFERENCE is taken."""
    top = max(_f1(ev) for ev in validation.values())
    events = max((int(ev.event.get("events") or 0) for ev in validation.values()), default=0)
    tie = 1.0 / events if events else 0.0
    good = [k for k, ev in validation.items() if _f1(ev) >= top - tie - 1e-9]
    return min(good, key=lambda k: (PREFERENCE.index(k) if k in PREFERENCE else len(PREFERENCE), k))


def _f1(ev: Evaluation) -> float:
    f = ev.event.get("f1")
    return float(f) if f is not None else 0.0


def _summary(ev: Evaluation) -> dict[str, Any]:
    return {
        "event": {
            k: ev.event[k] for k in ("precision", "recall", "f1", "delay_steps_median", "false_alerts_per_instance_day")
        },
        "seen_f1": ev.groups["seen"]["f1"],
        "heldout_f1": ev.groups["heldout"]["f1"],
        "window_f1": ev.window.get("f1"),
    }


def _device(log: Log) -> None:
    import keras

    backend = keras.backend.backend()
    gpus: list[str] = []
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    elif backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform == "gpu"]
    elif backend == "torch":
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log(
        f"training on {', '.join(gpus) if gpus else f'CPU ({os.cpu_count()} cores)'} with Keras {keras.__version__} "
        f"({backend})"
    )


def settings_from_model(det: Detector, data: Sequence[str] | None = None) -> Settings:
    """The settings a model was trained with (to rebuild its data and split), with other data if given."""
    raw = det.meta.training_data.get("settings")
    if not isinstance(raw, dict):
        raise DatasetError(f"model {det.meta.name} does not record how it was trained; pass --heldout and --seed")
    known = {f.name for f in dataclasses.fields(Settings)}
    s = Settings(**{k: v for k, v in raw.items() if k in known})
    if data:
        s.data = list(data)
    return s


def evaluate_models(
    paths: Sequence[Path],
    data_paths: Sequence[str],
    out: Path,
    *,
    comparisons: Sequence[str] = DEFAULT_COMPARISONS,
    command: str = "",
    log: Log = print,
    allow_invalid_runs: bool = False,
    step_s: float | None = None,
) -> dict[str, Evaluation]:
    """`detectord evaluate`: the models (with their score variants) and the comparisons on the test role
    of `data_paths`, split as the first model was trained; a report in `out`. `step_s` judges them
    at another step than their own (as `model.any_step` runs them)."""
    from detectord.detectors import load_detector
    from detectord.offline.report import write_report

    dets = [load_detector(p) for p in paths]
    first = dets[0]
    for p, d in zip(paths, dets, strict=True):
        if (d.window, d.step_seconds, d.meta.inputs) != (first.window, first.step_seconds, first.meta.inputs):
            raise DatasetError(f"{p}: window, step or inputs differ from {paths[0]}'s; evaluate them apart")
    settings = settings_from_model(first, data_paths)
    settings.allow_invalid_runs = allow_invalid_runs
    if step_s is not None:
        settings.step_s = step_s
    data = load_data(settings, inputs=first.inputs, log=log)
    models: dict[str, Detector] = {}
    for p, d in zip(paths, dets, strict=True):
        for name, v in variants(d, data, settings):
            label = name if len(dets) == 1 or p.name in (d.kind, "default") else f"{p.name}: {name}"
            if p.name == "default" and len(dets) > 1:
                label = f"default: {name}"
            models[label] = v
    timelines = {name: detector_timelines(d, data) for name, d in models.items()}
    timelines.update(comparison_timelines(data, comparisons, settings, log))
    evals = judge(timelines, data, "test")
    write_report(
        out, evals, data, timelines, primary=next(iter(models)), title="Evaluation on the test data", command=command
    )
    return evals


def _data_arguments(p: argparse.ArgumentParser) -> None:
    """What `train` and `evaluate` both take: the comparisons to judge beside, and invalid lab runs."""
    p.add_argument(
        "--compare",
        default=",".join(DEFAULT_COMPARISONS),
        help="comparison rule sets and detectors, comma-separated; '' for none",
    )
    p.add_argument(
        "--allow-invalid-runs",
        action="store_true",
        help="use lab runs whose healthy periods failed the lab's own health check (refused otherwise)",
    )


def evaluate_main(argv: list[str] | None = None) -> int:
    from detectord.offline.report import side_by_side

    p = argparse.ArgumentParser(
        prog="detectord evaluate", description="Evaluate models beside the comparisons; writes a report and JSON."
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="MODEL... DATA",
        help="model directories, then the data (a directory of recordings, or one recording)",
    )
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="report directory (default: evaluation)")
    p.add_argument(
        "--step",
        default=None,
        help="judge the models at this step instead of their own (as model.any_step would run them), e.g. 15s",
    )
    _data_arguments(p)
    args = p.parse_args(argv)
    if len(args.paths) < 2:
        p.error("give at least one model and the data")
    *models, data = args.paths
    command = "detectord evaluate " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        at = float(Duration.parse(args.step)) if args.step else None
        by_step = _models_by_step([Path(m) for m in models])
        if at is not None:
            by_step = {at: [p for ps in by_step.values() for p in ps]}
        for step, paths in by_step.items():
            # One report per step when a model set spans several.
            out = args.out if len(by_step) == 1 else args.out / step_name(step)
            evals = evaluate_models(
                paths,
                [data],
                out,
                comparisons=[b for b in args.compare.split(",") if b],
                command=command,
                allow_invalid_runs=args.allow_invalid_runs,
                step_s=at,
            )
            print(f"== {step_name(step)} steps")
            print("\n".join(side_by_side(evals)))
            print(f"report: {out / 'report.md'}, numbers: {out / 'evaluation.json'}")
    except (DatasetError, ValueError) as exc:
        print(f"detectord evaluate: {exc}", file=sys.stderr)
        return 2
    except DetectordError as exc:
        print(f"detectord evaluate: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class _Member:
    path: Path
    kind: str
    window: int
    inputs: dict[str, Any]


def _init_members(path: Path) -> dict[float, _Member]:
    """`train --init`: the artifact, or each of a model set's, by step."""
    from detectord.detectors.artifact import read_meta
    from detectord.detectors.model_set import model_set

    out = {}
    for step, q in (model_set(path) or {read_meta(path).step_seconds: path}).items():
        meta = read_meta(q)
        out[step] = _Member(q, meta.kind, meta.window, meta.inputs)
    return out


def _models_by_step(paths: Sequence[Path]) -> dict[float, list[Path]]:
    """Artifacts to evaluate, grouped by step: a model set counts as each of its members."""
    from detectord.detectors.artifact import read_meta
    from detectord.detectors.model_set import model_set

    out: dict[float, list[Path]] = {}
    for p in paths:
        members = model_set(p)
        for step, q in (members or {read_meta(p).step_seconds: p}).items():
            out.setdefault(step, []).append(q)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="detectord train", description="Train the detectors on labelled recordings.")
    p.add_argument("--data", nargs="+", default=["data"], help="recordings or directories (default: data)")
    p.add_argument("--out", type=Path, default=Path("models"), help="where the artifacts go (default: models)")
    p.add_argument("--kinds", default=",".join(DETECTORS), help=f"comma-separated (default: {','.join(DETECTORS)})")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every kind (default: per kind)")
    p.add_argument("--window", type=int, default=None, help="steps (default: a tuned config's, else the step's recipe)")
    p.add_argument(
        "--steps",
        default=None,
        help="the scrape intervals to make models for, comma-separated durations (default: "
        f"{','.join(step_name(s) for s in SHIPPED_STEPS)}; with --init, the model's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="engineers' labels (YAML/JSON) to add to the ground truth")
    p.add_argument(
        "--heldout",
        default=",".join(DEFAULT_HELDOUT),
        help="classes kept out of training and validation (comma-separated; '' for none)",
    )
    p.add_argument("--no-phases", action="store_true", help="no phase-shifted training windows")
    _data_arguments(p)
    p.add_argument("--tensorboard", default=".cache/tensorboard", help="TensorBoard log directory ('' for none)")
    p.add_argument("--config", default=None, help="JSON of per-kind hyperparameters, e.g. from `detectord tune`")
    p.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="fine-tune this model on --data (your recordings, and --labels if any) instead of training afresh: "
        "an artifact, or a model set (its model for each of --steps; default: every step it has). Its kind, "
        "window, step and input plan are kept, --kinds and --window are not used; it trains for "
        f"{FINE_TUNE_EPOCHS} epochs (--epochs) at {FINE_TUNE_LEARNING_RATE:g} × the learning rate, is "
        "recalibrated on the validation part, and no comparisons run unless --compare names them. A "
        "classifier keeps its incident classes and learns from normal data alone; a siamese network needs "
        "labelled incidents",
    )
    p.set_defaults(compare=None)
    args = p.parse_args(argv)
    compare = args.compare if args.compare is not None else ("" if args.init else ",".join(DEFAULT_COMPARISONS))
    try:
        init = _init_members(Path(args.init)) if args.init else {}
    except DetectordError as exc:
        print(f"detectord train: --init: {exc}", file=sys.stderr)
        return 2
    if init and args.steps is None:
        args.steps = ",".join(step_name(s) for s in init)
    try:
        hp = read_hyperparameters(Path(args.config)) if args.config else Hyperparameters({})
    except DatasetError as exc:
        print(f"detectord train: {exc}", file=sys.stderr)
        return 2
    try:
        steps = [
            float(Duration.parse(x)) for x in (args.steps or ",".join(map(step_name, SHIPPED_STEPS))).split(",") if x
        ]
    except ValueError as exc:
        print(f"detectord train: --steps: {exc}", file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in DETECTORS]
    if unknown or not kinds:
        print(f"detectord train: unknown kinds {unknown}; known: {', '.join(DETECTORS)}", file=sys.stderr)
        return 2
    if not steps:
        print("detectord train: --steps names no step", file=sys.stderr)
        return 2
    missing = [step_name(s) for s in steps if init and s not in init]
    if missing:
        print(f"detectord train: --init {args.init} has no model for {', '.join(missing)} steps", file=sys.stderr)
        return 2

    def make_settings(step: float) -> Settings:
        s = Settings.for_step(
            args.data,
            step,
            kinds=kinds,
            configs=hp.configs,
            seed=args.seed,
            labels=args.labels,
            heldout=[c for c in args.heldout.split(",") if c],
            tensorboard=args.tensorboard or None,
            allow_invalid_runs=args.allow_invalid_runs,
        )
        window = args.window or hp.window
        if window:
            s.window = int(window)
        if args.no_phases:
            s.phases = []
        if args.epochs:
            s.epochs = {k: args.epochs for k in s.kinds}
        if hp.learning_rate is not None:
            s.learning_rate = hp.learning_rate
        if init:
            meta, plan = init[step], InputPlan.from_dict(init[step].inputs)
            s.init, s.kinds, s.window = str(init[step].path), [meta.kind], meta.window
            s.baseline, s.min_rows = dataclasses.asdict(plan.baseline), plan.min_rows
            s.epochs = {meta.kind: args.epochs or FINE_TUNE_EPOCHS}
            if hp.learning_rate is None:
                s.learning_rate *= FINE_TUNE_LEARNING_RATE
        return s

    command = "detectord train " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        train_steps(steps, args.out, make_settings, comparisons=[b for b in compare.split(",") if b], command=command)
    except (DatasetError, ValueError) as exc:
        print(f"detectord train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

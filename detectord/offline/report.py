"""Evaluation reports and model cards: Markdown tables side by side, PNG plots (precision-recall
curves, confusion matrices, score timelines with the ground truth shaded) and the numbers as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detectord.offline.dataset import Data, SeriesInfo, benign_class
from detectord.offline.evaluation import (
    Evaluation,
    Timeline,
    aligned,
    aligned_scores,
    poisson_upper95,
    precision_recall,
)

if TYPE_CHECKING:
    from detectord.detectors import Detector


def _f(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _fa(ev: Evaluation, test_only: bool) -> str:
    """False alerts per instance-day on the recordings that are (or are not) test only, with the
    rate's 95 % upper bound."""
    recs = {k: v for k, v in ev.recordings.items() if v.get("test_only", False) == test_only}
    fa = sum(v["false_alerts"] for v in recs.values())
    days = sum(v["normal_instance_days"] for v in recs.values())
    if days <= 0:
        return "–"
    return f"{fa / days:.2f} (≤ {poisson_upper95(fa) / days:.2f}; {fa} in {days * 24:.1f} h)"


def long_incidents(evals: Mapping[str, Evaluation], min_s: float = 120.0) -> list[str]:
    """Incidents of `min_s` or longer, per detector: caught, delay, the share of the incident's
    steps with an alert firing, and steps from its end until the alert resolved."""
    rows = [e for e in next(iter(evals.values())).events if (e.get("duration_s") or 0) >= min_s] if evals else []
    if not rows:
        return []
    names = list(evals)
    lines = [
        "| incident | class | length | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        cells = []
        for n in names:
            e = next((x for x in evals[n].events if x["id"] == row["id"]), None)
            if e is None or not e["caught"]:
                cells.append("missed")
                continue
            share = e.get("firing_share")
            cells.append(
                f"{e['delay_steps']} st, firing {_f(share * 100 if share is not None else None, '.0f')} %, "
                f"resolved +{e.get('resolve_steps')} st"
            )
        lines.append(f"| {row['id']} | {row['class']} | {row['duration_s'] / 60:.0f} min | " + " | ".join(cells) + " |")
    return lines


def side_by_side(evals: Mapping[str, Evaluation]) -> list[str]:
    """One row per detector or comparison: event-level precision/recall/F1 on seen and held-out
    classes, window-level F1, detection delay, false alerts per instance-day."""
    lines = [
        "| detector | seen F1 | seen P | seen R | held-out F1 | held-out P | held-out R | all F1 | window F1 "
        "| delay median / p90 (steps) | false alerts / instance-day (95 % upper bound), lab | …, test-only fleets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ev in evals.items():
        s, h, a = ev.groups["seen"], ev.groups["heldout"], ev.event
        lines.append(
            f"| {name} | {_f(s['f1'])} | {_f(s['precision'])} | {_f(s['recall'])} ({s['caught']}/{s['events']}) | "
            f"{_f(h['f1'])} | {_f(h['precision'])} | {_f(h['recall'])} ({h['caught']}/{h['events']}) | "
            f"{_f(a['f1'])} | {_f(ev.window.get('f1'))} | {_f(a['delay_steps_median'], '.1f')} / "
            f"{_f(a['delay_steps_p90'], '.1f')} | {_fa(ev, False)} | {_fa(ev, True)} |"
        )
    return lines


def per_class(evals: Mapping[str, Evaluation]) -> list[str]:
    classes = sorted(
        {c for ev in evals.values() for c in ev.classes},
        key=lambda c: (any(ev.classes.get(c, {}).get("heldout") for ev in evals.values()), c),
    )
    names = list(evals)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in classes:
        held = any(ev.classes.get(c, {}).get("heldout") for ev in evals.values())
        cells = []
        for n in names:
            r = evals[n].classes.get(c)
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['caught']}/{r['events']}"
            if r["delay_steps_median"] is not None:
                cell += f", {r['delay_steps_median']:.0f} st"
            if r.get("named"):
                cell += f", named {r['named_right']}→{r['named_right_at_end']}/{r['named']}"
            cells.append(cell)
        lines.append(f"| {c}{' (held out)' if held else ''} | " + " | ".join(cells) + " |")
    return lines


def by_recording(evals: Mapping[str, Evaluation]) -> list[str]:
    recs = sorted({r for ev in evals.values() for r in ev.recordings})
    lines = ["| detector | " + " | ".join(recs) + " |", "|---|" + "---|" * len(recs)]
    for n, ev in evals.items():
        cells = []
        for r in recs:
            g = ev.recordings.get(r)
            cells.append("–" if g is None else f"{g['caught']}/{g['events']} caught, {g['false_alerts']} false")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _role_text(r: Mapping[str, Any]) -> str:
    if not r["test_only"]:
        return "split"
    lanes = r.get("validation_lanes") or []
    return f"test only, but validation on the lanes of {', '.join(lanes)}" if lanes else "test only"


def data_summary(data: Data) -> list[str]:
    d = data.description
    lines = ["| recording | instances | steps | incidents | role |", "|---|---|---|---|---|"]
    for r in d["recordings"]:
        lines.append(f"| {r['file']} | {r['instances']} | {r['steps']:,} | {r['incidents']} | {_role_text(r)} |")
    c = d["counts"]
    lines += [
        "",
        f"Steps of {d['step_seconds']:g} s, windows of {d['window']} steps. Split: {d['split']['method']} "
        f"(seed {d['split_seed']}).",
        "",
        "| role | windows | normal | anomalous | incidents |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r} | {c[r]['windows']:,} | {c[r]['normal']:,} | {c[r]['anomalous']:,} | {c[r]['incidents']} |" for r in c
    ]
    lines += [
        "",
        f"Held-out classes (never in training or validation; every one of their incidents is test data): "
        f"{', '.join(d['heldout_classes'])}. Seen classes: {', '.join(d['seen_classes'])}.",
    ]
    return lines


def rule_text(ev: Evaluation) -> str:
    r = ev.rule
    return (
        f"Alerts are timed as serving times them: pending at the first step scored above 1, firing once "
        f"`for` ({r['for_seconds']:g} s) has passed, resolved after `keep_firing_for` "
        f"({r['keep_firing_for_seconds']:g} s) without one; an incident is caught if an alert fires on one "
        f"of its instances while it lasts; an alert starting on a normal step is a false alert. A failed "
        f"scrape (`up == 0`) of a scored instance alerts at once, as serving's liveness does. Steps of "
        f"{r['step_seconds']:g} s."
    )


# ---- plots ----------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr(path: Path, timelines: Mapping[str, Mapping[str, Timeline]], data: Data, role: str = "test") -> None:
    """Window-level precision-recall curves of every detector with continuous scores."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, tl in timelines.items():
        scores, truth = aligned_scores(tl, data, role)
        if not len(scores) or not truth.any():
            continue
        precision, recall, _ = precision_recall(scores, truth)
        if len(np.unique(scores)) <= 3:
            k = int((scores > 1.0).sum())
            ax.plot([recall[k - 1] if k else 0.0], [precision[k - 1] if k else 1.0], "o", label=name)
        else:
            ax.plot(recall, precision, label=name, lw=1.4)
    ax.set_xlabel("recall (windows)")
    ax.set_ylabel("precision (windows)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none on normal data alone (a fleet's own recordings)
        ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Precision-recall, test windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(path: Path, ev: Evaluation) -> None:
    plt = _plt()
    cm = ev.window["confusion"]
    cc = ev.window.get("class_confusion")
    ncols = 2 if cc else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols + (3 if cc else 0), 4))
    axes = np.atleast_1d(axes)
    m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    ax = axes[0]
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["normal", "anomalous"])
    ax.set_yticks([0, 1], ["normal", "anomalous"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(f"{ev.name}: test windows")
    if cc:
        truths = sorted(cc)
        guesses = sorted({g for row in cc.values() for g in row} | set(truths))
        mm = np.array([[cc[t].get(g, 0) for g in guesses] for t in truths])
        ax = axes[1]
        ax.imshow(mm, cmap="Oranges")
        for (i, j), v in np.ndenumerate(mm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(guesses)), guesses, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(truths)), truths, fontsize=7)
        ax.set_xlabel("looks like")
        ax.set_title("class named, caught windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MAX_TIMELINE_ROWS = 16


def plot_timelines(path: Path, recording: str, tl: Mapping[str, Timeline], data: Data, name: str) -> None:
    """The score of the instances of one recording over time, ground-truth incidents shaded
    (benign changes hatched); of a large fleet, the MAX_TIMELINE_ROWS with the highest scores."""
    plt = _plt()
    infos = [i for i in data.series if i.recording == recording]
    if not infos:
        return
    if len(infos) > MAX_TIMELINE_ROWS:

        def peak(info: SeriesInfo) -> float:
            timeline = tl.get(info.name)
            s = aligned(timeline, info.timestamps_ms) if timeline is not None else np.zeros(0)
            return float(np.nanmax(s)) if np.isfinite(s).any() else -1.0

        keep = {i.name for i in sorted(infos, key=peak, reverse=True)[:MAX_TIMELINE_ROWS]}
        infos = [i for i in infos if i.name in keep]
    cmap = plt.get_cmap("tab20")
    classes = sorted({ev["class"] for ev in data.events.values()})
    color = {c: cmap(i % 20) for i, c in enumerate(classes)}
    fig, axes = plt.subplots(len(infos), 1, figsize=(12, 1.5 * len(infos) + 0.8), sharex=True, squeeze=False)
    t0 = min(int(i.timestamps_ms[0]) for i in infos)
    seen_cls: set[str] = set()
    for ax, info in zip(axes[:, 0], infos, strict=True):
        t = (info.timestamps_ms - t0) / 60000.0
        timeline = tl.get(info.name)
        s = aligned(timeline, info.timestamps_ms) if timeline is not None else np.full(len(t), np.nan)
        for ev_id in sorted({e for e in info.event if e}):
            ev = data.events.get(ev_id)
            if ev is None:  # a benign change: its steps, with their aftermath
                steps = info.timestamps_ms[info.event == ev_id]
                a, b = (steps[0] - t0) / 60000.0, (steps[-1] - t0) / 60000.0
                label = f"benign: {benign_class(ev_id)}"
                ax.axvspan(a, b, color="grey", alpha=0.2, hatch="//", label=label if label not in seen_cls else None)
                seen_cls.add(label)
                continue
            a, b = (ev["start_ms"] - t0) / 60000.0, (ev["end_ms"] - t0) / 60000.0
            ax.axvspan(
                a, b, color=color[ev["class"]], alpha=0.35, label=ev["class"] if ev["class"] not in seen_cls else None
            )
            seen_cls.add(ev["class"])
        test = np.array([r == "test" for r in info.role], dtype=bool)
        ax.plot(t, np.clip(s, 1e-2, None), lw=0.8, color="black")
        if test.any() and not test.all():
            ax.fill_between(t, 1e-2, 1e3, where=test, color="grey", alpha=0.08, step="mid")
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylim(1e-2, max(10.0, float(np.nanmax(s)) * 1.5) if np.isfinite(s).any() else 10.0)
        ax.set_ylabel("/".join(info.instance[-1:]), fontsize=8)
    axes[-1, 0].set_xlabel("minutes")
    handles, labels = [], []
    for ax in axes[:, 0]:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=4)
    fig.suptitle(
        f"{name} on {recording}: score (log; > 1 anomalous), incidents shaded"
        + ("; grey: test blocks" if any(r != "test" for i in infos for r in i.role if r) else ""),
        fontsize=9,
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- documents ------------------------------------------------------------------------------------


def write_report(
    out: Path,
    evals: Mapping[str, Evaluation],
    data: Data,
    timelines: Mapping[str, Mapping[str, Timeline]],
    *,
    primary: str,
    title: str,
    command: str = "",
) -> Path:
    """report.md with its PNGs and evaluation.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_pr(out / "precision_recall.png", timelines, data)
    plot_confusion(out / f"confusion_{_slug(primary)}.png", evals[primary])
    for name in evals:
        if name != primary and evals[name].window.get("class_confusion"):
            plot_confusion(out / f"confusion_{_slug(name)}.png", evals[name])
    recs = sorted({i.recording for i in data.series if any(r == "test" for r in i.role)})
    for rec in recs:
        plot_timelines(out / f"timeline_{_slug(rec)}.png", rec, timelines[primary], data, primary)
    first = next(iter(evals.values()))
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += ["## Every detector and comparison, side by side", "", rule_text(first), ""]
    lines += side_by_side(evals)
    lines += [
        "",
        "P and R are event-level precision and recall; F1 their harmonic mean. Seen and held-out rows share "
        "the false alerts (they have no class). Window F1 judges each test window's verdict.",
        "",
        "## Per class (incidents caught / incidents, median delay in steps, class named right)",
        "",
    ]
    lines += per_class(evals)
    lines += [
        "",
        '"named a→b/n": of n caught incidents, the alert named the right class in a when it began '
        "firing and in b at the incident's last firing step (an alert names the class its anomalous steps "
        "resembled most often; held-out classes cannot be named).",
    ]
    lines += ["", "## Per recording", "", *by_recording(evals)]
    long = long_incidents(evals)
    if long:
        lines += [
            "",
            "## Long incidents (2 minutes or more)",
            "",
            "Steps to the first firing step, the share of the incident's steps with an alert firing on one of "
            "its instances, and steps after its end until the last one resolved.",
            "",
            *long,
        ]
    benign = {n: ev.event for n, ev in evals.items() if ev.event.get("benign_changes")}
    if benign:
        kinds = sorted({c for e in benign.values() for c in e.get("benign_by_class", {})})
        lines += [
            "",
            "## Benign changes (reloads, restarts, joins and leaves, cache flushes, traffic growth)",
            "",
            "Normal, with their aftermath: an alert on one is a false alert, counted here by kind of "
            "change (false alerts / changes).",
            "",
            "| detector | all | " + " | ".join(kinds) + " |",
            "|---|---|" + "---|" * len(kinds),
            *(
                f"| {n} | {e['false_alerts_on_benign_changes']} / {e['benign_changes']} | "
                + " | ".join(
                    "{false_alerts} / {changes}".format(
                        **e["benign_by_class"].get(c, {"false_alerts": 0, "changes": 0})
                    )
                    for c in kinds
                )
                + " |"
                for n, e in benign.items()
            ),
        ]
    notes = {n: ev.event for n, ev in evals.items() if ev.event.get("notifications_per_incident") is not None}
    if notes:
        lines += [
            "",
            "## Notifications per incident",
            "",
            "Incidents on more than one instance, alerts grouped as Alertmanager groups them by the shared "
            "`upstream` label (group_wait 30s, group_interval 5m): firing notifications sent.",
            "",
            "| detector | mean | most |",
            "|---|---|---|",
            *(
                f"| {n} | {e['notifications_per_incident']:.2f} | {e['notifications_per_incident_max']} |"
                for n, e in notes.items()
            ),
        ]
    lines += ["", "## Data", "", *data_summary(data)]
    lines += [
        "",
        "## Plots",
        "",
        "![precision-recall](precision_recall.png)",
        "",
        f"![confusion]({'confusion_' + _slug(primary)}.png)",
        "",
    ]
    lines += [f"![{rec}](timeline_{_slug(rec)}.png)" for rec in recs]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "evaluation.json").write_text(
        json.dumps({name: ev.to_json() for name, ev in evals.items()}, indent=1, default=_json) + "\n", encoding="utf-8"
    )
    return out / "report.md"


def write_model_card(path: Path, det: Detector, evals: Mapping[str, Evaluation], data: Data, *, default: bool) -> None:
    meta = det.meta
    mine = {n: ev for n, ev in evals.items() if n == det.kind or n.startswith(det.kind + " ")}
    td = meta.training_data
    cal = meta.calibration
    lines = [
        f"# {meta.name}: {det.kind} {meta.version}" + (" (the default model)" if default else ""),
        "",
        f"Trained {meta.trained_at} with `{td.get('command') or 'detectord train'}`; "
        f"reproduce every number below with `detectord evaluate {path} data`.",
        "",
        "## What it is",
        "",
        _what(det),
        "",
        f"Windows of {meta.window} steps × {len(meta.features)} features ({', '.join(meta.features)}), "
        f"{meta.step_seconds:g} s a step. Inputs are scale-free per instance (detectord/ingest/normalise.py): "
        "each instance's features against its own recent median and spread, learned online while it warms "
        f"({meta.inputs['baseline']['min_buckets'] * meta.inputs['baseline']['bucket_steps']} steps), so a "
        "fleet's own level is its normal.",
        "",
        "## Data",
        "",
    ]
    lines += data_summary(data)
    fit = td.get("fit", {})
    lines += [
        "",
        f"Trained for {int(fit.get('epochs', 0))} epochs on {int(fit.get('train_windows', 0)):,} windows "
        f"(including {td.get('augmented_windows', 0):,} cut at other step phases from training blocks) in "
        f"{td.get('fit_seconds', 0):.0f} s.",
        "",
        "## Threshold",
        "",
        f"Raw threshold {meta.threshold:.4g}: {cal.get('margin')} × the lowest raw score at which the "
        f"{cal.get('normal_windows', 0):,} normal validation windows ({cal.get('instance_days', 0) * 24:.1f} "
        f"instance-hours) raise at most {cal.get('target_false_alerts_per_instance_day')} false alerts per "
        "instance-day. Scores are divided by it: above 1.0 is anomalous.",
        "",
        "## Results on the test data",
        "",
        rule_text(next(iter(evals.values()))),
        "",
    ]
    lines += side_by_side(mine)
    lines += ["", "Per class:", "", *per_class(mine)]
    lines += ["", "## Beside the comparisons and the other models", "", *side_by_side(evals)]
    lines += [
        "",
        "## Limits",
        "",
        "- Trained and tested on a lab fleet (real CoreDNS, real dnsperf load, scripted faults), not on "
        "production traffic; the unseen-load fleets test other rates and cache sizes, not other topologies.",
        "- Test data holds few incidents per seen class (see the per-class table): each is a handful of "
        "events, not a rate.",
        "- False alerts per instance-day rest on hours, not days, of normal test data.",
        "- An incident that lasts longer than about half the baseline horizon "
        f"({meta.inputs['baseline']['buckets'] * meta.inputs['baseline']['bucket_steps'] // 2} steps) becomes "
        "that instance's new normal.",
    ]
    (path / "MODEL_CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _what(det: Detector) -> str:
    cfg = det.config.to_dict()
    return {
        "conv_autoencoder": "A 1-D convolutional autoencoder, trained on normal windows only; the score is the "
        "reconstruction error of the newest rows (per-feature errors name what moved).",
        "conv_classifier": "A 1-D convolutional classifier with two heads: anomalous or not, and which incident "
        f"class it looks like ({', '.join(det.classes)}).",
        "siamese": "A siamese network trained with a contrastive loss on pairs of windows; a window is classed by "
        "its distances to the centroids of normal and incident windows in the learned space.",
    }.get(det.kind, det.kind) + f" {det.count_params():,} parameters; settings {json.dumps(cfg)}."


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s).strip("_")


def _json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON: {type(o)}")


def write_model_set_card(path: Path, results: Mapping[str, Mapping[str, Any]], *, command: str = "") -> None:
    """The model set's card: which detector serves each step, and how every detector and comparison
    does at each step (`results`: step name -> what `train_all` returned)."""
    best = {step: r["evaluations"][r["default"]] for step, r in results.items()}
    lines = [
        "# The default model set",
        "",
        f"One model per scrape interval, made by `{command or 'detectord train'}`. `detectord serve` picks the one "
        "whose step is `ingest.step` and refuses a step it has none for. Each directory is a model artifact with "
        "its own card; `detectord evaluate DIR data` reproduces its numbers.",
        "",
        "| step | detector | window | first score after a start (s) |",
        "|---|---|---|---|",
    ]
    for step, r in results.items():
        lines.append(f"| {step} | {r['default']} | {r['window']} steps | {r['first_score_s']:.0f} |")
    lines += ["", "## The default at each step, on the test data", ""]
    lines += side_by_side({f"{step}: {results[step]['default']}": ev for step, ev in best.items()})
    for step, r in results.items():
        lines += ["", f"## At {step}: every detector and comparison", ""]
        lines += side_by_side(r["evaluations"])
    lines += ["", rule_text(next(iter(best.values()))) if best else "", ""]
    path.mkdir(parents=True, exist_ok=True)
    (path / "MODEL_CARD.md").write_text("\n".join(lines))

"""Data sets: recordings with their ground truth → feature rows (the serve code path) → per-instance
baselines → labelled windows, split 70/15/15 by contiguous time blocks, with held-out classes.

A recording `NAME.drec[.xz]` comes with `NAME.truth.json` (written by the lab, see lab/runner.py):
its fault events, each with a class and the instances it affects. Engineers' labels (`Label`)
add spans to any recording: anomalous with a class, or normal. Every step of every instance gets
a label ("" normal, a class, or None for an incident's aftermath) and a role (train, validation,
test, or None where a window would straddle two roles).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from detectord.config import IngestConfig
from detectord.detectors.windowset import WindowSet
from detectord.ingest.features import FEATURE_NAMES, FeatureSeries, InstanceKey, extract
from detectord.ingest.liveness import CrashLoops
from detectord.ingest.normalise import BaselineSeries, InputPlan, baseline_series, windows_at
from detectord.ingest.remote_write import DecodedWrite, LabelCache
from detectord.recordings import truth
from detectord.recordings.format import ReadStats, read_writes
from detectord.recordings.truth import INSTANCE_LABELS, Truth, TruthError, recording_name, truth_of

Role = Literal["train", "validation", "test"]
ROLES: tuple[Role, ...] = ("train", "validation", "test")
SPLIT = {"train": 0.70, "validation": 0.15, "test": 0.15}
# After an incident ends, a server takes a while to look normal again (forward marks its upstream
# healthy, caches refill after the restart or reload that ended it): steps in this span are
# neither normal nor anomalous.
RECOVERY_S = 120.0
# Classes no supervised model trains or validates on: they test generalisation to incidents
# never seen before (the 2020 proposal's test).
DEFAULT_HELDOUT = ("upstream_packet_loss", "cpu_starvation", "random_subdomain_flood")


class DatasetError(ValueError):
    """A recording, truth file or label that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Span:
    """A labelled stretch of one instance: an incident (cls = its class) or normal (cls = "")."""

    instance: InstanceKey
    start_ms: int
    end_ms: int
    cls: str
    event: str  # "DATASET#ID" for a lab event, "label:N" for an engineer's label
    severity: str = ""
    # False for an instance an incident moves without being its subject (an upstream whose edge is
    # flooded sees the flood too): its steps then are not judged, as neither normal nor anomalous.
    judged: bool = True
    # A benign change (a reload, a restart, traffic growth): normal, with its aftermath, and its
    # steps carry its event id ("benign:…") so alerts on them are counted apart.
    benign: bool = False

    @property
    def labelled(self) -> bool:
        """An engineer's label, not the recording's own truth."""
        return self.event.startswith("label:")


@dataclass(frozen=True)
class Label:
    """An engineer's verdict on a stretch of one instance (retraining from labels)."""

    dataset: str  # the recording's name (file name without .drec[.xz]); "*" for any
    instance: InstanceKey
    start_ms: int
    end_ms: int
    anomalous: bool
    cls: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Label:
        known = {"dataset", "labels", "start", "end", "verdict", "class"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DatasetError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        for k in ("labels", "start", "end", "verdict"):
            if k not in d:
                raise DatasetError(f"{where}.{k}: is required")
        verdict = d["verdict"]
        if verdict not in ("anomaly", "normal"):
            raise DatasetError(f"{where}.verdict: must be 'anomaly' or 'normal', got {verdict!r}")
        labels = d["labels"]
        if not isinstance(labels, dict) or not all(k in labels for k in INSTANCE_LABELS):
            raise DatasetError(f"{where}.labels: must give {', '.join(INSTANCE_LABELS)}")
        start, end = _time_ms(d["start"], f"{where}.start"), _time_ms(d["end"], f"{where}.end")
        if end <= start:
            raise DatasetError(f"{where}: end must be after start")
        klass = str(d.get("class", "") or "")
        if verdict == "anomaly" and not klass:
            klass = "labelled_anomaly"
        return cls(
            str(d.get("dataset", "*")),
            tuple(str(labels[k]) for k in INSTANCE_LABELS),
            start,
            end,
            verdict == "anomaly",
            klass if verdict == "anomaly" else "",
        )


def load_labels(path: Path | str) -> list[Label]:
    """A labels file: YAML or JSON, a list of {dataset, labels: {job, instance}, start, end,
    verdict: anomaly|normal, class}; times as RFC 3339 or Unix milliseconds."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read labels: {exc}") from None
    if isinstance(raw, dict) and "labels" in raw and isinstance(raw["labels"], list):
        raw = raw["labels"]
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: a labels file holds a list of labelled spans")
    return [Label.from_dict(d, f"{path.name}[{i}]") for i, d in enumerate(raw)]


def _time_ms(v: Any, where: str) -> int:
    if isinstance(v, bool):
        raise DatasetError(f"{where}: not a time: {v!r}")
    if isinstance(v, (int, float)):
        return int(v)
    import datetime as dt

    if isinstance(v, dt.datetime):
        return int(v.timestamp() * 1000)
    try:
        return int(dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise DatasetError(f"{where}: not a time (RFC 3339 or Unix ms): {v!r}") from None


@dataclass
class Recording:
    """One recording, through features and baselines, with its labelled spans."""

    name: str
    path: Path
    step_s: float
    inputs: InputPlan
    series: dict[InstanceKey, BaselineSeries]
    spans: list[Span]
    lanes: dict[InstanceKey, str]  # instances that share a fault domain (an upstream and its edges)
    test_only: bool  # the truth says so (a lab scenario's `test_only`): every window is test data
    read: ReadStats
    truth: Truth


def find_recordings(paths: Iterable[Path | str]) -> list[Path]:
    try:
        return truth.find_recordings(paths)
    except FileNotFoundError as exc:
        raise DatasetError(str(exc)) from None


def shift_writes(writes: Iterator[DecodedWrite], offset_ms: int) -> Iterator[DecodedWrite]:
    """The writes with every timestamp moved by `offset_ms` (a step grid at another phase)."""
    for w in writes:
        if offset_ms:
            w.timestamps = [t + offset_ms for t in w.timestamps]
        yield w


def read_recording(
    path: Path | str,
    *,
    step_s: float,
    inputs: InputPlan,
    phase_s: float = 0.0,
    labels: Sequence[Label] = (),
    allow_invalid: bool = False,
) -> Recording:
    """A recording's feature rows and baselines per instance, and its spans.

    `phase_s` shifts the step grid (training augmentation: the same traffic cut into steps at
    another phase); 0 is the grid `serve` uses. A lab run whose own health check found its healthy
    periods unhealthy is refused unless `allow_invalid`: its "normal" would teach and judge
    models on broken traffic."""
    path = Path(path)
    name = recording_name(path)
    try:
        tr = truth_of(path) or Truth()
    except TruthError as exc:
        raise DatasetError(str(exc)) from None
    if tr.health is not None and not tr.health.get("valid", True) and not allow_invalid:
        reasons = "; ".join(tr.health.get("reasons") or ["no reason given"])
        raise DatasetError(
            f"{path}: the lab run's healthy periods were not healthy ({reasons}); re-record it on a "
            "machine the run has to itself, or pass --allow-invalid-runs to use it anyway"
        )
    stats = ReadStats()
    offset = round(phase_s * 1000)
    writes = shift_writes((w for _, w in read_writes(path, LabelCache(), read_stats=stats)), offset)
    feats: dict[InstanceKey, FeatureSeries] = extract(writes, round(step_s * 1000), INSTANCE_LABELS)
    series = {}
    for key, fs in sorted(feats.items()):
        if offset:
            fs.timestamps_ms = fs.timestamps_ms - offset
        series[key] = baseline_series(fs, inputs, step_s)
    spans = _judge_upstreams(_truth_spans(name, tr), series, inputs) + [
        Span(lb.instance, lb.start_ms, lb.end_ms, lb.cls, f"label:{i}")
        for i, lb in enumerate(labels)
        if lb.dataset in ("*", name)
    ]
    if tr.ended_ms:
        # A lab run stops its load at `ended_ms` and records a few more scrapes: not traffic to judge.
        spans += [Span(key, int(tr.ended_ms), 2**62, "", "", judged=False) for key in series]
    lanes = {inst.key: inst.upstream or inst.instance for inst in tr.instances}
    for key in series:
        lanes.setdefault(key, key[-1])
    return Recording(name, path, step_s, inputs, series, spans, lanes, tr.test_only, stats, tr)


# An upstream of an edge an incident hits is judged by what its own metrics did against the two
# minutes before, each feature in its model transform and in units of its floor (the smallest
# spread the feature table allows it, whatever the instance): part of the incident when the median
# of some feature moved by `UPSTREAM_MOVED` floors (a flooded edge's misses, forward's retries
# and health checks, which an upstream answers REFUSED), normal when nothing did, and left
# unjudged when only some steps' query rate moved (a crash loop's bursts).
UPSTREAM_MOVED = 4.0
_RATE = FEATURE_NAMES.index("request_rate")
_BURST = float(np.log(1.25))


def _judge_upstreams(spans: list[Span], series: Mapping[InstanceKey, BaselineSeries], inputs: InputPlan) -> list[Span]:
    """Every instance is judged where the recording can say: an upstream the truth does not name,
    beside an edge it names, becomes part of the incident if its metrics moved and normal if they
    did not (see UPSTREAM_MOVED). The truth says which instances a fault acts on; what it moves
    further up is measured in the recording."""
    incident = {sp.event: sp for sp in spans if sp.cls and sp.judged}
    floor = np.array([spec.floor for spec in inputs.specs], dtype=np.float64)
    out = []
    for sp in spans:
        bs = series.get(sp.instance)
        ev = incident.get(sp.event)
        if sp.judged or ev is None or bs is None:
            out.append(sp)
            continue
        ts = bs.timestamps_ms
        before, during = (ts >= sp.start_ms - 120_000) & (ts < sp.start_ms), (ts > sp.start_ms) & (ts <= sp.end_ms)
        if not before.any() or not during.any():
            out.append(sp)  # nothing to measure: left unjudged
            continue
        x0 = np.median(bs.x[before], axis=0)
        moved = np.abs(np.median(bs.x[during], axis=0) - x0) / floor
        rate0 = float(np.median(bs.raw[before, _RATE]))
        bursts = np.abs(np.log((bs.raw[during, _RATE] + 1e-3) / (rate0 + 1e-3)))
        if float(moved.max()) >= UPSTREAM_MOVED:
            out.append(Span(sp.instance, sp.start_ms, sp.end_ms, ev.cls, sp.event, ev.severity))
        elif float(np.quantile(bursts, 0.9)) >= _BURST:
            out.append(sp)  # some steps' traffic moved, most did not: left unjudged
    return out


def benign_class(event_id: str) -> str | None:
    """The class of a benign change's event id ("benign:CLASS@RECORDING#ID"); None for others."""
    if not event_id.startswith("benign:"):
        return None
    return event_id[len("benign:") :].split("@", 1)[0]


def _truth_spans(name: str, tr: Truth) -> list[Span]:
    """The incidents on their instances, and unjudged spans on the upstreams of affected edges
    (`_judge_upstreams` judges them)."""
    spans = []
    for ev in tr.events:
        if ev.start_ms is None or ev.end_ms is None:
            continue
        start, end, eid = int(ev.start_ms), int(ev.end_ms), f"{name}#{ev.id}"
        if ev.benign:
            for inst in ev.instances:
                key = tuple(inst.get(k, "") for k in INSTANCE_LABELS)
                spans.append(Span(key, start, end, "", f"benign:{ev.cls}@{eid}", ev.severity, benign=True))
            continue
        affected = {inst.get("instance") for inst in ev.instances}
        for inst in ev.instances:
            key = tuple(inst.get(k, "") for k in INSTANCE_LABELS)
            spans.append(Span(key, start, end, ev.cls, eid, ev.severity))
            edge = tr.instance(inst.get("instance", ""))
            up = tr.instance(edge.upstream) if edge is not None and edge.upstream else None
            if up is not None and up.instance not in affected:
                spans.append(Span(up.key, start, end, "", eid, judged=False))
    return spans


# ---- labels and roles per step -------------------------------------------------------------------


def step_labels(
    ts: np.ndarray, step_ms: int, spans: Sequence[Span], recovery_s: float = RECOVERY_S
) -> tuple[np.ndarray, np.ndarray]:
    """Per step: its label ("" normal, a class, None recovering) and the event it belongs to ("" none).

    A step (T - step, T] belongs to an incident it overlaps; the `recovery_s` after an incident
    are unlabelled. A span labelled normal by an engineer overrides lab truth where they overlap."""
    label = np.full(len(ts), "", dtype=object)
    event = np.full(len(ts), "", dtype=object)
    starts = ts - step_ms
    for sp in sorted(spans, key=lambda s: (s.judged, not s.benign, s.cls == "")):
        inside = (ts > sp.start_ms) & (starts < sp.end_ms)
        if sp.benign:
            # Normal, aftermath included (caches refill after a restart); incidents may override it.
            event[(ts > sp.start_ms) & (starts < sp.end_ms + recovery_s * 1000) & (event == "")] = sp.event
        elif not sp.judged:
            label[(ts > sp.start_ms) & (starts < sp.end_ms + recovery_s * 1000)] = None
        elif sp.cls:
            after = (starts >= sp.end_ms) & (ts <= sp.end_ms + recovery_s * 1000) & (label == "")
            label[after] = None
            label[inside] = sp.cls
            event[inside] = sp.event
        else:
            label[inside] = ""
            event[inside] = ""
    return label, event


@dataclass
class Block:
    recording: str
    lane: str
    start_ms: int
    end_ms: int
    classes: frozenset[str]
    steps: int
    role: Role = "train"


def _blocks(rec: Recording, normal_block_s: float) -> list[Block]:
    """Contiguous time blocks per lane: a run with incidents in two halves, a normal run in
    `normal_block_s` pieces."""
    out = []
    by_lane: dict[str, list[InstanceKey]] = {}
    for key in rec.series:
        by_lane.setdefault(rec.lanes[key], []).append(key)
    for lane, keys in sorted(by_lane.items()):
        t0 = min(int(rec.series[k].timestamps_ms[0]) for k in keys)
        t1 = max(int(rec.series[k].timestamps_ms[-1]) for k in keys) + 1
        spans = [s for s in rec.spans if s.instance in keys and s.cls and not s.labelled]
        if spans:
            cuts = [t0, (t0 + t1) // 2, t1]
        else:
            n = max(1, round((t1 - t0) / 1000 / normal_block_s))
            cuts = [t0 + (t1 - t0) * i // n for i in range(n + 1)]
        for a, b in itertools.pairwise(cuts):
            classes = frozenset(s.cls for s in spans if a <= s.start_ms < b)
            steps = sum(
                int(((rec.series[k].timestamps_ms >= a) & (rec.series[k].timestamps_ms < b)).sum()) for k in keys
            )
            out.append(Block(rec.name, lane, a, b, classes, steps))
    return out


def assign_roles(blocks: list[Block], seen: set[str], seed: int, tries: int = 4000) -> None:
    """Give blocks roles so the steps split 70/15/15 and every seen class is in each split if it can
    be (in training above all)."""
    rng = np.random.default_rng(seed)
    total = sum(b.steps for b in blocks) or 1
    best: tuple[float, list[int]] | None = None
    for _ in range(tries):
        roles = rng.choice(3, size=len(blocks), p=[SPLIT[r] for r in ROLES])
        frac = [sum(b.steps for b, r in zip(blocks, roles, strict=True) if r == i) / total for i in range(3)]
        cost = sum(abs(f - SPLIT[r]) for f, r in zip(frac, ROLES, strict=True))
        for i, weight in ((0, 0.2), (1, 0.05), (2, 0.05)):
            covered = set().union(*(b.classes for b, r in zip(blocks, roles, strict=True) if r == i))
            cost += weight * len(seen - covered)
        if best is None or cost < best[0]:
            best = (cost, roles.tolist())
    assert best is not None
    for b, r in zip(blocks, best[1], strict=True):
        b.role = ROLES[r]


# ---- windows -------------------------------------------------------------------------------------


@dataclass
class SeriesInfo:
    """One instance of one recording, step by step: what evaluation needs beside the scores."""

    name: str  # "RECORDING/job/instance"
    recording: str
    instance: InstanceKey
    timestamps_ms: np.ndarray
    label: np.ndarray  # per step, see step_labels
    event: np.ndarray  # per step: the event id it belongs to, "" none
    role: np.ndarray  # per step: "train" | "validation" | "test" | None (a window there straddles roles)
    scored: np.ndarray  # per step: a window ends here (warm baseline, full window, no restart inside)
    # Per step: its scrapes failed (`up == 0`), or it is in a crash loop (on scored steps); serving
    # alerts there whatever the score.
    down: np.ndarray | None = None


@dataclass
class Data:
    """Every window of every recording, by role, and the per-step truth for evaluation."""

    all: WindowSet
    role: np.ndarray  # object (N,) per window
    series: list[SeriesInfo]
    events: dict[str, dict[str, Any]]  # event id -> {class, severity, recording, instances, start_ms, end_ms}
    heldout: tuple[str, ...]
    seen: tuple[str, ...]
    recordings: list[Recording] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    def baseline_series(self) -> dict[str, BaselineSeries]:
        """Every instance's transformed rows and baselines, by series name."""
        return {"/".join((r.name, *k)): bs for r in self.recordings for k, bs in r.series.items()}

    def _role(self, role: Role, *, supervised_view: bool = True) -> WindowSet:
        mask = self.role == role
        if supervised_view and role != "test":
            # Held-out classes never reach training or validation.
            mask &= np.array([lb not in self.heldout for lb in self.all.label], dtype=bool)
        return self.all.subset(mask & np.array([lb is not None for lb in self.all.label], dtype=bool))

    @property
    def train(self) -> WindowSet:
        return self._role("train")

    @property
    def validation(self) -> WindowSet:
        return self._role("validation")

    @property
    def test(self) -> WindowSet:
        return self._role("test")


def load_datasets(
    paths: Iterable[Path | str],
    *,
    window: int,
    step_s: float,
    inputs: InputPlan | None = None,
    heldout: Sequence[str] = DEFAULT_HELDOUT,
    labels: Sequence[Label] = (),
    seed: int = 0,
    normal_block_s: float = 1200.0,
    recovery_s: float = RECOVERY_S,
    log: Any = None,
    allow_invalid: bool = False,
) -> Data:
    """Recordings (files or directories) → labelled, split windows; see the module docstring."""
    inputs = inputs or InputPlan.default(FEATURE_NAMES)
    recs = [
        read_recording(p, step_s=step_s, inputs=inputs, labels=labels, allow_invalid=allow_invalid)
        for p in find_recordings(paths)
    ]
    if log:
        for r in recs:
            log(
                f"  {r.name}: {len(r.series)} instances, {sum(len(s.x) for s in r.series.values()):,} steps, "
                f"{len({s.event for s in r.spans if s.cls})} incidents{' (test only)' if r.test_only else ''}"
            )
    return build_data(
        recs, window=window, heldout=heldout, seed=seed, normal_block_s=normal_block_s, recovery_s=recovery_s
    )


def build_data(
    recs: Sequence[Recording],
    *,
    window: int,
    heldout: Sequence[str] = DEFAULT_HELDOUT,
    seed: int = 0,
    normal_block_s: float = 1200.0,
    recovery_s: float = RECOVERY_S,
) -> Data:
    heldout = tuple(heldout)
    all_classes = sorted({s.cls for r in recs for s in r.spans if s.cls})
    seen = tuple(c for c in all_classes if c not in heldout)
    blocks = [b for r in recs if not r.test_only for b in _blocks(r, normal_block_s)]
    assign_roles(blocks, {s.cls for r in recs for s in r.spans if s.cls and not s.labelled} - set(heldout), seed)
    if len({r.inputs for r in recs}) > 1 or len({r.step_s for r in recs}) > 1:
        raise DatasetError("recordings must share one step and one input plan")
    sets: list[WindowSet] = []
    roles: list[np.ndarray] = []
    infos: list[SeriesInfo] = []
    events: dict[str, dict[str, Any]] = {}
    for r in recs:
        step_ms = round(r.step_s * 1000)
        for sp in r.spans:
            if not sp.cls:
                continue
            ev = events.setdefault(
                sp.event,
                {
                    "class": sp.cls,
                    "severity": sp.severity,
                    "recording": r.name,
                    "start_ms": sp.start_ms,
                    "end_ms": sp.end_ms,
                    "instances": [],
                },
            )
            ev["instances"].append("/".join((r.name, *sp.instance)))
        for key, bs in r.series.items():
            name = "/".join((r.name, *key))
            ts = bs.timestamps_ms
            spans = [s for s in r.spans if s.instance == key]
            label, event = step_labels(ts, step_ms, spans, recovery_s)
            role = np.full(len(ts), None, dtype=object)
            if r.test_only:
                role[:] = "validation" if r.lanes[key] in r.truth.validation_lanes else "test"
            else:
                for b in blocks:
                    if b.recording == r.name and b.lane == r.lanes[key]:
                        role[(ts >= b.start_ms) & (ts < b.end_ms)] = b.role
            for sp in spans:
                first = int(np.searchsorted(ts, sp.start_ms, side="right"))
                last = int(np.searchsorted(ts, sp.end_ms + (recovery_s * 1000 if sp.cls else 0), side="right"))
                if sp.labelled:
                    # An engineer's verdicts: incidents teach the supervised models, false alarms
                    # called normal raise the threshold (calibrated on validation data).
                    role[max(0, first - window + 1) : last] = "train" if sp.cls else "validation"
                elif sp.cls in heldout:
                    # A held-out incident is test data wherever it happened, with the window before it.
                    role[max(0, first - window + 1) : last] = "test"
            ends = _window_ends(bs, r.inputs.rows_needed(window))
            scored = np.zeros(len(ts), dtype=bool)
            scored[ends] = True
            # A window keeps its end step's role only if every step in it has that role.
            win_role = np.array(
                [role[e] if all(role[max(0, e - window + 1) : e + 1] == role[e]) else None for e in ends], dtype=object
            )
            win_label, clean = _window_labels(label, ends, window)
            x = windows_at(bs, ends, window, r.inputs)
            sid = len(infos)
            infos.append(
                SeriesInfo(
                    name,
                    r.name,
                    key,
                    ts,
                    label,
                    event,
                    _step_roles(role, ends, win_role, len(ts)),
                    scored,
                    _down_steps(ts, bs.up_ms, bs.up, IngestConfig.failed_scrapes)
                    | (_crash_loop_steps(key, ts, bs.process_restarts) & scored),
                )
            )
            sets.append(WindowSet(x, win_label, np.full(len(ends), sid, dtype=np.int64), ts[ends], [], r.step_s, clean))
            roles.append(win_role)
    names = [i.name for i in infos]
    for s in sets:
        s.series = names
    nf = recs[0].series[next(iter(recs[0].series))].x.shape[1] if recs and recs[0].series else len(FEATURE_NAMES)
    empty = WindowSet(
        np.zeros((0, window, nf), np.float32),
        np.zeros(0, dtype=object),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        names,
        recs[0].step_s if recs else 1.0,
    )
    all_ = WindowSet.concat(sets) if sets else empty
    role_all = np.concatenate(roles) if roles else np.zeros(0, dtype=object)
    data = Data(all_, role_all, infos, events, heldout, seen, list(recs))
    data.description = describe(recs, data, blocks, window=window, seed=seed, recovery_s=recovery_s)
    return data


def _down_steps(ts: np.ndarray, up_ms: np.ndarray, up: np.ndarray, failed_scrapes: int) -> np.ndarray:
    """Per step (T - step, T]: serving's liveness calls the instance down there. A Prometheus that
    scrapes once a step sees the step's last `up` sample (a recording at a finer scrape is cut as
    the features are); down from the `failed_scrapes`-th consecutive step whose scrape failed.
    A step without an `up` sample neither counts nor breaks a run."""
    down = np.zeros(len(ts), dtype=bool)
    if not len(ts) or not len(up_ms):
        return down
    idx = np.searchsorted(ts, up_ms, side="left")
    keep = idx < len(ts)
    idx, up = idx[keep], up[keep]
    # The last sample of each step: where the step index changes next.
    last = np.flatnonzero(np.append(idx[1:] != idx[:-1], True)) if len(idx) else idx
    run = 0
    for i in last:
        run = run + 1 if up[i] == 0.0 else 0
        down[idx[i]] = run >= failed_scrapes
    return down


def _crash_loop_steps(key: InstanceKey, ts: np.ndarray, process_restarts: Sequence[int]) -> np.ndarray:
    """Per row: serving's crash-loop alert (`CrashLoops`, stepped with every row) holds there."""
    loops = CrashLoops(IngestConfig.crash_loop_restarts, float(IngestConfig.crash_loop_within))
    restarted = set(process_restarts)
    return np.array([loops.step(key, int(t), i in restarted) is not None for i, t in enumerate(ts)], dtype=bool)


def _window_ends(bs: BaselineSeries, rows: int) -> np.ndarray:
    """Rows where `serve` scores a window: the baseline is warm and at least `rows` rows have come
    since the series' start or latest restart (`InputPlan.rows_needed`)."""
    n = len(bs.x)
    ok = bs.ready.copy()
    ok[: rows - 1] = False
    for r in bs.restarts:
        ok[r : min(n, r + rows - 1)] = False
    return np.flatnonzero(ok)


def _window_labels(label: np.ndarray, ends: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each window's label (its end step's: what an alert at that step would be judged by) and
    whether the whole window is free of incidents and their aftermath."""
    out: np.ndarray = label[ends].copy()
    normal = np.array([lb == "" for lb in label], dtype=bool)
    dirty = np.concatenate([[0], np.cumsum(~normal)])
    clean = dirty[ends + 1] - dirty[np.maximum(0, ends - window + 1)] == 0
    return out, clean


def _step_roles(role: np.ndarray, ends: np.ndarray, win_role: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    out[ends] = win_role
    return out


def describe(
    recs: Sequence[Recording],
    data: Data,
    blocks: Sequence[Block],
    *,
    window: int,
    seed: int,
    recovery_s: float = RECOVERY_S,
) -> dict[str, Any]:
    """What a model card says about the data: sources, split, held-out classes, counts."""
    counts: dict[str, dict[str, int]] = {}
    for role in ROLES:
        m = data.role == role
        lab = data.all.label[m]
        counts[role] = {
            "windows": int(m.sum()),
            "normal": int(sum(1 for x in lab if x == "")),
            "anomalous": int(sum(1 for x in lab if x)),
            "incidents": len({e for i in data.series for e in i.event[i.role == role] if e}),
        }
    return {
        "recordings": [
            {
                "name": r.name,
                "file": r.path.name,
                "instances": len(r.series),
                "steps": int(sum(len(s.x) for s in r.series.values())),
                "incidents": len({s.event for s in r.spans if s.cls}),
                "test_only": r.test_only,
                "validation_lanes": list(r.truth.validation_lanes),
            }
            for r in recs
        ],
        "step_seconds": recs[0].step_s if recs else None,
        "window": window,
        "split_seed": seed,
        "split": {
            "method": "contiguous time blocks per fault domain (an upstream and its edges); fault runs "
            "in halves, normal runs in 20-minute blocks; windows straddling two roles dropped",
            "target": SPLIT,
            "blocks": [
                {"recording": b.recording, "lane": b.lane, "role": b.role, "classes": sorted(b.classes)} for b in blocks
            ],
        },
        "heldout_classes": list(data.heldout),
        "seen_classes": list(data.seen),
        "counts": counts,
        "recovery_seconds": recovery_s,
    }


def phase_windows(
    paths: Iterable[Path | str],
    data: Data,
    *,
    window: int,
    step_s: float,
    inputs: InputPlan,
    phases: Sequence[float],
    labels: Sequence[Label] = (),
    allow_invalid: bool = False,
) -> WindowSet:
    """More training windows: the training blocks' traffic cut into steps at other phases.

    Each window keeps the role and label its end time has in `data` (the phase-0 cut)."""
    extra = []
    by_name = {i.name: i for i in data.series}
    for p in find_recordings(paths):
        for ph in phases:
            rec = read_recording(
                p, step_s=step_s, inputs=inputs, phase_s=ph, labels=labels, allow_invalid=allow_invalid
            )
            if rec.test_only:
                continue
            step_ms = round(step_s * 1000)
            for key, bs in rec.series.items():
                info = by_name.get("/".join((rec.name, *key)))
                if info is None:
                    continue
                ends = _window_ends(bs, inputs.rows_needed(window))
                # The phase-0 step each of these steps falls in.
                idx = np.clip(np.searchsorted(info.timestamps_ms, bs.timestamps_ms), 0, len(info.timestamps_ms) - 1)
                label, _ = step_labels(bs.timestamps_ms, step_ms, [s for s in rec.spans if s.instance == key])
                train_ok = np.array([info.role[j] == "train" for j in idx], dtype=bool)
                # Every step of the window inside training blocks.
                okc = np.concatenate([[0], np.cumsum(~train_ok)])
                keep = np.array([okc[e + 1] - okc[max(0, e - window + 1)] == 0 for e in ends], dtype=bool)
                ends = ends[keep]
                if not len(ends):
                    continue
                wl, clean = _window_labels(label, ends, window)
                extra.append(
                    WindowSet(
                        windows_at(bs, ends, window, inputs),
                        wl,
                        np.zeros(len(ends), np.int64),
                        bs.timestamps_ms[ends],
                        [info.name],
                        step_s,
                        clean,
                    )
                )
    return WindowSet.concat(extra) if extra else data.train.subset(np.zeros(len(data.train), dtype=bool))

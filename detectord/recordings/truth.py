"""The ground truth beside a recording, `NAME.truth.json`: what ran (scenario, instances and their
roles) and every fault (class, severity, the instances it affects, when). The lab writes it
(lab/runner.py); data sets read it (offline/dataset.py). Also where recordings are found.

Keys a reader does not know are kept, so an older detectord does not lose what a newer lab wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RECORDING_SUFFIXES = (".drec.xz", ".drec")
TRUTH_SUFFIX = ".truth.json"
INSTANCE_LABELS = ("job", "instance")


class TruthError(ValueError):
    """A truth file that cannot be read; the message names the file and the key."""


@dataclass
class TruthInstance:
    """One server of the run."""

    job: str
    instance: str
    role: str = ""  # "edge" or "upstream" in the lab
    upstream: str | None = None  # an edge's upstream (its `instance`)
    relay: dict[str, Any] | None = None  # an edge's relay counts: queries, answers, dropped, failed

    @property
    def key(self) -> tuple[str, ...]:
        return (self.job, self.instance)


@dataclass
class TruthEvent:
    """One fault: an incident of `cls` on `instances` (label sets) from `start_ms` to `end_ms`."""

    id: int
    cls: str
    severity: str = ""
    start_ms: int | None = None  # None: it never began (see `error`)
    end_ms: int | None = None
    instances: list[dict[str, str]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # What happened while it lasted, as it happened: a crashed server's {"instance", "down_ms"} and
    # {"instance", "up_ms"} (when it answered again).
    marks: list[dict[str, Any]] = field(default_factory=list)
    # A change operators make every day, not an incident: its instances are normal throughout.
    benign: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("cls")
        if out["error"] is None:
            del out["error"]
        if not out["benign"]:
            del out["benign"]
        return {"id": out.pop("id"), "class": out.pop("class"), **out}


@dataclass
class Truth:
    scenario: str = ""
    description: str = ""
    test_only: bool = False  # no model trains or calibrates on it: every window is test data
    # Of a test-only run, the lanes (an upstream and its edges) held for validation instead:
    # thresholds are calibrated and the default picked on them too; never trained on, never test.
    validation_lanes: list[str] = field(default_factory=list)
    source: str | None = None  # the scenario file
    recording: str = ""
    started_ms: int = 0
    ended_ms: int = 0  # the load stopped here; later scrapes are not traffic to judge
    interrupted: bool = False
    step_seconds: float = 1.0
    instance_labels: list[str] = field(default_factory=lambda: list(INSTANCE_LABELS))
    instances: list[TruthInstance] = field(default_factory=list)
    events: list[TruthEvent] = field(default_factory=list)
    # The lab's verdict on its healthy periods (lab/health.py): {"valid": bool, "reasons": [...], ...};
    # None for a run that was not checked (made before the check existed, or not by the lab).
    health: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this detectord does not know

    def instance(self, name: str) -> TruthInstance | None:
        return next((i for i in self.instances if i.instance == name), None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("instances", "events", "extra"):
                continue
            out[f.name] = getattr(self, f.name)
        out["instances"] = [{k: v for k, v in asdict(i).items() if v is not None} for i in self.instances]
        out["events"] = [e.to_json() for e in self.events]
        return {**out, **self.extra}

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, raw: Any, where: str = "truth") -> Truth:
        if not isinstance(raw, dict):
            raise TruthError(f"{where}: a truth file holds a JSON object")
        known = {f.name for f in fields(cls)} - {"instances", "events", "extra"}
        try:
            t = cls(
                **{k: v for k, v in raw.items() if k in known},
                extra={k: v for k, v in raw.items() if k not in known | {"instances", "events"}},
            )
            t.instances = [
                TruthInstance(**{k: v for k, v in i.items() if k in _INSTANCE_KEYS}) for i in raw.get("instances", [])
            ]
            t.events = [
                TruthEvent(int(e["id"]), str(e["class"]), **{k: v for k, v in e.items() if k in _EVENT_KEYS})
                for e in raw.get("events", [])
            ]
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise TruthError(f"{where}: malformed ({exc.__class__.__name__}: {exc})") from None
        return t


_INSTANCE_KEYS = {f.name for f in fields(TruthInstance)}
_EVENT_KEYS = {f.name for f in fields(TruthEvent)} - {"id", "cls"}


def read_truth(path: Path) -> Truth:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TruthError(f"{path}: cannot read: {exc}") from None
    return Truth.from_json(raw, str(path))


def recording_name(path: Path) -> str:
    for suf in RECORDING_SUFFIXES:
        if path.name.endswith(suf):
            return path.name[: -len(suf)]
    return path.stem


def truth_path(recording: Path) -> Path:
    return recording.with_name(recording_name(recording) + TRUTH_SUFFIX)


def truth_of(recording: Path) -> Truth | None:
    """The truth beside `recording`, or None where it has none (a production recording)."""
    tp = truth_path(recording)
    return read_truth(tp) if tp.exists() else None


def find_recordings(paths: Iterable[Path | str]) -> list[Path]:
    """Recordings named by `paths`: files, or directories holding NAME.drec[.xz] files."""
    paths = list(paths)
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if any(q.name.endswith(s) for s in RECORDING_SUFFIXES)))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such recording or directory")
    if not out:
        raise FileNotFoundError(f"no recordings (NAME.drec or NAME.drec.xz) in {', '.join(map(str, paths))}")
    return out

"""Model sets: a directory of artifacts, one per scrape interval (`5s/`, `15s/`, `1m/` …), and the
choice of the one a daemon runs at its `ingest.step`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detectord.detectors.artifact import META_FILE, ArtifactError, ArtifactMissing

# With a model set and no `ingest.step`: Prometheus's default scrape_interval. A step that is a
# multiple of the real scrape interval is always safe (each step takes the scrape at its end).
DEFAULT_SET_STEP_S = 60.0


class StepNotCovered(ArtifactError):
    def __init__(self, path: Path | str, step_s: float, steps: list[float]) -> None:
        self.step_s = step_s
        self.steps = steps
        super().__init__(
            path,
            f"no model here is made for {fmt_step(step_s)} steps; it has "
            f"{', '.join(fmt_step(s) for s in steps)}. Set ingest.step to one of them (a multiple of "
            "your scrape_interval works: each step then takes the scrape at its end), or set "
            "model.any_step: true to run the nearest one anyway",
        )


def fmt_step(step_s: float) -> str:
    if step_s >= 60 and step_s % 60 == 0:
        return f"{int(step_s // 60)}m"
    return f"{step_s:g}s"


def is_artifact(path: Path) -> bool:
    return (path / META_FILE).is_file()


def model_set(path: Path) -> dict[float, Path] | None:
    """step (s) -> artifact directory, for a model set; None when `path` is one artifact."""
    if is_artifact(path):
        return None
    if not path.is_dir():
        raise ArtifactMissing(path, "no such directory")
    steps: dict[float, Path] = {}
    for sub in sorted(p for p in path.iterdir() if is_artifact(p)):
        try:
            step = float(json.loads((sub / META_FILE).read_text())["step_seconds"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(sub, f"{META_FILE}: cannot read its step: {exc}") from None
        if step in steps:
            raise ArtifactError(path, f"two models for {fmt_step(step)} steps: {steps[step].name}, {sub.name}")
        steps[step] = sub
    if not steps:
        raise ArtifactError(
            path, f"neither a model artifact (no {META_FILE}) nor a set of them (subdirectories, one per step)"
        )
    return dict(sorted(steps.items()))


def pick(path: Path, step_s: float | None, *, any_step: bool = False) -> Path:
    """The artifact to run at `step_s` (None: the artifact's own step, or a set's 1m model): `path`
    itself, or the member of the set made for that step. A set without one is refused, unless
    `any_step` (then the nearest step's model)."""
    members = model_set(path)
    if members is None:
        return path
    return _nearest(path, members, step_s, any_step)


def check_step(path: Path, model_step_s: float, step_s: float | None, *, any_step: bool = False) -> None:
    """A single artifact runs at its own step only, unless `any_step`."""
    if step_s is not None and not any_step and not math.isclose(model_step_s, step_s, rel_tol=1e-9):
        raise StepNotCovered(path, step_s, [model_step_s])


def _nearest(path: Path, members: dict[float, Path], step_s: float | None, any_step: bool) -> Path:
    want = DEFAULT_SET_STEP_S if step_s is None else step_s
    for s, p in members.items():
        if math.isclose(s, want, rel_tol=1e-9):
            return p
    if not any_step:
        raise StepNotCovered(path, want, list(members))
    return members[min(members, key=lambda s: abs(math.log(s / want)))]

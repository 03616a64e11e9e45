"""Small slices of the committed lab data sets (data/), for tests that train real models quickly."""

from __future__ import annotations

import json
import os
from pathlib import Path

from detectord.recordings.truth import read_truth, truth_path
from detectord.recordings.format import RecordingWriter, read_records

REPO = Path(__file__).resolve().parents[1]
# Tests may be pointed at other recordings (NAME.drec[.xz] beside NAME.truth.json).
DATA = Path(os.environ.get("DETECTORD_TEST_DATA", REPO / "data"))


def slice_recording(src: Path, dst: Path, minutes: float, skip_minutes: float = 0.0) -> Path:
    """The records of `src` that arrived in [skip, skip + minutes) after its first, and its truth
    file with the events that start in that span."""
    truth = read_truth(truth_path(src))
    start = None
    with RecordingWriter(dst) as w:
        for rec in read_records(src):
            start = start if start is not None else rec.arrival_ns
            t = (rec.arrival_ns - start) / 60e9
            if t < skip_minutes:
                continue
            if t >= skip_minutes + minutes:
                break
            w.append(rec.body, rec.version, rec.arrival_ns)
    assert start is not None
    lo = start // 1_000_000 + int(skip_minutes * 60_000)
    hi = lo + int(minutes * 60_000)
    truth.events = [e for e in truth.events if e.start_ms and e.end_ms and lo <= e.start_ms and e.end_ms < hi]
    truth.write(truth_path(dst))
    return dst


def small_data(out: Path, *, normal_minutes: float = 30.0, fault_minutes: float = 16.0) -> Path:
    """A directory with the first minutes of the normal run and of the first fault run."""
    out.mkdir(parents=True, exist_ok=True)
    normal = sorted(DATA.glob("normal.drec*"))[0]
    faults = sorted(DATA.glob("faults-1.drec*"))[0]
    slice_recording(normal, out / "normal.drec", normal_minutes)
    slice_recording(faults, out / "faults-1.drec", fault_minutes)
    return out

"""What one CoreDNS instance costs in memory, and where: Python's traced bytes per instance once N
synthetic instances score, by what holds them (label cache, series state, baseline, window, score
history, the /metrics export), and by the line that allocated them.

Two columns: when every instance has just begun to score (its baseline holds its first buckets,
as in bench/fleet_scale.py's runs), and mature, as after hours of running: every baseline bucket
filled and the score history (`inference.score_history` steps) full. Traced bytes are what the
objects take, without the allocator's slack or the model: the resident size per instance at fleet
scale is in bench/fleet_scale.py. The synthetic CoreDNS exports about 135 series an instance, as a
CoreDNS with a few zones and upstreams does.

    .venv/bin/python bench/instance_memory.py --instances 2000 --top 12
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, cast

import snappy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.state import STEP_S, ingestor, mature_baselines
from detectord.config import InferenceConfig
from detectord.serve.exports import InstanceExports
from detectord.serve.history import InstanceScores
from lab.synthetic import SyntheticFleet

if TYPE_CHECKING:
    from detectord.ingest.features import InstanceKey
    from detectord.serve.sink import ScoreSink

PACKAGE = REPO / "detectord"
# What holds the bytes, by the package module that allocated them.
HOLDERS = {
    "ingest/remote_write.py": "series identity (label cache)",
    "ingest/features.py": "series and step state",
    "ingest/normalise.py": "baseline",
    "ingest/windows.py": "window",
    "serve/history.py": "score history",
    "serve/exports.py": "/metrics export",
}


class _Sink:
    """What InstanceExports reads of the daemon's score sink."""

    def __init__(self, history: dict[InstanceKey, InstanceScores]) -> None:
        self.history = history
        self.phases: dict[InstanceKey, str] = {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--top", type=int, default=12, help="allocation sites shown")
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    args = p.parse_args()
    n = args.instances
    ing, _ = ingestor(args.model)
    base = ing.normaliser.plan.baseline
    # Until every instance scores: a window, and the baseline's first buckets.
    rounds = max(ing.windows.window, base.bucket_steps * base.min_buckets) + 6
    start = int(time.time() * 1000) - int((rounds + 2) * STEP_S * 1000)
    fleet = SyntheticFleet(n, seed=1, scrape_interval_s=STEP_S, start_ms=start, restarts_per_hour=0.0)
    bodies = [[snappy.compress(b) for b in fleet.scrape_payloads()] for _ in range(rounds)]
    gc.collect()
    # Deep enough to find the package's frame under numpy's and the standard library's.
    tracemalloc.start(12)
    for r in bodies:
        for b in r:
            ing.write_sync(b, "1.0")
    del bodies
    gc.collect()
    series = len(ing.extractor.labels)
    scoring_snap = tracemalloc.take_snapshot()
    mature_baselines(ing)
    steps = InferenceConfig().score_history
    history = {k: InstanceScores(steps) for k in ing.extractor.instance_keys()}
    for i in range(steps):
        for h in history.values():
            h.add(start + i * int(STEP_S * 1000), 0.5)
    sink = cast("ScoreSink", _Sink(history))
    exports = InstanceExports(lambda: sink, ("job", "instance"), "all", 0)
    exports.text()
    gc.collect()
    mature_snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    scoring = ing.instance_counts.get("scoring", 0)
    young, mature = _by_holder(scoring_snap), _by_holder(mature_snap)
    print(f"{n} instances ({scoring} scoring), {series / n:.0f} series an instance, after {rounds} rounds")
    print(f"traced bytes an instance, {'scoring':>9} {'mature':>9}")
    for holder in [*HOLDERS.values(), "other"]:
        print(f"  {holder:<31} {young[holder] / n:>9,.0f} {mature[holder] / n:>9,.0f}")
    print(f"  {'all':<31} {young.total() / n:>9,.0f} {mature.total() / n:>9,.0f}")
    print(f"  {'a series, all':<31} {young.total() / series:>9,.0f} {mature.total() / series:>9,.0f}")
    print(f"mature: {base.buckets} baseline buckets, {steps} scores kept; the lines that allocated most:")
    lines: Counter[tuple[str, int]] = Counter()
    for st in mature_snap.statistics("traceback"):
        frame = _ours(st.traceback)
        lines[frame.filename, frame.lineno] += st.size
    for (filename, lineno), size in lines.most_common(args.top):
        where = Path(filename).resolve()
        shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where
        print(f"{size / n:>9,.0f}  {shown}:{lineno}")
    ing.close()
    return 0


def _ours(tb: tracemalloc.Traceback) -> tracemalloc.Frame:
    """The innermost frame in the package (numpy's own lines say nothing of who asked)."""
    for frame in reversed(tb):
        if Path(frame.filename).resolve().is_relative_to(PACKAGE):
            return frame
    return tb[-1]


def _by_holder(snap: tracemalloc.Snapshot) -> Counter[str]:
    out: Counter[str] = Counter()
    for st in snap.statistics("traceback"):
        where = Path(_ours(st.traceback).filename).resolve()
        rel = where.relative_to(PACKAGE).as_posix() if where.is_relative_to(PACKAGE) else ""
        out[HOLDERS.get(rel, "other")] += st.size
    return out


if __name__ == "__main__":
    sys.exit(main())

"""What one CoreDNS instance costs the ingest path in memory, and where: Python's traced bytes per
instance once N synthetic instances score (label cache, series state, features, baselines,
windows), by the line that allocated them.

Traced bytes are what the objects take, without the allocator's slack or the model: the
resident size per instance at fleet scale is in bench/fleet_scale.py. The synthetic CoreDNS
exports about 135 series an instance, as a CoreDNS with a few zones and upstreams does.

    .venv/bin/python bench/instance_memory.py --instances 200 --top 12
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import snappy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.state import STEP_S, ingestor
from lab.synthetic import SyntheticFleet


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
    tracemalloc.start(1)
    for r in bodies:
        for b in r:
            ing.write_sync(b, "1.0")
    del bodies
    gc.collect()
    series = len(ing.extractor.labels)
    total = tracemalloc.get_traced_memory()[0]
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    scoring = ing.instance_counts.get("scoring", 0)
    print(f"{n} instances ({scoring} scoring), {series / n:.0f} series an instance, after {rounds} rounds")
    print(f"traced: {total / n:,.0f} bytes an instance, {total / series:,.0f} a series")
    for st in snap.statistics("lineno")[: args.top]:
        frame = st.traceback[0]
        where = Path(frame.filename).resolve()
        shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where
        print(f"{st.size / n:>9,.0f}  {shown}:{frame.lineno}")
    ing.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

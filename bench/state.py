"""State snapshots at fleet scale: size and time of a snapshot of N CoreDNS-shaped instances
with mature baselines: reading the instances (on the ingest thread, the longest slice), encoding
them and writing the file (on the writer thread), loading it (reading and decoding its records)
and restoring it (load included; records are decoded as they are restored), and how much the
process's resident memory grew by the restore. Reading and encoding are timed twice: the first
snapshot of a process encodes every instance's label block, the next ones reuse them ("again").

    .venv/bin/python bench/state.py --instances 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import snappy
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectord.config import ModelConfig
from detectord.detectors import load_model
from detectord.ingest.metrics import IngestMetrics
from detectord.ingest.pipeline import Ingestor, ScoreRequest, resident_bytes
from detectord.serve import snapshots
from detectord.serve.state import SLICE
from lab.synthetic import SyntheticFleet

STEP_S = 15.0


class _Discard:
    def submit_many(self, reqs: list[ScoreRequest]) -> int:
        return len(reqs)


def ingestor(model_path: Path) -> tuple[Ingestor, dict[str, object]]:
    model = load_model(ModelConfig(path=model_path), STEP_S)
    ing = Ingestor(
        step_ms=int(STEP_S * 1000),
        instance_labels=("job", "instance"),
        window=model.window,
        inputs=model.inputs,
        max_instances=10**7,
        max_gap_steps=5,
        max_decoded=1 << 30,
        max_future_s=600.0,
        stale_after_s=120.0,
        failed_scrapes=2,
        crash_loop_restarts=3,
        crash_loop_within_s=600.0,
        worker=_Discard(),
        metrics=IngestMetrics(CollectorRegistry()),
    )
    fp = snapshots.fingerprint(
        features=model.features,
        window=model.window,
        step_s=STEP_S,
        inputs=model.inputs,
        instance_labels=("job", "instance"),
    )
    return ing, fp


def mature_baselines(ing: Ingestor) -> None:
    """Every instance's baseline as after hours of running: every bucket of the horizon filled,
    each with its own noise (identical buckets would compress far better than real ones)."""
    rng = np.random.default_rng(0)
    for b in ing.normaliser._baselines.values():
        mean, std = b.loc[b._c.rel_idx].astype(np.float64), b.scale[b._c.rel_idx].astype(np.float64)
        for _ in range(b._c.cfg.buckets):
            b._add_bucket(mean + rng.normal(0, 0.1, mean.shape) * std, std * rng.uniform(0.8, 1.2, std.shape))


def _resident() -> int:
    """This process's resident bytes: after a restore, its peak (freed objects' pages stay)."""
    rss = resident_bytes()
    if rss is None:
        raise RuntimeError("no /proc/self/statm: the resident size is unknown")
    return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, nargs="+", default=[10000])
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    args = p.parse_args()
    print(
        f"{'instances':>9} {'series':>9} {'bytes':>12} {'B/inst':>8} {'read s':>7} {'max slice ms':>12} "
        f"{'encode s':>8} {'again: read s':>13} {'max slice ms':>12} {'encode s':>8} "
        f"{'write s':>8} {'load s':>7} {'restore s':>9} {'restore MB':>10}"
    )
    for n in args.instances:
        ing, fp = ingestor(args.model)
        rounds = ing.windows.window + ing.normaliser.plan.baseline.warm_steps + 3
        start = int(time.time() * 1000) - int((rounds + 2) * STEP_S * 1000)
        fleet = SyntheticFleet(n, seed=1, scrape_interval_s=STEP_S, start_ms=start, restarts_per_hour=0.0)
        for _ in range(rounds):
            for body in fleet.scrape_payloads():
                ing.write_sync(snappy.compress(body), "1.0")
        mature_baselines(ing)
        keys = ing.extractor.instance_keys()
        series = sum(len(ing.extractor._instances[k].series) for k in keys)
        timed = []
        for _ in range(2):
            t0 = time.perf_counter()
            states, worst = [], 0.0
            for i in range(0, len(keys), SLICE):
                t = time.perf_counter()
                states.extend(ing.instance_states(keys[i : i + SLICE]))
                worst = max(worst, time.perf_counter() - t)
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            records = [snapshots.encode(st) for st in states]
            timed.append((read_s, worst, time.perf_counter() - t0))
            del states
        with tempfile.TemporaryDirectory() as d:
            stats = snapshots.write(
                Path(d), fp, {"name": "bench"}, records, {"alerts": [], "upstream_of": {}, "resolved": []}
            )
            fresh, _ = ingestor(args.model)
            rss = _resident()
            t0 = time.perf_counter()
            with snapshots.read(Path(d), fp, max_age_s=3600) as snap:  # type: ignore[union-attr]
                fresh.restore_instances(snap.instances())
            restore_s = time.perf_counter() - t0
            restored_mb = (_resident() - rss) / 2**20
            t0 = time.perf_counter()
            with snapshots.read(Path(d), fp, max_age_s=3600) as snap:  # type: ignore[union-attr]
                for _ in snap.instances():
                    pass
            load_s = time.perf_counter() - t0
        print(
            f"{n:>9} {series:>9} {stats.bytes:>12} {stats.bytes // n:>8} {timed[0][0]:>7.2f} "
            f"{timed[0][1] * 1000:>12.1f} {timed[0][2]:>8.2f} {timed[1][0]:>13.2f} {timed[1][1] * 1000:>12.1f} "
            f"{timed[1][2]:>8.2f} {stats.seconds:>8.2f} {load_s:>7.2f} {restore_s:>9.2f} {restored_mb:>10.0f}"
        )


if __name__ == "__main__":
    main()

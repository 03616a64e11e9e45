"""The score sink's time on the event loop for a round of a big fleet, in small batches as a
request in Prometheus's order closes them (each request: a few dozen instances).

A fleet of `--instances` over `--upstreams` upstreams; every instance scored once a round, in
batches of `--batch`; a share of them anomalous (`--anomalous`, a different few each round, so
alerts fire and resolve every round). Printed: seconds of `ScoreSink.deliver` a round, the
first scoring round (every instance new, its alerts firing) and the later ones.

    .venv/bin/python bench/score_sink.py --instances 100000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectord.config import AlertingConfig, ModelConfig
from detectord.detectors import load_model
from detectord.ingest.pipeline import ScoreRequest
from detectord.serve.inference import ScoredBatch
from tests.support import score_sink


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=100_000)
    p.add_argument("--upstreams", type=int, default=120, help="the synthetic fleet's: 120 sets of `to` labels")
    p.add_argument("--batch", type=int, default=60, help="windows a batch (100,000 in Prometheus's order: about 60)")
    p.add_argument("--anomalous", type=float, default=0.04, help="share anomalous a round (the synthetic fleet: 4 %%)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    model = load_model(ModelConfig(path=REPO / "models/default", any_step=True), 15.0)
    cfg = AlertingConfig()
    registry = CollectorRegistry()
    sink = score_sink(model, cfg, registry)
    rng = random.Random(1)
    nf = len(model.features)
    keys = [("coredns", f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:9153") for i in range(args.instances)]
    upstream = {k: f"upstream-{rng.randrange(args.upstreams)}" for k in keys}
    window, latest = np.zeros((1, nf), np.float32), np.ones(nf, np.float32)
    deviation = np.asarray(np.random.default_rng(1).uniform(-3, 3, (args.batch, nf)), np.float32)
    print(f"{args.instances:,} instances, {args.upstreams} upstreams, batches of {args.batch}")
    for r in range(args.rounds):
        ts_ms = 1_700_000_000_000 + r * 60_000  # a minute apart: keep_firing_for (1m) resolves the last round's
        anomalous = set(rng.sample(range(args.instances), int(args.instances * args.anomalous)))
        order = list(range(args.instances))
        rng.shuffle(order)
        spent = 0.0
        for a in range(0, len(order), args.batch):
            chunk = order[a : a + args.batch]
            reqs = [ScoreRequest(keys[i], ts_ms, window, latest, upstream[keys[i]]) for i in chunk]
            scores = [5.0 if i in anomalous else 0.1 for i in chunk]
            batch = ScoredBatch(reqs, scores, deviation[: len(chunk)], [None] * len(chunk))
            t0 = time.perf_counter()
            sink.deliver(batch)
            spent += time.perf_counter() - t0
        firing = len(sink.alerts.firing())
        print(f"round {r}: {spent:.2f} s in deliver ({firing:,} alerts firing after it)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

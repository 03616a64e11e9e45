"""Whole-cluster remote write: how fast detectord ignores the series that are not CoreDNS's.

Teams point a whole cluster's `remote_write` at detectord; most series (node-exporter,
kube-state-metrics, applications) mean nothing to it and must cost as little as possible, and be
counted. This feeds scrape rounds where `--other` (default 90 %) of the series are such series,
mixed into Prometheus-sized requests (one sample per series, snappy), through the real ingest path
(decompress, decode, features, windows) on one thread, and prints samples/s of the first round
(every series new) and of the steady rounds, and how many samples were counted as ignored beside
how many of the others were sent (more are ignored than sent: CoreDNS's own go_*, process_* and
other metrics no feature reads are ignored too).

    .venv/bin/python bench/whole_cluster.py --instances 1000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import snappy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.state import STEP_S, ingestor
from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from lab.synthetic import SyntheticFleet

PER_REQUEST = 2000  # Prometheus's max_samples_per_send since 2.44 (500 before)


def _other_series(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """`n` label sets shaped like a cluster's other targets: node-exporter, kube-state-metrics
    and application histograms, with the label counts and lengths those have."""
    rng = random.Random(seed)
    out: list[list[tuple[str, str]]] = []
    modes = ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")
    phases = ("Failed", "Pending", "Running", "Succeeded", "Unknown")
    les = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")
    i = 0
    while len(out) < n:
        node = f"ip-10-{i // 65536 % 256}-{i // 256 % 256}-{i % 256}.ec2.internal"
        for cpu in range(4):
            for mode in modes:
                out.append(
                    [
                        ("__name__", "node_cpu_seconds_total"),
                        ("container", "node-exporter"),
                        ("cpu", str(cpu)),
                        ("endpoint", "http-metrics"),
                        ("instance", f"{node}:9100"),
                        ("job", "node-exporter"),
                        ("mode", mode),
                        ("namespace", "monitoring"),
                        ("pod", f"node-exporter-{i:05x}"),
                        ("service", "node-exporter"),
                    ]
                )
        pod = f"checkout-{rng.getrandbits(40):010x}-{rng.getrandbits(20):05x}"
        for phase in phases:
            out.append(
                [
                    ("__name__", "kube_pod_status_phase"),
                    ("container", "kube-state-metrics"),
                    ("instance", "10.2.0.17:8080"),
                    ("job", "kube-state-metrics"),
                    ("namespace", f"team-{i % 300}"),
                    ("phase", phase),
                    ("pod", pod),
                    ("uid", f"{rng.getrandbits(128):032x}"),
                ]
            )
        for le in les:
            out.append(
                [
                    ("__name__", "http_server_request_duration_seconds_bucket"),
                    ("instance", f"10.3.{i // 256 % 256}.{i % 256}:8080"),
                    ("job", f"team-{i % 300}/checkout"),
                    ("le", le),
                    ("method", "GET"),
                    ("namespace", f"team-{i % 300}"),
                    ("pod", pod),
                    ("route", "/api/v1/cart/{id}"),
                    ("status", "200"),
                ]
            )
        i += 1
    return out[:n]


def _bodies(series: list[pb1.TimeSeries]) -> list[bytes]:
    out = []
    for a in range(0, len(series), PER_REQUEST):
        req = pb1.WriteRequest()
        req.timeseries.extend(series[a : a + PER_REQUEST])
        out.append(snappy.compress(req.SerializeToString()))
    return out


def _rounds(instances: int, other_share: float, rounds: int) -> tuple[list[list[bytes]], int, int]:
    """Scrape rounds as compressed request bodies, and one more of the other series alone;
    samples per round, and how many are others."""
    start = int(time.time() * 1000) - int((rounds + 2) * STEP_S * 1000)
    fleet = SyntheticFleet(instances, seed=1, scrape_interval_s=STEP_S, start_ms=start, restarts_per_hour=0.0)
    first = [pb1.WriteRequest.FromString(p) for p in fleet.scrape_payloads()]
    coredns = sum(len(r.timeseries) for r in first)
    others = _other_series(round(coredns * other_share / (1 - other_share)), seed=2)
    out: list[list[bytes]] = []
    shuffle = random.Random(3)
    ts_ms = 0
    for r in range(rounds + 1):
        if r < rounds:
            reqs = first if r == 0 else [pb1.WriteRequest.FromString(p) for p in fleet.scrape_payloads()]
            series = [ts for req in reqs for ts in req.timeseries]
            ts_ms = max(ts.samples[-1].timestamp for ts in series)
        else:
            series, ts_ms = [], ts_ms + int(STEP_S * 1000)
        for j, labels in enumerate(others):
            t = pb1.TimeSeries()
            for name, value in labels:
                t.labels.add(name=name, value=value)
            t.samples.add(value=float(r * 10 + j % 7), timestamp=ts_ms)
            series.append(t)
        shuffle.shuffle(series)  # Prometheus shards by series hash: each request is a mix
        out.append(_bodies(series))
    return out, coredns + len(others), len(others)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, nargs="+", default=[1000], help="CoreDNS instances among the rest")
    p.add_argument("--other", type=float, default=0.9, help="share of series that are not CoreDNS's")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; one ingest thread")
    print(
        f"{'instances':>9} {'samples/round':>13} {'other':>6} {'first M/s':>9} {'steady M/s':>10} "
        f"{'others alone M/s':>16} {'ignored':>9} {'others sent':>11}"
    )
    for n in args.instances:
        rounds, per_round, others = _rounds(n, args.other, args.rounds)
        ing, _ = ingestor(args.model)
        times, ignored = [], 0
        for bodies in rounds:
            t0 = time.perf_counter()
            for body in bodies:
                ignored += ing.write_sync(body, "1.0").stats.ignored
            times.append(time.perf_counter() - t0)
        mixed = times[:-1]
        steady = per_round * (len(mixed) - 1) / sum(mixed[1:])
        print(
            f"{n:>9} {per_round:>13} {others / per_round:>6.0%} {per_round / mixed[0] / 1e6:>9.3f} "
            f"{steady / 1e6:>10.3f} {others / times[-1] / 1e6:>16.3f} {ignored:>9} {others * len(rounds):>11}"
        )
        ing.close()
        del ing
    return 0


if __name__ == "__main__":
    sys.exit(main())

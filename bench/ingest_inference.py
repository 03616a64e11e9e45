"""Ingest samples/s and inference windows/s for N CoreDNS-shaped instances.

The same remote-write payloads (synthetic CoreDNS fleets, as Prometheus 2.42 sends them: one
sample per series, 500 per request, snappy) go to `detectord serve` and to Prometheus's own
receiver (`prometheus --web.enable-remote-write-receiver`), and the ratio is printed. With
`--protocol 2.0` the same series go as remote write 2.0 requests (one symbol table each), to
detectord alone: Prometheus 2.42's receiver takes 1.0 only.

    .venv/bin/python bench/ingest_inference.py --instances 1000 10000
    .venv/bin/python bench/ingest_inference.py --instances 1000 --protocol 2.0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import snappy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectord.ingest._proto import remote_write_v1_pb2 as pb1
from lab.peers.detectord import run_detectord
from lab.peers.prometheus import run_prometheus
from lab.synthetic import SyntheticFleet
from tests.support import V2_HEADERS, v2_body

HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
STEP_S = 15.0


@dataclass
class Rounds:
    bodies: list[list[bytes]]  # per scrape round, its requests
    samples: list[int]
    headers: dict[str, str] = field(default_factory=lambda: HEADERS)


def make_rounds(instances: int, rounds: int, seed: int = 1, protocol: str = "1.0") -> Rounds:
    start = int(time.time() * 1000) - int((rounds + 2) * STEP_S * 1000)
    fleet = SyntheticFleet(instances, seed=seed, scrape_interval_s=STEP_S, start_ms=start, restarts_per_hour=0.0)
    bodies, samples = [], []
    for _ in range(rounds):
        payloads = fleet.scrape_payloads()
        samples.append(sum(len(pb1.WriteRequest.FromString(p).timeseries) for p in payloads))
        if protocol == "2.0":
            bodies.append([_as_v2(p) for p in payloads])
        else:
            bodies.append([snappy.compress(p) for p in payloads])
    return Rounds(bodies, samples, V2_HEADERS if protocol == "2.0" else HEADERS)


def _as_v2(payload: bytes) -> bytes:
    """A 1.0 request's series as a compressed 2.0 request."""
    req = pb1.WriteRequest.FromString(payload)
    return v2_body(
        ({lb.name: lb.value for lb in ts.labels}, [(s.timestamp, s.value) for s in ts.samples]) for ts in req.timeseries
    )


async def send(
    url: str, rounds: Rounds, concurrency: int, after_round: Callable[[], object] | None = None
) -> list[float]:
    """Send round after round (each series' samples stay in order); seconds per round.
    `after_round` is called as each round is answered."""
    times = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        for bodies in rounds.bodies:
            queue = list(reversed(bodies))
            failures: list[str] = []

            async def worker(queue: list[bytes], failures: list[str]) -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(url, data=body, headers=rounds.headers) as r:
                        if r.status // 100 != 2:
                            failures.append(f"{r.status} {await r.text()}")

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(queue, failures) for _ in range(concurrency)))
            times.append(time.perf_counter() - t0)
            if after_round is not None:
                after_round()
            if failures:
                raise RuntimeError(f"{url}: {len(failures)} requests failed, first: {failures[0][:300]}")
    return times


def rate(rounds: Rounds, times: list[float]) -> tuple[float, float]:
    """(first round samples/s: every series new; later rounds samples/s: steady state)."""
    cold = rounds.samples[0] / times[0]
    steady = sum(rounds.samples[1:]) / sum(times[1:])
    return cold, steady


async def bench_detectord(rounds: Rounds, instances: int, concurrency: int, workdir: Path, model: Path) -> list[float]:
    config = {
        "web": {"max_body_size": "64MiB", "max_decoded_body_size": "256MiB"},
        "ingest": {"step": f"{STEP_S:g}s", "max_instances": instances + 100},
        "logging": {"level": "warning"},
    }
    async with run_detectord(config, workdir=workdir, model=model, ready_timeout=180) as det:
        await det.settle()
        return await send(det.write_url, rounds, concurrency)


async def bench_prometheus(rounds: Rounds, concurrency: int, workdir: Path) -> list[float]:
    async with run_prometheus({}, workdir=workdir, enable_receiver=True) as prom:
        return await send(f"{prom.url}/api/v1/write", rounds, concurrency)


def bench_inference(
    seconds: float, max_batch: int, path: Path, max_windows: int | None = None
) -> tuple[float, float, str]:
    """Windows/s through the real InferenceWorker (batching, padding, hand-back to a loop): as
    many windows as the forward pass scores in `seconds`, at most `max_windows` (a fast device
    would otherwise need tens of millions of requests made up front)."""
    from prometheus_client import CollectorRegistry

    from detectord.config import ModelConfig
    from detectord.detectors import load_model
    from detectord.ingest.pipeline import ScoreRequest
    from detectord.serve.inference import InferenceWorker
    from detectord.serve.metrics import DaemonMetrics

    model = load_model(ModelConfig(path=path), STEP_S)
    rng = np.random.default_rng(0)
    windows = rng.random((4096, model.window, len(model.features)), dtype=np.float32)

    # Raw forward passes of full batches.
    det = model
    det.score_batch(windows[:max_batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.score_batch(windows[:max_batch])
        n += max_batch
    raw = n / (time.perf_counter() - t0)

    loop = asyncio.new_event_loop()
    done = [0]
    total = int(raw * seconds) if max_windows is None else min(int(raw * seconds), max_windows)
    worker = InferenceWorker(
        det,
        window=model.window,
        nfeatures=len(model.features),
        max_batch=max_batch,
        max_wait=0.01,
        queue_size=total,
        deliver=lambda rs: done.__setitem__(0, done[0] + len(rs)),
        loop=loop,
        metrics=DaemonMetrics(CollectorRegistry(), ("job", "instance")),
    )
    worker.warm_up(every_size=True)
    worker.start()
    latest = np.zeros(len(model.features), dtype=np.float32)
    # Each with an arrival time, as a remote-written step's window has: its delay is counted.
    arrived = time.monotonic()
    reqs = [
        ScoreRequest(("coredns", str(i % 10000)), i, windows[i % 4096], latest, arrived=arrived) for i in range(total)
    ]
    t0 = time.perf_counter()
    for i in range(0, total, 1000):  # as the ingest thread hands over one request's windows
        worker.submit_many(reqs[i : i + 1000])
    while done[0] < total:
        loop.run_until_complete(asyncio.sleep(0.005))
    through_worker = total / (time.perf_counter() - t0)
    worker.stop()
    loop.close()
    import keras

    return raw, through_worker, keras.backend.backend()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, nargs="+", default=[1000])
    p.add_argument("--rounds", type=int, default=4, help="scrape rounds sent (the first one is the cold start)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (Prometheus shards)")
    p.add_argument("--no-prometheus", action="store_true")
    p.add_argument("--protocol", choices=("1.0", "2.0"), default="1.0", help="remote write version sent")
    p.add_argument("--inference-seconds", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    for n in args.instances:
        t0 = time.perf_counter()
        rounds = make_rounds(n, args.rounds, protocol=args.protocol)
        per_round = rounds.samples[0]
        print(
            f"\n== {n} CoreDNS instances: {per_round} samples per scrape round, "
            f"{len(rounds.bodies[0])} requests per round (payloads made in {time.perf_counter() - t0:.1f}s)"
        )
        with tempfile.TemporaryDirectory() as d:
            cold, steady = rate(rounds, asyncio.run(bench_detectord(rounds, n, args.concurrency, Path(d), args.model)))
        print(f"detectord   ingest: {steady / 1e6:.3f} M samples/s steady ({cold / 1e6:.3f} M/s first round)")
        if not args.no_prometheus and args.protocol == "1.0":
            with tempfile.TemporaryDirectory() as d:
                pcold, psteady = rate(rounds, asyncio.run(bench_prometheus(rounds, args.concurrency, Path(d))))
            print(f"prometheus  ingest: {psteady / 1e6:.3f} M samples/s steady ({pcold / 1e6:.3f} M/s first round)")
            print(f"ratio detectord/prometheus: {steady / psteady:.2f} steady, {cold / pcold:.2f} first round")
    raw, worker, backend = bench_inference(args.inference_seconds, args.max_batch, args.model)
    print(
        f"\ninference ({backend}, batch {args.max_batch}): {raw / 1e3:.1f} k windows/s forward pass, "
        f"{worker / 1e3:.1f} k windows/s through the worker"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

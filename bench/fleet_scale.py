"""Fleet scale: one `detectord serve` fed N CoreDNS instances as Prometheus would, a table row per N.

For each N (synthetic CoreDNS fleets as Prometheus sends them: one sample per series, snappy, 4
requests in flight; `--samples-per-request` 500 as Prometheus up to 2.43 sends by default, 2.42
being the receiver here, or 2000 as 2.44 and later do):

1. throughput: the first `--fast-rounds` scrape rounds as fast as they are taken: samples/s of the
   first round (every series new) and of the rest (steady), and the same rounds into Prometheus's
   own receiver (`--web.enable-remote-write-receiver`), a fresh process, and the ratio; and
   samples per second of the daemon's own CPU time (all its threads: one core's worth);
2. paced: the same daemon then gets one round every `--interval` seconds (15 s: a real scrape),
   its requests spread over the interval, until every instance scores and `--scored-rounds`
   more. Printed: remote-write answer time p99 while scoring runs; the delay from the request
   that completed a step to that step's score (`detectord_step_score_delay_seconds`, p50/p99
   interpolated in its buckets as histogram_quantile does); windows scored against instances
   × scored rounds, and windows dropped; `/metrics` render time (fetched mid-round, while writes
   go on) and size; resident memory per instance (the daemon's RSS at the end minus at ready:
   its baselines then hold their first buckets of 128; bench/instance_memory.py shows what a
   mature instance adds).

Then the inference worker's windows/s (bench/ingest_inference.py's `bench_inference`).
Needs the machine to itself. Prometheus is left out above `--prometheus-max-series` series a
round (its receiver holds every series in memory: about 17.8 million at 100,000 instances).

    .venv/bin/python bench/fleet_scale.py --instances 1000 10000 100000
    .venv/bin/python bench/fleet_scale.py --instances 1000 10000 100000 --samples-per-request 2000
    .venv/bin/python bench/fleet_scale.py --instances 100000 --samples-per-request 2000 --shards 4

The series' order within a round: by default one kind of series at a time (every instance's
request count, then every instance's next series), the hardest order for the daemon, whose
state is per instance; `--shards N` sends them as Prometheus's remote-write queue does with N
shards (lab/synthetic.py `scrape_payloads`), each instance's series in runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import snappy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest_inference import HEADERS, STEP_S, Rounds, bench_inference, bench_prometheus, rate, send
from detectord.detectors.artifact import read_meta
from detectord.ingest.features import bucket_quantile
from detectord.ingest.normalise import InputPlan
from lab.peers.detectord import run_detectord
from lab.synthetic import MAX_SAMPLES_PER_SEND, SyntheticFleet
from tests.support import metric

DELAY = "detectord_step_score_delay_seconds"


def _series(payload: bytes) -> int:
    try:
        from detectord.ingest import _fastdecode  # type: ignore[attr-defined]

        return int(_fastdecode.scan(payload, 1, 3, 2**62)[0])
    except ImportError:
        from detectord.ingest._proto import remote_write_v1_pb2 as pb1

        return len(pb1.WriteRequest.FromString(payload).timeseries)


class DiskRounds:
    """Scrape rounds of a fleet, compressed, one file each (at 100,000 instances a round is
    about 390 MB): the bench holds one round at a time, the daemon the rest of the memory."""

    def __init__(
        self, instances: int, rounds: int, where: Path, per_request: int, shards: int = 0, seed: int = 1
    ) -> None:
        # The rounds end two steps before now, so no sample is in the future when sent.
        start = int(time.time() * 1000) - int((rounds + 2) * STEP_S * 1000)
        fleet = SyntheticFleet(instances, seed=seed, scrape_interval_s=STEP_S, start_ms=start, restarts_per_hour=0.0)
        self.where = where
        self.samples: list[int] = []
        for r in range(rounds):
            payloads = fleet.scrape_payloads(per_request, shards)
            self.samples.append(sum(_series(p) for p in payloads))
            with (where / f"round-{r}").open("wb") as f:
                for body in map(snappy.compress, payloads):
                    f.write(len(body).to_bytes(4, "little"))
                    f.write(body)
            del payloads

    def __len__(self) -> int:
        return len(self.samples)

    def bodies(self, r: int) -> list[bytes]:
        data = (self.where / f"round-{r}").read_bytes()
        out, pos = [], 0
        while pos < len(data):
            size = int.from_bytes(data[pos : pos + 4], "little")
            out.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
        return out

    def first(self, n: int) -> Rounds:
        return Rounds([self.bodies(r) for r in range(n)], self.samples[:n])


@dataclass
class Row:
    instances: int
    samples: int
    per_request: int
    shards: int
    first: float = math.nan
    steady: float = math.nan
    prom_first: float = math.nan
    prom_steady: float = math.nan
    # Samples per second of the daemon's CPU time (all its threads): what one core takes.
    cpu_first: float = math.nan
    cpu_steady: float = math.nan
    kb_per_instance: float = math.nan
    delay_p50: float = math.nan
    delay_p99: float = math.nan
    answer_p99: float = math.nan
    metrics_s: list[float] = field(default_factory=list)
    metrics_mb: float = math.nan
    scored: int = 0
    expected: int = 0
    dropped: int = 0
    behind_s: float = 0.0  # how far the paced sending fell behind its schedule, at most
    # State snapshots in the paced rounds: written, the seconds they took (the daemon's
    # detectord_state_snapshot_seconds_total), and the paced rounds' seconds.
    snapshots: float = 0.0
    snapshot_s: float = 0.0
    paced_s: float = 0.0


def _snapshots(text: str) -> tuple[float, float]:
    """State snapshots written so far, and the seconds all snapshots took."""
    return (
        metric(text, "detectord_state_snapshots_total", result="success"),
        metric(text, "detectord_state_snapshot_seconds_total"),
    )


def delay_buckets(text: str) -> list[tuple[float, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(f"{DELAY}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(out)


async def paced_round(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], interval: float, concurrency: int
) -> tuple[list[float], float]:
    """The round's requests spread evenly over `interval` seconds, at most `concurrency` in
    flight: answer times, and how far behind schedule the last request went out."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    gap = interval / len(bodies)
    sem = asyncio.Semaphore(concurrency)
    answers: list[float] = []
    behind = [0.0]

    async def one(i: int, body: bytes) -> None:
        await asyncio.sleep(max(0.0, start + i * gap - loop.time()))
        async with sem:
            behind[0] = max(behind[0], loop.time() - (start + i * gap))
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=HEADERS) as r:
                if r.status // 100 != 2:
                    raise RuntimeError(f"{r.status} {await r.text()}")
            answers.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    await asyncio.sleep(max(0.0, start + interval - loop.time()))
    return answers, behind[0]


async def timed_metrics(session: aiohttp.ClientSession, url: str, after: float) -> tuple[float, float, int]:
    """Seconds to the answer's head (the daemon renders the whole body before it answers) and to
    its last byte, and its size."""
    await asyncio.sleep(after)
    t0 = time.perf_counter()
    async with session.get(f"{url}/metrics") as r:
        head = time.perf_counter() - t0
        body = await r.read()
    return head, time.perf_counter() - t0, len(body)


async def bench_detectord(
    rounds: DiskRounds,
    row: Row,
    *,
    fast: int,
    scored_from: int,
    interval: float,
    concurrency: int,
    workdir: Path,
    model: Path,
    huge_pages: bool,
) -> None:
    n = row.instances
    config = {
        "web": {"max_body_size": "64MiB", "max_decoded_body_size": "256MiB"},
        "ingest": {"step": f"{STEP_S:g}s", "max_instances": n + 100, "huge_pages": huge_pages},
        "logging": {"level": "warning"},
    }
    async with run_detectord(config, workdir=workdir, model=model, ready_timeout=300) as det:
        await det.settle()
        rss0 = det.rss()
        fast_rounds = rounds.first(fast)
        # The daemon's CPU time (all its threads) before each fast round and once it is idle after
        # the last: samples per CPU second, what one core takes.
        cpu = [det.cpu_seconds()]
        times = await send(det.write_url, fast_rounds, concurrency, after_round=lambda: cpu.append(det.cpu_seconds()))
        await det.settle()
        cpu[-1] = det.cpu_seconds()
        row.first, row.steady = rate(fast_rounds, times)
        used = [b - a for a, b in itertools.pairwise(cpu)]
        row.cpu_first = fast_rounds.samples[0] / used[0]
        row.cpu_steady = sum(fast_rounds.samples[1:]) / sum(used[1:])
        print(
            f"  fast rounds: {row.first / 1e6:.3f} M/s first, {row.steady / 1e6:.3f} M/s steady; "
            f"per CPU second {row.cpu_first / 1e6:.3f} M first, {row.cpu_steady / 1e6:.3f} M steady",
            flush=True,
        )
        answers: list[float] = []
        text = await det.metrics()
        before = delay_buckets(text)
        snapshots0 = _snapshots(text)
        paced0 = time.monotonic()
        scored0 = 0.0
        conn = aiohttp.TCPConnector(limit=concurrency + 1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            for r in range(fast, len(rounds)):
                if r == scored_from:
                    text = await det.metrics()
                    before = delay_buckets(text)
                    scored0 = metric(text, "detectord_windows_scored_total")
                scrape = asyncio.create_task(timed_metrics(s, det.url, interval / 2))
                got, behind = await paced_round(s, det.write_url, rounds.bodies(r), interval, concurrency)
                head, took, size = await scrape
                row.behind_s = max(row.behind_s, behind)
                print(
                    f"  round {r}: {len(got)} requests, behind {behind:.1f}s, /metrics {took:.2f}s "
                    f"(its head after {head:.2f}s)",
                    flush=True,
                )
                if r >= scored_from:
                    answers += got
                    row.metrics_s.append(took)
                    row.metrics_mb = size / 2**20
            # The last round's steps close when the next one's samples come: wait for the worker.
            await asyncio.sleep(3.0)
            text = await det.metrics()
        row.paced_s = time.monotonic() - paced0
        row.snapshots, row.snapshot_s = (b - a for a, b in zip(snapshots0, _snapshots(text), strict=True))
        print(
            f"  state snapshots in the paced rounds: {row.snapshots:.0f} written, {row.snapshot_s:.1f} s of "
            f"{row.paced_s:.0f} s ({100 * row.snapshot_s / row.paced_s:.1f} %); the latest took "
            f"{metric(text, 'detectord_state_snapshot_duration_seconds'):.1f} s",
            flush=True,
        )
        after = delay_buckets(text)
        diff = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)] if before else after
        if diff and diff[-1][1] > 0:
            row.delay_p50, row.delay_p99 = bucket_quantile(0.5, diff), bucket_quantile(0.99, diff)
        row.answer_p99 = sorted(answers)[int(0.99 * (len(answers) - 1))] if answers else math.nan
        row.scored = int(metric(text, "detectord_windows_scored_total") - scored0)
        # Each scored round closes one step of every instance (its step closes a round later).
        row.expected = n * (len(rounds) - scored_from)
        row.dropped = int(
            sum(metric(text, "detectord_windows_dropped_total", reason=x) for x in ("queue_full", "inference_error"))
        )
        row.kb_per_instance = (det.rss() - rss0) / n / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--fast-rounds", type=int, default=6, help="rounds sent as fast as they are taken (first: cold)")
    p.add_argument("--scored-rounds", type=int, default=3, help="paced rounds once every instance scores")
    p.add_argument("--interval", type=float, default=STEP_S, help="seconds per paced round (the scrape interval)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (Prometheus shards)")
    p.add_argument(
        "--samples-per-request",
        type=int,
        default=MAX_SAMPLES_PER_SEND,
        help="Prometheus's max_samples_per_send: 500 before 2.44, 2000 since",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        help="the series' order: 0, one kind of series at a time (the hardest for the daemon's caches); "
        "N, as Prometheus's queue sends them with N shards (runs of about 175 / N series of one instance)",
    )
    p.add_argument("--prometheus-max-series", type=int, default=4_000_000)
    p.add_argument("--inference-seconds", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    p.add_argument("--tmp", type=Path, default=None, help="where the rounds' payloads are written")
    p.add_argument(
        "--no-huge-pages", action="store_true", help="the daemon's objects in plain pages (ingest.huge_pages: false)"
    )
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    meta = read_meta(args.model / f"{STEP_S:g}s")
    # Rows before an instance scores: a window, and its baseline's first buckets (plus the step
    # that closes on the next round's samples).
    base = InputPlan.from_dict(meta.inputs).baseline
    warm = max(meta.window, base.bucket_steps * base.min_buckets) + 2
    scored_from = max(args.fast_rounds, warm)
    total = scored_from + args.scored_rounds
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {total} rounds per fleet")
    rows = []
    for n in args.instances:
        with tempfile.TemporaryDirectory(dir=args.tmp) as payloads:
            rounds = DiskRounds(n, total, Path(payloads), args.samples_per_request, args.shards)
            rows.append(run_one(n, rounds, scored_from, args))
    raw, worker, backend = bench_inference(args.inference_seconds, args.max_batch, args.model)
    print("\n" + _table(rows))
    print(
        f"inference ({backend}, batch {args.max_batch}): {raw / 1e3:.1f} k windows/s forward pass, "
        f"{worker / 1e3:.1f} k windows/s through the worker"
    )
    return 0


def run_one(n: int, rounds: DiskRounds, scored_from: int, args: argparse.Namespace) -> Row:
    row = Row(n, rounds.samples[0], args.samples_per_request, args.shards)
    print(
        f"\n== {n:,} instances: {row.samples:,} samples a round in requests of {row.per_request}, "
        f"{_order(row.shards)}, {len(rounds)} rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(
            bench_detectord(
                rounds,
                row,
                fast=args.fast_rounds,
                scored_from=scored_from,
                interval=args.interval,
                concurrency=args.concurrency,
                workdir=Path(d),
                model=args.model,
                huge_pages=not args.no_huge_pages,
            )
        )
    if row.samples <= args.prometheus_max_series:
        fast_rounds = rounds.first(args.fast_rounds)
        with tempfile.TemporaryDirectory() as d:
            row.prom_first, row.prom_steady = rate(
                fast_rounds, asyncio.run(bench_prometheus(fast_rounds, args.concurrency, Path(d)))
            )
    print(_table([row]), flush=True)
    return row


def _order(shards: int) -> str:
    return f"{shards} shards" if shards else "by kind"


def _table(rows: list[Row]) -> str:
    head = (
        "| instances | samples/round (a request, order) | first M/s (Prom, ratio) | steady M/s (Prom, ratio) "
        "| M samples per CPU-s first / steady | KB/instance "
        "| step scored p50 / p99 s | answer p99 s | /metrics s (MB) | scored / expected, dropped | behind s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:

        def vs(a: float, b: float) -> str:
            return f"{a / 1e6:.2f} ({b / 1e6:.2f}, {a / b:.2f})" if b == b else f"{a / 1e6:.2f} (not run)"

        ms = (
            f"{statistics.median(r.metrics_s):.2f} (max {max(r.metrics_s):.2f}, {r.metrics_mb:.2f} MB)"
            if r.metrics_s
            else "-"
        )
        lines.append(
            f"| {r.instances:,} | {r.samples:,} ({r.per_request:,}, {_order(r.shards)}) "
            f"| {vs(r.first, r.prom_first)} | {vs(r.steady, r.prom_steady)} "
            f"| {r.cpu_first / 1e6:.2f} / {r.cpu_steady / 1e6:.2f} "
            f"| {r.kb_per_instance:.1f} | {r.delay_p50:.2f} / {r.delay_p99:.2f} | {r.answer_p99:.2f} | {ms} "
            f"| {r.scored:,} / {r.expected:,}, {r.dropped} | {r.behind_s:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

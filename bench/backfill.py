"""Start to all-scoring with a backfill: a real Prometheus holding `--lookback` of N synthetic
CoreDNS instances (written through its remote-write receiver, oldest first), then `detectord
serve` started with `backfill.url` pointing at it. Prints how long until ready, how many
instances score at ready, and what the backfill read.

    .venv/bin/python bench/backfill.py --instances 1000 --lookback 2h --timeouts 1h 1m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectord.config import Duration
from lab.peers.detectord import run_detectord
from lab.peers.prometheus import run_prometheus, write_history

STEP_S = 15.0


async def bench(instances: int, lookback: str, timeouts: list[str]) -> None:
    lookback_s = float(Duration.parse(lookback))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        async with run_prometheus({}, workdir=work / "prom", enable_receiver=True) as prom:
            t0 = time.monotonic()
            await write_history(f"{prom.url}/api/v1/write", instances, lookback_s, step_s=STEP_S)
            print(f"Prometheus filled with {lookback} of {instances} instances in {time.monotonic() - t0:.0f}s")
            for timeout in timeouts:
                config = {
                    "ingest": {"step": f"{STEP_S:g}s", "max_instances": instances * 2},
                    "backfill": {"url": f"{prom.url}/api/v1/read", "lookback": lookback, "timeout": timeout},
                }
                t0 = time.monotonic()
                async with run_detectord(config, workdir=work / f"d-{timeout}", ready_timeout=7200) as det:
                    ready_s = time.monotonic() - t0
                    listed = await det.instances()
                    log = [json.loads(x) for x in det.log.read_text().splitlines() if x.startswith("{")]
                done = [e for e in log if e.get("event") == "backfilled from Prometheus"]
                scoring = sum(not i["warming"] for i in listed)
                print(
                    f"instances {instances}  lookback {lookback}  timeout {timeout}  start to ready {ready_s:.1f}s  "
                    f"scoring at ready {scoring}/{len(listed)}"
                )
                if done:
                    e = done[0]
                    print(
                        f"  backfill: {e['series']} series, {e['samples']} samples in {e['seconds']}s "
                        f"({e['skipped_seconds']:g}s of the oldest history skipped to fit the timeout)"
                    )
                else:
                    print("  backfill did not complete:", [e for e in log if "backfill" in str(e.get("event"))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--lookback", default="2h")
    p.add_argument("--timeouts", nargs="+", default=["1h", "1m"], help="backfill.timeout of each daemon started")
    args = p.parse_args()
    asyncio.run(bench(args.instances, args.lookback, args.timeouts))


if __name__ == "__main__":
    main()

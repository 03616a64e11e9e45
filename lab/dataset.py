"""The committed data sets: lab runs published into data/ (recording xz-compressed, truth beside it)
and summarised (size, duration, instances, fault classes and events).

    python -m lab.dataset publish .cache/lab/normal .cache/lab/faults-1 --to data
    python -m lab.dataset summary data
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectord.recording import ReadStats, read_records
from lab.runner import RECORDING, TRUTH

SUFFIX = ".drec.xz"


def publish(run: Path, to: Path, name: str | None = None) -> Path:
    """Copy run/recording.drec (compressed) and run/truth.json into `to` as NAME.drec.xz and NAME.truth.json."""
    truth: dict[str, Any] = json.loads((run / TRUTH).read_text())
    if truth.get("interrupted"):
        raise SystemExit(f"{run}: the run was interrupted; not publishing it")
    name = name or str(truth["scenario"])
    to.mkdir(parents=True, exist_ok=True)
    src = run / RECORDING
    dst = to / f"{name}{SUFFIX}"
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    truth["recording"] = dst.name
    if truth.get("source"):
        truth["source"] = str(Path(truth["source"]).resolve().relative_to(Path.cwd().resolve()))
    (to / f"{name}.truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return dst


@dataclass
class Summary:
    name: str
    megabytes: float
    minutes: float
    requests: int
    instances: int
    events: Counter[str]
    severities: dict[str, Counter[str]]


def summarise(recording: Path) -> Summary:
    truth = json.loads(recording.with_name(recording.name.removesuffix(SUFFIX) + ".truth.json").read_text())
    stats = ReadStats()
    for _ in read_records(recording, stats):
        pass
    events: Counter[str] = Counter(e["class"] for e in truth["events"])
    sev: dict[str, Counter[str]] = {}
    for e in truth["events"]:
        sev.setdefault(e["class"], Counter())[e["severity"] or "-"] += 1
    return Summary(recording.name.removesuffix(SUFFIX), recording.stat().st_size / 1e6,
                   (truth["ended_ms"] - truth["started_ms"]) / 60000, stats.records, len(truth["instances"]),
                   events, sev)


def summary_table(directory: Path) -> str:
    rows = [summarise(p) for p in sorted(directory.glob(f"*{SUFFIX}"))]
    lines = ["| data set | size (MB) | duration (min) | requests | instances | fault events |",
             "|---|---|---|---|---|---|"]
    total: Counter[str] = Counter()
    per_sev: dict[str, Counter[str]] = {}
    for r in rows:
        total.update(r.events)
        for c, s in r.severities.items():
            per_sev.setdefault(c, Counter()).update(s)
        lines.append(f"| {r.name} | {r.megabytes:.1f} | {r.minutes:.1f} | {r.requests} | {r.instances} | "
                     f"{sum(r.events.values()) or 'none (normal)'} |")
    lines.append(f"| **all** | {sum(r.megabytes for r in rows):.1f} | {sum(r.minutes for r in rows):.1f} | "
                 f"{sum(r.requests for r in rows)} | | {sum(total.values())} |")
    lines += ["", "| fault class | events | low | medium | high |", "|---|---|---|---|---|"]
    for c in sorted(total):
        s = per_sev[c]
        lines.append(f"| {c} | {total[c]} | {s['low']} | {s['medium']} | {s['high']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.dataset")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="compress lab runs into a data directory")
    pub.add_argument("runs", nargs="+", type=Path)
    pub.add_argument("--to", type=Path, default=Path("data"))
    summ = sub.add_parser("summary", help="a Markdown table of a data directory")
    summ.add_argument("directory", type=Path, nargs="?", default=Path("data"))
    args = p.parse_args(argv)
    if args.cmd == "publish":
        for run in args.runs:
            dst = publish(run, args.to)
            print(f"{run} -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    else:
        print(summary_table(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The committed data sets: lab runs published into data/ (recording xz-compressed, truth beside it)
and summarised (size, duration, instances, fault classes and events) into data/README.md.

    python -m lab.dataset publish .cache/lab/normal .cache/lab/faults-1 --to data
    python -m lab.dataset summary data          # prints the tables; `readme` writes data/README.md
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from detectord.recordings.format import ReadStats, read_records
from detectord.recordings.truth import TRUTH_SUFFIX, read_truth, recording_name, truth_path
from lab.runner import RECORDING, TRUTH

SUFFIX = ".drec.xz"


def publish(run: Path, to: Path, name: str | None = None) -> Path:
    """Copy run/recording.drec (compressed) and run/truth.json into `to` as NAME.drec.xz and NAME.truth.json."""
    truth = read_truth(run / TRUTH)
    if truth.interrupted:
        raise SystemExit(f"{run}: the run was interrupted; not publishing it")
    if truth.health is not None and not truth.health.get("valid", True):
        raise SystemExit(
            f"{run}: its healthy periods were not healthy ({'; '.join(truth.health.get('reasons', []))}); "
            "not publishing it"
        )
    name = name or truth.scenario
    to.mkdir(parents=True, exist_ok=True)
    src = run / RECORDING
    dst = to / f"{name}{SUFFIX}"
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    truth.recording = dst.name
    if truth.source:
        truth.source = str(Path(truth.source).resolve().relative_to(Path.cwd().resolve()))
    truth.write(truth_path(dst))
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
    truth = read_truth(truth_path(recording))
    stats = ReadStats()
    for _ in read_records(recording, stats):
        pass
    events: Counter[str] = Counter(e.cls for e in truth.events)
    sev: dict[str, Counter[str]] = {}
    for e in truth.events:
        sev.setdefault(e.cls, Counter())[e.severity or "-"] += 1
    return Summary(
        recording_name(recording),
        recording.stat().st_size / 1e6,
        (truth.ended_ms - truth.started_ms) / 60000,
        stats.records,
        len(truth.instances),
        events,
        sev,
    )


def summary_table(directory: Path) -> str:
    rows = [summarise(p) for p in sorted(directory.glob(f"*{SUFFIX}"))]
    lines = [
        "| data set | size (MB) | duration (min) | requests | instances | fault events | classes (events each) |",
        "|---|---|---|---|---|---|---|",
    ]
    total: Counter[str] = Counter()
    per_sev: dict[str, Counter[str]] = {}
    for r in rows:
        total.update(r.events)
        for c, s in r.severities.items():
            per_sev.setdefault(c, Counter()).update(s)
        counts = set(r.events.values())
        each = (
            "–"
            if not r.events
            else f"all {len(r.events)} × {counts.pop()}"
            if len(counts) == 1
            else ", ".join(f"{c} {n}" for c, n in sorted(r.events.items()))
        )
        lines.append(
            f"| {r.name} | {r.megabytes:.1f} | {r.minutes:.1f} | {r.requests} | {r.instances} | "
            f"{sum(r.events.values()) or 'none (normal)'} | {each} |"
        )
    lines.append(
        f"| **all** | {sum(r.megabytes for r in rows):.1f} | {sum(r.minutes for r in rows):.1f} | "
        f"{sum(r.requests for r in rows)} | | {sum(total.values())} | {len(total)} classes |"
    )
    lines += ["", "| fault class | events | low | medium | high |", "|---|---|---|---|---|"]
    for c in sorted(total):
        s = per_sev[c]
        lines.append(f"| {c} | {total[c]} | {s['low']} | {s['medium']} | {s['high']} |")
    return "\n".join(lines)


_README = """# Lab data sets

Recordings of a real CoreDNS fleet on loopback (CoreDNS {coredns} built from its Go module by
`scripts/build-coredns.sh`, real `dnsperf` load, scripted faults), exactly as a real Prometheus
(Debian's 2.42, scraping every second; `benign` every 5 seconds) remote-wrote them to
`detectord record`. Each
`NAME.drec.xz` is a recording (detectord/recordings/format.py's format, xz-compressed; `detectord replay`,
`score`, `train` and `evaluate` read it as it is) and `NAME.truth.json` its ground truth: the
scenario, the instances, and every fault with its class, severity, affected instances, start and
end (Unix ms).

Every file is made by one lab run of the scenario of the same name, `lab/scenarios/NAME.yaml`:

    lab/run lab/scenarios/NAME.yaml --out .cache/lab/NAME
    python -m lab.dataset publish .cache/lab/NAME --to data

`make data` re-records all of them (about 6 hours; normal and unseen-low run beside the fault
runs, the other test-only fleets two at a time; unseen-high, durations and benign each alone)
and rewrites this file.

{files}

- `normal`: a healthy fleet, the data sets' normal traffic.
- `faults-1` … `faults-4`: every fault class twice per run, in two lanes that never touch the same
  instances (upstream-0 with edge-0/edge-2, upstream-1 with edge-1/edge-3), 60 s each (an
  upstream outage 20–60 s) with 90 s of recovery between; severities rotate over the runs.
- `unseen-low`, `unseen-high`: fleets at load levels and cache sizes the others never have (a tenth,
  and over ten times, the rate), healthy for 12 minutes, then six faults on one lane while the
  other stays healthy. Test data only (their scenarios say `test_only: true`, and so does their
  truth): no model trains or calibrates on them.
- `durations`: incidents of every length and ramp at the training load: 30 s, 3, 5 and 30
  minutes, abrupt and creeping (a latency that grows for 10 minutes, then holds for 20), and a
  crash loop, in three lanes of four; the fourth stays healthy. Test data only.
- `benign`: 56 low-load edges (15 qps) and 8 upstreams, scraped every 5 s for 55 minutes (2.3
  instance-days of healthy time at every step), with the changes operators make every day: a
  Corefile rollout on one edge and then on four at once, a rolling restart of four edges, an edge
  joining the service discovery and another leaving it, two cache flushes, traffic on one edge
  that doubles over 30 minutes. Normal, the alerts on them counted apart by kind. Never trained
  on; two of its eight lanes (upstream-3's, where nothing changes, and upstream-4's, with a
  restart and a reload) are validation data, so a fleet unlike the training fleets sets how
  quiet a model is (its threshold) and which model is the default; the other six lanes (1.9
  instance-days, every kind of change) are test data.
- `unseen-nodelocal`, `unseen-qtypes`: the training load, with a node-local DNS cache in front of
  every edge (its misses reach the edge over TCP), and with another query mix (AAAA 40, A 20,
  SRV 20, PTR 15, TXT 3, MX 2); six faults on one lane after 12 minutes. Test data only.
- `unseen-rtt`, `unseen-nxdomain`, `unseen-cache-small`, `unseen-cache-large`: the training load
  on fleets that differ from the training fleets on one axis each: upstreams that are real
  resolvers 25 ms (± 10 ms) away, 70 % NXDOMAIN answers (ndots:5 search paths), a 100-entry
  cache over 5,000 names (most queries miss), a 100,000-entry cache with a 5-minute TTL cap over
  20,000 names (nearly everything hits); the same six faults on one lane after 12 minutes. Test
  data only.

{classes}

Fault classes are made of the lab's primitives (lab/faults.py) in the scenario files:
upstream_timeout (delay beyond forward's 2 s timeout), upstream_latency (delay below it),
upstream_packet_loss, upstream_servfail (a share of names), upstream_down (SIGSTOP),
edge_crash (SIGKILL and restart), query_flood, random_subdomain_flood, reload_failure (a broken
Corefile), forward_saturation (slow upstream and a low max_concurrent: REFUSED), cpu_starvation
(the process runs a share of every 100 ms).
"""


def write_readme(directory: Path) -> Path:
    rows = [summarise(p) for p in sorted(directory.glob(f"*{SUFFIX}"))]
    table = summary_table(directory)
    files, classes = table.split("\n\n", 1)
    coredns = "?"
    for r in rows:
        extra = read_truth(directory / f"{r.name}{TRUTH_SUFFIX}").extra
        coredns = str(extra.get("coredns_version") or coredns)
    coredns = coredns if coredns != "?" else "v1.12.4"
    out = directory / "README.md"
    out.write_text(_README.format(coredns=coredns, files=files, classes=classes))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.dataset")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="compress lab runs into a data directory")
    pub.add_argument("runs", nargs="+", type=Path)
    pub.add_argument("--to", type=Path, default=Path("data"))
    summ = sub.add_parser("summary", help="a Markdown table of a data directory")
    summ.add_argument("directory", type=Path, nargs="?", default=Path("data"))
    rd = sub.add_parser("readme", help="write the data directory's README.md")
    rd.add_argument("directory", type=Path, nargs="?", default=Path("data"))
    args = p.parse_args(argv)
    if args.cmd == "publish":
        for run in args.runs:
            dst = publish(run, args.to)
            print(f"{run} -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    elif args.cmd == "readme":
        print(f"wrote {write_readme(args.directory)}")
    else:
        print(summary_table(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

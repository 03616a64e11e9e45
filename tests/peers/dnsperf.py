"""Real DNS load from dnsperf (Debian's 2.10): a mix of query types over the test zone, some names
that do not exist (as Kubernetes search paths produce), rate-limited."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.peers import missing_peer, run_process
from tests.peers.coredns import NAMES, ZONE

QTYPES = {"A": 50, "AAAA": 25, "TXT": 8, "MX": 5, "SRV": 7, "PTR": 5}


@dataclass
class DNSPerf:
    proc: subprocess.Popen[bytes]
    queries: Path
    log: Path


def query_file(path: Path, *, seed: int = 0, n: int = 5000, nxdomain_share: float = 0.1) -> Path:
    """dnsperf input over the upstream's zone (coredns.zone_file) and PTRs; `nxdomain_share` of
    the queries ask for names that do not exist."""
    rng = random.Random(seed)
    # A skewed popularity: a few names take most queries, so the cache does real work.
    weights = [1.0 / (i + 1) for i in range(len(NAMES))]
    lines = []
    for _ in range(n):
        if rng.random() < nxdomain_share:
            lines.append(f"host{rng.randrange(10**6)}.svc.cluster.local.{ZONE} A")
            continue
        name = rng.choices(NAMES, weights)[0]
        qtype = rng.choices(list(QTYPES), list(QTYPES.values()))[0]
        if qtype == "SRV":
            lines.append(f"_svc.{name}.{ZONE} SRV")
        elif qtype == "PTR":
            lines.append(f"{rng.randrange(1, 250)}.2.0.192.in-addr.arpa. PTR")
        else:
            lines.append(f"{name}.{ZONE} {qtype}")
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def run_dnsperf(port: int, *, qps: int, duration_s: float, workdir: Path, name: str = "load",
                      seed: int = 0, queries: Sequence[tuple[str, str]] | None = None,
                      max_outstanding: int = 100) -> AsyncIterator[DNSPerf]:
    """Send `qps` queries a second over UDP to 127.0.0.1:`port` for `duration_s` (stopped on exit).

    The queries are `queries` ((name, type) pairs) in a loop, or else query_file's mix. dnsperf
    keeps at most `max_outstanding` queries unanswered, so a slow server gets less than `qps`.
    """
    binary = shutil.which("dnsperf")
    if binary is None:
        missing_peer("dnsperf is not installed: run `make system-deps`")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"queries.{name}.txt"
    if queries is None:
        query_file(path, seed=seed)
    else:
        path.write_text("".join(f"{qname} {qtype}\n" for qname, qtype in queries))
    argv = [binary, "-s", "127.0.0.1", "-p", str(port), "-d", str(path), "-l", f"{duration_s:g}",
            "-Q", str(qps), "-q", str(max_outstanding), "-c", "2", "-t", "5"]
    log = workdir / f"dnsperf.{name}.log"
    async with run_process(argv, log=log, cwd=workdir) as proc:
        yield DNSPerf(proc, path, log)

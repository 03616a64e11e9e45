"""Real DNS load from dnsperf (Debian): a mix of query types over the test zone, some names
that do not exist (as Kubernetes search paths produce), rate-limited."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.peers import run_process
from tests.peers.coredns import NAMES, ZONE


def query_file(path: Path, *, seed: int = 0, n: int = 5000, nxdomain_share: float = 0.1) -> Path:
    rng = random.Random(seed)
    # A skewed popularity: a few names take most queries, so the cache does real work.
    weights = [1.0 / (i + 1) for i in range(len(NAMES))]
    lines = []
    for _ in range(n):
        if rng.random() < nxdomain_share:
            lines.append(f"host{rng.randrange(10**6)}.svc.cluster.local.{ZONE} A")
            continue
        name = rng.choices(NAMES, weights)[0]
        qtype = rng.choices(["A", "AAAA", "TXT", "MX", "SRV", "PTR"], [50, 25, 8, 5, 7, 5])[0]
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
                      seed: int = 0) -> AsyncIterator[subprocess.Popen[bytes]]:
    binary = shutil.which("dnsperf")
    if binary is None:
        pytest.fail("dnsperf is not installed: run `make system-deps`")
    queries = query_file(workdir / f"queries.{name}.txt", seed=seed)
    argv = [binary, "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(int(duration_s)),
            "-Q", str(qps), "-c", "2", "-t", "5"]
    async with run_process(argv, log=workdir / f"dnsperf.{name}.log", cwd=workdir) as proc:
        yield proc

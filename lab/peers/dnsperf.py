"""Real DNS load from dnsperf (Debian's 2.10): a mix of query types over the test zone, some names
that do not exist (as Kubernetes search paths produce), rate-limited."""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from detectord import children
from lab.peers import missing_peer
from lab.peers.coredns import NAMES, ZONE, names

QTYPES = {"A": 50, "AAAA": 25, "TXT": 8, "MX": 5, "SRV": 7, "PTR": 5}


@dataclass
class DNSPerf:
    proc: subprocess.Popen[bytes]
    queries: Path
    log: Path


# Kubernetes pods (ndots:5) try their search domains first: each lookup of a name becomes
# NXDOMAIN queries for name.<search domain>, which repeat (and are cached) like the names do.
SEARCH_DOMAINS = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")


def query_file(
    path: Path,
    *,
    seed: int = 0,
    n: int = 5000,
    nxdomain_share: float = 0.1,
    n_names: int = len(NAMES),
    qtypes: Mapping[str, float] = QTYPES,
    zipf: float = 1.0,
) -> Path:
    """dnsperf input over the upstream's zone (coredns.zone_file with n_names) and PTRs;
    `nxdomain_share` of the queries ask for search-path names that do not exist."""
    rng = random.Random(seed)
    pool = names(n_names)
    # A skewed (Zipf) popularity: a few names take most queries, so the cache does real work.
    cum = list(itertools.accumulate(1.0 / (i + 1) ** zipf for i in range(len(pool))))
    lines = []
    for _ in range(n):
        name = rng.choices(pool, cum_weights=cum)[0]
        if rng.random() < nxdomain_share:
            lines.append(f"{name}.{rng.choice(SEARCH_DOMAINS)}.{ZONE} {rng.choice(('A', 'AAAA'))}")
            continue
        qtype = rng.choices(list(qtypes), list(qtypes.values()))[0]
        if qtype == "SRV":
            lines.append(f"_svc.{name}.{ZONE} SRV")
        elif qtype == "PTR":
            lines.append(f"{rng.randrange(1, 250)}.2.0.192.in-addr.arpa. PTR")
        else:
            lines.append(f"{name}.{ZONE} {qtype}")
    path.write_text("\n".join(lines) + "\n")
    return path


def random_subdomain_file(path: Path, *, n: int, seed: int = 0) -> Path:
    """Unique random names under the zone, as a random-subdomain (water torture) attack sends:
    every one is a cache miss and an NXDOMAIN from the upstream."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    with open(path, "w") as f:
        for _ in range(n):
            label = "".join(rng.choices(alphabet, k=12))
            f.write(f"{label}.{ZONE} A\n")
    return path


def dnsperf_binary() -> str:
    binary = shutil.which("dnsperf")
    if binary is None:
        missing_peer("dnsperf is not installed: run `make system-deps`")
    return binary


@contextlib.asynccontextmanager
async def run_dnsperf(
    port: int,
    *,
    qps: int,
    duration_s: float,
    workdir: Path,
    name: str = "load",
    seed: int = 0,
    queries: Sequence[tuple[str, str]] | None = None,
    max_outstanding: int = 100,
) -> AsyncIterator[DNSPerf]:
    """Send `qps` queries a second over UDP to 127.0.0.1:`port` for `duration_s` (stopped on exit).

    The queries are `queries` ((name, type) pairs) in a loop, or else query_file's mix. dnsperf
    keeps at most `max_outstanding` queries unanswered, so a slow server gets less than `qps`.
    """
    binary = dnsperf_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"queries.{name}.txt"
    if queries is None:
        query_file(path, seed=seed)
    else:
        path.write_text("".join(f"{qname} {qtype}\n" for qname, qtype in queries))
    argv = [
        binary,
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(path),
        "-l",
        f"{duration_s:g}",
        "-Q",
        str(qps),
        "-q",
        str(max_outstanding),
        "-c",
        "2",
        "-t",
        "5",
    ]
    log = workdir / f"dnsperf.{name}.log"
    async with children.run(argv, log=log, cwd=workdir, name=f"dnsperf {name}") as child:
        yield DNSPerf(child.proc, path, log)

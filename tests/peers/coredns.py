"""A real CoreDNS (the slim build of scripts/build-coredns.sh) on loopback ports.

`edge_corefile` forwards to upstreams with a cache, as a cluster DNS server does;
`upstream_corefile` answers the zone `example.test.` from a zone file, or misbehaves on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tests.peers import REPO, free_port, run_process, wait_http_ok

ZONE = "example.test."
NAMES = [f"host{i}" for i in range(200)]

Fault = Literal["slow", "servfail", "drop"]


def coredns_binary() -> Path:
    """The cached CoreDNS; skips (or, under CI, fails) when `make coredns` has not built it."""
    path = REPO / ".cache/coredns/coredns"
    if path.exists() and os.access(path, os.X_OK):
        return path
    msg = f"CoreDNS not built at {path}: run `make coredns` (scripts/build-coredns.sh)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass
class Ports:
    """Ports of one CoreDNS, allocated before its Corefile is written."""

    dns: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    metrics: int = field(default_factory=free_port)
    ready: int = field(default_factory=free_port)

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics}"


def zone_file(path: Path) -> Path:
    lines = [f"$ORIGIN {ZONE}", "$TTL 30",
             f"@ IN SOA ns.{ZONE} admin.{ZONE} 1 7200 3600 1209600 30", f"@ IN NS ns.{ZONE}",
             "ns IN A 192.0.2.1", "@ IN MX 10 mail", "mail IN A 192.0.2.2"]
    for i, name in enumerate(NAMES):
        lines += [f"{name} IN A 192.0.2.{i % 250 + 1}", f"{name} IN AAAA 2001:db8::{i + 1:x}",
                  f'{name} IN TXT "v=spf1 -all {i}"', f"_svc.{name} IN SRV 10 5 443 {name}",
                  f"{name} IN MX 10 mail"]
    path.write_text("\n".join(lines) + "\n")
    return path


def edge_corefile(ports: Ports, upstreams: Sequence[str], *, cache_ttl: int = 5) -> str:
    return f"""
.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}
    ready 127.0.0.1:{ports.ready}
    errors
    cache {cache_ttl}
    forward . {' '.join(upstreams)} {{
        max_fails 2
        health_check 0.5s
    }}
    reload 2s 1s
}}
"""


def upstream_corefile(ports: Ports, zone: Path, fault: Fault | None = None) -> str:
    serve = {
        None: f"file {zone} {ZONE}",
        # Beyond forward's 2 s read timeout: the edge times out and answers SERVFAIL.
        "slow": "erratic {\n        delay 1 3s\n    }",
        "servfail": "template ANY ANY {\n        rcode SERVFAIL\n    }",
        "drop": "erratic {\n        drop 1\n    }",
    }[fault]
    reverse = "" if fault else f"""
in-addr.arpa.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}
    template IN PTR {{
        answer "{{{{ .Name }}}} 30 IN PTR host.{ZONE}"
    }}
}}
"""
    return f"""
.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}
    ready 127.0.0.1:{ports.ready}
    {serve}
    reload 2s 1s
}}
{reverse}"""


@dataclass
class CoreDNS:
    name: str
    ports: Ports
    corefile: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.dns}"

    async def reconfigure(self, text: str, *, wait_ready: bool = True) -> None:
        """Rewrite the Corefile and reload it now (SIGUSR1), as the reload plugin would.

        `erratic` reports ready only after it has answered queries: pass wait_ready=False for it.
        """
        self.corefile.write_text(text)
        self.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"CoreDNS {self.name} exited on reload; log: {self.log.read_text()[-2000:]}")
        if wait_ready:
            await wait_http_ok(f"http://127.0.0.1:{self.ports.ready}/ready", timeout=20, proc=self.proc,
                               log=self.log)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@contextlib.asynccontextmanager
async def run_coredns(corefile: str, ports: Ports, *, workdir: Path, name: str) -> AsyncIterator[CoreDNS]:
    binary = coredns_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"Corefile.{name}"
    path.write_text(corefile)
    log = workdir / f"coredns.{name}.log"
    async with run_process([str(binary), "-conf", str(path)], log=log, cwd=workdir) as proc:
        await wait_http_ok(f"http://127.0.0.1:{ports.ready}/ready", timeout=30, proc=proc, log=log)
        yield CoreDNS(name, ports, path, proc, log)

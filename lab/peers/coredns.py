"""A real CoreDNS (the slim build of scripts/build-coredns.sh) on loopback ports.

`edge_corefile` forwards to upstreams with a cache, as a cluster DNS server does;
`upstream_corefile` answers the zone `example.test.` from a zone file, or misbehaves on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from detectord import children
from detectord.children import free_port
from lab.peers import REPO, missing_peer

ZONE = "example.test."
NAMES = [f"host{i}" for i in range(200)]


def names(n: int = len(NAMES)) -> list[str]:
    return [f"host{i}" for i in range(n)]


Fault = Literal["slow", "servfail", "drop"]

_RELOAD_DIRECTIVE = re.compile(r"^\s*reload\b", re.MULTILINE)
_RELOAD_DONE = re.compile(
    r"Reloading complete|(Restart failed|reload failed|Corefile parse failed|\[ERROR\] SIGUSR1).*"
)


def coredns_binary() -> Path:
    """The cached CoreDNS; skips (or, under CI, fails) when `make coredns` has not built it."""
    path = REPO / ".cache/coredns/coredns"
    if path.exists() and os.access(path, os.X_OK):
        return path
    missing_peer(f"CoreDNS not built at {path}: run `make coredns` (scripts/build-coredns.sh)")


@dataclass
class Ports:
    """Ports of one CoreDNS, allocated before its Corefile is written."""

    dns: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    metrics: int = field(default_factory=free_port)
    ready: int = field(default_factory=free_port)
    health: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.dns}"

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics}"


def zone_file(path: Path, n_names: int = len(NAMES)) -> Path:
    """Write the `example.test.` zone: A, AAAA, TXT, MX and SRV records for each of names(n_names)."""
    lines = [
        f"$ORIGIN {ZONE}",
        "$TTL 30",
        f"@ IN SOA ns.{ZONE} admin.{ZONE} 1 7200 3600 1209600 30",
        f"@ IN NS ns.{ZONE}",
        "ns IN A 192.0.2.1",
        "@ IN MX 10 mail",
        "mail IN A 192.0.2.2",
    ]
    for i, name in enumerate(names(n_names)):
        lines += [
            f"{name} IN A 192.0.2.{i % 250 + 1}",
            f"{name} IN AAAA 2001:db8::{i + 1:x}",
            f'{name} IN TXT "v=spf1 -all {i}"',
            f"_svc.{name} IN SRV 10 5 443 {name}",
            f"{name} IN MX 10 mail",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _served(ports: Ports) -> str:
    """The opening of a lab server block: its DNS port, metrics, health and ready on loopback."""
    return f"""
.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}
    health 127.0.0.1:{ports.health}
    ready 127.0.0.1:{ports.ready}"""


def edge_corefile(
    ports: Ports,
    upstreams: Sequence[str],
    *,
    cache_ttl: int = 5,
    log: bool = False,
    cache_capacity: int | None = None,
    max_concurrent: int | None = None,
    loop: bool = False,
    prefer_udp: bool = False,
    extra: str = "",
) -> str:
    """A caching forwarder to `upstreams` (host:port), with metrics, health, ready and reload.

    `prefer_udp` forwards queries that came over TCP (from a node-local cache) over UDP, as the
    lab's relays carry only UDP. `extra` is appended inside the server block (the lab breaks a
    reload with it)."""
    logged = "\n    log" if log else ""
    cache = f"cache {cache_ttl}" + (
        f" {{\n        success {cache_capacity}\n        denial {cache_capacity}\n    }}" if cache_capacity else ""
    )
    limit = f"\n        max_concurrent {max_concurrent}" if max_concurrent else ""
    limit += "\n        prefer_udp" if prefer_udp else ""
    looped = "\n    loop" if loop else ""
    return f"""{_served(ports)}
    errors{logged}{looped}
    {cache}
    forward . {" ".join(upstreams)} {{
        max_fails 2
        health_check 0.5s{limit}
    }}
    reload 2s 1s{extra}
}}
"""


def nodelocal_corefile(ports: Ports, edge: str, *, cache_ttl: int = 30, cache_capacity: int = 9984) -> str:
    """A node-local DNS cache (Kubernetes' NodeLocal DNSCache: CoreDNS on every node) in front of
    a cluster DNS edge: it caches, and forwards its misses to the edge over TCP (`force_tcp`), as
    node-local-dns does to kube-dns."""
    return f"""{_served(ports)}
    errors
    loop
    cache {cache_ttl} {{
        success {cache_capacity}
        denial {cache_capacity} 5
    }}
    forward . {edge} {{
        force_tcp
    }}
    reload 2s 1s
}}
"""


def upstream_corefile(
    ports: Ports, zone: Path, fault: Fault | None = None, *, log: bool = False, servfail_match: str | None = None
) -> str:
    """The authoritative upstream for `zone` (see zone_file) and PTRs, or one that fails every query.

    Faults: "slow" answers after 3 s, beyond forward's 2 s read timeout, so the edge answers
    SERVFAIL; "servfail" answers SERVFAIL; "drop" never answers. `servfail_match` (a regex on the
    query name) answers SERVFAIL for the names it matches only, as a broken subtree would. It has
    no `reload` plugin: that plugin and SIGUSR1 (how CoreDNS.reconfigure reloads it at once) race
    and break each other.
    """
    serve = {
        None: f"file {zone} {ZONE}",
        "slow": "erratic {\n        delay 1 3s\n    }",
        "servfail": "template ANY ANY {\n        rcode SERVFAIL\n    }",
        "drop": "erratic {\n        drop 1\n    }",
    }[fault]
    if servfail_match is not None and fault is None:
        serve = (
            f'template ANY ANY {{\n        match "{servfail_match}"\n        rcode SERVFAIL\n'
            f"        fallthrough\n    }}\n    {serve}"
        )
    logged = "\n    log" if log else ""
    reverse = (
        ""
        if fault
        else f"""
in-addr.arpa.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}{logged}
    template IN PTR {{
        answer "{{{{ .Name }}}} 30 IN PTR host.{ZONE}"
    }}
}}
"""
    )
    return f"""
.:{ports.dns} {{
    bind 127.0.0.1
    prometheus 127.0.0.1:{ports.metrics}
    ready 127.0.0.1:{ports.ready}
    errors{logged}
    {serve}
}}
{reverse}"""


@dataclass
class CoreDNS:
    name: str
    ports: Ports
    corefile: Path
    child: children.Child

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def log(self) -> Path:
        return self.child.log

    @property
    def address(self) -> str:
        return self.ports.address

    @property
    def dns_port(self) -> int:
        return self.ports.dns

    @property
    def metrics_port(self) -> int:
        return self.ports.metrics

    async def reconfigure(self, text: str, *, wait_ready: bool = True, timeout: float = 20.0) -> None:
        """Rewrite the Corefile and return once CoreDNS runs it; raise if the reload failed.

        A Corefile with `reload` is picked up by that plugin (within its interval); one without
        gets SIGUSR1 and reloads at once. `erratic` reports ready only after it has answered a few
        queries: pass wait_ready=False for it.
        """
        uses_reload_plugin = bool(_RELOAD_DIRECTIVE.search(self.corefile.read_text()))
        offset = self.log.stat().st_size
        self.corefile.write_text(text)
        if not uses_reload_plugin:
            self.child.signal(signal.SIGUSR1)
        outcome = await self._wait_log(_RELOAD_DONE, offset, timeout)
        if outcome != "Reloading complete":
            raise RuntimeError(f"CoreDNS {self.name} did not reload: {outcome}")
        if wait_ready:
            await self.child.wait_http_ok(f"http://127.0.0.1:{self.ports.ready}/ready", timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP: the server holds its sockets but answers nothing, like a hung process."""
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal(signal.SIGCONT)

    async def _wait_log(self, pattern: re.Pattern[str], offset: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(offset)
                match = pattern.search(f.read().decode(errors="replace"))
            if match:
                return match.group(0)
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"CoreDNS {self.name}: no {pattern.pattern!r} in its log within {timeout}s "
            f"(exit code {self.proc.poll()}); log: {self.log.read_text()[-2000:]}"
        )


@contextlib.asynccontextmanager
async def run_coredns(corefile: str, ports: Ports, *, workdir: Path, name: str) -> AsyncIterator[CoreDNS]:
    """Run CoreDNS on `corefile` (which must serve `ready` on ports.ready) until ready; kill it on exit."""
    binary = coredns_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"Corefile.{name}"
    path.write_text(corefile)
    log = workdir / f"coredns.{name}.log"
    async with children.run(
        [str(binary), "-conf", str(path)],
        log=log,
        cwd=workdir,
        name=f"coredns {name}",
        ready_url=f"http://127.0.0.1:{ports.ready}/ready",
        ready_timeout=30,
    ) as child:
        yield CoreDNS(name, ports, path, child)

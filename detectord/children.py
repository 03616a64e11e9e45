"""Child processes, for everything that runs a real peer (the lab, the tests, the benchmarks, the
mixin comparison's temporary Prometheus): started in a process group of their own with output to
a log, ready when an HTTP endpoint answers 200, stopped within a deadline, and killed by the
kernel if this process dies first, so that nothing is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import signal
import socket
import ssl as ssl_
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from detectord.errors import DetectordError

STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class ChildError(DetectordError):
    """A child exited early or never became ready; the message ends with its log's tail."""

    def __init__(self, name: str, reason: str, log_tail: str) -> None:
        self.name = name
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(f"{name}: {reason}; log: {log_tail}")


@dataclass
class Child:
    """One running child: its process (the leader of its own group) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        return tail(self.log, n)

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def wait_http_ok(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        ssl: ssl_.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        await wait_http_ok(url, timeout=timeout, child=self, ssl=ssl, headers=headers)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the group (SIGCONT first: a stopped process cannot exit), SIGKILL it if it has
        not exited within `timeout`; return its exit code."""
        if self.alive:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                await loop.run_in_executor(None, self.proc.wait)
        return int(self.proc.returncode)


def _die_with_parent() -> None:
    # In the child, before exec: SIGKILL it when the thread that started it ends, so a runner
    # killed with -9 leaves no child behind. Children are started from the event loop's thread.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Child:
    """Start `argv` in its own process group, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Child(name or Path(argv[0]).name, proc, log)


@contextlib.asynccontextmanager
async def run(
    argv: Sequence[str],
    *,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    ready_url: str | None = None,
    ready_timeout: float = 30.0,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> AsyncIterator[Child]:
    """A child for the duration of the block: started, ready once `ready_url` answers 200 (if
    given), stopped on exit however the block ends."""
    child = spawn(argv, log=log, cwd=cwd, env=env, name=name)
    try:
        if ready_url is not None:
            await child.wait_http_ok(ready_url, timeout=ready_timeout)
        yield child
    finally:
        await child.stop(stop_timeout)


async def wait_http_ok(
    url: str,
    *,
    timeout: float = 30.0,
    child: Child | None = None,
    ssl: ssl_.SSLContext | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll `url` (trusting `ssl`'s CAs, sending `headers`) until it answers 200; fail early if
    `child` exits, naming its log."""
    deadline = time.monotonic() + timeout
    last: object = None
    name = child.name if child is not None else url
    connector = aiohttp.TCPConnector(ssl=ssl if ssl is not None else True)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        while time.monotonic() < deadline:
            if child is not None and not child.alive:
                raise ChildError(name, f"exited with {child.proc.returncode} before {url} answered", child.tail())
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
                    last = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = exc
            await asyncio.sleep(0.1)
    raise ChildError(
        name, f"{url} not ready after {timeout:g}s (last: {last!r})", child.tail() if child is not None else "<no log>"
    )


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of client sockets (Linux; 32768-60999 elsewhere)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


_handed_out: set[int] = set()
_random = random.SystemRandom()
LOWEST_PORT = 10000


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 for TCP (and, for DNS, UDP too) right now.

    It lies below the kernel's ephemeral range, so no client socket can take it while its server
    restarts (a crashed CoreDNS comes back on its own port), and this process never hands it out
    twice."""
    lo = LOWEST_PORT
    hi = ephemeral_ports()[0] - 1
    for _ in range(10000):
        port = _random.randint(lo, hi) if hi > lo else 0
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
                port = int(s.getsockname()[1])
            if kind != socket.SOCK_STREAM:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port in {lo}-{hi} on 127.0.0.1")


def tail(log: Path | None, n: int = 2000) -> str:
    if log is None or not log.exists():
        return "<no log>"
    return log.read_bytes()[-n:].decode(errors="replace")

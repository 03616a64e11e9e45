"""Real peer processes for the lab and the tests: CoreDNS, Prometheus, Alertmanager, dnsperf.

Each peer is started on unused loopback ports by an async context manager and killed (with its
whole process group) on exit, or by the kernel if this process dies first, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import NoReturn

import aiohttp

REPO = Path(__file__).resolve().parents[2]


def missing_peer(msg: str) -> NoReturn:
    """Skip a test whose peer is not installed here; under CI, where `make test` installs it, fail."""
    import pytest  # bench/ imports this package without pytest

    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(msg)
    pytest.skip(msg)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 for TCP (and, for DNS, UDP) right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if kind == socket.SOCK_STREAM:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@contextlib.asynccontextmanager
async def run_process(
    argv: Sequence[str], *, log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Start argv in its own process group, output to `log`; kill the group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=_die_with_parent,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # In the child, before exec: SIGKILL it when the thread that started it ends, so a lab or
    # test runner killed with -9 leaves no CoreDNS or Prometheus behind. Popen runs on the
    # event loop's (main) thread.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def wait_http_ok(url: str, *, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
                       log: Path | None = None) -> None:
    """Poll url until it answers 200, or fail naming the peer's log."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}; log: {_tail(log)}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
                    last = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r}); log: {_tail(log)}")


def _tail(log: Path | None, n: int = 2000) -> str:
    if log is None or not log.exists():
        return "<no log>"
    return log.read_bytes()[-n:].decode(errors="replace")

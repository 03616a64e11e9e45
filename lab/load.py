"""DNS load from dnsperf whose rate follows a function of time: the lab's slowly breathing "normal",
and the floods its faults add on top.

dnsperf takes a fixed rate, so the load runs as back-to-back dnsperf processes of `segment`
seconds each, every one at the rate due at its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from detectord import children
from lab.peers.dnsperf import dnsperf_binary

RateFn = Callable[[float], float]


@dataclass(frozen=True)
class Modulation:
    """rate(t) = qps * (1 + depth * sin(2 pi t / period + phase)): traffic that is never flat."""

    period_s: float = 600.0
    depth: float = 0.3
    phase: float = 0.0

    def factor(self, t: float) -> float:
        if self.depth <= 0 or self.period_s <= 0:
            return 1.0
        return 1.0 + self.depth * math.sin(2 * math.pi * t / self.period_s + self.phase)


class DnsperfLoop:
    """Runs dnsperf against 127.0.0.1:`port` at `rate(t)` queries a second. Each segment reads
    the next of the `queries` files (dnsperf always starts at a file's first line)."""

    def __init__(
        self,
        name: str,
        port: int,
        queries: Sequence[Path],
        rate: RateFn,
        *,
        log: Path,
        segment_s: float = 10.0,
        max_outstanding: int = 2000,
        timeout_s: float = 5.0,
    ) -> None:
        self.name = name
        self.port = port
        self.queries = list(queries)
        self.segments = 0
        self.rate = rate
        self.log = log
        self.segment_s = segment_s
        self.max_outstanding = max_outstanding
        self.timeout_s = timeout_s
        self.current_qps = 0.0
        # (segment start, its rate) in seconds of load time: what dnsperf was asked to send.
        self.history: list[tuple[float, float]] = []
        self._procs: list[children.Child] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"load-{self.name}")

    async def _run(self) -> None:
        binary = dnsperf_binary()
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time() - self._t0
            qps = max(0.0, self.rate(t))
            self.current_qps = qps
            self.history.append((t, float(int(qps)) if qps >= 1 else 0.0))
            self._reap()
            if qps >= 1:
                argv = [
                    binary,
                    "-s",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-d",
                    str(self.queries[self.segments % len(self.queries)]),
                    "-l",
                    f"{self.segment_s:g}",
                    "-Q",
                    str(int(qps)),
                    "-q",
                    str(self.max_outstanding),
                    "-c",
                    "2",
                    "-t",
                    f"{self.timeout_s:g}",
                ]
                self._procs.append(children.spawn(argv, log=self.log, name=f"dnsperf {self.name}"))
                self.segments += 1
            # The next segment starts when this one stops sending; the last one may still be
            # waiting out its outstanding queries.
            await asyncio.sleep(self.segment_s - (loop.time() - self._t0 - t))

    def requested(self, t0: float, t1: float) -> float:
        """The mean query rate dnsperf was asked for over [t0, t1] seconds of load time."""
        if t1 <= t0 or not self.history:
            return 0.0
        total = 0.0
        for i, (start, qps) in enumerate(self.history):
            end = min(self.history[i + 1][0] if i + 1 < len(self.history) else t1, start + self.segment_s)
            overlap = min(end, t1) - max(start, t0)
            if overlap > 0:
                total += qps * overlap
        return total / (t1 - t0)

    def _reap(self) -> None:
        self._procs = [p for p in self._procs if p.alive]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for p in self._procs:
            p.signal(signal.SIGKILL)
        for p in self._procs:
            await p.stop()
        self._procs.clear()
        self.current_qps = 0.0

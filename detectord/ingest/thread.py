"""The ingest thread: runs the event loop's ingest jobs one after another and hands their results
back in batches, not one wake-up of the loop per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# How long a finished job's result may wait for the jobs queued behind it before its loop is
# told: while requests keep coming, their answers go back in batches at least this often, at
# once when the queue runs dry, and before a long job. One wake-up a request, as an executor
# gives, cost about half as much again as a 500-series request's ingest, mostly the two threads
# taking the GIL from each other (bench/fleet_scale.py, "per CPU second"); so did handing each
# result back as soon as no hand-back was on its way.
HAND_BACK_S = 0.005

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[object, ...], bool]
_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class IngestThread:
    """One thread, its jobs in the order they were submitted (the ingest path's state has a
    single writer), started with the first job."""

    def __init__(self, name: str = "detectord-ingest") -> None:
        self._name = name
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., T], *args: object, long: bool = False) -> asyncio.Future[T]:
        """Run fn(*args) on the thread; its result (or exception) comes back in the caller's
        loop. A job whose future is cancelled before it starts does not run. `long`: it may take
        a while (a slice of a big request), so what finished before it is handed back first."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the ingest thread is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.append((loop, fut, fn, args, long))
            if self._waiting:
                self._cond.notify()
        return fut

    def close(self) -> None:
        """Run the jobs already queued, hand back their results and stop; refuse new ones."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        done: list[tuple[asyncio.AbstractEventLoop, _Done]] = []
        oldest = 0.0
        while True:
            with self._cond:
                if not self._jobs and not done:
                    self._waiting = True
                    while not self._jobs and not self._closed:
                        self._cond.wait()
                    self._waiting = False
                    if not self._jobs:  # closed, and all done and handed back
                        return
                job = self._jobs.popleft() if self._jobs else None
            if job is None:  # the queue ran dry
                _hand_back(done)
                done = []
                continue
            loop, fut, fn, args, long = job
            if fut.cancelled():
                continue
            if long and done:
                _hand_back(done)
                done = []
            try:
                done.append((loop, (fut, fn(*args), None)))
            except BaseException as exc:  # the caller gets it, as from an executor
                done.append((loop, (fut, None, exc)))
            now = time.monotonic()
            if len(done) == 1:
                oldest = now
            elif now - oldest >= HAND_BACK_S:
                _hand_back(done)
                done = []


def _hand_back(done: list[tuple[asyncio.AbstractEventLoop, _Done]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
    for loop, item in done:
        by_loop.setdefault(loop, []).append(item)
    for loop, items in by_loop.items():
        # A closed loop: nobody waits for these any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[_Done]) -> None:
    for fut, result, exc in items:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

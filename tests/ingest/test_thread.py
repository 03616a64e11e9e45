"""The ingest thread: jobs one at a time in order, results and errors back in the caller's loop,
and answers not held back while more requests keep coming."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from detectord.ingest.thread import IngestThread


def _numbered(ran: list[int], seconds: float) -> Callable[[int], int]:
    """A job that takes `seconds`, then notes its number in `ran` and returns it."""

    def job(i: int) -> int:
        time.sleep(seconds)
        ran.append(i)
        return i

    return job


async def test_jobs_run_one_at_a_time_in_order_on_one_thread() -> None:
    thread = IngestThread()
    ran: list[int] = []
    names: set[str] = set()
    busy = threading.Lock()

    def job(i: int) -> int:
        assert busy.acquire(blocking=False), "two jobs at once"
        try:
            names.add(threading.current_thread().name)
            time.sleep(0.0005)
            ran.append(i)
            return i * i
        finally:
            busy.release()

    try:
        got = await asyncio.gather(*(thread.submit(job, i) for i in range(200)))
    finally:
        thread.close()
    assert got == [i * i for i in range(200)]
    assert ran == list(range(200))
    assert names == {"detectord-ingest"}


async def test_a_job_that_fails_fails_its_caller_only() -> None:
    thread = IngestThread()

    def fail() -> None:
        raise ValueError("bad body")

    try:
        before = thread.submit(lambda: 1)
        failing = thread.submit(fail)
        after = thread.submit(lambda: 2)
        assert await before == 1
        with pytest.raises(ValueError, match="bad body"):
            await failing
        assert await after == 2
    finally:
        thread.close()


async def test_answers_go_back_while_more_requests_keep_coming() -> None:
    """The first job's result is handed back within about HAND_BACK_S of its end, not once the
    queue runs dry: a stream of requests that never lets up must still get its answers."""
    thread = IngestThread()
    ran: list[int] = []
    job = _numbered(ran, 0.002)
    try:
        futures = [thread.submit(job, i) for i in range(200)]
        assert await futures[0] == 0
        seen = len(ran)
        await asyncio.gather(*futures)
    finally:
        thread.close()
    assert seen < 100, f"the first answer came after {seen} of 200 jobs"


async def test_an_answer_is_not_held_behind_a_long_job_queued_after_it() -> None:
    """A small request's answer goes back before the slice of a big request that runs next."""
    thread = IngestThread()
    long_done = threading.Event()

    def long_job() -> None:
        time.sleep(1.0)
        long_done.set()

    try:
        short = thread.submit(lambda: "small request")
        long = thread.submit(long_job, long=True)
        assert await short == "small request"
        assert not long_done.is_set(), "the answer waited for the long job queued after it"
        await long
    finally:
        thread.close()


async def test_a_job_cancelled_before_it_starts_does_not_run() -> None:
    thread = IngestThread()
    started = threading.Event()
    go_on = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        started.set()
        go_on.wait(10)
        ran.append("blocker")

    try:
        first = thread.submit(blocker)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        cancelled = thread.submit(ran.append, "cancelled")
        cancelled.cancel()
        last = thread.submit(ran.append, "last")
        go_on.set()
        await first
        await last
    finally:
        thread.close()
    assert ran == ["blocker", "last"]


async def test_closing_runs_what_is_queued_and_refuses_more() -> None:
    thread = IngestThread()
    ran: list[int] = []
    job = _numbered(ran, 0.001)
    futures = [thread.submit(job, i) for i in range(20)]
    await asyncio.get_running_loop().run_in_executor(None, thread.close)
    assert ran == list(range(20))
    assert await asyncio.gather(*futures) == list(range(20))
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(job, 20)

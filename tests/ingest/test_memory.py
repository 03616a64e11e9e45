"""Freed heap goes back to the system: a fleet that grew leaves the tables and arrays it outgrew
freed in the middle of the heap, which glibc keeps until asked; the ingest thread's periodic pass
asks once the process has grown enough since it last did."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from detectord.config import IngestConfig
from detectord.ingest import pipeline
from detectord.ingest.features import FEATURE_NAMES
from detectord.ingest.metrics import IngestMetrics
from detectord.ingest.normalise import InputPlan
from detectord.ingest.pipeline import GIVE_BACK_AFTER_GROWING, Ingestor, ScoreRequest, resident_bytes

MiB = 1024**2


class _Discard:
    def submit_many(self, reqs: list[ScoreRequest]) -> int:
        return len(reqs)


def _ingestor(registry: CollectorRegistry) -> Ingestor:
    return Ingestor(
        step_ms=15_000,
        instance_labels=IngestConfig.instance_labels,
        window=8,
        inputs=InputPlan.default(FEATURE_NAMES),
        max_instances=100,
        max_gap_steps=5,
        max_decoded=1 << 30,
        max_future_s=600.0,
        stale_after_s=120.0,
        failed_scrapes=2,
        crash_loop_restarts=3,
        crash_loop_within_s=600.0,
        worker=_Discard(),
        metrics=IngestMetrics(registry),
    )


@pytest.mark.skipif(pipeline._malloc_trim is None or resident_bytes() is None, reason="needs glibc and /proc")
def test_heap_a_grown_process_freed_goes_back_at_the_next_pass() -> None:
    registry = CollectorRegistry()
    ing = _ingestor(registry)
    try:
        # 256 MiB in 8 KiB blocks, each followed by a small block that stays: freed, the big ones
        # are holes below the top of the heap, which glibc does not give back on its own.
        held, kept = [], []
        for _ in range(32_768):
            held.append(bytes(8192))
            kept.append(bytes(600))
        grown = resident_bytes()
        del held
        freed = resident_bytes()
        assert grown is not None and freed is not None
        assert freed > grown - 32 * MiB, "glibc gave the holes back by itself: nothing to test"
        assert 128 * MiB >= GIVE_BACK_AFTER_GROWING

        ing.evict_idle(time.monotonic() - 3600)

        after = resident_bytes()
        assert after is not None
        given = registry.get_sample_value("detectord_memory_given_back_bytes_total")
        assert after < freed - 128 * MiB, f"resident {freed / MiB:.0f} MiB, then {after / MiB:.0f} MiB"
        assert given is not None and given >= 128 * MiB
        del kept
    finally:
        ing.close()

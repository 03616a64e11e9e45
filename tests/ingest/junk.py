"""Junk remote-write requests for the fuzz test and bench/junk_memory.py: the seeded mutants of
`fuzzbodies` mixed with valid requests whose every series is new."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

from tests.ingest import fuzzbodies
from tests.support import V1_HEADERS, V2_HEADERS, coredns_scrape, v1_body, v2_body


def made_up(seed: int, n: int) -> Iterator[tuple[bytes, dict[str, str]]]:
    """Valid requests whose every series is new: CoreDNS metrics of made-up instances, and
    series no feature reads, with long random label values."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    for i in range(n):
        inst = f"junk-{seed}-{i}:{rng.randrange(65536)}"
        series = list(coredns_scrape(inst, now, 1))
        series += [
            ({"__name__": f"junk_metric_{rng.randrange(10**6)}", "id": rng.randbytes(60).hex()}, [(now, 1.0)])
            for _ in range(100)
        ]
        if i % 2:
            yield v1_body(series), V1_HEADERS
        else:
            yield v2_body(series), V2_HEADERS


def junk_requests(seed: int, n: int) -> Iterator[tuple[bytes, dict[str, str]]]:
    """n requests (body, headers): 45 % remote-write 1.0 mutants, 45 % 2.0, 10 % made-up series."""
    v1 = fuzzbodies.bodies(seed, n, "1.0")
    v2 = fuzzbodies.bodies(seed, n, "2.0")
    new = made_up(seed, n)
    rng = random.Random(seed)
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            yield next(v1), V1_HEADERS
        elif r < 0.9:
            yield next(v2), V2_HEADERS
        else:
            yield next(new)

"""The long fuzz run, by hand: the C and pure-Python decoders against each other for as long as you
let them, on seeded structure-aware mutants (as the CI differential test, over many more seeds),
or coverage-guided with atheris when it is installed (pip install atheris).

    .venv/bin/python -m tests.ingest.fuzz_decoders --seeds 0:200             # 200 seeds x 2 versions
    .venv/bin/python -m tests.ingest.fuzz_decoders --atheris -atheris_runs=1000000

A disagreement stops the run with the seed and index (or the input atheris saved) that reproduce it.
"""

from __future__ import annotations

import argparse
import sys
import time

import snappy

from detectord.ingest.remote_write import Version
from tests.ingest import fuzzbodies
from tests.ingest.test_decoder_differential import _Pair

VERSIONS: tuple[Version, ...] = ("1.0", "2.0")


def seeded(first: int, last: int, per_seed: int) -> None:
    pair = _Pair()
    t0 = time.monotonic()
    for seed in range(first, last):
        for version in VERSIONS:
            for i, body in enumerate(fuzzbodies.bodies(seed, per_seed, version)):
                pair.check(body, version, tight=i % 2 == 1, where=f"seed {seed} {version} body {i}")
        done = (seed - first + 1) * per_seed * len(VERSIONS)
        print(f"seed {seed}: {done:,} bodies agree in {time.monotonic() - t0:.0f}s, {pair.seen}", flush=True)


def with_atheris(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]

    pair = _Pair()

    def one(data: bytes) -> None:
        if not data:
            return
        version = VERSIONS[data[0] & 1]
        pair.check(bytes(snappy.compress(data[1:])), version, tight=bool(data[0] & 2), where="atheris input")

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0:100", help="FIRST:LAST seeds of the mutator (default 0:100)")
    p.add_argument("--per-seed", type=int, default=10_000, help="bodies per seed and version")
    p.add_argument("--atheris", action="store_true", help="coverage-guided; the rest of argv goes to libFuzzer")
    args, rest = p.parse_known_args()
    if args.atheris:
        with_atheris(rest)
        return
    first, last = (int(x) for x in args.seeds.split(":"))
    seeded(first, last, args.per_seed)


if __name__ == "__main__":
    main()

"""The daemon's object memory in transparent huge pages: what the objects made afterwards live in,
and that the memory they leave goes back to the system. In a child process: the arenas' allocator
changes for good."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectord.serve import hugepages

MiB = 1024**2

# The fleet is made after a thread ran, as in the daemon, which starts its executor's threads right
# after turning huge pages on.
_CHILD = r"""
import gc, json, threading
from detectord.ingest.pipeline import resident_bytes as resident
from detectord.serve import _hugepages, hugepages

def advised():
    spans, span = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                span = [int(x, 16) for x in head.split("-")]
            elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                spans.append(span)
    return spans

why_not = hugepages.use_huge_pages()
# As the daemon does right after: a thread runs (its frames take memory from the same allocator).
worker = threading.Thread(target=lambda: sum(range(10)))
worker.start()
worker.join()
before = resident()
fleet = [(f"10.0.{i >> 8}.{i & 255}:9153", i) for i in range(1_500_000)]
grown, made = resident(), _hugepages.stats()
intact = sum(i for _, i in fleet) == sum(range(1_500_000))
del fleet
gc.collect()
freed, emptied = resident(), _hugepages.stats()
again = [(str(i), i) for i in range(1_000_000)]
print(json.dumps({
    "why_not": why_not, "before": before, "grown": grown, "freed": freed, "intact": intact,
    "made": made, "emptied": emptied, "again": _hugepages.stats(), "advised": advised(),
}))
"""


@pytest.mark.skipif(
    hugepages._hugepages is None,  # type: ignore[attr-defined]
    reason="the huge-page arenas are not built",
)
def test_objects_live_in_advised_regions_and_their_memory_goes_back() -> None:
    if hugepages.thp_mode() in (None, "never"):
        pytest.skip(f"the kernel offers no transparent huge pages ({hugepages.thp_mode()})")
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(done.stdout)
    assert got["why_not"] is None
    made, emptied, again = got["made"], got["emptied"], got["again"]
    assert got["intact"]

    # The fleet's objects are in the regions, and each region is one the kernel was asked to back
    # with huge pages.
    grown = got["grown"] - got["before"]
    assert grown > 100 * MiB
    assert made["arenas_held"] * made["arena_bytes"] > 0.8 * grown
    for start in made["regions"]:
        assert any(a <= start and start + made["region_bytes"] <= b for a, b in got["advised"]), hex(start)

    # Freed, its memory is the system's again, and the next objects reuse the same arenas.
    assert got["freed"] < got["before"] + 0.1 * grown, f"{got['freed'] / MiB:.0f} MiB resident after freeing"
    assert emptied["arenas_spare"] > 0.8 * made["arenas_held"]
    assert again["regions"] == made["regions"]
    assert again["arenas_spare"] < emptied["arenas_spare"]


def test_the_kernels_mode_is_read_from_its_brackets(tmp_path: Path) -> None:
    modes = tmp_path / "enabled"
    for text, mode in [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always")]:
        modes.write_text(text)
        assert hugepages.thp_mode(modes) == mode
    modes.write_text("always madvise [never]\n")
    assert hugepages.thp_mode(modes) == "never"
    assert hugepages.thp_mode(tmp_path / "absent") is None


def test_a_kernel_without_them_leaves_plain_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modes = tmp_path / "enabled"
    modes.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_ENABLED", modes)
    assert hugepages.use_huge_pages() in (
        "the kernel's transparent huge pages are off (never)",
        "built without a C compiler",
    )
    monkeypatch.setattr(hugepages, "THP_ENABLED", tmp_path / "absent")
    assert hugepages.use_huge_pages() in (
        "the kernel's transparent huge pages are absent",
        "built without a C compiler",
    )

"""The daemon's object memory in transparent huge pages: Python's arenas carved from regions the
kernel is asked to back with 2 MiB pages (the C module `_hugepages` says why and how)."""

from __future__ import annotations

import re
from pathlib import Path

try:
    from detectord.serve import _hugepages  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: plain pages
    _hugepages = None

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path | None = None) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"); None where it has none."""
    try:
        text = (path or THP_ENABLED).read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def use_huge_pages() -> str | None:
    """From now on, for good, put the interpreter's new arenas in huge-page regions where the kernel
    and this build allow. None if it did; else why not, for the log."""
    if _hugepages is None:
        return "built without a C compiler"
    mode = thp_mode()
    if mode is None or mode == "never":
        return f"the kernel's transparent huge pages are {'absent' if mode is None else 'off (never)'}"
    _hugepages.install()
    return None

"""Real peer processes for the lab, the tests and the benchmarks: CoreDNS, Prometheus,
Alertmanager, dnsperf and detectord itself.

Each peer is started on unused loopback ports by an async context manager built on
`detectord.children` (own process group, log, readiness, stop with a deadline, killed with us).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[2]


def missing_peer(msg: str) -> NoReturn:
    """Skip a test whose peer is not installed here; under CI, where `make test` installs it, fail."""
    import pytest  # bench/ imports this package without pytest

    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(msg)
    pytest.skip(msg)

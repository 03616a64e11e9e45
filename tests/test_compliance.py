"""The public remote-write 2.0 receiver compliance suite (prometheus/compliance, remotewrite/receiver,
built by scripts/build-compliance.sh) against a live `detectord serve`: every check passes."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from lab.peers.detectord import run_detectord
from tests.support import REPO

pytestmark = pytest.mark.e2e

# The pinned suite's checks: each runs once per receiver in its config, as subtest RECEIVER.
RECEIVER = "detectord"
CHECKS = 205
_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+)", re.MULTILINE)


def _suite() -> Path:
    out = subprocess.run(
        [str(REPO / "scripts/build-compliance.sh")], capture_output=True, text=True, timeout=1800, check=False
    )
    assert out.returncode == 0, f"scripts/build-compliance.sh failed:\n{out.stderr[-3000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


async def test_the_receiver_compliance_suite_passes_every_check(tmp_path: Path) -> None:
    suite = await asyncio.to_thread(_suite)
    async with run_detectord(workdir=tmp_path / "detectord") as det:
        cfg = tmp_path / "config.yml"
        cfg.write_text(yaml.safe_dump({"remote_write": [{"name": RECEIVER, "url": det.write_url}]}))
        proc = await asyncio.create_subprocess_exec(
            str(suite),
            "-test.v",
            "-test.count=1",
            "-test.timeout=300s",
            cwd=tmp_path,
            env={"PROMETHEUS_RW2_COMPLIANCE_CONFIG_FILE": str(cfg), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 360)
        assert det.child.alive, "detectord died during the compliance suite"
    text = stdout.decode(errors="replace")
    results = _RESULT.findall(text)
    failed = [name for verdict, name in results if verdict == "FAIL"]
    skipped = [name for verdict, name in results if verdict == "SKIP"]
    passed = [name for verdict, name in results if verdict == "PASS" and name.endswith(f"/{RECEIVER}")]
    assert not failed, f"{len(failed)} compliance checks failed: {failed}\n{text[-6000:]}"
    assert not skipped, f"compliance checks skipped: {skipped}"
    assert proc.returncode == 0, text[-3000:]
    assert len(passed) == CHECKS, f"{len(passed)} checks passed, expected all {CHECKS}"

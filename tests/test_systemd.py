"""The systemd unit: `systemd-analyze verify` finds nothing wrong, its hardening scores an exposure
of 2.0 or lower, and detectord speaks `Type=notify`: READY=1 once ready, STATUS= lines, the
watchdog beaten from the event loop, RELOADING=1 and READY=1 around a reload, STOPPING=1.

systemd is not PID 1 on the machines the tests run on, so the notification socket is the test's:
a datagram socket at $NOTIFY_SOCKET, which is all systemd's side of the protocol is."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from lab.peers.detectord import run_detectord

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd/detectord.service"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


@needs_systemd_analyze
def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    # As installed: ExecStart names where detectord is (here, this venv's), the rest is the file as shipped.
    text = UNIT.read_text()
    assert "ExecStart=/opt/detectord/bin/detectord serve" in text
    unit = tmp_path / "detectord.service"
    unit.write_text(text.replace("/opt/detectord/bin/detectord", str(Path(sys.prefix) / "bin/detectord")))
    got = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert got.returncode == 0 and got.stderr == "", got.stderr


@needs_systemd_analyze
def test_the_units_exposure_is_at_most_2() -> None:
    got = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True
    )
    found = re.search(r"Overall exposure level for detectord.service: (\d+\.\d)", got.stdout)
    assert found, got.stdout + got.stderr
    assert float(found.group(1)) <= 2.0, got.stdout
    for line in ("Type=notify", "WatchdogSec=", "StateDirectory=detectord", "ProtectSystem=strict", "DynamicUser=yes"):
        assert line in UNIT.read_text()


class _NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
        return [m for _, m in self.messages]

    async def wait_for(self, key: str, *, after: int = 0, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.drain()
            for i in range(after, len(got)):
                if key in got[i]:
                    return i
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {key} from detectord; got {self.drain()}")


@pytest.fixture
def sd(tmp_path: Path) -> Iterator[_NotifySocket]:
    s = _NotifySocket(tmp_path / "notify")
    yield s
    s.sock.close()


async def test_type_notify_ready_status_watchdog_reload_and_stop(tmp_path: Path, sd: _NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(sd.path), "WATCHDOG_USEC": "1000000"}
    async with run_detectord({"ingest": {"step": "1s"}, "model": {"any_step": True}}, workdir=tmp_path, env=env) as d:
        ready = await sd.wait_for("READY")
        got = sd.drain()
        # Start-up said what it was doing before it was ready, and nothing came before READY=1.
        assert got[0] == {"STATUS": "loading the model"}
        assert all("READY" not in m and "WATCHDOG" not in m for m in got[:ready])
        assert got[ready]["STATUS"].startswith("ready: 0 instances tracked (0 scoring, 0 warming, 0 down); model ")
        async with aiohttp.ClientSession() as s, s.get(f"{d.url}/-/ready") as r:
            assert r.status == 200
        # WATCHDOG_USEC=1s: beats every half second, from the event loop, each with the status.
        await asyncio.sleep(2.0)
        beats = [m for m in sd.drain()[ready:] if m.get("WATCHDOG") == "1"]
        assert len(beats) >= 3
        assert all(m["STATUS"].startswith("ready: ") for m in beats)

        d.child.signal(signal.SIGHUP)
        reloading = await sd.wait_for("RELOADING", after=ready + 1)
        assert int(sd.drain()[reloading]["MONOTONIC_USEC"]) > 0
        await sd.wait_for("READY", after=reloading)
        assert "reloaded" in d.log.read_text()

        assert await d.child.stop() == 0
    stopping = await sd.wait_for("STOPPING", timeout=1.0)
    assert sd.drain()[stopping]["STATUS"] == "shutting down"

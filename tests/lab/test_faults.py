"""The lab's benign changes on a real CoreDNS: a successful reload keeps the process and loads the
new Corefile; a restart stops it with SIGTERM and starts it again on its own ports, marked in the
truth."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from lab.faults import Reload, Restart
from lab.fleet import Fleet
from lab.topology import LoadSpec, Topology

pytestmark = pytest.mark.e2e


async def _ready(port: int) -> bool:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/ready") as r:
        return r.status == 200


async def test_a_reload_keeps_the_process_and_a_restart_replaces_it_on_its_ports(tmp_path: Path) -> None:
    fleet = Fleet(Topology(edges=1, upstreams=1), LoadSpec(), workdir=tmp_path, seed=1)
    try:
        await fleet.start()
        edge = fleet.nodes["edge-0"]
        assert edge.coredns is not None
        pid, ports = edge.coredns.proc.pid, edge.ports

        await Reload().apply(fleet, edge)
        assert edge.coredns.proc.pid == pid and ".invalid" in edge.coredns.corefile.read_text()
        assert "Reloading complete" in edge.coredns.log.read_text()
        await Reload().revert(fleet, edge)
        assert ".invalid" not in edge.coredns.corefile.read_text()

        restart = Restart()
        await restart.apply(fleet, edge)
        assert edge.coredns is not None and edge.coredns.proc.pid != pid and edge.ports == ports
        assert await _ready(ports.ready)
        assert [next(k for k in m if k != "instance") for m in restart.marks] == ["down_ms", "up_ms"]
    finally:
        await fleet.stop()

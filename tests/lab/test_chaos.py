"""The lab's path between an edge and its upstream: its own round-trip time, always, and a fault's
delay on top while it lasts."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from lab.chaos import PathFault, start_relay


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[float] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.answers.put_nowait(time.perf_counter())


async def _rtts(relay_port: int, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", relay_port))
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            transport.sendto(b"q%d" % i)
            out.append(await asyncio.wait_for(client.answers.get(), 2.0) - t0)
    finally:
        transport.close()
    return out


async def test_the_path_has_its_own_rtt_and_a_fault_adds_to_it() -> None:
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    upstream = echo_transport.get_extra_info("sockname")
    relay = await start_relay(0, upstream, base=PathFault(delay_s=0.03, jitter_s=0.01))
    port = relay.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    try:
        base = await _rtts(port, 20)
        assert min(base) >= 0.02 and max(base) < 0.1, base
        assert max(base) - min(base) > 0.005  # jittered
        relay.fault = PathFault(delay_s=0.2)
        faulted = await _rtts(port, 3)
        assert all(0.22 <= r < 0.4 for r in faulted), faulted
        relay.fault = PathFault()  # the fault's end leaves the path's own RTT
        after = await _rtts(port, 5)
        assert all(0.02 <= r < 0.1 for r in after), after
    finally:
        relay.close()
        echo_transport.close()


async def test_a_ramped_delay_creeps_up_then_holds() -> None:
    """`ramp`: the path's delay grows from nothing to the fault's over that long, then holds."""
    from detectord.config import Duration
    from lab.faults import UpstreamDelay
    from lab.fleet import Node
    from lab.peers.coredns import Ports

    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    relay = await start_relay(0, echo_transport.get_extra_info("sockname"))
    port = relay.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    edge = Node("edge-0", "edge", Ports(), Path("."), relay=relay)  # the primitive touches only its relay
    fault = UpstreamDelay(delay=Duration(0.3), ramp=Duration(3.0))
    stop = asyncio.Event()
    try:
        await fault.apply(None, edge)  # type: ignore[arg-type]
        during = asyncio.ensure_future(fault.during(None, edge, stop))  # type: ignore[arg-type]
        seen = []
        for _ in range(5):
            seen.append(min(await _rtts(port, 2)))
            await asyncio.sleep(0.9)
        assert seen[0] < 0.05 and seen[-1] >= 0.29, seen  # from nothing to the full 300 ms
        assert all(b >= a - 0.02 for a, b in itertools.pairwise(seen)), seen  # growing
        assert any(0.05 < s < 0.25 for s in seen), seen  # and on its way in between
        stop.set()
        await during
        await fault.revert(None, edge)  # type: ignore[arg-type]
        assert max(await _rtts(port, 3)) < 0.05
    finally:
        relay.close()
        echo_transport.close()

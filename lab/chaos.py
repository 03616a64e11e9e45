"""The network between an edge and its upstream: a UDP relay that can delay (fixed or jittered) or
drop queries on demand, as netem would, without needing root.

A real CoreDNS can delay or drop only while answering with canned records (`erratic`), which would
change the rcodes the edge sees; this relay keeps the upstream's real answers. It carries DNS over
UDP only: the lab's answers are small, so forward never falls back to TCP.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass


@dataclass
class PathFault:
    """What the path does to each query now: delay = delay_s ± jitter_s (uniform), dropped with drop_p."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    drop_p: float = 0.0

    def delay(self, rng: random.Random) -> float:
        if self.jitter_s <= 0:
            return self.delay_s
        return max(0.0, self.delay_s + rng.uniform(-self.jitter_s, self.jitter_s))


# forward closes a pooled socket after 10 s unused (and at once after an error): a client address
# idle this long will not be back, and its socket towards the upstream can go.
_IDLE_CLIENT_S = 15.0
_EXPIRE_EVERY_S = 2.0


class _Upstream(asyncio.DatagramProtocol):
    """One connected socket towards the upstream per client address, so answers find their way back."""

    def __init__(self, relay: Relay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.last_used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.relay.transport is not None:
            self.relay.transport.sendto(data, self.client)
            self.relay.answers += 1


class Relay(asyncio.DatagramProtocol):
    """Listens on 127.0.0.1:`port`, relays to `upstream` (host, port) through `base` (the path's
    own round-trip time, always) and `fault` (what a fault adds to it, while it lasts)."""

    def __init__(self, upstream: tuple[str, int], *, seed: int = 0, base: PathFault | None = None) -> None:
        self.upstream = upstream
        self.base = base or PathFault()
        self.fault = PathFault()
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = self.answers = self.dropped = 0
        # Queries lost because no socket towards the upstream could be opened (EMFILE): counted.
        self.failed = 0
        self._rng = random.Random(seed)
        self._clients: dict[tuple[str, int], _Upstream] = {}
        self._pending: set[asyncio.Handle] = set()
        self._connecting: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def counts(self) -> dict[str, int]:
        """What the relay did with the edge's queries (the lab writes it into the truth)."""
        return {"queries": self.queries, "answers": self.answers, "dropped": self.dropped, "failed": self.failed}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._expiry = self._loop.call_later(_EXPIRE_EVERY_S, self._expire_periodically)

    def _expire_periodically(self) -> None:
        self._expire()
        self._expiry = self._loop.call_later(_EXPIRE_EVERY_S, self._expire_periodically)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        f = self.fault
        if f.drop_p > 0 and self._rng.random() < f.drop_p:
            self.dropped += 1
            return
        delay = self.base.delay(self._rng) + f.delay(self._rng)
        if delay <= 0:
            self._send(data, addr)
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._pending.discard(handle)
            self._send(data, addr)

        handle = self._loop.call_later(delay, fire)
        self._pending.add(handle)

    def _send(self, data: bytes, client: tuple[str, int]) -> None:
        up = self._clients.get(client)
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.last_used = time.monotonic()
            up.transport.sendto(data)
            return
        waiting = self._connecting.get(client)
        if waiting is not None:
            waiting.append(data)
            return
        self._connecting[client] = [data]
        task = self._loop.create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: tuple[str, int]) -> None:
        try:
            _, up = await self._loop.create_datagram_endpoint(
                lambda: _Upstream(self, client), remote_addr=self.upstream
            )
        except OSError:
            self.failed += len(self._connecting.pop(client, []))
            return
        queued = self._connecting.pop(client, [])
        self._clients[client] = up
        assert up.transport is not None
        for data in queued:
            up.transport.sendto(data)

    def _expire(self) -> None:
        cutoff = time.monotonic() - _IDLE_CLIENT_S
        for client, up in list(self._clients.items()):
            if up.last_used < cutoff and up.transport is not None:
                up.transport.close()
                del self._clients[client]

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for h in self._pending:
            h.cancel()
        self._pending.clear()
        for t in self._tasks:
            t.cancel()
        for up in self._clients.values():
            if up.transport is not None:
                up.transport.close()
        self._clients.clear()
        if self.transport is not None:
            self.transport.close()


async def start_relay(port: int, upstream: tuple[str, int], *, seed: int = 0, base: PathFault | None = None) -> Relay:
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(
        lambda: Relay(upstream, seed=seed, base=base), local_addr=("127.0.0.1", port)
    )
    return relay

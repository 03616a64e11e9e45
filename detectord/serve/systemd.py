"""systemd's service notification protocol (sd_notify(3)) for `Type=notify` units: READY=1 once the
model is loaded and warm, STATUS= lines, WATCHDOG=1 from the event loop, RELOADING=1, STOPPING=1."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("detectord.systemd")

# How often STATUS= is refreshed when no watchdog asks for more.
STATUS_EVERY_S = 10.0


class Systemd:
    """The notification socket systemd handed us in $NOTIFY_SOCKET; every call is a no-op
    without one (started by hand, in a container, under another supervisor)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        addr = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@".
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as exc:  # systemd gone or its queue full: it is told again at the next beat
            log.warning("cannot notify systemd", error=str(exc))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd ≥ 253 match the reload to our READY=1 after it.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=shutting down")

    async def run(self, status: Callable[[], str]) -> None:
        """Refresh STATUS=, and beat the watchdog at half its period: from the event loop itself,
        so a loop stuck for WatchdogSec gets detectord restarted."""
        period = STATUS_EVERY_S if self.watchdog_s is None else min(STATUS_EVERY_S, self.watchdog_s / 2)
        while True:
            fields = [f"STATUS={status()}"]
            if self.watchdog_s is not None:
                fields.insert(0, "WATCHDOG=1")
            self.notify(*fields)
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

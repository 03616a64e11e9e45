"""A real Alertmanager (Debian's 0.25) on a loopback port, with gossip off and a blackhole receiver."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from detectord import children

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"

_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
  group_interval: 1s
receivers:
  - name: blackhole
"""


@dataclass
class Alertmanager:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    async def alerts(
        self,
        *,
        active: bool | None = None,
        silenced: bool | None = None,
        inhibited: bool | None = None,
        filter: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """GET /api/v2/alerts. `filter` holds matchers like 'alertname="CoreDNSAnomaly"'.

        Alertmanager leaves out alerts whose endsAt has passed (resolved ones) whatever the flags.
        """
        params: list[tuple[str, str]] = [("filter", m) for m in filter]
        for name, value in (("active", active), ("silenced", silenced), ("inhibited", inhibited)):
            if value is not None:
                params.append((name, "true" if value else "false"))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v2/alerts", params=params, timeout=aiohttp.ClientTimeout(total=5)) as resp,
        ):
            resp.raise_for_status()
            alerts: list[dict[str, Any]] = await resp.json()
            return alerts


def _config(webhook_url: str | None, group_by: Sequence[str] | None, group_wait: str) -> str:
    if webhook_url is None and group_by is None:
        return _CONFIG
    route: dict[str, Any] = {"receiver": "hook", "group_wait": group_wait, "group_interval": "1s"}
    if group_by is not None:
        route["group_by"] = list(group_by)
    receiver: dict[str, Any] = {"name": "hook"}
    if webhook_url is not None:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    text: str = yaml.safe_dump({"route": route, "receivers": [receiver]})
    return text


@contextlib.asynccontextmanager
async def run_alertmanager(
    workdir: Path,
    *,
    port: int | None = None,
    webhook_url: str | None = None,
    group_by: Sequence[str] | None = None,
    group_wait: str = "1s",
) -> AsyncIterator[Alertmanager]:
    """Start Alertmanager on 127.0.0.1:`port` (a free one if None) and wait until it is ready.
    Notifications go nowhere, or to `webhook_url`, grouped by `group_by` after `group_wait`."""
    port = port if port is not None else children.free_port()
    home = workdir / f"alertmanager-{port}"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "alertmanager.yml"
    config.write_text(_config(webhook_url, group_by, group_wait))
    log = home / "alertmanager.log"
    argv = [
        ALERTMANAGER,
        f"--config.file={config}",
        f"--storage.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip: a lone peer on loopback
        "--alerts.gc-interval=1s",
        "--log.level=debug",
    ]
    url = f"http://127.0.0.1:{port}"
    async with children.run(
        argv, log=log, cwd=home, name="alertmanager", ready_url=f"{url}/-/ready", ready_timeout=20.0
    ) as child:
        yield Alertmanager(url=url, port=port, proc=child.proc, log=log)

"""A real Alertmanager (Debian's 0.25) on a loopback port, with gossip off and a blackhole receiver;
optionally behind its own --web.config.file (TLS, basic auth) and a --web.route-prefix."""

from __future__ import annotations

import contextlib
import ssl
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


@dataclass(frozen=True)
class AlertmanagerWeb:
    """Alertmanager's own web config (exporter-toolkit's schema): TLS and basic_auth_users."""

    cert_file: Path | None = None
    key_file: Path | None = None
    # User name to bcrypt hash.
    basic_auth_users: dict[str, str] | None = None

    def yaml(self) -> str:
        doc: dict[str, Any] = {}
        if self.cert_file is not None and self.key_file is not None:
            doc["tls_server_config"] = {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}
        if self.basic_auth_users:
            doc["basic_auth_users"] = dict(self.basic_auth_users)
        return str(yaml.safe_dump(doc))

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


@dataclass
class Alertmanager:
    # scheme://127.0.0.1:port, without the route prefix.
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    route_prefix: str = ""
    # How the test itself reaches an Alertmanager behind TLS and basic auth.
    ssl_context: ssl.SSLContext | None = None
    # An Authorization header value, e.g. detectord.http_client.basic_auth(user, password).
    authorization: str | None = None

    @property
    def api_url(self) -> str:
        return self.url + self.route_prefix

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.authorization} if self.authorization else {}

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
            aiohttp.ClientSession(
                headers=self._headers(), connector=aiohttp.TCPConnector(ssl=self.ssl_context or True)
            ) as session,
            session.get(f"{self.api_url}/api/v2/alerts", params=params, timeout=aiohttp.ClientTimeout(total=5)) as resp,
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
    web: AlertmanagerWeb | None = None,
    route_prefix: str = "",
    client_ssl: ssl.SSLContext | None = None,
    client_authorization: str | None = None,
) -> AsyncIterator[Alertmanager]:
    """Start Alertmanager on 127.0.0.1:`port` (a free one if None) and wait until it is ready.
    Notifications go nowhere, or to `webhook_url`, grouped by `group_by` after `group_wait`.

    With `web`, it serves TLS and asks for basic auth as that web config file says; the readiness
    check and `alerts()` then use `client_ssl` (trusting its CA) and `client_authorization` (an
    Authorization header). `route_prefix` moves every path under it, as behind a reverse proxy."""
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
    if web is not None:
        web_file = home / "web.yml"
        web_file.write_text(web.yaml())
        argv.append(f"--web.config.file={web_file}")
    if route_prefix:
        argv.append(f"--web.route-prefix={route_prefix}")
    url = f"{'https' if web is not None and web.tls else 'http'}://127.0.0.1:{port}"
    am_prefix = route_prefix.rstrip("/")
    async with children.run(argv, log=log, cwd=home, name="alertmanager") as child:
        am = Alertmanager(
            url=url,
            port=port,
            proc=child.proc,
            log=log,
            route_prefix=am_prefix,
            ssl_context=client_ssl,
            authorization=client_authorization,
        )
        await child.wait_http_ok(f"{am.api_url}/-/ready", timeout=20.0, ssl=client_ssl, headers=am._headers())
        yield am

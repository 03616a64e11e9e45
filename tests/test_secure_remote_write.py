"""A real Prometheus 2.42 remote-writes to `detectord serve --web.config.file` over mutual TLS
with basic auth; clients short of a certificate or the password are turned away."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web

from lab.peers.detectord import Detectord, run_detectord
from lab.peers.prometheus import run_prometheus
from tests.pki import make_pki
from tests.support import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """
ingest:
  step: 1s
model:
  any_step: true
logging:
  format: console
"""


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _status(det: Detectord, method: str, path: str, *, ssl: object, headers: dict[str, str]) -> int:
    connector = aiohttp.TCPConnector(ssl=ssl)  # type: ignore[arg-type]
    async with aiohttp.ClientSession(connector=connector) as s, s.request(method, det.url + path, headers=headers) as r:
        await r.read()
        return r.status


async def _coredns_metrics(request: web.Request) -> web.Response:
    """A CoreDNS's /metrics, as much of it as the features read: a counter that grows."""
    n = int(time.time() * 100)
    text = (
        f'coredns_dns_requests_total{{server="dns://:53",type="A"}} {n}\n'
        f'coredns_dns_responses_total{{rcode="NOERROR",plugin="cache"}} {n}\n'
        "go_goroutines 40\nprocess_resident_memory_bytes 4e7\n"
    )
    return web.Response(text=text, content_type="text/plain")


async def _wait_written(det: Detectord, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await det.metrics()
        if metric(text, "detectord_remote_write_requests_total", code="204") > 0 or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.5)


async def test_prometheus_writes_over_mtls_with_basic_auth_and_others_are_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    password = "correct horse battery staple"
    (tmp_path / "password").write_text(password)
    web_yml = tmp_path / "web.yml"
    web_yml.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": "pki/server.crt",
                    "key_file": "pki/server.key",
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_ca_file": "pki/ca.crt",
                    "min_version": "TLS12",
                },
                "basic_auth_users": {"prometheus": bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()},
            }
        )
    )
    good = _auth("prometheus", password)
    async with run_detectord(
        CONFIG,
        workdir=tmp_path / "detectord",
        web_config=web_yml,
        client_ssl=pki.client_context(),
        client_headers=good,
    ) as det:
        remote_write = {
            "tls_config": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)},
            "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")},
        }
        app = web.Application()
        app.router.add_get("/metrics", _coredns_metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        target = f"127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with run_prometheus(
                {"coredns": {"edge-1": target}},
                workdir=tmp_path / "prometheus",
                remote_write_url=det.write_url,
                extra_remote_write_config=remote_write,
            ):
                text = await _wait_written(det)
        finally:
            await runner.cleanup()
        assert metric(text, "detectord_remote_write_requests_total", code="204") > 0, text
        assert metric(text, "detectord_samples_total", outcome="accepted") > 0, text
        assert metric(text, "detectord_http_unauthorized_total", reason="bad_credentials") == 0
        assert any(i["labels"]["instance"] == "edge-1" for i in await det.instances())

        with_cert = pki.client_context()
        for method, path in [("POST", "/api/v1/write"), ("GET", "/metrics"), ("GET", "/api/v1/instances")]:
            assert await _status(det, method, path, ssl=with_cert, headers=_auth("prometheus", "wrong")) == 401
            assert await _status(det, method, path, ssl=with_cert, headers={}) == 401
        for path in ["/metrics", "/api/v1/instances", "/-/ready"]:
            assert await _status(det, "GET", path, ssl=with_cert, headers=good) == 200
        assert await _status(det, "GET", "/-/healthy", ssl=with_cert, headers={}) == 200

        # Without a certificate, or with one the CA did not sign, the TLS handshake fails: not
        # even /-/healthy answers, and the right password does not help.
        stranger = make_pki(tmp_path / "stranger")
        stranger_ctx = stranger.client_context()
        stranger_ctx.load_verify_locations(pki.ca)
        for ctx in (pki.client_context(cert=False), stranger_ctx):
            for method, path in [("POST", "/api/v1/write"), ("GET", "/-/healthy")]:
                with pytest.raises(aiohttp.ClientError):
                    await _status(det, method, path, ssl=ctx, headers=good)
        # Plain HTTP gets nowhere either.
        with pytest.raises(aiohttp.ClientError):
            await _status(det, "GET", "/metrics", ssl=False, headers=good)

        # A new password, taken on SIGHUP without a restart.
        raw = yaml.safe_load(web_yml.read_text())
        raw["basic_auth_users"]["prometheus"] = bcrypt.hashpw(b"rotated", bcrypt.gensalt(10)).decode()
        web_yml.write_text(yaml.safe_dump(raw))
        det.child.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any(
            "web config reloaded" in line and "trigger=SIGHUP" in line for line in det.log.read_text().splitlines()
        ):
            assert time.monotonic() < deadline, det.log.read_text()[-2000:]
            await asyncio.sleep(0.2)
        assert await _status(det, "GET", "/metrics", ssl=with_cert, headers=good) == 401
        assert await _status(det, "GET", "/metrics", ssl=with_cert, headers=_auth("prometheus", "rotated")) == 200

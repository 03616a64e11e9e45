"""Alerts to a real Alertmanager behind its own --web.config.file (TLS from a CA made here, basic
auth with a bcrypt hash) and --web.route-prefix, configured as Prometheus's http_config."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import structlog
from prometheus_client import CollectorRegistry

from detectord.alerting.notifier import AlertmanagerNotifier
from detectord.config import AlertmanagerConfig, Duration, parse_config
from detectord.http_client import basic_auth
from lab.peers.alertmanager import Alertmanager, AlertmanagerWeb, run_alertmanager
from tests.alerting.test_notifier import eventually, firing_now, ours, sample
from tests.pki import make_pki
from tests.support import EXTERNAL, config, states

pytestmark = pytest.mark.e2e

USER = "detectord"
PASSWORD = "s3cret-Pa55word-for-am"
WRONG = "not-the-Pa55word-at-all"
# Only this name is in the certificate: connecting to 127.0.0.1 verifies only with server_name.
NAME = "alertmanager.test"


@dataclasses.dataclass(frozen=True)
class PKI:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = make_pki(tmp_path_factory.mktemp("pki"))
    cert, key = ca.issue("alertmanager", server=True, sans=(NAME,))
    return PKI(ca.ca, cert, key)


def _client_ssl(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False  # the test reaches 127.0.0.1; detectord's side checks the name
    return ctx


@pytest.fixture
async def secure_am(tmp_path: Path, pki: PKI, request: pytest.FixtureRequest) -> AsyncIterator[Alertmanager]:
    web = AlertmanagerWeb(
        cert_file=pki.cert,
        key_file=pki.key,
        basic_auth_users={USER: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()},
    )
    prefix = getattr(request, "param", "")
    async with run_alertmanager(
        tmp_path,
        web=web,
        route_prefix=prefix,
        client_ssl=_client_ssl(pki),
        client_authorization=basic_auth(USER, PASSWORD),
    ) as am:
        yield am


def _target(am: Alertmanager, pki: PKI, password_file: Path, extra: str = "", tls: str = "") -> AlertmanagerConfig:
    """One Alertmanager as a user writes it in detectord.yml."""
    tls = tls or f"ca_file: {pki.ca}, server_name: {NAME}"
    cfg = parse_config(
        f"""
alerting:
  alertmanagers:
    - url: {am.url}
      timeout: 2s
      {extra}
      http_config:
        tls_config: {{{tls}}}
        basic_auth: {{username: {USER}, password_file: {password_file}}}
"""
    )
    return cfg.alerting.alertmanagers[0]


def _notifier(reg: CollectorRegistry, *targets: AlertmanagerConfig) -> AlertmanagerNotifier:
    return AlertmanagerNotifier(
        config(alertmanagers=targets), registry=reg, external_url=EXTERNAL, min_backoff=0.05, max_backoff=0.4
    )


async def _status(url: str, **session: Any) -> int | str:
    try:
        async with aiohttp.ClientSession(**session) as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status
    except aiohttp.ClientSSLError as exc:
        return type(exc).__name__


async def test_alert_reaches_alertmanager_over_tls_with_basic_auth(
    secure_am: Alertmanager, pki: PKI, tmp_path: Path
) -> None:
    alerts_url = f"{secure_am.api_url}/api/v2/alerts"
    # Alertmanager really asks for both: its certificate is not trusted by default, and the
    # right certificate without the password gets 401.
    assert await _status(alerts_url) == "ClientConnectorCertificateError"
    assert await _status(alerts_url, connector=aiohttp.TCPConnector(ssl=_client_ssl(pki))) == 401

    password_file = tmp_path / "am-password"
    password_file.write_text(PASSWORD + "\n")
    target = _target(secure_am, pki, password_file)
    assert target.url.startswith("https://")
    reg = CollectorRegistry()
    async with _notifier(reg, target) as n:
        alert = firing_now(states(for_=Duration(0)))
        n.submit([alert])
        [got] = await eventually(ours(secure_am))
        assert got["labels"] == alert.labels
        assert got["status"]["state"] == "active"
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=secure_am.url) == 1


async def test_wrong_password_fails_is_counted_never_logged_and_a_rotated_file_is_used(
    secure_am: Alertmanager, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password_file = tmp_path / "am-password"
    password_file.write_text(WRONG)
    target = _target(secure_am, pki, password_file)
    reg = CollectorRegistry()
    url = secure_am.url
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with _notifier(reg, target) as n:
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(
                lambda: _positive(reg, "detectord_alerts_dropped_total", alertmanager=url, reason="rejected")
            )
            assert sample(reg, "detectord_alert_send_failures_total", alertmanager=url, reason="http_401") == 1
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=url) == 0
            assert await ours(secure_am)() == []

            # The password is read from its file at each request: fixing the file is enough.
            password_file.write_text(PASSWORD)
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(ours(secure_am))
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=url) == 1
    refused = [e for e in logs if e["event"] == "alertmanager refused alerts; not retrying"]
    assert [(e["status"], e["alertmanager"]) for e in refused] == [(401, url)]
    seen = repr(logs) + caplog.text + repr(target) + repr(n.cfg)
    assert WRONG not in seen and PASSWORD not in seen


async def _positive(reg: CollectorRegistry, name: str, **labels: str) -> bool:
    return sample(reg, name, **labels) > 0


async def test_certificate_is_checked_against_the_url_host_without_server_name(
    secure_am: Alertmanager, pki: PKI, tmp_path: Path
) -> None:
    password_file = tmp_path / "am-password"
    password_file.write_text(PASSWORD)
    # The certificate names alertmanager.test, not 127.0.0.1: refused unless server_name says so.
    target = _target(secure_am, pki, password_file, tls=f"ca_file: {pki.ca}")
    reg = CollectorRegistry()
    async with _notifier(reg, target) as n:
        n.submit([firing_now(states(for_=Duration(0)))])
        await eventually(
            lambda: _positive(reg, "detectord_alert_send_failures_total", alertmanager=secure_am.url, reason="tls")
        )
        assert n.queued() == {secure_am.url: 1}  # kept and retried, not dropped
        assert await ours(secure_am)() == []


@pytest.mark.parametrize("secure_am", ["/alertmanager"], indirect=True)
async def test_path_prefix_reaches_alertmanager_under_its_route_prefix(
    secure_am: Alertmanager, pki: PKI, tmp_path: Path
) -> None:
    assert secure_am.route_prefix == "/alertmanager"
    password_file = tmp_path / "am-password"
    password_file.write_text(PASSWORD)
    with_prefix = _target(secure_am, pki, password_file, extra="path_prefix: /alertmanager")
    without = dataclasses.replace(with_prefix, path_prefix="")
    reg = CollectorRegistry()
    async with _notifier(reg, with_prefix, without) as n:
        n.submit([firing_now(states(for_=Duration(0)))])
        await eventually(ours(secure_am))
        prefixed = f"{secure_am.url}/alertmanager"
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=prefixed) == 1
        # The same server without the prefix answers 404 to /api/v2/alerts: nothing is sent there.
        await eventually(
            lambda: _positive(reg, "detectord_alerts_dropped_total", alertmanager=secure_am.url, reason="rejected")
        )
        assert sample(reg, "detectord_alert_send_failures_total", alertmanager=secure_am.url, reason="http_404") == 1
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=secure_am.url) == 0


async def test_missing_ca_file_is_counted_and_alerts_wait_until_it_is_there(
    secure_am: Alertmanager, pki: PKI, tmp_path: Path
) -> None:
    password_file = tmp_path / "am-password"
    password_file.write_text(PASSWORD)
    ca = tmp_path / "not-yet-ca.pem"
    target = _target(secure_am, pki, password_file, tls=f"ca_file: {ca}, server_name: {NAME}")
    reg = CollectorRegistry()
    url = secure_am.url
    with structlog.testing.capture_logs() as logs:
        async with _notifier(reg, target) as n:  # starts: a reload must not fail half-way
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(
                lambda: _positive(reg, "detectord_alert_send_failures_total", alertmanager=url, reason="tls_config")
            )
            assert n.queued() == {url: 1}
            ca.write_bytes(pki.ca.read_bytes())
            await eventually(ours(secure_am))
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=url) == 1
    [error] = [e for e in logs if e["event"] == "cannot load certificates; alerts wait"]
    assert "alerting.alertmanagers[0].http_config.tls_config" in error["error"]

"""Delivery to real Alertmanagers (fakes only for 5xx and hangs): resends, retries, queues, flush."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from detectord.alerting.notifier import AlertmanagerNotifier
from detectord.alerting.states import Alert, AlertStates
from detectord.children import free_port
from detectord.config import AlertmanagerConfig, Duration, parse_config
from lab.peers.alertmanager import Alertmanager, run_alertmanager
from tests.support import EXTERNAL, KEY, LABELS, TOP, config, states, step

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            assert value, f"not true within {timeout}s: {value!r}"
            return value
        await asyncio.sleep(0.05)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def firing_now(s: AlertStates, instance: str = "10.0.0.1:9153") -> Alert:
    [alert] = s.observe(
        ("coredns", instance), {"job": "coredns", "instance": instance}, time.time() - 1, 3.0, 0.042, TOP
    )
    return alert


def notifier(reg: CollectorRegistry, *urls: str, **kw: Any) -> AlertmanagerNotifier:
    cfg = config(alertmanagers=tuple(AlertmanagerConfig(u, timeout=Duration(2)) for u in urls), **kw)
    return AlertmanagerNotifier(cfg, registry=reg, external_url=EXTERNAL, min_backoff=0.05, max_backoff=0.4)


def ours(am: Alertmanager, instance: str = "10.0.0.1:9153") -> Callable[[], Awaitable[list[dict[str, Any]]]]:
    return lambda: am.alerts(filter=['alertname="CoreDNSAnomaly"', f'instance="{instance}"'])


def parse(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@pytest.fixture
async def am(tmp_path: Path) -> AsyncIterator[Alertmanager]:
    async with run_alertmanager(tmp_path) as a:
        yield a


async def test_firing_alert_reaches_alertmanager_then_resolves(am: Alertmanager) -> None:
    reg = CollectorRegistry()
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    async with notifier(reg, am.url) as n:
        alert = firing_now(s)
        n.submit([alert])
        [got] = await eventually(ours(am))
        assert got["labels"] == alert.labels
        assert got["annotations"] == alert.annotations
        assert "rcode_servfail_share +12.3σ (0.41)" in got["annotations"]["description"]
        assert abs(parse(got["startsAt"]) - alert.starts_at) < 0.002
        # endsAt lies 4 resend intervals ahead, so what follows cannot be mere expiry.
        assert parse(got["endsAt"]) - time.time() > 15
        assert got["generatorURL"] == f"{EXTERNAL}/instances/coredns,10.0.0.1:9153"
        assert got["status"]["state"] == "active"
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=am.url) == 1

        [resolved] = s.observe(KEY, LABELS, time.time() - 0.5, 0.1, 0.042, TOP)
        n.submit([resolved])
        assert await eventually(lambda: _empty(ours(am)), timeout=3.0)
        assert await am.alerts() == []
        assert sample(reg, "detectord_notification_queue_length", alertmanager=am.url) == 0
        assert sample(reg, "detectord_notification_latency_seconds_count", alertmanager=am.url) >= 2


async def _empty(get: Callable[[], Awaitable[list[dict[str, Any]]]]) -> bool:
    return await get() == []


async def test_firing_alerts_are_resent_and_resolved_ones_for_a_while(am: Alertmanager) -> None:
    reg = CollectorRegistry()
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    async with notifier(reg, am.url, resend_interval=Duration(0.2), resolved_resend_for=Duration(0.6)) as n:
        alert = firing_now(s)
        n.submit([alert])
        [first] = await eventually(ours(am))
        # Without re-sends Alertmanager would consider it over once endsAt (now + 0.8 s) passed.
        await asyncio.sleep(1.5)
        [later] = await ours(am)()
        assert parse(later["updatedAt"]) > parse(first["updatedAt"]) + 1.0
        assert parse(later["endsAt"]) > time.time()
        step(s, time.time() + 0.3, 4.0, top=[("qps", 9.0, 99.0)])  # the description follows the latest step
        await asyncio.sleep(0.5)
        [updated] = await ours(am)()
        assert "qps +9.0σ (99)" in updated["annotations"]["description"]

        [resolved] = s.observe(KEY, LABELS, time.time(), 0.1, 0.042, TOP)
        n.submit([resolved])
        sent_at_resolution = sample(reg, "detectord_alerts_sent_total", alertmanager=am.url)
        await asyncio.sleep(1.2)
        sent = sample(reg, "detectord_alerts_sent_total", alertmanager=am.url)
        assert sent >= sent_at_resolution + 3  # once, then every 0.2 s for 0.6 s
        await asyncio.sleep(0.6)
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=am.url) == sent


async def test_every_alertmanager_receives_the_alert(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    async with (
        run_alertmanager(tmp_path) as am1,
        run_alertmanager(tmp_path) as am2,
        notifier(reg, am1.url, am2.url) as n,
    ):
        alert = firing_now(states(for_=Duration(0)))
        n.submit([alert])
        for am in (am1, am2):
            [got] = await eventually(ours(am))
            assert got["labels"] == alert.labels
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=am.url) == 1


async def test_alertmanager_down_then_up_gets_the_alert_and_the_other_is_not_delayed(
    tmp_path: Path, am: Alertmanager
) -> None:
    reg = CollectorRegistry()
    port = free_port()
    down = f"http://127.0.0.1:{port}"
    async with notifier(reg, down, am.url) as n:
        alert = firing_now(states(for_=Duration(0)))
        started = time.monotonic()
        n.submit([alert])
        await eventually(ours(am), timeout=1.0)
        assert time.monotonic() - started < 1.0
        await eventually(
            lambda: _positive(reg, "detectord_alert_send_failures_total", alertmanager=down, reason="connection")
        )
        assert sample(reg, "detectord_notification_queue_length", alertmanager=down) == 1
        async with run_alertmanager(tmp_path, port=port) as late:
            [got] = await eventually(ours(late))
            assert got["labels"] == alert.labels
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=down) == 1
            assert sample(reg, "detectord_notification_queue_length", alertmanager=down) == 0


async def _positive(reg: CollectorRegistry, name: str, **labels: str) -> bool:
    return sample(reg, name, **labels) > 0


async def test_hanging_alertmanager_does_not_delay_another(am: Alertmanager) -> None:
    hung = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        hung.set()
        await asyncio.sleep(30)
        return web.Response()

    async with _fake_alertmanager(hang) as slow:
        reg = CollectorRegistry()
        async with notifier(reg, slow, am.url) as n:
            n.submit([firing_now(states(for_=Duration(0)))])
            await asyncio.wait_for(hung.wait(), 2)
            await eventually(ours(am), timeout=1.0)


async def test_5xx_is_retried_until_accepted() -> None:
    answers = [503, 500, 200]
    bodies: list[Any] = []

    async def flaky(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=answers.pop(0) if len(answers) > 1 else answers[0], text="busy")

    async with _fake_alertmanager(flaky) as url:
        reg = CollectorRegistry()
        async with notifier(reg, url) as n:
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(lambda: _positive(reg, "detectord_alerts_sent_total", alertmanager=url))
        assert [b[0]["labels"] for b in bodies] == [bodies[0][0]["labels"]] * 3
        assert sample(reg, "detectord_alert_send_failures_total", alertmanager=url, reason="http_503") == 1
        assert sample(reg, "detectord_alert_send_failures_total", alertmanager=url, reason="http_500") == 1
        assert sample(reg, "detectord_alerts_dropped_total", alertmanager=url, reason="rejected") == 0


async def test_rejected_alert_is_counted_not_retried(am: Alertmanager) -> None:
    reg = CollectorRegistry()
    async with notifier(reg, am.url) as n:
        good = firing_now(states(for_=Duration(0)))
        bad = Alert(
            labels={"alertname": "CoreDNSAnomaly", "bad-label": "x"},
            annotations={},
            starts_at=time.time(),
            score=2.0,
            threshold=0.042,
        )
        n.submit([bad])
        await eventually(
            lambda: _positive(reg, "detectord_alerts_dropped_total", alertmanager=am.url, reason="rejected")
        )
        await asyncio.sleep(0.5)  # backoff is 0.05–0.4 s here: a retry would have happened
        assert sample(reg, "detectord_alert_send_failures_total", alertmanager=am.url, reason="http_400") == 1
        assert sample(reg, "detectord_alerts_dropped_total", alertmanager=am.url, reason="rejected") == 1
        assert sample(reg, "detectord_notification_queue_length", alertmanager=am.url) == 0
        # The sender goes on with other alerts.
        n.submit([good])
        await eventually(ours(am))
        assert sample(reg, "detectord_alerts_sent_total", alertmanager=am.url) == 1


async def test_queue_is_bounded_and_keeps_newest_state_per_alert(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    s = states(for_=Duration(0), keep_firing_for=Duration(0))
    async with notifier(reg, url, queue_capacity=3) as n:
        instances = [f"10.0.0.{i}:9153" for i in range(1, 6)]
        alerts = [firing_now(s, i) for i in instances]
        for a in alerts:
            n.submit([a])
        assert sample(reg, "detectord_alerts_dropped_total", alertmanager=url, reason="queue_full") == 2
        assert n.queued() == {url: 3}
        # Newer states of queued alerts replace them: the queue does not grow.
        for i in instances[2:]:
            n.submit(s.observe(("coredns", i), {"job": "coredns", "instance": i}, time.time() - 0.5, 0.1, 0.042, TOP))
        assert n.queued() == {url: 3}
        assert sample(reg, "detectord_alerts_dropped_total", alertmanager=url, reason="queue_full") == 2
        n.submit([firing_now(s, instances[4])])  # firing again: a new alert, older state of it replaced
        async with run_alertmanager(tmp_path, port=port) as am:
            await eventually(ours(am, instances[4]))
            assert await ours(am, instances[2])() == [] and await ours(am, instances[3])() == []
            assert await ours(am, instances[0])() == [] and await ours(am, instances[1])() == []


async def test_flush_delivers_pending_alerts_and_gives_up_at_the_timeout(am: Alertmanager) -> None:
    reg = CollectorRegistry()
    down = f"http://127.0.0.1:{free_port()}"
    async with notifier(reg, am.url, down) as n:
        n.submit([firing_now(states(for_=Duration(0)))])
        started = time.monotonic()
        await n.flush(0.5)
        assert 0.4 < time.monotonic() - started < 1.0
        assert len(await ours(am)()) == 1  # delivered by the time flush returned
        assert n.queued() == {am.url: 0, down: 1}


async def test_submit_without_alertmanagers_does_nothing() -> None:
    async with AlertmanagerNotifier(config(), registry=CollectorRegistry(), external_url=EXTERNAL) as n:
        n.submit([firing_now(states(for_=Duration(0)))])
        await n.flush(1.0)
        assert n.queued() == {}


@contextlib.asynccontextmanager
async def _fake_alertmanager(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """For faults a real Alertmanager cannot be made to produce: 5xx answers, hangs."""
    app = web.Application()
    app.router.add_post("/api/v2/alerts", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _configured(reg: CollectorRegistry, url: str, http_config: str) -> AlertmanagerNotifier:
    """A notifier for one Alertmanager whose `http_config` is written as in detectord.yml."""
    parsed = parse_config(f"alerting: {{alertmanagers: [{{url: '{url}', timeout: 2s, http_config: {http_config}}}]}}")
    return AlertmanagerNotifier(
        config(alertmanagers=parsed.alerting.alertmanagers),
        registry=reg,
        external_url=EXTERNAL,
        min_backoff=0.05,
        max_backoff=0.4,
    )


async def test_unreadable_password_file_is_retried_until_it_appears(am: Alertmanager, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    password_file = tmp_path / "missing-password"
    with structlog.testing.capture_logs() as logs:
        async with _configured(reg, am.url, f"{{basic_auth: {{username: u, password_file: {password_file}}}}}") as n:
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(
                lambda: _positive(reg, "detectord_alert_send_failures_total", alertmanager=am.url, reason="credentials")
            )
            assert n.queued() == {am.url: 1}
            assert await ours(am)() == []
            password_file.write_text("now-there\n")
            await eventually(ours(am))
            assert sample(reg, "detectord_alerts_sent_total", alertmanager=am.url) == 1
    [warning] = [e for e in logs if e["event"] == "cannot send alerts; retrying" and e["log_level"] == "warning"]
    assert warning["reason"] == "credentials"
    assert str(password_file) in warning["detail"] and "basic_auth.password_file" in warning["detail"]
    assert "now-there" not in repr(logs)


async def test_bearer_token_is_read_from_its_file_at_each_post(tmp_path: Path) -> None:
    # Alertmanager checks only basic auth itself; a token is for a proxy in front of it, faked here.
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response()

    token = tmp_path / "token"
    token.write_text("first-token\n")
    s = states(for_=Duration(0))
    async with _fake_alertmanager(record) as url:
        reg = CollectorRegistry()
        async with _configured(reg, url, f"{{authorization: {{credentials_file: {token}}}}}") as n:
            n.submit([firing_now(s, "10.0.0.1:9153")])
            await eventually(lambda: _positive(reg, "detectord_alerts_sent_total", alertmanager=url))
            token.write_text("rotated-token")
            n.submit([firing_now(s, "10.0.0.2:9153")])
            await eventually(lambda: _count(reg, "detectord_alerts_sent_total", 2, alertmanager=url))
    assert seen == ["Bearer first-token", "Bearer rotated-token"]


async def _count(reg: CollectorRegistry, name: str, n: float, **labels: str) -> bool:
    return sample(reg, name, **labels) == n


@pytest.mark.parametrize("follow", [True, False])
async def test_redirects_as_follow_redirects_says_and_credentials_stay_with_the_alertmanager(
    tmp_path: Path, follow: bool
) -> None:
    # Redirects are a fault a real Alertmanager cannot be made to answer with.
    elsewhere: list[str | None] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Authorization"))
        return web.Response()

    password_file = tmp_path / "password"
    password_file.write_text("do-not-leak")
    async with _fake_alertmanager(other) as other_url:

        async def moved(request: web.Request) -> web.Response:
            assert request.headers["Authorization"].startswith("Basic ")
            raise web.HTTPTemporaryRedirect(f"{other_url}/api/v2/alerts")

        async with _fake_alertmanager(moved) as url:
            reg = CollectorRegistry()
            auth = f"basic_auth: {{username: u, password_file: {password_file}}}"
            http_config = f"{{follow_redirects: {str(follow).lower()}, {auth}}}"
            async with _configured(reg, url, http_config) as n:
                n.submit([firing_now(states(for_=Duration(0)))])
                if follow:
                    await eventually(lambda: _positive(reg, "detectord_alerts_sent_total", alertmanager=url))
                    # The other origin got the alerts, not the password.
                    assert elsewhere == [None]
                else:
                    await eventually(
                        lambda: _positive(
                            reg, "detectord_alert_send_failures_total", alertmanager=url, reason="http_307"
                        )
                    )
                    assert elsewhere == []
                    assert sample(reg, "detectord_alerts_sent_total", alertmanager=url) == 0


async def test_proxy_url_carries_the_alerts(tmp_path: Path) -> None:
    # No proxy server is installed; this fake one answers in the Alertmanager's place.
    via_proxy: list[tuple[str, str | None]] = []

    async def proxy(request: web.Request) -> web.Response:
        via_proxy.append((request.headers["Host"], request.headers.get("Authorization")))
        return web.Response()

    token = tmp_path / "token"
    token.write_text("t0ken")
    async with _fake_alertmanager(proxy) as proxy_url:
        reg = CollectorRegistry()
        # An unresolvable host: only the proxy can deliver.
        url = "http://alertmanager.invalid:9093"
        http_config = f"{{proxy_url: '{proxy_url}', authorization: {{credentials_file: {token}}}}}"
        async with _configured(reg, url, http_config) as n:
            n.submit([firing_now(states(for_=Duration(0)))])
            await eventually(lambda: _positive(reg, "detectord_alerts_sent_total", alertmanager=url))
    assert via_proxy == [("alertmanager.invalid:9093", "Bearer t0ken")]

"""The CoreDNS mixin's alert rules as a comparison: a temporary real Prometheus takes a recording
and answers each rule's range query; Prometheus's `for` is applied here, per alert series and
instance, by the same timing serving uses."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from detectord import children
from detectord.alerting.timing import AlertRule, firing
from detectord.config import Duration
from detectord.errors import DetectordError
from detectord.ingest.features import InstanceKey
from detectord.ingest.remote_write import LabelCache
from detectord.recordings.format import read_writes
from detectord.recordings.replay import replay, summary

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

DEFAULT_SELECTOR = 'job=~"coredns-.*"'
# Prometheus refuses a range query of more points than this per series.
MAX_POINTS_PER_QUERY = 11000
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class PrometheusNotFound(DetectordError):
    """No Prometheus binary to evaluate the rules with."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        where = f"{path} is not an executable file" if path else "prometheus is not on PATH"
        super().__init__(f"{where}: install Debian's prometheus (`make system-deps`) or pass its path")


class RuleEvaluationError(DetectordError):
    """The temporary Prometheus did not start, did not take the whole recording, or failed a query."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


@dataclass(frozen=True)
class Rule:
    name: str
    # PromQL as published; %(corednsSelector)s stands for the selector, as in the mixin's jsonnet.
    expr: str
    for_seconds: float
    severity: str

    @property
    def key(self) -> str:
        """Unique within a rule set (the mixin has two CoreDNSErrorsHigh, one per severity)."""
        return f"{self.name}/{self.severity}"

    def promql(self, selector: str) -> str:
        return self.expr % {"corednsSelector": selector}


def _rule(name: str, expr: str, for_: str, severity: str) -> Rule:
    return Rule(name, expr.strip(), float(Duration.parse(for_)), severity)


# povilasv/coredns-mixin alerts/coredns.libsonnet and alerts/forward.libsonnet at eb356cf
# (2023-04-25, the published head), selector left as the placeholder.
_ERRORS = """
sum without (pod, instance, server, zone, view, rcode, plugin) (rate(coredns_dns_responses_total{%(corednsSelector)s,rcode="SERVFAIL"}[5m]))
  /
sum without (pod, instance, server, zone, view, rcode, plugin) (rate(coredns_dns_responses_total{%(corednsSelector)s}[5m]))
"""
_FORWARD_ERRORS = """
sum without (pod, instance, rcode) (rate(coredns_forward_responses_total{%(corednsSelector)s,rcode="SERVFAIL"}[5m]))
  /
sum without (pod, instance, rcode) (rate(coredns_forward_responses_total{%(corednsSelector)s}[5m]))
"""
_TUNED_ERRORS = """
sum by (job, instance) (rate(coredns_dns_responses_total{%(corednsSelector)s,rcode="SERVFAIL"}[1m]))
  /
sum by (job, instance) (rate(coredns_dns_responses_total{%(corednsSelector)s}[1m]))
"""

RULESETS: dict[str, tuple[Rule, ...]] = {
    "mixin": (
        _rule("CoreDNSDown", "absent(up{%(corednsSelector)s} == 1)", "15m", "critical"),
        _rule(
            "CoreDNSLatencyHigh",
            "histogram_quantile(0.99, sum(rate(coredns_dns_request_duration_seconds_bucket{%(corednsSelector)s}[5m]))"
            " without (instance,pod)) > 4",
            "10m",
            "critical",
        ),
        _rule("CoreDNSErrorsHigh", _ERRORS.strip() + " > 0.03", "10m", "critical"),
        _rule("CoreDNSErrorsHigh", _ERRORS.strip() + " > 0.01", "10m", "warning"),
        # The coredns_forward_* metrics below, but for healthcheck_broken_total, are gone since CoreDNS 1.11.
        _rule(
            "CoreDNSForwardLatencyHigh",
            "histogram_quantile(0.99, sum(rate(coredns_forward_request_duration_seconds_bucket{%(corednsSelector)s}[5m]))"
            " without (pod, instance, rcode)) > 4",
            "10m",
            "critical",
        ),
        _rule("CoreDNSForwardErrorsHigh", _FORWARD_ERRORS.strip() + " > 0.03", "10m", "critical"),
        _rule("CoreDNSForwardErrorsHigh", _FORWARD_ERRORS.strip() + " > 0.01", "10m", "warning"),
        _rule(
            "CoreDNSForwardHealthcheckFailureCount",
            "sum without (pod, instance) (rate(coredns_forward_healthcheck_failures_total{%(corednsSelector)s}[5m])) > 0",
            "10m",
            "warning",
        ),
        _rule(
            "CoreDNSForwardHealthcheckBrokenCount",
            "sum without (pod, instance) (rate(coredns_forward_healthcheck_broken_total{%(corednsSelector)s}[5m])) > 0",
            "10m",
            "warning",
        ),
        # The common extra (awesome-prometheus-alerts), verbatim: it has no selector.
        _rule("CorednsPanicCount", "increase(coredns_panics_total[1m]) > 0", "0m", "critical"),
    ),
    # What an SRE tuning for fast detection deploys: per instance, 1m windows, no `for`, and
    # forward health on the metric CoreDNS >= 1.11 exports.
    "mixin_tuned": (
        _rule("CoreDNSDown", "up{%(corednsSelector)s} == 0", "0s", "critical"),
        _rule(
            "CoreDNSLatencyHigh",
            "histogram_quantile(0.99, sum by (job, instance, server, zone, le)"
            " (rate(coredns_dns_request_duration_seconds_bucket{%(corednsSelector)s}[1m]))) > 4",
            "0s",
            "critical",
        ),
        _rule("CoreDNSErrorsHigh", _TUNED_ERRORS.strip() + " > 0.03", "0s", "critical"),
        _rule("CoreDNSErrorsHigh", _TUNED_ERRORS.strip() + " > 0.01", "0s", "warning"),
        _rule(
            "CoreDNSForwardHealthcheckFailureCount",
            "sum by (job, instance) (rate(coredns_proxy_healthcheck_failures_total{%(corednsSelector)s}[1m])) > 0",
            "0s",
            "warning",
        ),
        _rule(
            "CoreDNSForwardHealthcheckBrokenCount",
            "sum by (job, instance) (rate(coredns_forward_healthcheck_broken_total{%(corednsSelector)s}[1m])) > 0",
            "0s",
            "warning",
        ),
        _rule("CorednsPanicCount", "increase(coredns_panics_total{%(corednsSelector)s}[1m]) > 0", "0s", "critical"),
    ),
}


@dataclass(frozen=True)
class InstanceAlerts:
    timestamps_ms: IntArray  # the step grid, shared by every instance
    firing: BoolArray  # any rule of the set firing for this instance
    by_rule: dict[str, BoolArray]  # Rule.key -> firing


@dataclass(frozen=True)
class FiringSpan:
    instance: InstanceKey
    rule: str  # Rule.key
    start_ms: int  # first and last step it fired at
    end_ms: int


@dataclass(frozen=True)
class RuleResult:
    ruleset: str
    step_ms: int
    timestamps_ms: IntArray
    instances: dict[InstanceKey, InstanceAlerts]
    replay_seconds: float
    query_seconds: float

    def spans(self) -> list[FiringSpan]:
        """Every run of consecutive firing steps, by instance and rule."""
        out: list[FiringSpan] = []
        ts = self.timestamps_ms
        for key, alerts in sorted(self.instances.items()):
            for rule, fired in alerts.by_rule.items():
                edges = np.flatnonzero(np.diff(np.concatenate(([0], fired.astype(np.int8), [0]))))
                out += [
                    FiringSpan(key, rule, int(ts[a]), int(ts[b - 1]))
                    for a, b in zip(edges[::2], edges[1::2], strict=True)
                ]
        return out


def hold_for(active: BoolArray, timestamps_ms: IntArray, for_seconds: float) -> BoolArray:
    """Prometheus's `for` on one alert series: returned at consecutive steps it is pending from the
    first and fires once `for` has passed since then; a step without it ends the alert. The
    timing is serving's own (`detectord.alerting.timing`), with no keep_firing_for."""
    return firing(timestamps_ms, active, AlertRule(for_seconds, 0.0))


def step_grid(first_ms: int, last_ms: int, step_ms: int) -> IntArray:
    """The steps detectord stamps feature rows with: the end of each step holding a sample."""
    return np.arange(
        (first_ms // step_ms + 1) * step_ms, (last_ms // step_ms + 1) * step_ms + 1, step_ms, dtype=np.int64
    )


def sample_span(recording: str | Path) -> tuple[int, int]:
    """The first and last sample timestamp (ms) in a recording."""
    first, last = sys.maxsize, -sys.maxsize
    for _, write in read_writes(recording, LabelCache()):
        if write.timestamps:
            first = min(first, min(write.timestamps))
            last = max(last, max(write.timestamps))
    if first > last:
        raise RuleEvaluationError(str(recording), "the recording holds no samples")
    return first, last


def evaluate_rules(
    recording: str | Path,
    *,
    rulesets: Sequence[str] = tuple(RULESETS),
    step_s: float,
    selector: str = DEFAULT_SELECTOR,
    prometheus: str | None = None,
    workdir: Path | None = None,
) -> dict[str, RuleResult]:
    """Which rules of each of `rulesets` fire for which instance at each step of `recording`
    (one temporary Prometheus takes the recording once and answers them all)."""
    return asyncio.run(
        evaluate_rules_async(
            recording, rulesets=rulesets, step_s=step_s, selector=selector, prometheus=prometheus, workdir=workdir
        )
    )


async def evaluate_rules_async(
    recording: str | Path,
    *,
    rulesets: Sequence[str] = tuple(RULESETS),
    step_s: float,
    selector: str = DEFAULT_SELECTOR,
    prometheus: str | None = None,
    workdir: Path | None = None,
) -> dict[str, RuleResult]:
    unknown = [r for r in rulesets if r not in RULESETS]
    if unknown:
        raise ValueError(f"unknown rulesets {unknown}: choose from {', '.join(RULESETS)}")
    step_ms = round(step_s * 1000)
    if step_ms <= 0 or abs(step_ms - step_s * 1000) > 1e-6:
        raise ValueError(f"step must be a positive whole number of milliseconds, got {step_s}s")
    binary = prometheus_binary(prometheus)
    loop = asyncio.get_running_loop()
    first_ms, last_ms = await loop.run_in_executor(None, sample_span, recording)
    grid = step_grid(first_ms, last_ms, step_ms)
    async with (
        _temporary_prometheus(binary, workdir) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
    ):
        stats = await replay(recording, f"{url}/api/v1/write", speed=0)
        if stats.refused or stats.failed:
            raise RuleEvaluationError("replay", f"Prometheus did not take the whole recording: {summary(stats)}")
        span = (first_ms, last_ms)
        instances = sorted({_instance(s) for s in await _series(session, url, f"up{{{selector}}}", span)})
        servers: dict[str, set[InstanceKey]] = {}
        for s in await _series(session, url, f"coredns_dns_requests_total{{{selector}}}", span):
            if "server" in s:
                servers.setdefault(s["server"], set()).add(_instance(s))
        out = {}
        for ruleset in rulesets:
            t0 = time.monotonic()
            rules = RULESETS[ruleset]
            by_rule = {k: {rule.key: np.zeros(len(grid), dtype=bool) for rule in rules} for k in instances}
            for rule in rules:
                for labels, active in (await _active(session, url, rule.promql(selector), grid)).items():
                    firing = hold_for(active, grid, rule.for_seconds)
                    for k in _covered(dict(labels), instances, servers):
                        by_rule[k][rule.key] |= firing
            per_instance = {
                k: InstanceAlerts(grid, np.logical_or.reduce(list(rs.values())), rs) for k, rs in by_rule.items()
            }
            out[ruleset] = RuleResult(ruleset, step_ms, grid, per_instance, stats.seconds, time.monotonic() - t0)
    return out


def prometheus_binary(path: str | None = None) -> str:
    found = shutil.which(path or "prometheus")
    if found is None:
        raise PrometheusNotFound(path)
    return found


def _instance(labels: Mapping[str, str]) -> InstanceKey:
    return (labels.get("job", ""), labels.get("instance", ""))


def _covered(
    labels: Mapping[str, str], instances: Sequence[InstanceKey], servers: Mapping[str, set[InstanceKey]]
) -> list[InstanceKey]:
    """The instances an alert is about: those its labels single out; all, for a fleet-wide alert."""
    out = [k for k in instances if labels.get("job", k[0]) == k[0] and labels.get("instance", k[1]) == k[1]]
    # In the lab every instance listens on its own port, so `server` names one instance.
    if labels.get("server") in servers:
        out = [k for k in out if k in servers[labels["server"]]]
    return out


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}"


async def _api(session: aiohttp.ClientSession, url: str, path: str, form: Sequence[tuple[str, str]]) -> Any:
    async with session.post(f"{url}{path}", data=list(form)) as resp:
        body = await resp.json(content_type=None)
    if body.get("status") != "success":
        query = dict(form).get("query") or dict(form).get("match[]")
        raise RuleEvaluationError(f"{path} {query}", f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


async def _series(session: aiohttp.ClientSession, url: str, match: str, span: tuple[int, int]) -> list[dict[str, str]]:
    form = [("match[]", match), ("start", _seconds(span[0])), ("end", _seconds(span[1]))]
    result: list[dict[str, str]] = await _api(session, url, "/api/v1/series", form)
    return result


async def _active(
    session: aiohttp.ClientSession, url: str, promql: str, grid: IntArray
) -> dict[frozenset[tuple[str, str]], BoolArray]:
    """Each alert series `promql` returns (labels without __name__, as Prometheus keys alerts) and
    the steps it is returned at."""
    step_ms = int(grid[1] - grid[0]) if len(grid) > 1 else 1000
    out: dict[frozenset[tuple[str, str]], BoolArray] = {}
    for lo in range(0, len(grid), MAX_POINTS_PER_QUERY):
        chunk = grid[lo : lo + MAX_POINTS_PER_QUERY]
        form = [
            ("query", promql),
            ("start", _seconds(int(chunk[0]))),
            ("end", _seconds(int(chunk[-1]))),
            ("step", _seconds(step_ms)),
        ]
        data = await _api(session, url, "/api/v1/query_range", form)
        for series in data["result"]:
            labels = frozenset((k, v) for k, v in series["metric"].items() if k != "__name__")
            ts = np.array([round(float(t) * 1000) for t, _ in series["values"]], dtype=np.int64)
            active = out.setdefault(labels, np.zeros(len(grid), dtype=bool))
            active[(ts - int(grid[0])) // step_ms] = True
    return out


@contextlib.asynccontextmanager
async def _temporary_prometheus(binary: str, workdir: Path | None) -> AsyncIterator[str]:
    """A Prometheus with an empty scrape config and the remote-write receiver on a free loopback
    port, its TSDB in a temporary directory; both gone on exit."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="detectord-mixin-", dir=workdir))
    try:
        config = tmp / "prometheus.yml"
        config.write_text("scrape_configs: []\n")
        port = children.free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-remote-write-receiver",
        ]
        try:
            async with children.run(
                argv,
                log=tmp / "prometheus.log",
                cwd=tmp,
                name="prometheus",
                ready_url=f"{url}/-/ready",
                ready_timeout=READY_TIMEOUT_S,
                stop_timeout=STOP_TIMEOUT_S,
            ):
                yield url
        except children.ChildError as exc:
            raise RuleEvaluationError("prometheus", f"{exc.reason}: {exc.log_tail}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

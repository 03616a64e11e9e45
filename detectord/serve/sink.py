"""The score sink: every scored batch, on the event loop, into each instance's score history and
gauges and through its alert state; the alerts that began firing or resolved go to the notifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from detectord.alerting.notifier import AlertmanagerNotifier
from detectord.alerting.states import Alert, AlertStates, FleetShare, alert_from_state, alert_state
from detectord.config import AlertingConfig
from detectord.detectors import Detector
from detectord.ingest.features import InstanceKey
from detectord.ingest.liveness import CrashLoop, LivenessEvent
from detectord.serve.history import InstanceScores
from detectord.serve.inference import ScoredBatch
from detectord.serve.metrics import DaemonMetrics


class ScoreSink:
    """Owns what serving learns from scores: the latest `history` scores per instance (for
    `/api/v1/scores`), the score and feature gauges, and the alert states. Runs on the event loop
    only, so none of it needs a lock."""

    def __init__(
        self,
        model: Detector,
        cfg: AlertingConfig,
        *,
        instance_labels: Sequence[str],
        metrics: DaemonMetrics,
        notifier: AlertmanagerNotifier,
        external_url: str,
        history: int,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.instance_labels = tuple(instance_labels)
        self.metrics = metrics
        self.notifier = notifier
        self.history_len = history
        self.alerts = AlertStates(cfg, model_name=model.name, external_url=external_url)
        self.history: dict[InstanceKey, InstanceScores] = {}
        # What each instance forwards to (FeatureRow.upstream), and each upstream's counts.
        self.upstream_of: dict[InstanceKey, str] = {}
        self._shares: dict[str, FleetShare] = {}
        self.latest_step: int | None = None  # the newest step scored (data time, ms)
        # Each pending or firing instance's alert state, as detectord_alert_state shows it.
        self.phases: dict[InstanceKey, str] = {}
        self._linked: set[Alert] = set()  # the firing alerts counted in their upstream's share
        self._relink = False
        self._count_alerts()

    def _labels(self, key: InstanceKey) -> dict[str, str]:
        labels = dict(zip(self.instance_labels, key, strict=True))
        upstream = self.upstream_of.get(key)
        if upstream and self.cfg.upstream_label:
            labels.setdefault(self.cfg.upstream_label, upstream)
        return labels

    def _share(self, upstream: str) -> FleetShare:
        share = self._shares.get(upstream)
        if share is None:
            share = self._shares[upstream] = FleetShare(upstream)
        return share

    def _see_upstream(self, key: InstanceKey, upstream: str) -> None:
        old = self.upstream_of.get(key)
        if old == upstream:
            return
        if old:
            self._shares[old].instances -= 1
            self._drop_if_empty(old)
        self.upstream_of[key] = upstream
        if upstream:
            self._share(upstream).instances += 1

    def _count_firing(self, changed: Iterable[Alert]) -> None:
        """Alerts that began firing or resolved into their upstream's count of firing instances.
        A firing alert reads its sentence from that count when shown (`Alert.shown`); a resolved
        one keeps the sentence it had."""
        name = self.cfg.upstream_label
        for a in changed:
            if a.resolved:
                if a.fleet is not None:
                    a.annotations = a.shown()
                    self._unlink(a)
            elif a.fleet is None and name and a.labels.get(name):
                self._link(a, a.labels[name])

    def _link(self, a: Alert, upstream: str) -> None:
        a.fleet = self._share(upstream)
        a.fleet.anomalous += 1
        self._linked.add(a)

    def _unlink(self, a: Alert) -> None:
        assert a.fleet is not None
        a.fleet.anomalous -= 1
        self._drop_if_empty(a.fleet.upstream)
        a.fleet = None
        self._linked.discard(a)

    def _drop_if_empty(self, upstream: str) -> None:
        share = self._shares[upstream]
        if share.instances == 0 and share.anomalous == 0:
            del self._shares[upstream]

    def _link_all(self) -> None:
        """Every firing alert counted in its upstream's share anew: after a restore, or a reload
        (the upstream label, or the alerts' labels, may have changed)."""
        for a in list(self._linked):
            self._unlink(a)
        self._count_firing(self.alerts.firing())

    def deliver(self, batch: ScoredBatch) -> None:
        """Take one scored batch (the inference worker hands it to the event loop)."""
        features = self.model.features
        threshold = self.model.threshold
        m, alerts = self.metrics, self.alerts
        changed: list[Alert] = []
        phases = False  # an alert state changed
        m.score_distribution.observe_many(np.asarray(batch.scores, dtype=np.float64))
        deviation = np.nan_to_num(batch.deviation, nan=0.0).astype(np.float32, copy=False)
        # Each window's top features, biggest deviation first: one sort for the whole batch.
        tops = np.argsort(-np.abs(deviation), axis=1)[:, : self.cfg.top_features].tolist()
        for r, score, dev, order, looks_like in zip(
            batch.requests, batch.scores, deviation, tops, batch.looks_like, strict=True
        ):
            key = r.instance
            down = None if r.crash_loop is None else ("crash_looping", _crash_loop_text(r.crash_loop))
            top = [(features[i], float(dev[i]), float(r.latest[i])) for i in order]
            hist = self.scores_of(key)
            hist.add(r.step_ts_ms, score)
            if self.latest_step is None or r.step_ts_ms > self.latest_step:
                self.latest_step = r.step_ts_ms
            # A copy: a view would keep the whole batch's deviations alive.
            hist.deviation, hist.latest, hist.looks_like = dev.copy(), r.latest, looks_like
            hist.anomalous = score > 1.0 or down is not None
            self._see_upstream(key, r.upstream)
            labels = self._labels(key)
            new = alerts.observe(key, labels, r.step_ts_ms / 1000.0, score, threshold, top, looks_like, down)
            self._remember(key, new)
            phases |= self._show_phase(key)
            changed.extend(new)
            # A firing instance's top features are on /metrics (serve.exports).
            hist.top = top if alerts.is_firing(key) else None
        self._count_firing(changed)
        if self._relink:  # the first batch after a reload: alerts may have new labels
            self._relink = False
            self._link_all()
        if changed:
            self.notifier.submit(changed)
        if changed or phases:
            self._count_alerts()

    def scores_of(self, key: InstanceKey) -> InstanceScores:
        hist = self.history.get(key)
        if hist is None:
            hist = self.history[key] = InstanceScores(self.history_len)
        return hist

    def _remember(self, key: InstanceKey, changed: list[Alert]) -> None:
        """Alerts that began firing are kept with the instance's scores, for its page."""
        for a in changed:
            if not a.resolved:
                self.scores_of(key).remember(a)

    def _show_phase(self, key: InstanceKey) -> bool:
        """Whether the instance's alert state changed."""
        phase = self.alerts.state_of(key)
        if phase == "inactive":
            return self.phases.pop(key, None) is not None
        if self.phases.get(key) == phase:
            return False
        self.phases[key] = phase
        return True

    def liveness(self, events: list[LivenessEvent]) -> None:
        """Steps of instances that are down (their alert fires, saying why), or that came back (a
        normal step: the alert resolves after keep_firing_for, while the window warms again)."""
        changed: list[Alert] = []
        alerts = self.alerts
        for ev in events:
            key = ev.instance
            labels = self._labels(key)
            ts = ev.ts_ms / 1000.0
            if ev.state == "up":
                changed.extend(alerts.observe(key, labels, ts, 0.0, self.model.threshold, ()))
                self._show_phase(key)
                self.scores_of(key).anomalous = False
                continue
            was_firing = alerts.is_firing(key)
            new = alerts.observe(key, labels, ts, 0.0, self.model.threshold, (), down=(ev.state, _down_text(ev)))
            self._remember(key, new)
            self._show_phase(key)
            changed.extend(new)
            hist = self.scores_of(key)
            hist.anomalous = True
            if not was_firing:
                hist.top = None
        self._count_firing(changed)
        if changed:
            self.notifier.submit(changed)
        self._count_alerts()

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        """Instances evicted by the ingest path: their firing alerts resolve, their series go."""
        resolved: list[Alert] = []
        for key in keys:
            self.history.pop(key, None)
            self.phases.pop(key, None)
            self._see_upstream(key, "")
            self.upstream_of.pop(key, None)
            resolved.extend(self.alerts.forget(key))
        self._count_firing(resolved)
        if resolved:
            self.notifier.submit(resolved)
        self._count_alerts()

    def use(self, model: Detector, cfg: AlertingConfig, notifier: AlertmanagerNotifier, *, history: int) -> None:
        """After a reload: alert states carry over (replaced where their labels change), and a new
        notifier is told of every firing alert."""
        if cfg != self.cfg or model.name != self.model.name:
            self.alerts = self.alerts.reconfigured(cfg, model_name=model.name)
        if notifier is not self.notifier:
            self.notifier = notifier
            notifier.submit(self.alerts.firing())
        if history != self.history_len or model.features != self.model.features:
            # Another model's feature deviations are not this one's.
            self.history = {k: h.resized(history) for k, h in self.history.items()}
            if model.features != self.model.features:
                for h in self.history.values():
                    h.deviation = h.latest = h.top = None
        self.model, self.cfg, self.history_len = model, cfg, history
        self._relink = True

    def state(self) -> dict[str, Any]:
        """The alert states, what each instance forwards to, and resolved alerts still re-sent."""
        return {
            "alerts": self.alerts.state(),
            "upstream_of": dict(self.upstream_of),
            "resolved": [(alert_state(a), left) for a, left in self.notifier.resolved_resending()],
        }

    def restore(self, state: Mapping[str, Any]) -> int:
        """Take back `state()` after a restart. Firing alerts go to Alertmanager at once with the
        `startsAt` they had, so they stay active across the restart; returns the alerts restored."""
        resolved = [(alert_from_state(a), float(left)) for a, left in state["resolved"]]
        upstreams = {tuple(str(v) for v in k): str(u) for k, u in state["upstream_of"].items()}
        n = self.alerts.restore(state["alerts"])
        for key, upstream in upstreams.items():
            self._see_upstream(key, upstream)
        for key in self.alerts.tracked():
            self._show_phase(key)
        firing = self.alerts.firing()
        for a in firing:
            instance = tuple(a.labels.get(name, "") for name in self.instance_labels)
            self.scores_of(instance).anomalous = True
            self._remember(instance, [a])
        self._link_all()
        self.notifier.submit(firing)
        self.notifier.resume_resolved(resolved)
        self._count_alerts()
        return n

    def _count_alerts(self) -> None:
        for state, n in self.alerts.counts().items():
            self.metrics.alerts.labels(state).set(n)


def _down_text(ev: LivenessEvent) -> str:
    since = datetime.fromtimestamp(ev.since_ms / 1000, tz=UTC).strftime("%H:%M:%SZ")
    if ev.state == "scrape_failing":
        return f"Scrapes failing since {since} (up == 0): the CoreDNS is down or Prometheus cannot reach it."
    gone = _duration(max(0.0, (ev.ts_ms - ev.since_ms) / 1000))
    return (
        f"No data for {gone} (since {since}): its series stopped while the rest of the fleet's still "
        "arrive; the CoreDNS may be gone, or its scrapes no longer reach detectord."
    )


def _crash_loop_text(loop: CrashLoop) -> str:
    since = datetime.fromtimestamp(loop.since_ms / 1000, tz=UTC).strftime("%H:%M:%SZ")
    return (
        f"Crash loop: restarted {loop.restarts} times in the last {_duration(loop.within_s)} (since {since}; "
        "its counters reset each time), even where its scrapes succeed."
    )


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"

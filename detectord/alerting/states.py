"""Alert states per CoreDNS instance: scored steps to Prometheus-style alerts, without any I/O.

`AlertStates` keeps one alert per instance whose score is above 1, timed by `timing.AlertTimer`;
its firing and resolved alerts go to `notifier.AlertmanagerNotifier`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from detectord.alerting.timing import AlertRule, AlertTimer, Phase, Resemblance
from detectord.config import AlertingConfig
from detectord.ingest.features import url_key

ALERTNAME = "CoreDNSAnomaly"
# How far ahead a firing alert's endsAt lies, in resend intervals (as Prometheus does).
ENDS_AT_RESENDS = 4

InstanceKey = tuple[str, ...]
LabelsKey = tuple[tuple[str, str], ...]
TopFeatures = Sequence[tuple[str, float, float]]


class FleetShare:
    """The instances forwarding to one upstream (`alerting.upstream_label`) and how many of them
    fire: the sentence each firing alert of that upstream ends with. The score sink counts them
    as batches come, and an alert reads its sentence when it is shown, so a batch rewrites no
    alert it did not touch however many fire."""

    __slots__ = ("anomalous", "instances", "upstream")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.instances = 0
        self.anomalous = 0

    def sentence(self) -> str:
        total = max(self.instances, self.anomalous)
        if total <= 1:
            return ""
        return f"{self.anomalous} of {total} instances forwarding to {self.upstream} are anomalous."


@dataclass(eq=False)
class Alert:
    """One alert as Alertmanager sees it. A firing alert is updated in place while it fires."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float  # data time (seconds) of the step the alert began firing at
    score: float
    threshold: float
    generator_url: str = ""
    resolved_at: float | None = None
    top_features: tuple[str, ...] = ()  # the features the description names, first the one that moved most
    fleet: FleetShare | None = field(default=None, repr=False)  # while it fires: its upstream's counts
    key: LabelsKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = tuple(sorted(self.labels.items()))

    @property
    def resolved(self) -> bool:
        return self.resolved_at is not None

    def shown(self) -> dict[str, str]:
        """Its annotations as Alertmanager and the API get them: while it fires, with the sentence
        on its upstream's fleet (annotation `fleet`, and the description's last sentence)."""
        out = dict(self.annotations)
        text = "" if self.fleet is None else self.fleet.sentence()
        if text:
            out["fleet"] = text
            desc = out.get("description", "")
            out["description"] = f"{desc} {text}" if desc else text
        return out

    def to_api(self, now: float, resend_interval: float) -> dict[str, Any]:
        """The Alertmanager v2 `PostableAlert` for this alert, sent at wall time `now`."""
        if self.resolved_at is not None:
            ends_at = self.resolved_at
        else:
            ends_at = now + ENDS_AT_RESENDS * resend_interval
        # Alertmanager refuses an alert that ends before it starts (clock skew between data and wall time).
        ends_at = max(ends_at, self.starts_at)
        out: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": self.shown(),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(ends_at),
        }
        if self.generator_url:
            out["generatorURL"] = self.generator_url
        return out


def alert_state(a: Alert) -> dict[str, Any]:
    return {
        "labels": dict(a.labels),
        "annotations": dict(a.annotations),
        "starts_at": a.starts_at,
        "score": a.score,
        "threshold": a.threshold,
        "generator_url": a.generator_url,
        "resolved_at": a.resolved_at,
        "top_features": list(a.top_features),
    }


def alert_from_state(st: Mapping[str, Any]) -> Alert:
    resolved_at = st["resolved_at"]
    annotations = {str(k): str(v) for k, v in st["annotations"].items()}
    if resolved_at is None and "fleet" in annotations:
        # A firing alert an earlier detectord saved has its fleet sentence written in: the score sink
        # links it to its upstream's counts again.
        text = annotations.pop("fleet")
        desc = annotations.get("description", "")
        annotations["description"] = "" if desc == text else desc.removesuffix(" " + text)
    return Alert(
        labels={str(k): str(v) for k, v in st["labels"].items()},
        annotations=annotations,
        starts_at=float(st["starts_at"]),
        score=float(st["score"]),
        threshold=float(st["threshold"]),
        generator_url=str(st["generator_url"]),
        resolved_at=None if resolved_at is None else float(resolved_at),
        top_features=tuple(str(f) for f in st.get("top_features", ())),
    )


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Track:
    """An instance whose alert is pending or firing."""

    labels: dict[str, str]
    timer: AlertTimer
    last_ts: float
    alert: Alert | None = None  # set while firing
    resemblance: Resemblance = field(default_factory=Resemblance)


def rule_of(cfg: AlertingConfig) -> AlertRule:
    return AlertRule(float(cfg.for_), float(cfg.keep_firing_for))


class AlertStates:
    """Every instance's alert, driven once per scored step with the step's data time.

    A step is anomalous when its score is above 1; `timing.AlertTimer` says when the alert goes
    pending, fires and resolves (`alerting.for` and `alerting.keep_firing_for`). Only instances
    whose alert is pending or firing are tracked. Warming instances must not be observed.
    """

    def __init__(self, cfg: AlertingConfig, *, model_name: str, external_url: str) -> None:
        self.cfg = cfg
        self.rule = rule_of(cfg)
        self.model_name = model_name
        self.external_url = external_url.rstrip("/")
        self._tracks: dict[InstanceKey, _Track] = {}
        self._firing = 0  # tracks with an alert: counted as they change, read after every batch
        # Firing alerts whose identity changed on reconfiguration; returned, resolved, by the next call.
        self._retired: list[Alert] = []

    def observe(
        self,
        instance: InstanceKey,
        labels: Mapping[str, str],
        step_ts: float,
        score: float,
        threshold: float,
        top_features: TopFeatures,
        looks_like: str | None = None,
        down: tuple[str, str] | None = None,
    ) -> list[Alert]:
        """Advance `instance` by one step; return the alerts that began firing or resolved.

        `down` (why, description) marks a step of an instance that is down (scrapes failing, no
        data): anomalous whatever the score, and the alert says so instead of naming features."""
        changed, self._retired = self._retired, []
        anomalous = score > 1.0 or down is not None
        tr = self._tracks.get(instance)
        if tr is None:
            if not anomalous:
                return changed
            tr = self._tracks[instance] = _Track(dict(labels), AlertTimer(self.rule), step_ts)
        tr.last_ts = step_ts
        if anomalous:
            looks_like = tr.resemblance.add(looks_like)
        change = tr.timer.step(step_ts, anomalous)
        if change == "fired":
            tr.alert = self._new_alert(instance, tr.labels, step_ts, score, threshold, top_features, looks_like)
            self._firing += 1
            if down is not None:
                _describe_down(tr.alert, *down)
            changed.append(tr.alert)
        elif change == "cleared":
            del self._tracks[instance]
        elif change == "resolved":
            assert tr.alert is not None
            tr.alert.resolved_at = max(step_ts, tr.alert.starts_at)
            changed.append(tr.alert)
            del self._tracks[instance]
            self._firing -= 1
        elif down is not None and tr.alert is not None:
            _describe_down(tr.alert, *down)
        elif anomalous and tr.alert is not None:
            self._describe(tr.alert, score, threshold, top_features, looks_like)
        return changed

    def forget(self, instance: InstanceKey) -> list[Alert]:
        """Drop an evicted instance; its firing alert resolves at the last step it was seen."""
        changed, self._retired = self._retired, []
        tr = self._tracks.pop(instance, None)
        if tr is not None and tr.alert is not None:
            tr.alert.resolved_at = max(tr.last_ts, tr.alert.starts_at)
            changed.append(tr.alert)
            self._firing -= 1
        return changed

    def tracked(self) -> list[InstanceKey]:
        """The instances whose alert is pending or firing."""
        return list(self._tracks)

    def firing(self) -> list[Alert]:
        return [tr.alert for tr in self._tracks.values() if tr.alert is not None]

    def alert_of(self, instance: InstanceKey) -> Alert | None:
        """The instance's alert while it fires."""
        tr = self._tracks.get(instance)
        return None if tr is None else tr.alert

    def is_firing(self, instance: InstanceKey) -> bool:
        tr = self._tracks.get(instance)
        return tr is not None and tr.alert is not None

    def state_of(self, instance: InstanceKey) -> Phase:
        tr = self._tracks.get(instance)
        return "inactive" if tr is None else tr.timer.phase

    def since_of(self, instance: InstanceKey) -> float | None:
        """When the instance's alert went pending, or began firing (data time, seconds)."""
        tr = self._tracks.get(instance)
        if tr is None:
            return None
        return tr.alert.starts_at if tr.alert is not None else tr.timer.active_at

    def counts(self) -> dict[Phase, int]:
        """Instances by alert state, for a gauge (inactive ones are not tracked and not counted)."""
        return {"pending": len(self._tracks) - self._firing, "firing": self._firing}

    def state(self) -> list[dict[str, Any]]:
        """Every pending or firing alert as plain values (see `restore`)."""
        out = []
        for instance, tr in self._tracks.items():
            t = tr.timer
            out.append(
                {
                    "instance": instance,
                    "labels": dict(tr.labels),
                    "timer": (t.phase, t.active_at, t.fired_at, t.quiet_since),
                    "last_ts": tr.last_ts,
                    "alert": None if tr.alert is None else alert_state(tr.alert),
                    "resemblance": (dict(tr.resemblance._counts), tr.resemblance._best),
                }
            )
        return out

    def restore(self, states: Sequence[Mapping[str, Any]]) -> int:
        """Take back `state()`: pending alerts stay pending, firing ones keep firing with the same
        `startsAt`. Raises ValueError (TypeError, KeyError) on a state that does not fit."""
        tracks: dict[InstanceKey, _Track] = {}
        for st in states:
            phase, active_at, fired_at, quiet_since = st["timer"]
            if phase not in ("pending", "firing"):
                raise ValueError(f"an alert state of phase {phase!r}")
            timer = AlertTimer(
                self.rule, phase, float(active_at), float(fired_at), None if quiet_since is None else float(quiet_since)
            )
            counts, best = st["resemblance"]
            labels = {str(k): str(v) for k, v in st["labels"].items()}
            alert = None if st["alert"] is None else alert_from_state(st["alert"])
            if (alert is None) != (phase == "pending"):
                raise ValueError("a firing alert state without its alert, or a pending one with one")
            tracks[tuple(str(v) for v in st["instance"])] = _Track(
                labels,
                timer,
                float(st["last_ts"]),
                alert,
                Resemblance({str(k): int(v) for k, v in counts.items()}, None if best is None else str(best)),
            )
        self._tracks.update(tracks)
        self._recount()
        return len(tracks)

    def _recount(self) -> None:
        self._firing = sum(1 for tr in self._tracks.values() if tr.alert is not None)

    def reconfigured(self, cfg: AlertingConfig, *, model_name: str) -> AlertStates:
        """The same states under a new config or model; alerts whose labels change are replaced.

        The old alert of each replaced one resolves and is returned by the next `observe` or `forget`.
        """
        new = AlertStates(cfg, model_name=model_name, external_url=self.external_url)
        new._retired = list(self._retired)
        for instance, tr in self._tracks.items():
            old = tr.alert
            # Another model's classes are not this one's.
            timer = tr.timer
            moved = _Track(
                tr.labels,
                AlertTimer(new.rule, timer.phase, timer.active_at, timer.fired_at, timer.quiet_since),
                tr.last_ts,
                None,
                tr.resemblance if model_name == self.model_name else Resemblance(),
            )
            if old is not None:
                alert = new._new_alert(instance, tr.labels, old.starts_at, old.score, old.threshold, ())
                if alert.key == old.key:
                    old.annotations["summary"] = alert.annotations["summary"]
                    alert = old
                else:
                    alert.annotations["description"] = old.annotations.get("description", "")
                    alert.top_features = old.top_features
                    old.resolved_at = max(tr.last_ts, old.starts_at)
                    new._retired.append(old)
                moved.alert = alert
            new._tracks[instance] = moved
        new._recount()
        return new

    def _new_alert(
        self,
        instance: InstanceKey,
        instance_labels: Mapping[str, str],
        starts_at: float,
        score: float,
        threshold: float,
        top_features: TopFeatures,
        looks_like: str | None = None,
    ) -> Alert:
        # Identity labels first: configured extras may add labels but never merge two instances' alerts.
        labels = {"alertname": ALERTNAME, **instance_labels}
        labels.setdefault("severity", self.cfg.severity)
        labels.setdefault("model", self.model_name)
        for name, value in self.cfg.labels.items():
            labels.setdefault(name, value)
        alert = Alert(
            labels=labels,
            annotations={"summary": _summary(instance_labels)},
            starts_at=starts_at,
            score=score,
            threshold=threshold,
            generator_url=self._generator_url(instance),
        )
        self._describe(alert, score, threshold, top_features, looks_like)
        return alert

    def _describe(
        self, alert: Alert, score: float, threshold: float, top_features: TopFeatures, looks_like: str | None = None
    ) -> None:
        alert.score, alert.threshold = score, threshold
        named = top_features[: self.cfg.top_features]
        alert.top_features = tuple(name for name, _, _ in named)
        top = ", ".join(f"{name} {dev:+.1f}σ ({_num(value)})" for name, dev, value in named)
        text = f"Anomaly score {score:.2f} (above 1 is anomalous; model threshold {threshold:g})."
        if looks_like:
            text += f" Looks like {looks_like.replace('_', ' ')}."
        if top:
            text += f" Top contributing features: {top}."
        alert.annotations.update(description=text, score=f"{score:.4g}", threshold=f"{threshold:g}")
        alert.annotations.pop("down", None)
        if looks_like:
            alert.annotations["looks_like"] = looks_like
        else:
            alert.annotations.pop("looks_like", None)

    def _generator_url(self, instance: InstanceKey) -> str:
        """The instance's page, where its score, window and baseline are (`serve.pages`)."""
        if not self.external_url:
            return ""
        return f"{self.external_url}/instances/{url_key(instance)}"


def _describe_down(alert: Alert, why: str, description: str) -> None:
    alert.annotations.update(description=description, down=why)
    alert.top_features = ()
    for key in ("score", "looks_like"):
        alert.annotations.pop(key, None)


def _summary(labels: Mapping[str, str]) -> str:
    name = labels.get("instance")
    rest = [f"{k} {v}" for k, v in labels.items() if k != "instance"]
    if name is None:
        return f"CoreDNS {', '.join(rest)} is behaving anomalously"
    where = f" ({', '.join(rest)})" if rest else ""
    return f"CoreDNS {name}{where} is behaving anomalously"


def _num(v: float) -> str:
    """Three significant digits, without an exponent for everyday magnitudes."""
    if not math.isfinite(v):
        return str(v)
    if v == 0 or not 1e-3 <= abs(v) < 1e6:
        return f"{v:.3g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text

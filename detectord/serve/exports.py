"""The per-instance series on /metrics, read from the score sink's live state at scrape time (a
custom collector, client_python's way for many series): no metric object per instance to keep.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import utils
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

try:
    from detectord.serve import _fastexports  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the reference path below
    _fastexports = None

if TYPE_CHECKING:
    from detectord.ingest.features import InstanceKey
    from detectord.serve.history import InstanceScores
    from detectord.serve.sink import ScoreSink


class InstanceExports(Collector):
    """detectord_anomaly_score, detectord_anomaly, detectord_alert_state and, for firing instances,
    detectord_feature_value and _deviation of their top features.

    `export` picks the instances: all of them, only the anomalous ones (score above 1, down, or
    alert pending or firing), or those and the `top` highest scores besides. Runs on a scrape's
    thread while the event loop changes the sink: it copies each dict whole (atomic under the
    GIL) before reading it."""

    def __init__(
        self,
        sink: Callable[[], ScoreSink | None],
        labels: tuple[str, ...],
        export: str,
        top: int,
        *,
        native: bool = True,
    ) -> None:
        self._sink, self.labels, self.export, self.top = sink, labels, export, top
        self.native = native  # the C renderer where it is built (tests compare the two)
        # Each exported instance's `{...}` as `text` last wrote it: an instance's label values never
        # change, so a scrape renders only the instances new since the one before.
        self._rendered: dict[InstanceKey, str] = {}

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Described (no samples) so registering the collector does not call collect.
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        il = list(self.labels)
        return (
            GaugeMetricFamily(
                "detectord_anomaly_score", "Latest anomaly score per instance; > 1 is anomalous.", labels=il
            ),
            GaugeMetricFamily(
                "detectord_anomaly",
                "1 while the instance is anomalous: its latest score above the threshold, down, or in a crash loop.",
                labels=il,
            ),
            GaugeMetricFamily(
                "detectord_alert_state",
                "1 for each instance whose CoreDNSAnomaly alert is pending or firing, by state (as Prometheus's "
                "ALERTS{alertstate}); no series while inactive.",
                labels=[*il, "state"],
            ),
            GaugeMetricFamily(
                "detectord_feature_value",
                "Current value of the top contributing features of instances whose alert is firing.",
                labels=[*il, "feature"],
            ),
            GaugeMetricFamily(
                "detectord_feature_deviation",
                "Deviation (standard units) of the top contributing features of firing instances.",
                labels=[*il, "feature"],
            ),
        )

    def _picked(self) -> tuple[dict[InstanceKey, InstanceScores], dict[InstanceKey, str]]:
        """The exported instances' score histories, and every alert's phase."""
        sink = self._sink()
        if sink is None:
            return {}, {}
        # dict(): a copy without a tuple per instance (a list of items made 100,000 of them and
        # woke the garbage collector, which then walked every object of the daemon).
        history = dict(sink.history)
        phases = dict(sink.phases)
        if self.export != "all":
            wanted = {k for k, h in history.items() if h.anomalous} | set(phases)
            if self.export == "top" and self.top:
                scored = ((h.score, k) for k, h in history.items() if h.count and math.isfinite(h.score))
                wanted |= {k for _, k in heapq.nlargest(self.top, scored)}
            history = {k: h for k, h in history.items() if k in wanted}
        return history, phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The reference for `text`, and what a registry this collector is registered with shows."""
        score, anomaly, state, value, deviation = fams = self._families()
        history, phases = self._picked()
        for key, h in history.items():
            labels = list(key)
            if h.count:
                score.add_metric(labels, h.score)
            if h.anomalous is not None:
                anomaly.add_metric(labels, 1.0 if h.anomalous else 0.0)
            for name, d, v in h.top or ():
                value.add_metric([*labels, name], v)
                deviation.add_metric([*labels, name], d)
        for key, phase in phases.items():
            state.add_metric([*key, phase], 1.0)
        yield from fams

    def text(self) -> bytes:
        """What generate_latest makes of `collect`'s families, byte for byte
        (tests/serve/test_exports.py compares), without a sample object per series: at 100,000
        instances several times faster, which is what /metrics serves."""
        score, anomaly, state, value, deviation = self._families()
        history, phases = self._picked()
        inst = _LabelOrder(self.labels)
        if len(self._rendered) > 2 * len(history) + 1024:
            # Forget instances no longer exported, once they are most of what is kept.
            self._rendered = {k: v for k, v in self._rendered.items() if k in history}
        lines = self._lines if _fastexports is None or not self.native else self._lines_native
        scores, flags, firing = lines(history, inst.render)
        values, deviations = [_head(value)], [_head(deviation)]
        with_feature = _LabelOrder((*self.labels, "feature"))
        for key, top in firing:
            for name, d, v in top:
                named = with_feature.render((*key, name))
                values.append(f"detectord_feature_value{named} {_go_float(v)}\n")
                deviations.append(f"detectord_feature_deviation{named} {_go_float(d)}\n")
        states = [_head(state)]
        with_state = _LabelOrder((*self.labels, "state"))
        states += [f"detectord_alert_state{with_state.render((*k, p))} 1.0\n" for k, p in phases.items()]
        rest = "".join([*states, *values, *deviations])
        return b"".join([_head(score).encode(), scores, _head(anomaly).encode(), flags, rest.encode()])

    def _lines(self, history: dict[InstanceKey, InstanceScores], render: Callable[[InstanceKey], str]) -> _Lines:
        """The score and anomaly lines of `history`'s instances, and the (key, top features) of
        those that have them. The reference for _fastexports.render."""
        rendered, inf, exponent = self._rendered, _INF, _GO_EXPONENT
        scores, flags, firing = [], [], []
        for key, h in history.items():
            labels = rendered.get(key)
            if labels is None:
                rendered[key] = labels = render(key)
            if h.count:
                v = h.score
                scores.append(f"detectord_anomaly_score{labels} {repr(v) if -inf < v < exponent else _go_float(v)}\n")
            if h.anomalous is not None:
                flags.append(f"detectord_anomaly{labels} {'1.0' if h.anomalous else '0.0'}\n")
            if h.top:
                firing.append((key, h.top))
        return "".join(scores).encode(), "".join(flags).encode(), firing

    def _lines_native(self, history: dict[InstanceKey, InstanceScores], render: Callable[[InstanceKey], str]) -> _Lines:
        scores, flags, firing = [], [], []
        pos = 0
        while pos >= 0:
            pos, s, f, fi = _fastexports.render(history, pos, NATIVE_SLICE, self._rendered, render, _go_float)
            scores.append(s)
            flags.append(f)
            firing += fi
        return b"".join(scores), b"".join(flags), firing


_Lines = tuple[bytes, bytes, list[tuple["InstanceKey", list[tuple[str, float, float]]]]]

# Instances a call of the C renderer writes: it holds Python's lock through a call (about 0.7 µs
# an instance here), so the ingest thread waits at most that long for it, about 14 ms.
NATIVE_SLICE = 20_000

# Sample values as generate_latest writes them (Go's float format). Untyped in prometheus_client.
_go_float: Callable[[float], str] = utils.floatToGoString
# Below it a finite float is Python's repr in Go's format too (Go writes 1e+06 where Python writes
# 1000000.0); the score lines take that shortcut, 100,000 times a scrape.
_GO_EXPONENT = 1e6
_INF = math.inf


def _head(family: GaugeMetricFamily) -> str:
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {family.name} {doc}\n# TYPE {family.name} gauge\n"


class _LabelOrder:
    """Renders label values given in `names`' order as generate_latest does: `{name="value",...}`
    sorted by name, values escaped. The names are valid label names (config checks them)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.order = sorted(range(len(names)), key=names.__getitem__)
        self.names = [names[i] for i in self.order]

    def render(self, values: tuple[str, ...]) -> str:
        inner = ",".join([f'{n}="{_escape(values[i])}"' for n, i in zip(self.names, self.order, strict=True)])
        return f"{{{inner}}}"


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value

"""The JSON API the pages read (and scripts may): the model and fleet, the instances sorted,
filtered and paged, one instance's scores, window, baseline and alerts. Documented in the README.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from detectord import __version__
from detectord.ingest.features import InstanceKey, parse_url_key, url_key
from detectord.serve.appkeys import SERVER_KEY
from detectord.serve.history import InstanceScores

if TYPE_CHECKING:
    from detectord.alerting.states import Alert
    from detectord.serve.server import Server
    from detectord.serve.sink import ScoreSink

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
DEFAULT_SPARK = 30
_ALERT_RANK = {"firing": 2, "pending": 1, "inactive": 0}
_SORTS = ("score", "labels", "alert", "since")


def _server(request: web.Request) -> Server:
    return request.app[SERVER_KEY]


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"status": "error", "error": text}, status=status)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


async def handle_status(request: web.Request) -> web.Response:
    srv = _server(request)
    sink, ing = srv.sink, srv.ingestor
    model = srv.pipeline.model if srv.pipeline is not None else None
    data: dict[str, Any] = {
        "version": __version__,
        "ready": srv.ready,
        "phase": srv.phase,
        "instance_labels": list(srv.cfg.ingest.instance_labels),
        "now": round(time.time() * 1000),
        "step_seconds": srv.step_s,
        "latest_step": None if sink is None else sink.latest_step,
        "model": None,
        "fleet": None,
    }
    if model is not None:
        data["model"] = {
            "name": model.name,
            "kind": model.kind,
            "version": model.version,
            "trained_at": model.trained_at,
            "window": model.window,
            "step_seconds": model.step_seconds,
            "threshold": model.threshold,
            "features": list(model.features),
            "card": "model/card",
        }
    if ing is not None and sink is not None:
        counts = dict(ing.instance_counts)
        alerts = sink.alerts.counts()
        data["fleet"] = {
            "tracked": sum(counts.values()),
            **counts,
            "refused": len(ing.extractor.refused),
            "pending": alerts["pending"],
            "firing": alerts["firing"],
        }
    return web.json_response({"status": "success", "data": data})


async def handle_model_card(request: web.Request) -> web.Response:
    srv = _server(request)
    model = srv.pipeline.model if srv.pipeline is not None else None
    card = None if model is None or model.path is None else model.path / "MODEL_CARD.md"
    if card is None or not card.is_file():
        return web.Response(status=404, text="the model being served has no card\n")
    return web.Response(text=card.read_text(encoding="utf-8"), content_type="text/plain", charset="utf-8")


def key_matcher(text: str, names: Sequence[str]) -> Callable[[InstanceKey], bool] | None:
    """`filter`: space-separated terms, each `name=value` (that label is exactly value) or bare
    text (some label value holds it, ignoring case); a key must match every term. None: no terms."""
    exact: list[tuple[int, str]] = []
    loose: list[str] = []
    for term in text.split():
        name, eq, value = term.partition("=")
        if eq and name in names:
            exact.append((names.index(name), value))
        elif eq and name:
            exact.append((-1, value))  # a label instances do not have matches nothing
        else:
            loose.append(term.lower())
    if not exact and not loose:
        return None

    def match(key: InstanceKey) -> bool:
        for i, value in exact:
            if i < 0 or key[i] != value:
                return False
        if loose:
            lowered = [v.lower() for v in key]
            return all(any(t in v for v in lowered) for t in loose)
        return True

    return match


def _int(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        n = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer, got {raw!r}\n") from None
    if not lo <= n <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be in [{lo}, {hi}], got {n}\n")
    return n


def _top(sink: ScoreSink, hist: InstanceScores | None, state: str) -> list[dict[str, Any]]:
    if hist is None or hist.deviation is None or hist.latest is None or state == "warming":
        return []
    features = sink.model.features
    if len(hist.deviation) != len(features):
        return []
    order = np.argsort(-np.abs(hist.deviation))[: sink.cfg.top_features]
    return [
        {"name": features[i], "deviation": _num(float(hist.deviation[i])), "value": _num(float(hist.latest[i]))}
        for i in order
    ]


def _looks_like(sink: ScoreSink, key: InstanceKey, hist: InstanceScores | None) -> str | None:
    """The class an anomalous instance looks like: its alert's (the most frequent over its
    anomalous steps), else its latest anomalous window's; none for a normal one."""
    alert = sink.alerts.alert_of(key)
    if alert is not None:
        return alert.annotations.get("looks_like")
    if hist is not None and hist.count and hist.score > 1.0:
        return hist.looks_like
    return None


def _row(sink: ScoreSink, key: InstanceKey, state: str, spark: int) -> dict[str, Any]:
    hist = sink.history.get(key)
    alerts = sink.alerts
    scored = hist is not None and hist.count > 0
    row: dict[str, Any] = {
        "key": url_key(key),
        "labels": dict(zip(sink.instance_labels, key, strict=True)),
        "state": state,
        "warming": state == "warming",
        "score": _num(hist.score) if scored and hist is not None else None,
        "step": hist.step if hist is not None else None,
        "sparkline": [],
        "alert": alerts.state_of(key),
        "alert_since": _ms(alerts.since_of(key)),
        "top_features": _top(sink, hist, state),
        "looks_like": _looks_like(sink, key, hist),
        "upstream": sink.upstream_of.get(key) or None,
    }
    if scored and hist is not None and spark:
        row["sparkline"] = [_num(s) for s in hist.last(spark)[1].tolist()]
    return row


def _labels_of(item: tuple[InstanceKey, str]) -> InstanceKey:
    return item[0]


def _sort_key(sink: ScoreSink, sort: str) -> Callable[[tuple[InstanceKey, str]], Any]:
    """Read on a thread while the event loop changes the sink: the histories are copied (whole,
    atomic under the GIL); an alert's state is one lookup."""
    history, alerts = dict(sink.history), sink.alerts

    def score(item: tuple[InstanceKey, str]) -> float:
        h = history.get(item[0])
        return h.score if h is not None and h.count and math.isfinite(h.score) else -math.inf

    if sort == "score":
        return score
    if sort == "alert":
        return lambda item: (_ALERT_RANK[alerts.state_of(item[0])], score(item))
    if sort == "since":

        def since(item: tuple[InstanceKey, str]) -> float:
            t = alerts.since_of(item[0])
            return math.inf if t is None else t

        return since
    return lambda item: item[0]


async def handle_instances(request: web.Request) -> web.Response:
    """Tracked instances, sorted (`sort`, `order`), filtered (`filter`, or the older
    `instance`: a substring of a label value) and paged (`offset`, `limit`)."""
    srv = _server(request)
    ing, sink = srv.ingestor, srv.sink
    if ing is None or sink is None:
        return _error(503, "not ready")
    q = request.query
    sort = q.get("sort", "score")
    if sort not in _SORTS:
        return _error(400, f"sort must be one of {', '.join(_SORTS)}, got {sort!r}")
    order = q.get("order", "asc" if sort in ("labels", "since") else "desc")
    if order not in ("asc", "desc"):
        return _error(400, f"order must be asc or desc, got {order!r}")
    try:
        offset = _int(q, "offset", 0, 0, 1 << 31)
        limit = _int(q, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
        spark = _int(q, "spark", DEFAULT_SPARK, 0, max(sink.history_len, 0))
    except web.HTTPBadRequest as exc:
        return _error(400, (exc.text or "").strip())
    overview, _ = await ing.call(ing.instance_overview)
    match = key_matcher(q.get("filter", ""), list(sink.instance_labels))
    want = q.get("instance")

    def ordered() -> list[tuple[InstanceKey, str]]:
        items = overview
        if match is not None:
            items = [item for item in items if match(item[0])]
        if want is not None:  # the older form: a substring of any label value
            items = [item for item in items if any(want in v for v in item[0])]
        # Ties (and every unscored instance) in label order, whichever way the main key runs.
        items.sort(key=_labels_of)
        items.sort(key=_sort_key(sink, sort), reverse=order == "desc")
        return items

    # Off the event loop, as /metrics: at 100,000 instances the sorts take about 0.2 s.
    overview = await asyncio.get_running_loop().run_in_executor(None, ordered)
    page = overview[offset:] if limit == 0 else overview[offset : offset + limit]
    data = [_row(sink, key, state, spark) for key, state in page]
    return web.json_response(
        {
            "status": "success",
            "data": data,
            "total": len(overview),
            "offset": offset,
            "limit": limit,
            "sort": sort,
            "order": order,
        }
    )


def _alert_json(a: Alert) -> dict[str, Any]:
    shown = a.shown()
    return {
        "state": "resolved" if a.resolved else "firing",
        "starts_at": _ms(a.starts_at),
        "ends_at": _ms(a.resolved_at),
        "summary": shown.get("summary", ""),
        "description": shown.get("description", ""),
        "looks_like": shown.get("looks_like"),
        "top_features": list(a.top_features),
        "down": shown.get("down"),
        "generator_url": a.generator_url,
    }


async def handle_instance(request: web.Request) -> web.Response:
    """One instance: its score history, recent alerts, and its window against its baseline."""
    srv = _server(request)
    ing, sink = srv.ingestor, srv.sink
    if ing is None or sink is None:
        return _error(503, "not ready")
    try:
        key = parse_url_key(request.match_info["key"])
    except ValueError as exc:
        return _error(400, str(exc))
    if len(key) != len(sink.instance_labels):
        return _error(404, "no such instance")
    overview_state = await ing.call(_state_of, ing, key)
    if overview_state is None:
        return _error(404, "no such instance")
    state, got = overview_state
    row = _row(sink, key, state, 0)
    hist = sink.history.get(key)
    model = sink.model
    row["threshold"] = model.threshold
    row["step_seconds"] = srv.step_s
    row["scores"] = [] if hist is None else [[t, _num(s)] for t, s in hist.pairs()]
    row["alerts"] = [] if hist is None else [_alert_json(a) for a in hist.alerts]
    row["window"] = None
    if got is not None:
        view, last_ts = got
        features = list(ing.normaliser.plan.features)
        step_ms = round(srv.step_s * 1000)
        n = len(view.values)
        dev = hist.deviation if hist is not None and hist.deviation is not None else None
        if dev is not None and len(dev) != len(features):
            dev = None
        row["window"] = {
            "features": features,
            "timestamps": [last_ts - (n - 1 - i) * step_ms for i in range(n)],
            "values": [[_num(v) for v in col] for col in view.values.T.tolist()],
            "median": [_num(v) for v in view.median.tolist()],
            "low": [_num(v) for v in view.low.tolist()],
            "high": [_num(v) for v in view.high.tolist()],
            # As the alert measures it (the model's own account of the window) once it is scored.
            "deviation": [_num(v) for v in (dev if dev is not None else view.deviation).tolist()],
            "top": [t["name"] for t in row["top_features"]],
        }
    return web.json_response({"status": "success", "data": row})


def _state_of(ing: Any, key: InstanceKey) -> tuple[str, Any] | None:
    """On the ingest thread: the instance's state and window view, None when not tracked."""
    if ing.extractor.liveness(key) is None:
        return None
    state = "down" if key in ing.liveness.down else "warming" if ing.is_warming(key) else "scoring"
    return state, ing.instance_window(key)


async def handle_scores(request: web.Request) -> web.Response:
    """The latest scores of each instance (or of those whose label values include ?instance=, or
    that match ?filter=), oldest first, as [step timestamp in ms, score] pairs; in label order,
    paged by `offset` and `limit` (100; 0 for all)."""
    srv = _server(request)
    if srv.sink is None:
        return _error(503, "not ready")
    q = request.query
    try:
        offset = _int(q, "offset", 0, 0, 1 << 31)
        limit = _int(q, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
    except web.HTTPBadRequest as exc:
        return _error(400, (exc.text or "").strip())
    want = q.get("instance")
    names = srv.cfg.ingest.instance_labels
    match = key_matcher(q.get("filter", ""), names)
    history = srv.sink.history

    def ordered() -> list[InstanceKey]:
        return sorted(
            key
            for key, hist in dict(history).items()  # a copy: the event loop changes it meanwhile
            if hist.count and (want is None or any(want in v for v in key)) and (match is None or match(key))
        )

    keys = await asyncio.get_running_loop().run_in_executor(None, ordered)
    page = keys[offset:] if limit == 0 else keys[offset : offset + limit]
    out = [
        {"labels": dict(zip(names, key, strict=True)), "scores": [[t, s] for t, s in history[key].pairs()]}
        for key in page
        if key in history
    ]
    return web.json_response({"status": "success", "data": out, "total": len(keys), "offset": offset, "limit": limit})

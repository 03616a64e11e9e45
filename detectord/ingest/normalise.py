"""Per-instance baselines: every instance's feature rows made scale-free against its own recent past,
so a fleet at 20 or 50,000 queries a second, with any cache hit ratio, looks alike to a model.

Each feature is transformed (log1p or 2·asin√p, see `features.Input`); a "relative" feature is then
measured in units of the instance's own spread around its own median, learned online from
buckets of `bucket_steps` rows over the last `buckets` of them. Medians make the baseline
robust: an incident shorter than half the horizon hardly moves it. Serving (`Normaliser`, on the
ingest thread) and training (`baseline_series`) run the same transform and `InstanceBaseline.take`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from detectord.ingest.features import FEATURES, FeatureSeries, Input, InstanceKey

_BY_NAME: dict[str, Input] = {f.name: f.input for f in FEATURES}


@dataclass(frozen=True)
class BaselineConfig:
    # Rows per bucket, buckets kept (the horizon: bucket_steps × buckets rows), and closed
    # buckets needed before an instance is scored (it "warms" until then).
    bucket_steps: int = 16
    buckets: int = 128
    min_buckets: int = 2
    # A spread learned from few buckets is uncertain: it is widened by sqrt(1 + young / buckets),
    # so a young baseline errs towards quiet (×1.7 at 2 buckets, ×1.1 at 16).
    young: float = 4.0
    # Model inputs are clipped to ±clip (a feature 1,000 spreads out says no more than one 20 out).
    clip: float = 20.0
    # A closed bucket whose mean lies more than `hold_z` spreads from the baseline in any feature is
    # held out of it (0: never): an ongoing incident must not become the instance's normal. Held
    # buckets are dropped when a bucket within reach closes (the incident is over), and taken in
    # once they span `hold_max_s` (a level that lasts that long is the new normal). Only a baseline
    # of at least `hold_after` buckets holds: a young one may not know the instance's normal yet.
    hold_z: float = 0.0
    hold_max_s: float = 3600.0
    hold_after: int = 8

    def __post_init__(self) -> None:
        if self.bucket_steps < 1 or self.buckets < 1:
            raise ValueError("bucket_steps and buckets must be >= 1")
        if not 1 <= self.min_buckets <= self.buckets:
            raise ValueError(f"min_buckets must be in [1, buckets={self.buckets}], got {self.min_buckets}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not self.young >= 0:
            raise ValueError(f"young must be >= 0, got {self.young}")
        if not self.hold_z >= 0 or not self.hold_max_s > 0 or self.hold_after < 1:
            raise ValueError("hold_z must be >= 0, hold_max_s > 0 and hold_after >= 1")

    @property
    def warm_steps(self) -> int:
        return self.bucket_steps * self.min_buckets


@dataclass(frozen=True)
class InputPlan:
    """What a model's inputs are: the features' input specs (a snapshot, saved with the model),
    the baseline settings, and how soon a window is scored. `InputPlan.default(features)` reads
    the feature table."""

    features: tuple[str, ...]
    specs: tuple[Input, ...]
    baseline: BaselineConfig = BaselineConfig()
    # A window is scored once it holds this many rows since the instance appeared or restarted,
    # its older rows repeating the oldest one (None: only full windows). At coarse steps a full
    # window takes many minutes; this keeps the first score within minutes of an instance's start.
    min_rows: int | None = None

    def __post_init__(self) -> None:
        if self.min_rows is not None and self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")

    @classmethod
    def default(
        cls, features: Sequence[str], baseline: BaselineConfig | None = None, min_rows: int | None = None
    ) -> InputPlan:
        missing = [f for f in features if f not in _BY_NAME]
        if missing:
            raise ValueError(f"no input spec for features {missing}")
        return cls(tuple(features), tuple(_BY_NAME[f] for f in features), baseline or BaselineConfig(), min_rows)

    def rows_needed(self, window: int) -> int:
        """Rows after an instance's start or restart before its first window is scored."""
        return window if self.min_rows is None else min(self.min_rows, window)

    @property
    def low(self) -> np.ndarray:
        """The lowest model input of each feature: 0 where only a rise counts and for absolute
        features (0 when healthy, never below), -clip for the rest."""
        clip = self.baseline.clip
        floor0 = [s.direction == "rise" or s.baseline == "absolute" for s in self.specs]
        return np.where(floor0, 0.0, -clip).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "baseline": asdict(self.baseline),
            "features": {n: asdict(s) for n, s in zip(self.features, self.specs, strict=True)},
        }
        if self.min_rows is not None:  # absent in artifacts made before partial windows
            out["min_rows"] = self.min_rows
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputPlan:
        try:
            feats = d["features"]
            known = {f.name for f in fields(Input)}
            specs = []
            for name, spec in feats.items():
                unknown = set(spec) - known
                if unknown:
                    raise ValueError(f"feature {name!r}: unknown input keys {sorted(unknown)}")
                specs.append(Input(**spec))
            min_rows = d.get("min_rows")
            if min_rows is not None and not isinstance(min_rows, int):
                raise ValueError(f"min_rows must be an integer, got {min_rows!r}")
            return cls(tuple(feats), tuple(specs), BaselineConfig(**d.get("baseline", {})), min_rows)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed input plan: {exc}") from None


class _Compiled:
    """An InputPlan as arrays, for one step length."""

    def __init__(self, plan: InputPlan, step_s: float) -> None:
        if not step_s > 0:
            raise ValueError(f"step must be > 0 s, got {step_s}")
        specs = plan.specs
        self.cfg = plan.baseline
        self.nf = len(specs)
        self.prescale = np.array([s.prescale for s in specs], dtype=np.float32)
        self.log = np.array([s.transform == "log1p" for s in specs])
        self.asin = np.array([s.transform == "asin_sqrt" for s in specs])
        self.relative = np.array([s.baseline == "relative" for s in specs])
        self.rel_idx = np.flatnonzero(self.relative)
        self.floor = np.array([s.floor for s in specs], dtype=np.float32)
        self.hold = [(i, max(1, math.ceil(s.hold_s / step_s))) for i, s in enumerate(specs) if s.hold_s > 0]
        # Buckets an ongoing deviation is held out of the baseline for, at most.
        self.hold_buckets = max(1, math.ceil(self.cfg.hold_max_s / (self.cfg.bucket_steps * step_s)))
        # Absolute features: fixed location 0 and scale `floor`.
        self.abs_loc = np.zeros(self.nf, dtype=np.float32)
        self.abs_scale = self.floor.copy()

    def transform(self, raw: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            x = np.where(raw > 0, np.minimum(raw, 1.0e30), 0.0).astype(np.float32) * self.prescale
        t = np.where(self.log, np.log1p(x), x)
        t = np.where(self.asin, 2.0 * np.arcsin(np.sqrt(np.minimum(x, 1.0))), t)
        return t.astype(np.float32, copy=False)

    def untransform(self, t: np.ndarray) -> np.ndarray:
        """Transformed values (…, F) back in the features' own units."""
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.where(self.log, np.expm1(t), t)
            x = np.where(self.asin, np.sin(np.clip(t, 0.0, np.pi) / 2.0) ** 2, x)
            out: np.ndarray = (x / self.prescale).astype(np.float64)
        return out


@dataclass(frozen=True)
class BaselineView:
    """An instance's window against its own baseline, in the features' units (for its page)."""

    values: np.ndarray  # (W, F) the window as the model saw it
    median: np.ndarray  # (F,) the baseline's location
    low: np.ndarray  # (F,) location - one spread
    high: np.ndarray  # (F,) location + one spread
    deviation: np.ndarray  # (F,) the latest row, in spreads from the location


class InstanceBaseline:
    """One instance's baseline. `take` takes each feature row, transformed, in step order; `loc`
    and `scale` are then what a window ending at that row is measured with."""

    __slots__ = (
        "_acc",
        "_acc2",
        "_c",
        "_held",
        "_hpos",
        "_k",
        "_means",
        "_n",
        "_next",
        "_pending",
        "_stds",
        "_taking",
        "held_buckets",
        "loc",
        "scale",
    )

    def __init__(self, compiled: _Compiled) -> None:
        c = self._c = compiled
        nrel = len(c.rel_idx)
        # Bucket statistics, float32, grown as buckets close (a short-lived instance stays small).
        self._means = np.zeros((0, nrel), dtype=np.float32)
        self._stds = np.zeros((0, nrel), dtype=np.float32)
        self._n = 0  # closed buckets kept
        self._next = 0  # ring position of the next closed bucket
        self._acc = np.zeros(nrel, dtype=np.float64)
        self._acc2 = np.zeros(nrel, dtype=np.float64)
        self._k = 0
        self._held = [[0.0] * h for _, h in c.hold]
        self._hpos = 0
        # Closed buckets held out of the baseline while they deviate (see BaselineConfig.hold_z).
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._taking = False  # a deviation outlasted hold_max_s: it is taken in until it ends
        self.held_buckets = 0  # buckets ever held out and then dropped (an incident's)
        self.loc = c.abs_loc.copy()
        self.scale = c.abs_scale.copy()

    @property
    def ready(self) -> bool:
        return self._n >= self._c.cfg.min_buckets

    def take(self, t: np.ndarray, *, gap: bool = False) -> np.ndarray:
        """The next row, transformed (`_Compiled.transform`, elementwise, so one call does many
        rows); returned as the model sees it (changed in place)."""
        c = self._c
        if c.hold:
            pos = self._hpos
            self._hpos += 1
            for (i, h), ring in zip(c.hold, self._held, strict=True):
                ring[pos % h] = float(t[i])
                t[i] = max(ring)
        if gap:
            return t  # a held row (missed scrape) says nothing new about the baseline
        v = t[c.rel_idx].astype(np.float64)
        self._acc += v
        self._acc2 += v * v
        self._k += 1
        if self._k == c.cfg.bucket_steps:
            self._close_bucket()
        return t

    def state(self) -> dict[str, Any]:
        """Everything it learned, as plain values (see `restore`)."""
        return {
            "means": _arr(self._means),
            "stds": _arr(self._stds),
            "n": self._n,
            "next": self._next,
            "acc": _arr(self._acc),
            "acc2": _arr(self._acc2),
            "k": self._k,
            "held": [list(r) for r in self._held],
            "hpos": self._hpos,
            "pending": [(_arr(m), _arr(sd)) for m, sd in self._pending],
            "taking": self._taking,
            "held_buckets": self.held_buckets,
            "loc": _arr(self.loc),
            "scale": _arr(self.scale),
        }

    def restore(self, st: Mapping[str, Any]) -> None:
        """Take back a `state()`; ValueError if its shapes are not this plan's."""
        c, nrel = self._c, len(self._c.rel_idx)
        means, stds = _unarr(st["means"], np.float32), _unarr(st["stds"], np.float32)
        n, nxt, k = int(st["n"]), int(st["next"]), int(st["k"])
        if (
            means.ndim != 2
            or means.shape[1] != nrel
            or stds.shape != means.shape
            or not 0 <= n <= min(len(means), c.cfg.buckets)
            or not 0 <= nxt < c.cfg.buckets
            or not 0 <= k < c.cfg.bucket_steps
        ):
            raise ValueError("the baseline's buckets do not fit this model's input plan")
        held = [[float(x) for x in r] for r in st["held"]]
        if [len(r) for r in held] != [h for _, h in c.hold]:
            raise ValueError("the baseline's held rows do not fit this model's input plan")
        vectors = [_unarr(st[name], np.float64) for name in ("acc", "acc2")]
        loc, scale = _unarr(st["loc"], np.float32), _unarr(st["scale"], np.float32)
        pending = [(_unarr(m, np.float64), _unarr(sd, np.float64)) for m, sd in st["pending"]]
        if any(v.shape != (nrel,) for v in [*vectors, *(x for p in pending for x in p)]) or (
            loc.shape != (c.nf,) or scale.shape != (c.nf,)
        ):
            raise ValueError("the baseline's statistics do not fit this model's input plan")
        self._means, self._stds, self._n, self._next, self._k = means, stds, n, nxt, k
        self._acc, self._acc2 = vectors
        self._held, self._hpos = held, int(st["hpos"])
        self._pending, self._taking = pending, bool(st["taking"])
        self.held_buckets = int(st["held_buckets"])
        self.loc, self.scale = loc, scale

    @property
    def holding(self) -> bool:
        """It is holding an ongoing deviation out of the baseline."""
        return bool(self._pending)

    def _close_bucket(self) -> None:
        c = self._c
        k = self._k
        mean = self._acc / k
        std = np.sqrt(np.maximum(self._acc2 / k - mean * mean, 0.0))
        self._acc[:] = 0.0
        self._acc2[:] = 0.0
        self._k = 0
        cfg = c.cfg
        if cfg.hold_z > 0 and self._n >= max(cfg.min_buckets, cfg.hold_after):
            rel = c.rel_idx
            off = bool((np.abs(mean - self.loc[rel]) > cfg.hold_z * self.scale[rel]).any())
            if off and not self._taking:
                self._pending.append((mean, std))
                if len(self._pending) < c.hold_buckets:
                    return
                # It has lasted hold_max_s: the new normal, learned from here on as any level is.
                for m, s in self._pending:
                    self._add_bucket(m, s)
                self._pending.clear()
                self._taking = True
                self._update()
                return
            if not off:
                self._taking = False
                self.held_buckets += len(self._pending)
                self._pending.clear()
        self._add_bucket(mean, std)
        self._update()

    def _add_bucket(self, mean: np.ndarray, std: np.ndarray) -> None:
        c = self._c
        if self._next >= len(self._means):
            grow = min(c.cfg.buckets, max(8, 2 * len(self._means)))
            self._means = np.resize(self._means, (grow, self._means.shape[1]))
            self._stds = np.resize(self._stds, (grow, self._stds.shape[1]))
        self._means[self._next] = mean
        self._stds[self._next] = std
        self._next = (self._next + 1) % c.cfg.buckets
        self._n = min(self._n + 1, c.cfg.buckets)

    def _update(self) -> None:
        c = self._c
        means, stds = self._means[: self._n], self._stds[: self._n]
        loc = _median(means)
        between = 1.4826 * _median(np.abs(means - loc))
        within = _median(stds)
        rel = c.rel_idx
        self.loc[rel] = loc
        spread = np.sqrt((between * between + within * within) * (1.0 + c.cfg.young / self._n))
        self.scale[rel] = np.maximum(spread, c.floor[rel])


def _median(a: np.ndarray) -> np.ndarray:
    """np.median(a, axis=0), the same numbers (a sort and the mean of the middle two, in a's dtype;
    NaN where a column holds one) in a quarter of the time on a baseline's 128 × 12 buckets."""
    s = np.sort(a, axis=0)
    n = len(s)
    out: np.ndarray = (s[(n - 1) // 2] + s[n // 2]) / 2
    nan = np.isnan(s[-1])
    if nan.any():
        out[nan] = np.nan
    return out


def model_inputs(
    window: np.ndarray,
    loc: np.ndarray,
    scale: np.ndarray,
    low: np.ndarray,
    high: float,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Transformed rows (…, W, F) measured against a baseline (…, F), each feature clipped to
    [low, high] (see `InputPlan.low`): what a detector sees. With `out` (float32, the window's
    shape; the window itself when the caller owns it) no array is made."""
    if out is None:
        out = ((window - loc[..., None, :]) / scale[..., None, :]).astype(np.float32, copy=False)
    else:
        np.subtract(window, loc[..., None, :], out=out)
        np.divide(out, scale[..., None, :], out=out)
    # np.clip's numbers (NaN stays NaN) at half its cost on a window.
    np.maximum(out, low, out=out)
    np.minimum(out, high, out=out)
    return out


class Normaliser:
    """Baselines keyed by instance. Owned by the ingest thread."""

    def __init__(self, plan: InputPlan, step_s: float) -> None:
        self.plan = plan
        self._low = plan.low
        self._compiled = _Compiled(plan, step_s)
        self._baselines: dict[InstanceKey, InstanceBaseline] = {}
        self.made = 0  # baselines ever made (see Ingestor.freeze_if_grown)

    def transform(self, raws: np.ndarray) -> np.ndarray:
        """Raw rows (…, F) transformed, for `take`: one call for a request's rows."""
        return self._compiled.transform(raws)

    def take(self, key: InstanceKey, t: np.ndarray, *, gap: bool = False) -> tuple[np.ndarray, InstanceBaseline]:
        """The instance's next row, from `transform`, through its baseline."""
        b = self._baselines.get(key)
        if b is None:
            b = self._baselines[key] = InstanceBaseline(self._compiled)
            self.made += 1
        return b.take(t, gap=gap), b

    def inputs(self, baseline: InstanceBaseline, window: np.ndarray) -> np.ndarray:
        """The model's inputs for `window` (the caller's own copy), written over it."""
        return model_inputs(window, baseline.loc, baseline.scale, self._low, self.plan.baseline.clip, out=window)

    def forget(self, keys: Iterable[InstanceKey]) -> None:
        for k in keys:
            self._baselines.pop(k, None)

    def view(self, key: InstanceKey, window: np.ndarray) -> BaselineView | None:
        """`window` (transformed rows, oldest first) of `key` against its baseline."""
        b = self._baselines.get(key)
        if b is None:
            return None
        c = self._compiled
        dev = (window[-1] - b.loc) / b.scale
        return BaselineView(
            c.untransform(window),
            c.untransform(b.loc),
            np.maximum(c.untransform(b.loc - b.scale), 0.0),  # every feature is >= 0
            c.untransform(b.loc + b.scale),
            dev.astype(np.float64),
        )

    def state_of(self, key: InstanceKey) -> dict[str, Any] | None:
        b = self._baselines.get(key)
        return None if b is None else b.state()

    def restore(self, key: InstanceKey, state: Mapping[str, Any]) -> None:
        b = InstanceBaseline(self._compiled)
        b.restore(state)
        self._baselines[key] = b
        self.made += 1


def _arr(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """An array as plain values: dtype, shape, bytes (what a snapshot holds)."""
    return (a.dtype.str, a.shape, a.tobytes())


def _unarr(t: Sequence[Any], dtype: type[np.generic]) -> np.ndarray:
    kind, shape, data = t
    if np.dtype(kind) != np.dtype(dtype):
        raise ValueError(f"an array of {kind}, expected {np.dtype(dtype).str}")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(x) for x in shape)).copy()


@dataclass
class BaselineSeries:
    """One instance's transformed rows and, per row, the baseline a window ending there uses."""

    timestamps_ms: np.ndarray  # int64 (T,)
    x: np.ndarray  # float32 (T, F): transformed rows
    loc: np.ndarray  # float32 (T, F)
    scale: np.ndarray  # float32 (T, F)
    ready: np.ndarray  # bool (T,): the baseline was warm
    restarts: list[int]
    raw: np.ndarray  # float32 (T, F): the feature rows as extracted
    # Its `up` samples and the rows where its process restarted (see FeatureSeries).
    up_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    up: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    process_restarts: list[int] = field(default_factory=list)


def baseline_series(series: FeatureSeries, plan: InputPlan, step_s: float) -> BaselineSeries:
    """The offline twin of `Normaliser`: the same transform and takes, row by row, in step order."""
    c = _Compiled(plan, step_s)
    b = InstanceBaseline(c)
    n, nf = series.values.shape
    x = np.empty((n, nf), dtype=np.float32)
    loc = np.empty((n, nf), dtype=np.float32)
    scale = np.empty((n, nf), dtype=np.float32)
    ready = np.empty(n, dtype=bool)
    gap = series.gap if len(series.gap) == n else np.zeros(n, dtype=bool)
    t = c.transform(series.values)
    for i in range(n):
        x[i] = b.take(t[i], gap=bool(gap[i]))
        loc[i] = b.loc
        scale[i] = b.scale
        ready[i] = b.ready
    return BaselineSeries(
        series.timestamps_ms,
        x,
        loc,
        scale,
        ready,
        list(series.restarts),
        series.values,
        series.up_ms,
        series.up,
        list(series.process_restarts),
    )


def segment_starts(n: int, restarts: Sequence[int]) -> np.ndarray:
    """Per row, the first row of its segment: 0, or the latest restart at or before it (serving's
    window starts again there)."""
    marks = np.zeros(n, dtype=np.int64)
    for r in restarts:
        if 0 <= r < n:
            marks[r] = r
    out: np.ndarray = np.maximum.accumulate(marks)
    return out


def windows_at(bs: BaselineSeries, ends: np.ndarray, window: int, plan: InputPlan) -> np.ndarray:
    """Model inputs (N, W, F) of the windows ending at rows `ends`, as serving's `WindowStore`
    makes them: rows before the end's segment (the instance's start or latest restart) repeat the
    segment's first row."""
    idx = ends[:, None] + np.arange(-window + 1, 1)[None, :]
    starts = segment_starts(len(bs.x), bs.restarts)[ends]
    idx = np.maximum(idx, starts[:, None])
    out: np.ndarray = model_inputs(bs.x[idx], bs.loc[ends], bs.scale[ends], plan.low, plan.baseline.clip)
    return out

"""Per-feature scaling of raw feature rows: a variance-taming transform, then standardisation.

One definition serves both sides: numpy for fitting and offline use, `keras.ops` inside the
compiled forward pass, so training and serving scale identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Transform = Literal["identity", "log1p", "asin_sqrt"]
TRANSFORMS: tuple[str, ...] = ("identity", "log1p", "asin_sqrt")

# (transform, scale applied before it, floor of the standard deviation after it), by feature.
# Rates, counts and bytes span decades: log1p. Latencies are taken in ms, CPU in % of a core,
# memory in MiB, rare events per minute, so log1p is near-linear where values are small.
# Shares use 2·asin(√p), which evens out the binomial noise of a share so 0 → 3 % moves as far
# as 50 % → 60 %. Rare-event rates are 0 in normal data: their floor keeps one stray event
# from dominating a score, while a sustained stream still does. SERVFAIL and REFUSED shares are
# ~0 almost everywhere: their floor makes 0 vs 0.1 % cheap and 3 % (the CoreDNS mixin's
# critical level) still six deviations away.
_DEFAULTS: dict[str, tuple[Transform, float, float]] = {
    "request_rate": ("log1p", 1.0, 0.1),
    "rcode_noerror_share": ("asin_sqrt", 1.0, 0.02),
    "rcode_nxdomain_share": ("asin_sqrt", 1.0, 0.02),
    "rcode_servfail_share": ("asin_sqrt", 1.0, 0.05),
    "rcode_refused_share": ("asin_sqrt", 1.0, 0.05),
    "latency_p50_seconds": ("log1p", 1000.0, 0.1),
    "latency_p99_seconds": ("log1p", 1000.0, 0.1),
    "cache_hit_ratio": ("asin_sqrt", 1.0, 0.02),
    "cache_entries": ("log1p", 1.0, 0.1),
    "upstream_request_rate": ("log1p", 1.0, 0.1),
    "upstream_latency_p99_seconds": ("log1p", 1000.0, 0.1),
    "upstream_healthcheck_failure_rate": ("log1p", 60.0, 0.5),
    "forward_max_concurrent_reject_rate": ("log1p", 60.0, 0.5),
    "panic_rate": ("log1p", 60.0, 0.5),
    "cpu_seconds_rate": ("log1p", 100.0, 0.1),
    "resident_memory_bytes": ("log1p", 1.0 / 2**20, 0.1),
    "goroutines": ("log1p", 1.0, 0.1),
}
_FALLBACK: tuple[Transform, float, float] = ("log1p", 1.0, 0.1)


@dataclass(frozen=True)
class FeatureScaling:
    name: str
    transform: str
    scale: float
    mean: float
    std: float

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"feature {self.name!r}: unknown transform {self.transform!r}; "
                             f"expected one of {', '.join(TRANSFORMS)}")
        if not (np.isfinite(self.std) and self.std > 0 and np.isfinite(self.mean) and np.isfinite(self.scale)):
            raise ValueError(f"feature {self.name!r}: mean, std and scale must be finite and std > 0")


class Scaler:
    """x → (transform(scale·x) − mean) / std, per feature."""

    def __init__(self, features: Sequence[FeatureScaling]) -> None:
        self.features = tuple(features)
        self.names = tuple(f.name for f in self.features)
        self.scale = np.array([f.scale for f in self.features], dtype=np.float32)
        self.mean = np.array([f.mean for f in self.features], dtype=np.float32)
        self.std = np.array([f.std for f in self.features], dtype=np.float32)
        self._log = np.array([f.transform == "log1p" for f in self.features])
        self._asin = np.array([f.transform == "asin_sqrt" for f in self.features])
        self._runs: list[tuple[int, int, str]] = []
        for i, f in enumerate(self.features):
            if self._runs and self._runs[-1][2] == f.transform:
                self._runs[-1] = (self._runs[-1][0], i + 1, f.transform)
            else:
                self._runs.append((i, i + 1, f.transform))

    @classmethod
    def fit(cls, names: Sequence[str], rows: np.ndarray) -> Scaler:
        """Fit on raw feature rows (N, F) (or windows (N, W, F)) of normal behaviour."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, len(names))
        spec = [_DEFAULTS.get(n, _FALLBACK) for n in names]
        partial = Scaler([FeatureScaling(n, t, s, 0.0, 1.0) for n, (t, s, _) in zip(names, spec, strict=True)])
        z = partial.transform_np(rows).astype(np.float64)
        mean, std = z.mean(axis=0), z.std(axis=0)
        return cls([FeatureScaling(n, t, s, float(m), float(max(sd, floor)))
                    for n, (t, s, floor), m, sd in zip(names, spec, mean, std, strict=True)])

    def transform_np(self, x: np.ndarray) -> np.ndarray:
        """Scaled features (float32) of raw rows or windows, last axis = features."""
        x = np.asarray(x, dtype=np.float32)
        with np.errstate(invalid="ignore"):
            x = np.where(x > 0, np.minimum(x, 1.0e30), 0.0).astype(np.float32) * self.scale
        t = np.where(self._log, np.log1p(x), x)
        t = np.where(self._asin, 2.0 * np.arcsin(np.sqrt(np.minimum(x, 1.0))), t)
        return ((t - self.mean) / self.std).astype(np.float32)

    def transform_ops(self, x: Any) -> Any:
        """The same as `transform_np`, in `keras.ops` (for a compiled forward pass)."""
        from keras import ops

        x = ops.cast(x, "float32")
        # One pass for NaN → 0, negatives → 0 and a cap on +Inf (NaN > 0 is false).
        x = ops.where(x > 0, ops.minimum(x, 1.0e30), 0.0) * self.scale
        # Transform runs of neighbouring features that share a transform: each element once.
        parts = []
        for a, b, kind in self._runs:
            v = x[..., a:b]
            if kind == "log1p":
                v = ops.log1p(v)
            elif kind == "asin_sqrt":
                v = 2.0 * ops.arcsin(ops.sqrt(ops.minimum(v, 1.0)))
            parts.append(v)
        t = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        return (t - self.mean) * (1.0 / self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"features": [asdict(f) for f in self.features]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scaler:
        try:
            return cls([FeatureScaling(**f) for f in d["features"]])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"scaler statistics are malformed: {exc}") from None

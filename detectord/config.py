"""The daemon's configuration: one YAML file, typed and validated once at start.

Every key, its type and its default is declared here; `detectord.example.yml` documents them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from detectord.errors import ConfigError
from detectord.packaged import default_model_path


class Duration(float):
    """Seconds, written in YAML the Prometheus way: `15s`, `1m30s`, `500ms`, `2h`."""

    _UNITS: ClassVar[dict[str, float]] = {
        "ms": 0.001,
        "s": 1.0,
        "m": 60.0,
        "h": 3600.0,
        "d": 86400.0,
        "w": 604800.0,
        "y": 31536000.0,
    }
    _RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")

    @classmethod
    def parse(cls, text: str) -> Duration:
        text = text.strip()
        pos, total = 0, 0.0
        for m in cls._RE.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * cls._UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 15s, 1m30s)")
        return cls(total)

    def __str__(self) -> str:
        return f"{float(self):g}s"


class ByteSize(int):
    """Bytes, written as `512KiB`, `32MiB`, `1GB` or a plain integer."""

    _UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "kb": 1000,
        "mb": 1000**2,
        "gb": 1000**3,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
    }
    _RE = re.compile(r"(\d+)\s*([a-zA-Z]*)")

    @classmethod
    def parse(cls, text: str) -> ByteSize:
        m = cls._RE.fullmatch(text.strip())
        if not m or m.group(2).lower() not in cls._UNITS:
            raise ValueError(f"not a size: {text!r} (use e.g. 10MiB, 512KiB)")
        return cls(int(m.group(1)) * cls._UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class WebConfig:
    listen_address: str = "0.0.0.0:9464"
    # Base URL users reach detectord at; each alert's generatorURL is its instance's page there.
    external_url: str = ""
    # Compressed request body limit; the declared decompressed length is checked too.
    max_body_size: ByteSize = ByteSize(16 * 1024**2)
    max_decoded_body_size: ByteSize = ByteSize(64 * 1024**2)
    shutdown_timeout: Duration = Duration(10.0)
    # Open client connections; at the cap the one that has waited longest without finishing its
    # request is closed to make room. Lowered to fit the open-files limit (LimitNOFILE).
    max_connections: int = 4096
    # Requests handled at once (probes aside); beyond, 503 with Retry-After, which Prometheus retries.
    max_concurrent_requests: int = 256
    # Request body bytes (as their Content-Length declares) read at once; beyond, the slowest body
    # being read is dropped to make room, or the request gets 503 with Retry-After.
    max_body_bytes_in_flight: ByteSize = ByteSize(256 * 1024**2)
    # A connection that has not sent a whole request head within this long is closed.
    read_header_timeout: Duration = Duration(10.0)
    # A request body not received within this long is answered 408.
    read_body_timeout: Duration = Duration(30.0)
    # Remote-write limits, as Prometheus's scrape limits (0: none). A series beyond a label limit
    # is refused (400, the rest of the request is taken); a request beyond
    # remote_write_series_limit is refused whole before any series is decoded.
    label_name_length_limit: int = 1024
    label_value_length_limit: int = 4096
    label_limit: int = 64
    remote_write_series_limit: int = 2_000_000


@dataclass(frozen=True)
class IngestConfig:
    # Length of one feature row: Prometheus's scrape_interval for the CoreDNS targets, or a
    # multiple of it. The model set runs its model for this step (null: the model's own step;
    # for a set, 1m, Prometheus's default scrape_interval).
    step: Duration | None = None
    # Labels whose values name one CoreDNS instance. Churny labels (pod) can be left out.
    instance_labels: tuple[str, ...] = ("job", "instance")
    # Instances tracked at once; new ones beyond are refused (and counted).
    max_instances: int = 10000
    # Bytes the label cache may hold (series seen lately: decoding a known series is a dict lookup)
    # beyond the tracked instances' own series, which stay while their instance is tracked. Past
    # it, and for series not seen for instance_ttl, entries are let go.
    label_cache_size: ByteSize = ByteSize(256 * 1024**2)
    # An instance that was scoring and whose samples stop for this long while the rest of the
    # stream goes on is down: its alert fires ("no data for 2m"). Leave null for
    # max(2m, 3 steps).
    stale_after: Duration | None = None
    # Consecutive failed scrapes (`up == 0`) that make an instance that was scoring down: 2 lets
    # one timed-out scrape pass without a page.
    failed_scrapes: int = 2
    # An instance restarted (its counters reset) crash_loop_restarts times within
    # crash_loop_within is in a crash loop, even if every scrape finds it up: its alert fires.
    crash_loop_restarts: int = 3
    crash_loop_within: Duration = Duration(600.0)
    # Forget an instance not seen for this long (its alert resolves), or as soon as its `up`
    # series goes stale (Prometheus has dropped the target).
    instance_ttl: Duration = Duration(3600.0)
    # Up to this many consecutive missing steps are filled by holding the last row;
    # a longer gap restarts the instance's window (it warms again).
    max_gap_steps: int = 5
    # Samples further in the future than this are rejected (as Prometheus does).
    max_future: Duration = Duration(600.0)
    # Keep the fleet's state (Python's object memory) in transparent huge pages where the kernel
    # offers them (its mode `madvise` or `always`): 13 % less CPU a sample at 100,000 instances.
    huge_pages: bool = True


@dataclass(frozen=True)
class ModelConfig:
    # A model artifact, or a model set (one artifact per step; detectord runs the one made for
    # ingest.step and refuses a step the set has no model for).
    path: Path = field(default_factory=default_model_path)
    # Run a model at an ingest.step it was not made for (a set: its nearest step's). Its card's
    # numbers do not hold there; for experiments and fast tests.
    any_step: bool = False
    # Overrides the threshold stored with the model (in raw score units of the model).
    threshold: float | None = None
    # If set, must match the model; a guard against loading the wrong artifact.
    window: int | None = None
    features: tuple[str, ...] | None = None


@dataclass(frozen=True)
class InferenceConfig:
    max_batch: int = 1024
    max_wait: Duration = Duration(0.01)
    queue_size: int = 100000
    # Latest scores kept per instance (12 bytes each): the instance page's plot, GET /api/v1/scores.
    score_history: int = 240
    # Which instances have per-instance series on /metrics (score, anomaly, alert state, top
    # features): all, only anomalous ones (score above 1, down, alert pending or firing), or
    # those and the export_top highest scores. The fleet-wide series are always there.
    export_instances: Literal["all", "anomalous", "top"] = "all"
    export_top: int = 100


@dataclass(frozen=True)
class AlertmanagerConfig:
    # http:// or https://; alerts are posted to {url}{path_prefix}/api/v2/alerts.
    url: str
    timeout: Duration = Duration(10.0)
    # Alertmanager's --web.route-prefix (or a reverse proxy's), as Prometheus's path_prefix.
    path_prefix: str = ""
    http_config: HTTPClientConfig = field(default_factory=lambda: HTTPClientConfig())


@dataclass(frozen=True)
class AlertingConfig:
    # The alert goes pending at the first anomalous step and fires after `for`. Shipped models
    # calibrate their threshold, and are evaluated, with `for: 0s` and `keep_firing_for: 1m`.
    for_: Duration = Duration(0.0)
    # A firing alert resolves after this long without an anomalous step.
    keep_firing_for: Duration = Duration(60.0)
    resend_interval: Duration = Duration(60.0)
    # Resolved alerts are re-sent for this long, as Prometheus does.
    resolved_resend_for: Duration = Duration(900.0)
    severity: str = "warning"
    labels: Mapping[str, str] = field(default_factory=dict)
    alertmanagers: tuple[AlertmanagerConfig, ...] = ()
    # Pending deliveries kept per Alertmanager while it is unreachable.
    queue_capacity: int = 10000
    max_batch: int = 64
    # Features named in an alert's description.
    top_features: int = 3
    # Alerts of instances that forward to the same upstreams (the `to` labels of their
    # coredns_proxy_* series) carry them in this label, so Alertmanager can group them into one
    # notification (group_by: [alertname, upstream]); the description says how many of those
    # instances are anomalous. "" leaves the label out.
    upstream_label: str = "upstream"


@dataclass(frozen=True)
class StateConfig:
    # Where snapshots of every instance's state go (systemd's StateDirectory, a PVC in
    # Kubernetes); relative to the working directory. "" keeps nothing across restarts.
    dir: str = "detectord-state"
    snapshot_interval: Duration = Duration(60.0)
    # A snapshot older than this is not restored: what it knew is stale.
    max_age: Duration = Duration(3600.0)


@dataclass(frozen=True)
class BasicAuthConfig:
    username: str
    password_file: str = ""
    # Secrets come only from files (re-read at each request, so a rotated one is picked up): a
    # secret written in the config file would be shown wherever the file is.
    _inline_secrets: ClassVar[Mapping[str, str]] = {"password": "password_file"}


@dataclass(frozen=True)
class AuthorizationConfig:
    type: str = "Bearer"
    credentials_file: str = ""
    _inline_secrets: ClassVar[Mapping[str, str]] = {"credentials": "credentials_file"}


TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # The name the server's certificate must carry, and the SNI sent (default: the URL's host).
    server_name: str = ""
    insecure_skip_verify: bool = False
    min_version: TLSVersion = "TLS12"


@dataclass(frozen=True)
class HTTPClientConfig:
    """Prometheus's outbound `http_config`: how detectord authenticates to a server it calls."""

    basic_auth: BasicAuthConfig | None = None
    authorization: AuthorizationConfig | None = None
    tls_config: TLSConfig = field(default_factory=TLSConfig)
    # http:// or https:// proxy; credentials in it are refused, as other secrets in the file are.
    proxy_url: str = ""
    follow_redirects: bool = True


@dataclass(frozen=True)
class BackfillConfig:
    # Prometheus's remote-read endpoint, e.g. http://prometheus:9090/api/v1/read ("": no backfill).
    url: str = ""
    # History read for each instance without restored state: enough for its baseline to be mature.
    lookback: Duration = Duration(7200.0)
    # A series selector; "" reads exactly the series the features use (CoreDNS, process and Go
    # metrics) and `up`.
    match: str = ""
    # The whole backfill; past it the daemon starts cold and says so.
    timeout: Duration = Duration(60.0)
    http_config: HTTPClientConfig = field(default_factory=HTTPClientConfig)


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    web: WebConfig = field(default_factory=WebConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Python names that differ from the YAML key (reserved words).
_YAML_NAMES = {"for_": "for"}


def load_config(path: Path | str) -> Config:
    """Read and validate a config file. Relative model paths resolve against the file's directory."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from exc
    return parse_config(text, base_dir=path.parent, source=str(path))


def parse_config(text: str, *, base_dir: Path = Path("."), source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and "path" in model and model["path"] is None:
        # `model.path: null`, as the example has it: the default set shipped in the package.
        raw["model"] = {k: v for k, v in model.items() if k != "path"}
    cfg: Config = from_mapping(Config, raw, "")
    if not cfg.model.path.is_absolute():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=base_dir / cfg.model.path))
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(key, msg)

    _split_hostport(cfg.web.listen_address, "web.listen_address")
    need(cfg.web.max_body_size > 0, "web.max_body_size", "must be > 0")
    need(cfg.web.max_connections >= 16, "web.max_connections", "must be >= 16")
    need(cfg.web.max_concurrent_requests >= 1, "web.max_concurrent_requests", "must be >= 1")
    need(
        cfg.web.max_body_bytes_in_flight >= cfg.web.max_body_size,
        "web.max_body_bytes_in_flight",
        "must be >= web.max_body_size",
    )
    need(cfg.web.read_header_timeout > 0, "web.read_header_timeout", "must be > 0")
    need(cfg.web.read_body_timeout > 0, "web.read_body_timeout", "must be > 0")
    for key in ("label_name_length_limit", "label_value_length_limit", "label_limit", "remote_write_series_limit"):
        need(getattr(cfg.web, key) >= 0, f"web.{key}", "must be >= 0 (0: no limit)")
    need(
        cfg.web.max_decoded_body_size >= cfg.web.max_body_size,
        "web.max_decoded_body_size",
        "must be >= web.max_body_size",
    )
    if cfg.ingest.step is not None:
        need(cfg.ingest.step >= 0.1, "ingest.step", f"must be >= 100ms, got {cfg.ingest.step}")
    need(len(cfg.ingest.instance_labels) > 0, "ingest.instance_labels", "must name at least one label")
    need(cfg.ingest.max_instances >= 1, "ingest.max_instances", "must be >= 1")
    need(cfg.ingest.label_cache_size >= 1024**2, "ingest.label_cache_size", "must be >= 1MiB")
    need(cfg.ingest.max_gap_steps >= 0, "ingest.max_gap_steps", "must be >= 0")
    need(cfg.ingest.failed_scrapes >= 1, "ingest.failed_scrapes", "must be >= 1")
    need(cfg.ingest.crash_loop_restarts >= 2, "ingest.crash_loop_restarts", "must be >= 2")
    need(cfg.ingest.crash_loop_within > 0, "ingest.crash_loop_within", "must be > 0")
    need(cfg.ingest.instance_ttl > 0, "ingest.instance_ttl", "must be > 0")
    if cfg.model.window is not None:
        need(cfg.model.window >= 8, "model.window", f"must be >= 8 steps, got {cfg.model.window}")
    if cfg.model.threshold is not None:
        need(
            math.isfinite(cfg.model.threshold) and cfg.model.threshold > 0,
            "model.threshold",
            "must be a positive number",
        )
    need(1 <= cfg.inference.max_batch <= 65536, "inference.max_batch", "must be in 1..65536")
    need(cfg.inference.queue_size >= cfg.inference.max_batch, "inference.queue_size", "must be >= inference.max_batch")
    need(cfg.inference.score_history >= 0, "inference.score_history", "must be >= 0")
    need(cfg.inference.export_top >= 0, "inference.export_top", "must be >= 0")
    need(cfg.alerting.resend_interval > 0, "alerting.resend_interval", "must be > 0")
    need(cfg.alerting.queue_capacity >= 1, "alerting.queue_capacity", "must be >= 1")
    need(1 <= cfg.alerting.max_batch <= 1000, "alerting.max_batch", "must be in 1..1000")
    label_re = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
    for name in cfg.alerting.labels:
        need(bool(label_re.fullmatch(name)), f"alerting.labels.{name}", "not a valid label name")
    if cfg.alerting.upstream_label:
        need(
            bool(label_re.fullmatch(cfg.alerting.upstream_label)),
            "alerting.upstream_label",
            f"{cfg.alerting.upstream_label!r} is not a valid label name",
        )
    for name in cfg.ingest.instance_labels:
        need(bool(label_re.fullmatch(name)), "ingest.instance_labels", f"{name!r} is not a valid label name")
    need(cfg.state.snapshot_interval >= 1, "state.snapshot_interval", "must be >= 1s")
    need(cfg.state.max_age > 0, "state.max_age", "must be > 0")
    if cfg.backfill.url:
        need(
            re.match(r"https?://[^/]+", cfg.backfill.url) is not None,
            "backfill.url",
            f"must be an http(s) URL, got {cfg.backfill.url!r}",
        )
    need(cfg.backfill.lookback > 0, "backfill.lookback", "must be > 0")
    need(cfg.backfill.timeout > 0, "backfill.timeout", "must be > 0")
    check_http_config(cfg.backfill.http_config, "backfill.http_config")
    for i, am in enumerate(cfg.alerting.alertmanagers):
        key = f"alerting.alertmanagers[{i}]"
        need(
            re.fullmatch(r"https?://[^/@?#]+(/[^?#]*)?", am.url) is not None,
            f"{key}.url",
            f"must be an http(s) URL without credentials, query or fragment, got {am.url!r}",
        )
        need(
            am.path_prefix == "" or re.fullmatch(r"(/[^/?#]+)+/?", am.path_prefix) is not None,
            f"{key}.path_prefix",
            f"must be a path starting with /, got {am.path_prefix!r}",
        )
        need(am.timeout > 0, f"{key}.timeout", "must be > 0")
        check_http_config(am.http_config, f"{key}.http_config")


def check_http_config(h: HTTPClientConfig, key: str) -> None:
    """Refuse an `http_config` Prometheus would refuse; `key` names where it sits."""

    def need(ok: bool, sub: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}.{sub}" if sub else key, msg)

    need(h.basic_auth is None or h.authorization is None, "", "basic_auth and authorization are mutually exclusive")
    if h.basic_auth is not None:
        need(h.basic_auth.username != "", "basic_auth.username", "must not be empty")
    if h.authorization is not None:
        a = h.authorization
        need(
            re.fullmatch(r"[!-~]+", a.type) is not None and a.type.lower() != "basic",
            "authorization.type",
            f"must be one word other than Basic (use basic_auth for that), got {a.type!r}",
        )
        need(a.credentials_file != "", "authorization.credentials_file", "is required: the file holding the token")
    t = h.tls_config
    need(bool(t.cert_file) == bool(t.key_file), "tls_config", "cert_file and key_file must be given together")
    if h.proxy_url:
        need(
            re.fullmatch(r"https?://[^/@?#]+/?", h.proxy_url) is not None,
            "proxy_url",
            f"must be http://HOST:PORT or https://HOST:PORT without credentials, got {h.proxy_url!r}",
        )


def _split_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen_host_port(cfg: Config) -> tuple[str, int]:
    return _split_hostport(cfg.web.listen_address, "web.listen_address")


def with_listen_address(cfg: Config, address: str) -> Config:
    _split_hostport(address, "--web.listen-address")
    return dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, listen_address=address))


def from_mapping(cls: type[Any], raw: Any, key: str) -> Any:
    """An instance of dataclass `cls` from parsed YAML, every value checked against its type hint;
    errors name the dotted key under `key`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(key or "<top level>", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    by_yaml = {_YAML_NAMES.get(f.name, f.name): f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        f = by_yaml.get(name)
        secret_file = getattr(cls, "_inline_secrets", {}).get(name)
        if f is None and secret_file is not None:
            raise ConfigError(sub, f"secrets are not accepted inline; put it in a file and set {secret_file}")
        if f is None:
            raise ConfigError(sub, f"unknown key (known: {', '.join(sorted(by_yaml))})")
        kwargs[f.name] = _convert(hints[f.name], value, sub)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{_YAML_NAMES.get(f.name, f.name)}" if key else f.name, "is required")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if value is None:
        raise ConfigError(key, "must not be empty")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"must be one of {', '.join(map(repr, get_args(tp)))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        item = get_args(tp)[0]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
        kv = get_args(tp)
        value_type = kv[1] if len(kv) == 2 else str
        return {str(k): _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Duration:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(key, f"must be a duration like 15s, got {value!r}")
        try:
            d = Duration.parse(value) if isinstance(value, str) else Duration(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        if d < 0:
            raise ConfigError(key, "must not be negative")
        return d
    if tp is ByteSize:
        try:
            return ByteSize.parse(str(value))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a path, got {value!r}")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return str(value)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover - a bug in this module


def step_seconds(cfg: Config, model_step: float) -> float:
    return float(cfg.ingest.step) if cfg.ingest.step is not None else model_step

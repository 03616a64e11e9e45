"""`--web.config.file`: exporter-toolkit's web configuration (TLS, client certificates, basic auth,
response headers, rate limit), read into frozen dataclasses, built into an SSLContext, re-read on change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import hashlib
import ipaddress
import os
import re
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bcrypt
import structlog
import yaml
from prometheus_client import CollectorRegistry, Counter

from detectord.config import Duration, TLSVersion, from_mapping
from detectord.errors import ConfigError
from detectord.http_client import TLS_VERSIONS

log = structlog.get_logger(__name__)

ClientAuthType = Literal[
    "",
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # exporter-toolkit's old name for RequireAnyClientCert
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]

# Go's tls.CipherSuites() (the ones exporter-toolkit accepts) by their OpenSSL names. TLS 1.3's
# suites are not configurable in Go either: accepted and left to the library.
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}

# Headers exporter-toolkit lets a web config set, with the values it allows (None: any).
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_BCRYPT_RE = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
# Checked against when the user is unknown, so that an unknown user costs as long as a known one
# (exporter-toolkit's: bcrypt of "fakepassword" at cost 10).
_DECOY_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
AUTH_CACHE_SIZE = 100
# How often the file and the certificates it names are checked for changes.
POLL_S = 2.0


@dataclass(frozen=True)
class TLSServerConfig:
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_auth_type: ClientAuthType = "NoClientCert"
    client_ca_file: str = ""
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: TLSVersion = "TLS12"
    max_version: TLSVersion = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """Any TLS setting given turns TLS on (exporter-toolkit's IsEnabled)."""
        return any(
            (self.cert, self.key, self.client_ca, self.cert_file, self.key_file, self.client_ca_file)
        ) or self.client_auth_type not in ("", "NoClientCert")


@dataclass(frozen=True)
class HTTPServerConfig:
    # aiohttp serves HTTP/1.1 only: accepted for compatibility, as over plain HTTP in Go.
    http2: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RateLimitConfig:
    interval: Duration = Duration(0)
    burst: int = 0


@dataclass(frozen=True)
class WebConfig:
    tls_server_config: TLSServerConfig = TLSServerConfig()
    http_server_config: HTTPServerConfig = HTTPServerConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    basic_auth_users: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedWebConfig:
    """A validated web config with its built SSLContext (None without TLS) and the files it was
    read from, as (path, stat signature) pairs for change detection."""

    config: WebConfig
    ssl_context: ssl.SSLContext | None
    files: tuple[tuple[str, tuple[int, int, int]], ...]


# ---- reading and checking ---------------------------------------------------------------------


def parse_web_config(text: str, *, base_dir: Path = Path("."), source: str = "<web config>") -> WebConfig:
    """Parse and check the schema; relative file names resolve against `base_dir`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {exc}") from exc
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(source, f"must be a mapping, got {type(raw).__name__}")
    # An empty section (`tls_server_config:`) is Go's zero value, not an error.
    raw = {k: ({} if v is None and k != "basic_auth_users" else v) for k, v in raw.items()}
    if raw.get("basic_auth_users") is None:
        raw.pop("basic_auth_users", None)
    cfg: WebConfig = from_mapping(WebConfig, raw, "")
    tls = cfg.tls_server_config
    tls = dataclasses.replace(
        tls,
        cert_file=_join(base_dir, tls.cert_file),
        key_file=_join(base_dir, tls.key_file),
        client_ca_file=_join(base_dir, tls.client_ca_file),
    )
    cfg = dataclasses.replace(cfg, tls_server_config=tls)
    _check(cfg)
    return cfg


def _join(base: Path, name: str) -> str:
    return str(base / name) if name and not os.path.isabs(name) else name


def _check(cfg: WebConfig) -> None:
    t = cfg.tls_server_config
    for i, name in enumerate(t.cipher_suites):
        if name not in CIPHER_SUITES:
            raise ConfigError(f"tls_server_config.cipher_suites[{i}]", f"unknown cipher: {name}")
    for i, name in enumerate(t.curve_preferences):
        if name not in CURVES:
            raise ConfigError(f"tls_server_config.curve_preferences[{i}]", f"unknown curve: {name}")
    if TLS_VERSIONS[t.min_version] > TLS_VERSIONS[t.max_version]:
        raise ConfigError("tls_server_config.min_version", f"{t.min_version} is above max_version {t.max_version}")
    if t.enabled:
        if not (t.cert or t.cert_file):
            raise ConfigError("tls_server_config.cert_file", "missing one of cert or cert_file")
        if not (t.key or t.key_file):
            raise ConfigError("tls_server_config.key_file", "missing one of key or key_file")
    if (t.client_ca or t.client_ca_file) and t.client_auth_type in ("", "NoClientCert"):
        raise ConfigError(
            "tls_server_config.client_auth_type", "client CAs have been configured without a client auth policy"
        )
    if t.client_auth_type in ("RequireAnyClientCert", "RequireClientCert") and not (t.client_ca or t.client_ca_file):
        # OpenSSL as Python drives it verifies every client certificate it requires.
        raise ConfigError(
            "tls_server_config.client_auth_type",
            f"{t.client_auth_type} needs client_ca_file here (client certificates are verified against it); "
            "use RequireAndVerifyClientCert",
        )
    if t.client_allowed_sans is not None and t.client_auth_type not in (
        "RequireAnyClientCert",
        "RequireClientCert",
        "RequireAndVerifyClientCert",
    ):
        raise ConfigError(
            "tls_server_config.client_allowed_sans",
            "requires client_auth_type to be one of RequireAnyClientCert or RequireAndVerifyClientCert",
        )
    for name, value in cfg.http_server_config.headers.items():
        if name not in ALLOWED_HEADERS:
            raise ConfigError(f"http_server_config.headers.{name}", f"HTTP header {name!r} can not be configured")
        allowed = ALLOWED_HEADERS[name]
        if allowed is not None and value not in allowed:
            raise ConfigError(
                f"http_server_config.headers.{name}", f"expected one of {', '.join(allowed)}, got {value!r}"
            )
    if cfg.rate_limit.burst < 0:
        raise ConfigError("rate_limit.burst", "must be >= 0")
    for user, hashed in cfg.basic_auth_users.items():
        m = _BCRYPT_RE.fullmatch(hashed)
        if m is None or not 4 <= int(m.group(1)) <= 31:
            raise ConfigError(f"basic_auth_users.{user}", 'not a bcrypt hash (make one with `htpasswd -nBC 10 ""`)')


def load_web_config(path: str | Path) -> LoadedWebConfig:
    """Read, check and build a web config file: every certificate and key it names is loaded,
    so a file that passes here serves."""
    path = Path(path)
    before = _signature(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read web config file: {exc.strerror}") from exc
    cfg = parse_web_config(text, base_dir=path.parent, source=str(path))
    t = cfg.tls_server_config
    # Signatures taken before the files are read: a change while they are read is seen next poll.
    certs = [f for f in (t.cert_file, t.key_file, t.client_ca_file) if f]
    files = ((str(path), before), *((f, _signature(Path(f))) for f in certs))
    ctx = server_ssl_context(cfg) if t.enabled else None
    return LoadedWebConfig(cfg, ctx, files)


def _signature(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def changed(loaded: LoadedWebConfig) -> bool:
    return any(_signature(Path(f)) != sig for f, sig in loaded.files)


# ---- TLS ------------------------------------------------------------------------------------


def server_ssl_context(cfg: WebConfig) -> ssl.SSLContext:
    """An SSLContext serving `cfg`'s certificate with its client-certificate policy; errors name the key."""
    t = cfg.tls_server_config
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, cfg)
    for name in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(t, name)
        try:
            if path:
                Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"tls_server_config.{name}", f"cannot read {path}: {exc.strerror}") from exc
    with _pem_files(t) as (cert, key):
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("tls_server_config.cert_file", f"failed to load the certificate and key: {exc}") from exc
    if t.client_ca_file or t.client_ca:
        key = "client_ca_file" if t.client_ca_file else "client_ca"
        try:
            if t.client_ca_file:
                ctx.load_verify_locations(cafile=t.client_ca_file)
            else:
                ctx.load_verify_locations(cadata=t.client_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"tls_server_config.{key}", f"no CA certificates loaded: {exc}") from exc
    return ctx


def apply_policy(ctx: ssl.SSLContext, cfg: WebConfig) -> None:
    """Versions, ciphers, curves and the client-certificate policy: what a handshake decides before
    OpenSSL looks at which certificate to present (set on the listening context too, on reload)."""
    t = cfg.tls_server_config
    ctx.minimum_version = TLS_VERSIONS[t.min_version]
    ctx.maximum_version = TLS_VERSIONS[t.max_version]
    names = [CIPHER_SUITES[c] for c in t.cipher_suites if CIPHER_SUITES[c]]
    if names:
        try:
            ctx.set_ciphers(":".join(dict.fromkeys(n for n in names if n)))
        except ssl.SSLError as exc:
            raise ConfigError("tls_server_config.cipher_suites", f"no usable cipher: {exc}") from exc
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if len(t.curve_preferences) == 1:
        ctx.set_ecdh_curve(CURVES[t.curve_preferences[0]])
    # Python's ssl cannot ask for a certificate without verifying it: RequestClientCert asks for
    # none (detectord never reads an unverified one), RequireAnyClientCert verifies it (_check).
    ctx.verify_mode = {
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
        "RequireAnyClientCert": ssl.CERT_REQUIRED,
        "RequireClientCert": ssl.CERT_REQUIRED,
    }.get(t.client_auth_type, ssl.CERT_NONE)
    ctx.set_alpn_protocols(["http/1.1"])


class _pem_files:
    """The certificate and key as file names, writing inline PEM (`cert`, `key`) to private
    temporary files for OpenSSL to read."""

    def __init__(self, t: TLSServerConfig) -> None:
        self.t = t
        self.tmp: list[str] = []

    def __enter__(self) -> tuple[str, str]:
        return self._file(self.t.cert_file, self.t.cert), self._file(self.t.key_file, self.t.key)

    def _file(self, name: str, inline: str) -> str:
        if name:
            return name
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(inline)
        self.tmp.append(tmp)
        return tmp

    def __exit__(self, *exc: object) -> None:
        for tmp in self.tmp:
            os.unlink(tmp)


class ListeningContext:
    """The SSLContext the listener keeps for its lifetime. Each handshake is handed the newest
    built context (its certificate, key and client CAs) from the SNI callback, which OpenSSL runs
    for every ClientHello, with or without a server name: new certificates serve without a restart."""

    def __init__(self, loaded: LoadedWebConfig) -> None:
        assert loaded.ssl_context is not None
        self.current = loaded.ssl_context
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        apply_policy(self.context, loaded.config)
        # The listening context needs a certificate of its own for OpenSSL to start a handshake.
        with _pem_files(loaded.config.tls_server_config) as (cert, key):
            self.context.load_cert_chain(cert, key)
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def use(self, loaded: LoadedWebConfig) -> None:
        assert loaded.ssl_context is not None
        apply_policy(self.context, loaded.config)
        self.current = loaded.ssl_context


# ---- per request -------------------------------------------------------------------------------


class Unauthorized(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes. Good credentials are cached by (user,
    hash, password digest) as exporter-toolkit does, so bcrypt's cost is paid once per credential,
    not per request. Wrong ones are not cached: a flood of guesses cannot push Prometheus's good
    credential out and make it pay bcrypt behind them. bcrypt runs on a thread of its own, so the
    guesses do not hold up other work off the event loop (/metrics rendering)."""

    def __init__(self) -> None:
        self._cache: collections.OrderedDict[tuple[str, str, bytes], bool] = collections.OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detectord-bcrypt")

    async def check(self, users: Mapping[str, str], header: str | None) -> str:
        """The user name, or raise Unauthorized with the reason (missing, malformed, bad_credentials)."""
        if not header:
            raise Unauthorized("missing")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            raise Unauthorized("malformed")
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed") from None
        if not sep:
            raise Unauthorized("malformed")
        known = user in users
        hashed = users[user].encode() if known else _DECOY_HASH
        key = (user, hashed.decode(), hashlib.sha256(password.encode()).digest())
        if key in self._cache:
            self._cache.move_to_end(key)
            return user
        ok = await asyncio.get_running_loop().run_in_executor(self._executor, self._bcrypt, hashed, password.encode())
        if not (ok and known):
            raise Unauthorized("bad_credentials")
        self._cache[key] = True
        while len(self._cache) > AUTH_CACHE_SIZE:
            self._cache.popitem(last=False)
        return user

    def _bcrypt(self, hashed: bytes, password: bytes) -> bool:
        try:
            return bool(bcrypt.checkpw(password, hashed))
        except ValueError:
            return False


class RateLimiter:
    """A token bucket: `burst` requests at once, one more every `interval` (exporter-toolkit's rate_limit)."""

    def __init__(self, cfg: RateLimitConfig) -> None:
        self.cfg = cfg
        self.tokens = float(cfg.burst)
        self.at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.cfg.burst), self.tokens + (now - self.at) / float(self.cfg.interval))
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def san_allowed(peercert: Mapping[str, Any] | None, allowed: tuple[str, ...]) -> bool:
    """Whether a verified client certificate has a subject alternative name in `allowed`."""
    if not peercert:
        return False
    want = {_norm(a) for a in allowed}
    return any(_norm(str(value)) in want for _, value in peercert.get("subjectAltName", ()))


def _norm(value: str) -> str:
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


class WebSecurity:
    """The web config in force: what the HTTP middleware checks per request and what the
    listener's TLS serves. `reload()` swaps in a new file's settings or keeps the old ones."""

    def __init__(self, path: str | None, registry: CollectorRegistry) -> None:
        self.path = path
        self.loaded = load_web_config(path) if path else LoadedWebConfig(WebConfig(), None, ())
        self.listening = ListeningContext(self.loaded) if self.loaded.ssl_context is not None else None
        self.auth = BasicAuth()
        self.limiter = self._limiter(self.loaded.config)
        self._refused: tuple[tuple[str, tuple[int, int, int]], ...] | None = None
        self.unauthorized = Counter(
            "detectord_http_unauthorized_total",
            "Requests refused by --web.config.file, by reason: missing, malformed or bad_credentials "
            "(401), client_san (403), rate_limited (429).",
            ["reason"],
            registry=registry,
        )
        self.reloads = Counter(
            "detectord_web_config_reloads_total",
            "Re-reads of --web.config.file by result.",
            ["result"],
            registry=registry,
        )

    @property
    def config(self) -> WebConfig:
        return self.loaded.config

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.listening.context if self.listening is not None else None

    @staticmethod
    def _limiter(cfg: WebConfig) -> RateLimiter | None:
        return RateLimiter(cfg.rate_limit) if cfg.rate_limit.interval > 0 else None

    async def reload(self, trigger: str) -> None:
        """Re-read the file; on any error keep the settings in force, log why and raise ConfigError."""
        if self.path is None:
            return
        try:
            # Reading the files and building a context are disk I/O: not on the event loop.
            loaded = await asyncio.get_running_loop().run_in_executor(None, load_web_config, self.path)
            if (loaded.ssl_context is None) != (self.listening is None):
                raise ConfigError(
                    "tls_server_config", "TLS cannot be turned on or off while running; restart detectord"
                )
            if self.listening is not None:
                self.listening.use(loaded)
        except ConfigError as exc:
            self.reloads.labels("failure").inc()
            self._refused = tuple((f, _signature(Path(f))) for f, _ in self.loaded.files)
            log.error(
                "web config refused; the previous one stays in force",
                trigger=trigger,
                file=self.path,
                key=exc.key,
                error=exc.reason,
            )
            raise
        if loaded.config.rate_limit != self.config.rate_limit:
            self.limiter = self._limiter(loaded.config)
        self.loaded = loaded
        self._refused = None
        self.reloads.labels("success").inc()
        log.info("web config reloaded", trigger=trigger, file=self.path, tls=self.listening is not None)

    async def poll(self) -> None:
        """Reload if the file or a certificate it names changed since it was last read (a
        refused version is not retried until it changes again)."""
        if self.path is None or not changed(self.loaded):
            return
        if self._refused is not None and not any(_signature(Path(f)) != sig for f, sig in self._refused):
            return
        with contextlib.suppress(ConfigError):  # reload() has logged and counted it
            await self.reload("file change")

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.poll()

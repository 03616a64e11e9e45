"""Outbound HTTP as Prometheus configures it (`http_config`): basic auth or an Authorization
header, from the config or from files read at each session, and TLS with a CA and client
certificates."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from detectord.config import HTTPClientConfig
from detectord.errors import ConfigError


def _secret(value: str, file: str, key: str) -> str:
    if not file:
        return value
    try:
        return Path(file).read_text().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {file}: {exc.strerror}") from exc


def headers(cfg: HTTPClientConfig, key: str) -> dict[str, str]:
    """The Authorization header `cfg` asks for ({} for none); `key` names its config section."""
    if cfg.basic_auth is not None:
        b = cfg.basic_auth
        password = _secret(b.password, b.password_file, f"{key}.basic_auth.password_file")
        return {"Authorization": aiohttp.BasicAuth(b.username, password).encode()}
    if cfg.authorization is not None:
        a = cfg.authorization
        token = _secret(a.credentials, a.credentials_file, f"{key}.authorization.credentials_file")
        return {"Authorization": f"{a.type} {token}"}
    return {}


def ssl_context(cfg: HTTPClientConfig, key: str) -> ssl.SSLContext | None:
    """None (the default verification) unless `tls_config` says otherwise."""
    t = cfg.tls_config
    if not (t.ca_file or t.cert_file or t.key_file or t.insecure_skip_verify):
        return None
    try:
        ctx = ssl.create_default_context(cafile=t.ca_file or None)
        if t.cert_file or t.key_file:
            ctx.load_cert_chain(t.cert_file, t.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.tls_config", f"cannot load certificates: {exc}") from exc
    if t.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def session(cfg: HTTPClientConfig, key: str, *, timeout: float) -> aiohttp.ClientSession:
    """A session that authenticates as `cfg` says."""
    ctx = ssl_context(cfg, key)
    connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else True)
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers(cfg, key),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )

"""Outbound HTTP as Prometheus configures it (`http_config`): TLS with a CA, client certificates
and a server name; basic auth or an Authorization header from files; a proxy; redirects or not."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiohttp
from yarl import URL

from detectord.config import HTTPClientConfig
from detectord.errors import ConfigError

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class CredentialsError(aiohttp.ClientError):
    """A password or token file could not be read when a request was about to be sent."""

    def __init__(self, key: str, file: str, reason: str) -> None:
        self.key = key
        super().__init__(f"{key}: cannot read {file}: {reason}")


class RedirectNotFollowed(aiohttp.ClientResponseError):
    """A 3xx answer while `follow_redirects` is false: an error, as Prometheus makes it."""


def _read_secret(file: str, key: str) -> str:
    try:
        return Path(file).read_text().strip()
    except OSError as exc:
        raise CredentialsError(key, file, exc.strerror or type(exc).__name__) from None


def basic_auth(username: str, password: str) -> str:
    """An Authorization header value for basic auth (UTF-8, as Prometheus sends it)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def authorization(cfg: HTTPClientConfig, key: str) -> str | None:
    """The Authorization header `cfg` asks for, its secret read from its file now (None: none);
    `key` names the config section. Raises CredentialsError if the file cannot be read."""
    if cfg.basic_auth is not None:
        b = cfg.basic_auth
        password = _read_secret(b.password_file, f"{key}.basic_auth.password_file") if b.password_file else ""
        return basic_auth(b.username, password)
    if cfg.authorization is not None:
        a = cfg.authorization
        return f"{a.type} {_read_secret(a.credentials_file, f'{key}.authorization.credentials_file')}"
    return None


def ssl_context(cfg: HTTPClientConfig, key: str) -> ssl.SSLContext:
    """The TLS client context `tls_config` describes; certificates are loaded now."""
    t = cfg.tls_config
    try:
        ctx = ssl.create_default_context(cafile=t.ca_file or None)
        if t.cert_file:
            ctx.load_cert_chain(t.cert_file, t.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.tls_config", f"cannot load certificates: {exc}") from exc
    ctx.minimum_version = TLS_VERSIONS[t.min_version]
    if t.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def session(cfg: HTTPClientConfig, key: str, *, url: str, timeout: float) -> aiohttp.ClientSession:
    """A session for calls to the server at `url`, authenticating and verifying as `cfg` says.

    Credentials go only to `url`'s origin (not to a host a redirect points at) and are read from
    their files at each request, so a rotated password is used without a restart, as Prometheus
    does. Raises ConfigError if the certificates cannot be loaded."""
    ctx = ssl_context(cfg, key)
    origin = URL(url).origin()
    server_name = cfg.tls_config.server_name

    async def middleware(req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        if req.url.origin() == origin:
            header = authorization(cfg, key)
            if header is not None:
                req.headers[aiohttp.hdrs.AUTHORIZATION] = header
            if server_name:
                req.server_hostname = server_name
        resp = await handler(req)
        if not cfg.follow_redirects and resp.status in _REDIRECTS:
            resp.release()
            raise RedirectNotFollowed(
                resp.request_info,
                (),
                status=resp.status,
                message=f"redirect to {resp.headers.get('Location', '?')} not followed (follow_redirects: false)",
            )
        return resp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx),
        proxy=cfg.proxy_url or None,
        middlewares=(middleware,),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )

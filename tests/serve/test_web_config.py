"""`--web.config.file`: exporter-toolkit's schema and its errors, bcrypt basic auth and its cache,
headers, and an in-process server whose certificate and file are swapped while it runs."""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from detectord.cli import main
from detectord.errors import ConfigError
from detectord.serve import webconfig
from detectord.serve.webconfig import BasicAuth, Unauthorized, load_web_config, parse_web_config
from tests.pki import Pki, bcrypt_hash, make_pki
from tests.support import metric, running_server, test_config

# ---- the schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tls_server_confg: {}", "tls_server_confg"),
        ("tls_server_config: {cert_flie: x.crt}", "tls_server_config.cert_flie"),
        ("http_server_config: {http3: true}", "http_server_config.http3"),
        ("http_server_config: {headers: {X-Powered-By: me}}", "http_server_config.headers.X-Powered-By"),
        ("http_server_config: {headers: {X-Frame-Options: allow}}", "http_server_config.headers.X-Frame-Options"),
        (
            "http_server_config: {headers: {X-Content-Type-Options: sniff}}",
            "http_server_config.headers.X-Content-Type-Options",
        ),
        ("basic_auth_users: {alice: hunter2}", "basic_auth_users.alice"),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_auth_type: Maybe}",
            "tls_server_config.client_auth_type",
        ),
        ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS14}", "tls_server_config.min_version"),
        (
            "tls_server_config: {cert_file: a, key_file: b, min_version: TLS13, max_version: TLS12}",
            "tls_server_config.min_version",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]}",
            "tls_server_config.cipher_suites[0]",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, curve_preferences: [P-999]}",
            "tls_server_config.curve_preferences[0]",
        ),
        ("tls_server_config: {cert_file: a}", "tls_server_config.key_file"),
        ("tls_server_config: {key_file: a}", "tls_server_config.cert_file"),
        ("tls_server_config: {cert_file: a, key_file: b, client_ca_file: c}", "tls_server_config.client_auth_type"),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_auth_type: VerifyClientCertIfGiven, "
            "client_ca_file: c, client_allowed_sans: [x]}",
            "tls_server_config.client_allowed_sans",
        ),
        ("rate_limit: {interval: soon}", "rate_limit.interval"),
    ],
)
def test_schema_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_web_config(text)
    assert err.value.key == key, str(err.value)


def test_an_empty_file_is_plain_http_without_auth() -> None:
    cfg = parse_web_config("")
    assert not cfg.tls_server_config.enabled and not cfg.basic_auth_users
    cfg = parse_web_config("tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n")
    assert not cfg.tls_server_config.enabled


def test_files_resolve_beside_the_web_config_and_must_load(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: pki/server.crt\n  key_file: pki/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: pki/ca.crt\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  curve_preferences: [CurveP256]\n"
    )
    loaded = load_web_config(tmp_path / "web.yml")
    assert loaded.config.tls_server_config.cert_file == str(pki.server_cert)
    assert loaded.ssl_context is not None and loaded.ssl_context.verify_mode == ssl.CERT_REQUIRED
    # Go's cipher names become OpenSSL's; TLS 1.3's suites are left to the library, as in Go.
    tls12 = {c["name"] for c in loaded.ssl_context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    assert loaded.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2

    (tmp_path / "web.yml").write_text("tls_server_config: {cert_file: pki/server.crt, key_file: pki/gone.key}\n")
    with pytest.raises(ConfigError) as err:
        load_web_config(tmp_path / "web.yml")
    assert err.value.key == "tls_server_config.key_file" and "gone.key" in str(err.value)

    # A key that is not the certificate's.
    _, other_key = pki.issue("other", server=True)
    (tmp_path / "web.yml").write_text(f"tls_server_config: {{cert_file: pki/server.crt, key_file: {other_key}}}\n")
    with pytest.raises(ConfigError) as err:
        load_web_config(tmp_path / "web.yml")
    assert err.value.key == "tls_server_config.cert_file"


def test_check_web_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(f"basic_auth_users:\n  prometheus: '{bcrypt_hash('pw')}'\n")
    bad.write_text("http_server_config:\n  headers:\n    Server: detectord\n")
    assert main(["check", "web-config", str(good)]) == 0
    assert f"{good}: OK" in capsys.readouterr().out
    assert main(["check", "web-config", str(good), str(bad)]) == 2
    assert "http_server_config.headers.Server" in capsys.readouterr().err
    config = tmp_path / "detectord.yml"
    config.write_text("ingest:\n  step: 15s\n")
    assert main(["check", "config", str(config), "--skip-model", "--web.config.file", str(bad)]) == 2


# ---- basic auth ------------------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": _basic(user, password)}


async def test_basic_auth_pays_bcrypt_once_per_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"prometheus": bcrypt_hash("s3cret", cost=6)}
    auth = BasicAuth()
    calls: list[bytes] = []
    real = auth._bcrypt

    def counted(hashed: bytes, password: bytes) -> bool:
        calls.append(hashed)
        return real(hashed, password)

    monkeypatch.setattr(auth, "_bcrypt", counted)
    for _ in range(5):
        assert await auth.check(users, _basic("prometheus", "s3cret")) == "prometheus"
    assert len(calls) == 1

    for header, reason in [
        (None, "missing"),
        ("Bearer abc", "malformed"),
        ("Basic !!!", "malformed"),
        (_basic("prometheus", "wrong"), "bad_credentials"),
        (_basic("mallory", "s3cret"), "bad_credentials"),
    ]:
        with pytest.raises(Unauthorized) as err:
            await auth.check(users, header)
        assert err.value.reason == reason
    # An unknown user is checked against a decoy hash, as long as a known one takes.
    assert calls[-1] == webconfig._DECOY_HASH and len(calls) == 3

    # A flood of guesses does not push the good credential out of the cache.
    for i in range(2 * webconfig.AUTH_CACHE_SIZE):
        with pytest.raises(Unauthorized):
            await auth.check(users, _basic("prometheus", f"guess-{i}"))
    before = len(calls)
    assert await auth.check(users, _basic("prometheus", "s3cret")) == "prometheus"
    assert len(calls) == before

    # A changed hash for the same user is checked anew: the old password no longer passes.
    with pytest.raises(Unauthorized):
        await auth.check({"prometheus": bcrypt_hash("rotated")}, _basic("prometheus", "s3cret"))


# ---- a server with TLS, client certificates and basic auth -----------------------------------------


def _web_yaml(pki: Pki, *, users: dict[str, str], cert: Path | None = None, key: Path | None = None) -> str:
    text: str = yaml.safe_dump(
        {
            "tls_server_config": {
                "cert_file": str(cert or pki.server_cert),
                "key_file": str(key or pki.server_key),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(pki.ca),
                "min_version": "TLS12",
            },
            "http_server_config": {"headers": {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}},
            "basic_auth_users": users,
        }
    )
    return text


async def _served_cert(port: int, ctx: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def test_server_requires_certificate_and_password_and_takes_new_files_without_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    web = tmp_path / "web.yml"
    web.write_text(_web_yaml(pki, users={"prometheus": bcrypt_hash("s3cret")}))
    async with running_server(test_config(), web_config_file=str(web)) as srv:
        base = f"https://127.0.0.1:{srv.port}"
        assert srv.external_url().startswith("https://")
        good = _auth("prometheus", "s3cret")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as s:
            for path in ("/metrics", "/api/v1/instances", "/", "/-/ready"):
                async with s.get(base + path) as r:
                    assert r.status == 401, path
                    assert r.headers["WWW-Authenticate"] == "Basic"
                    assert r.headers["X-Frame-Options"] == "deny"
                async with s.get(base + path, headers=good) as r:
                    assert r.status == 200, path
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            async with s.post(base + "/api/v1/write", data=b"x", headers=_auth("prometheus", "no")) as r:
                assert r.status == 401
            async with s.get(base + "/-/healthy") as r:
                assert r.status == 200
                assert r.headers["X-Frame-Options"] == "deny"
            async with s.get(base + "/metrics", headers=good) as r:
                text = await r.text()
            assert metric(text, "detectord_http_unauthorized_total", reason="missing") == 4
            assert metric(text, "detectord_http_unauthorized_total", reason="bad_credentials") == 1

        # No client certificate: the handshake fails.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context(cert=False))) as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(base + "/-/healthy") as r:
                    await r.read()

        # A new certificate (and key) in the same files serves new connections, found by polling.
        assert await _served_cert(srv.port, pki.client_context()) == _der(pki.server_cert)
        old = tmp_path / "old"
        old.mkdir()
        shutil.copy(pki.server_cert, old / "server.crt")
        new_cert, new_key = pki.issue("server2", server=True, sans=("127.0.0.1",))
        shutil.copy(new_key, pki.server_key)
        shutil.copy(new_cert, pki.server_cert)
        deadline = time.monotonic() + 4 * webconfig.POLL_S + 5
        while await _served_cert(srv.port, pki.client_context()) != _der(new_cert):
            assert time.monotonic() < deadline, "the new certificate was not served"
            await asyncio.sleep(0.2)

        # A broken file is refused with the key named; the previous settings stay in force.
        reloads = srv.web_security.reloads
        web.write_text(_web_yaml(pki, users={"prometheus": "not-a-hash"}))
        with pytest.raises(ConfigError) as err:
            await srv.web_security.reload("test")
        assert err.value.key == "basic_auth_users.prometheus"
        assert reloads.labels("failure")._value.get() == 1
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as s:
            async with s.get(base + "/api/v1/instances", headers=good) as r:
                assert r.status == 200
            assert await _served_cert(srv.port, pki.client_context()) == _der(new_cert)

            # A good file again: a new password from now on.
            web.write_text(_web_yaml(pki, users={"prometheus": bcrypt_hash("rotated")}))
            await srv.web_security.reload("test")
            async with s.get(base + "/api/v1/instances", headers=good) as r:
                assert r.status == 401
            async with s.get(base + "/api/v1/instances", headers=_auth("prometheus", "rotated")) as r:
                assert r.status == 200

            # Only client certificates with an allowed SAN (the client's is DNS:prometheus); a rate limit.
            raw = yaml.safe_load(_web_yaml(pki, users={}))
            raw["tls_server_config"]["client_allowed_sans"] = ["127.0.0.9", "prometheus"]
            web.write_text(yaml.safe_dump(raw))
            await srv.web_security.reload("test")
            async with s.get(base + "/api/v1/instances") as r:
                assert r.status == 200
            raw["tls_server_config"]["client_allowed_sans"] = ["grafana"]
            raw["rate_limit"] = {"interval": "1m", "burst": 2}
            web.write_text(yaml.safe_dump(raw))
            await srv.web_security.reload("test")
            async with s.get(base + "/api/v1/instances") as r:
                assert r.status == 403
            async with s.get(base + "/api/v1/instances") as r:
                assert r.status == 403
            async with s.get(base + "/api/v1/instances") as r:
                assert r.status == 429
            async with s.get(base + "/-/healthy") as r:
                assert r.status == 200

"""Config: typed, validated once, every default documented in detectord.example.yml."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detectord.config import Config, Duration, load_config, parse_config
from detectord.errors import ConfigError
from tests.support import REPO

EXAMPLE = REPO / "detectord.example.yml"


def _yaml_keys(cls: type) -> list[str]:
    return [{"for_": "for"}.get(f.name, f.name) for f in dataclasses.fields(cls)]


def test_example_documents_every_key_with_its_default() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    cfg = Config()
    for section in dataclasses.fields(Config):
        assert section.name in raw, f"section {section.name} missing from the example"
        sub = getattr(cfg, section.name)
        assert sorted(raw[section.name]) == sorted(_yaml_keys(type(sub))), section.name
    parsed = load_config(EXAMPLE)
    assert dataclasses.replace(parsed, model=cfg.model) == cfg
    assert parsed.model.path == REPO / "models/default"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("web: {listen_adress: ':9464'}", "web.listen_adress"),
        ("ingest: {step: fast}", "ingest.step"),
        ("ingest: {max_instances: -1}", "ingest.max_instances"),
        ("ingest: {instance_labels: []}", "ingest.instance_labels"),
        ("ingest: {crash_loop_restarts: 1}", "ingest.crash_loop_restarts"),
        ("ingest: {crash_loop_within: 0s}", "ingest.crash_loop_within"),
        ("alerting: {for: 1x}", "alerting.for"),
        ("alerting: {alertmanagers: [{url: 'localhost:9093'}]}", "alerting.alertmanagers[0].url"),
        ("alerting: {alertmanagers: [{timeout: 5s}]}", "alerting.alertmanagers[0].url"),
        ("logging: {format: xml}", "logging.format"),
        ("web: {listen_address: 'nonsense'}", "web.listen_address"),
        ("model: {window: 4}", "model.window"),
        ("inference: {max_batch: 0}", "inference.max_batch"),
        ("bogus: 1", "bogus"),
        ("alerting: {labels: {'bad-name': x}}", "alerting.labels.bad-name"),
        ("state: {snapshot_interval: 100ms}", "state.snapshot_interval"),
        ("state: {max_age: 0s}", "state.max_age"),
        ("state: {directory: /var/lib}", "state.directory"),
        ("backfill: {url: 'prometheus:9090'}", "backfill.url"),
        ("backfill: {lookback: 0s}", "backfill.lookback"),
        ("backfill: {http_config: {basic_auth: {password_file: x}}}", "backfill.http_config.basic_auth.username"),
        (
            "backfill: {http_config: {basic_auth: {username: u}, authorization: {credentials_file: t}}}",
            "backfill.http_config",
        ),
        (
            "backfill: {http_config: {authorization: {credentials: t, credentials_file: f}}}",
            "backfill.http_config.authorization.credentials",
        ),
        *[
            (f"alerting: {{alertmanagers: [{{url: 'https://am:9093', {am}}}]}}", f"alerting.alertmanagers[0].{key}")
            for am, key in [
                ("http_config: {basic_auth: {username: u, password: hunter2}}", "http_config.basic_auth.password"),
                ("http_config: {basic_auth: {username: u}, authorization: {credentials_file: f}}", "http_config"),
                ("http_config: {authorization: {type: Basic, credentials_file: f}}", "http_config.authorization.type"),
                ("http_config: {authorization: {type: Bearer}}", "http_config.authorization.credentials_file"),
                ("http_config: {tls_config: {cert_file: c.pem}}", "http_config.tls_config"),
                ("http_config: {tls_config: {key_file: k.pem}}", "http_config.tls_config"),
                ("http_config: {tls_config: {min_version: TLS14}}", "http_config.tls_config.min_version"),
                ("http_config: {tls_config: {servername: am}}", "http_config.tls_config.servername"),
                ("http_config: {proxy_url: 'socks5://proxy:1080'}", "http_config.proxy_url"),
                ("http_config: {proxy_url: 'http://user:secret@proxy:3128'}", "http_config.proxy_url"),
                ("http_config: {follow_redirects: maybe}", "http_config.follow_redirects"),
                ("http_config: {oauth2: {}}", "http_config.oauth2"),
                ("path_prefix: alertmanager", "path_prefix"),
                ("timeout: 0s", "timeout"),
            ]
        ],
        ("alerting: {alertmanagers: [{url: 'https://u:p@am:9093'}]}", "alerting.alertmanagers[0].url"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("section", "secret", "file_key"),
    [
        ("basic_auth: {username: u, password: hunter2}", "password", "password_file"),
        ("authorization: {credentials: hunter2}", "credentials", "credentials_file"),
    ],
)
def test_inline_secrets_are_refused_with_the_file_key_to_use(section: str, secret: str, file_key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"backfill: {{http_config: {{{section}}}}}")
    assert info.value.key.endswith(f".{secret}")
    assert file_key in info.value.reason
    assert "hunter2" not in str(info.value)


def test_alertmanager_http_config_the_prometheus_way() -> None:
    cfg = parse_config(
        """
alerting:
  alertmanagers:
    - url: https://alertmanager.example:9093
      path_prefix: /alertmanager
      http_config:
        basic_auth: {username: detectord, password_file: /etc/detectord/am-password}
        tls_config:
          ca_file: /etc/detectord/ca.pem
          cert_file: /etc/detectord/client.pem
          key_file: /etc/detectord/client-key.pem
          server_name: alertmanager.internal
          min_version: TLS13
        proxy_url: http://proxy.example:3128
        follow_redirects: false
    - url: http://127.0.0.1:9093
      http_config:
        authorization: {credentials_file: /etc/detectord/token}
"""
    )
    first, second = cfg.alerting.alertmanagers
    assert first.path_prefix == "/alertmanager"
    h = first.http_config
    assert h.basic_auth is not None and h.basic_auth.password_file == "/etc/detectord/am-password"
    assert h.tls_config.server_name == "alertmanager.internal"
    assert h.tls_config.min_version == "TLS13"
    assert h.tls_config.insecure_skip_verify is False
    assert (h.proxy_url, h.follow_redirects) == ("http://proxy.example:3128", False)
    d = second.http_config
    assert d.authorization is not None and (d.authorization.type, d.authorization.credentials_file) == (
        "Bearer",
        "/etc/detectord/token",
    )
    # Prometheus's defaults: verify, TLS 1.2 at least, follow redirects.
    assert (d.tls_config.min_version, d.follow_redirects, d.proxy_url) == ("TLS12", True, "")


def test_durations_and_sizes() -> None:
    cfg = parse_config("ingest: {step: 1m30s, instance_ttl: 500ms}\nweb: {max_body_size: 1MiB}")
    assert cfg.ingest.step == 90.0
    assert cfg.ingest.instance_ttl == Duration(0.5)
    assert cfg.web.max_body_size == 1024 * 1024


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detectord", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_check_config_cli(tmp_path: Path) -> None:
    ok = _cli("check", "config", str(EXAMPLE), "--skip-model")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("alerting:\n  keep_firing: 1m\n")
    res = _cli("check", "config", str(bad), "--skip-model")
    assert res.returncode == 2
    assert "alerting.keep_firing" in res.stderr
    bad.write_text("backfill:\n  url: http://prometheus:9090/api/v1/read\n  match: '{job=\"coredns\"'\n")
    res = _cli("check", "config", str(bad), "--skip-model")
    assert res.returncode == 2
    assert "backfill.match" in res.stderr


def test_serve_exits_2_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("ingest:\n  max_gap_steps: many\n")
    res = _cli("serve", "--config.file", str(bad))
    assert res.returncode == 2
    assert "ingest.max_gap_steps" in res.stderr

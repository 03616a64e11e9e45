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
        ("backfill: {http_config: {basic_auth: {password: x}}}", "backfill.http_config.basic_auth.username"),
        (
            "backfill: {http_config: {basic_auth: {username: u}, authorization: {credentials: t}}}",
            "backfill.http_config",
        ),
        (
            "backfill: {http_config: {authorization: {credentials: t, credentials_file: f}}}",
            "backfill.http_config.authorization",
        ),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert key in str(info.value)


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

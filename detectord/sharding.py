"""Splitting a fleet across detectord shards the way Prometheus can: one remote-write entry per
shard (and per replica of a shard), each keeping the instances whose hashmod is its number."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

# The series detectord reads; everything else is dropped before it leaves Prometheus.
KEEP = "coredns_.*|process_.*|go_goroutines|up"
SHARD_LABEL = "__tmp_detectord_shard"

Style = Literal["prometheus", "operator"]


def remote_writes(
    url: str,
    *,
    shards: int = 1,
    replicas: int = 1,
    instance_labels: Sequence[str] = ("job", "instance"),
    style: Style = "prometheus",
) -> list[dict[str, Any]]:
    """The remote-write entries for `shards` shards of `replicas` replicas each. `url` may name
    `{shard}` and `{replica}`; `instance_labels` must be detectord's `ingest.instance_labels`, so
    every series of an instance goes to the same shard. `style`: prometheus.yml's
    `remote_write`, or the Prometheus Operator's `spec.remoteWrite`."""
    if shards < 1 or replicas < 1:
        raise ValueError(f"shards and replicas must be >= 1, got {shards} and {replicas}")
    if shards > 1 and "{shard}" not in url:
        raise ValueError("with more than one shard, the url must name {shard}")
    if replicas > 1 and "{replica}" not in url:
        raise ValueError("with more than one replica, the url must name {replica}")
    out = []
    for shard in range(shards):
        relabel: list[dict[str, Any]] = [{"source_labels": ["__name__"], "regex": KEEP, "action": "keep"}]
        if shards > 1:
            relabel += [
                {
                    "source_labels": list(instance_labels),
                    "modulus": shards,
                    "target_label": SHARD_LABEL,
                    "action": "hashmod",
                },
                {"source_labels": [SHARD_LABEL], "regex": str(shard), "action": "keep"},
            ]
        for replica in range(replicas):
            name = "detectord" + (f"-{shard}" if shards > 1 else "") + (f"-r{replica}" if replicas > 1 else "")
            out.append(
                {
                    "name": name,
                    "url": url.format(shard=shard, replica=replica),
                    "write_relabel_configs": copy.deepcopy(relabel),  # no YAML aliases between entries
                    "queue_config": {"batch_send_deadline": "5s"},
                }
            )
    return [_camel(e) for e in out] if style == "operator" else out


def _camel(value: Any) -> Any:
    if isinstance(value, dict):
        return {_camel_key(k): _camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value


def _camel_key(key: str) -> str:
    first, *rest = key.split("_")
    return first + "".join(w.capitalize() for w in rest)

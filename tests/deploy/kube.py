"""What the deployment tests check Kubernetes manifests with: the pinned tools of
scripts/install-kube-tools.sh, strict schema validation, and the real Pod Security checks."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.support import REPO

KUBE = REPO / "deploy" / "kubernetes"

Obj = dict[str, Any]

_INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# resource.Quantity's serialised form (apimachinery's quantity.go): a decimal with an optional
# binary (Ki … Ei), decimal (n … E) or exponent suffix; YAML numbers are quantities too.
_QUANTITY_RE = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"


@dataclass(frozen=True)
class KubeTools:
    kustomize: Path
    psscheck: Path
    swagger: Path
    crds: Path


def install_kube_tools() -> KubeTools:
    """Runs scripts/install-kube-tools.sh (idempotent: instant once built) and finds its tools."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "install-kube-tools.sh")], capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/install-kube-tools.sh failed:\n{proc.stderr}")
    out = Path(proc.stdout.strip().splitlines()[-1])
    return KubeTools(
        kustomize=out / "bin" / "kustomize",
        psscheck=out / "bin" / "psscheck",
        swagger=out / "schemas" / "kubernetes" / "swagger.json",
        crds=out / "schemas" / "prometheus-operator",
    )


def kustomize_build(tools: KubeTools, directory: Path) -> list[Obj]:
    proc = subprocess.run(
        [str(tools.kustomize), "build", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kustomize build {directory.relative_to(REPO)}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


class _CrdLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.1 reads a bare `=` (an enum value in the CRDs) as the "value" tag, which PyYAML has
    no constructor for; it is the string "="."""


_CrdLoader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


def _strict(schema: Any) -> None:
    """Unknown fields become errors, as the API server's strict field validation makes them: every
    object schema that lists its properties and says nothing else about extra ones gets
    additionalProperties: false. Walks schema keywords only, so a property *named* "properties"
    or "items" is not taken for a keyword."""
    if not isinstance(schema, dict):
        return
    if schema.get("nullable") is True and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    props = schema.get("properties")
    if isinstance(props, dict):
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for sub in props.values():
            _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        _strict(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, ()):
            _strict(sub)


class Schemas:
    """Strict validators by (apiVersion, kind): Kubernetes's own kinds from the release's OpenAPI
    spec (swagger.json), and the custom resources of every CRD in a directory."""

    def __init__(self, swagger: Path, crd_dir: Path) -> None:
        defs: dict[str, Any] = json.loads(swagger.read_text())["definitions"]
        for d in defs.values():
            _strict(d)
        # The spec types both as plain strings; YAML writes `port: 9464` and `cpu: 2` as numbers.
        defs[_INT_OR_STRING] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        defs[_QUANTITY] = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _QUANTITY_RE}]}
        self._defs = defs
        self._schemas: dict[tuple[str, str], Obj] = {}
        for name, d in defs.items():
            gvks = d.get("x-kubernetes-group-version-kind", [])
            if len(gvks) == 1:  # the shared meta types (DeleteOptions, WatchEvent, …) list many
                gvk = gvks[0]
                api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
                self._schemas[(api_version, gvk["kind"])] = {"$ref": f"#/definitions/{name}", "definitions": defs}
        for path in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=_CrdLoader)
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                _strict(schema)
                schema["properties"]["metadata"] = {"$ref": f"#/definitions/{_OBJECT_META}"}
                schema["definitions"] = defs
                self._schemas[(f"{group}/{version['name']}", kind)] = schema

    def errors(self, obj: Obj) -> list[str]:
        """Every way `obj` breaks its kind's schema, each as `Kind/name: path: message`."""
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        name = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
        schema = self._schemas.get((api_version, kind))
        if schema is None:
            return [f"{name}: no schema for apiVersion {api_version!r} kind {kind!r}"]
        validator = jsonschema.Draft4Validator(schema)
        return [
            f"{name}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(Kind/name, pod template) of every object that makes pods."""
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        name = f"{kind}/{obj['metadata']['name']}"
        if kind == "Pod":
            yield name, obj
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield name, spec["template"]
        elif kind == "CronJob":
            yield name, spec["jobTemplate"]["spec"]["template"]


@dataclass(frozen=True)
class PodSecurity:
    name: str
    allowed: bool
    reasons: list[str]


def pod_security(tools: KubeTools, templates: list[tuple[str, Obj]], level: str = "restricted") -> list[PodSecurity]:
    """Each template judged by k8s.io/pod-security-admission's checks at `level`, latest version."""
    pods = [{"name": n, "metadata": t.get("metadata", {}), "spec": t["spec"]} for n, t in templates]
    proc = subprocess.run(
        [str(tools.psscheck), "-level", level, "-version", "latest"],
        input=json.dumps(pods),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"psscheck: {proc.stderr}"
    return [PodSecurity(r["name"], r["allowed"], r["reasons"]) for r in json.loads(proc.stdout)]


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector selects an object with `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True

"""The Kubernetes manifests (deploy/kubernetes/): every overlay builds with the pinned kustomize,
every object passes strict validation against the pinned Kubernetes OpenAPI spec and the
prometheus-operator CRDs, every pod meets the restricted Pod Security Standard (the real admission
checks), and every config they ship passes `detectord check config`."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import detectord
from detectord.cli import main as cli_main
from tests.deploy.kube import (
    KUBE,
    KubeTools,
    Obj,
    Schemas,
    install_kube_tools,
    kustomize_build,
    matches,
    pod_security,
    pod_templates,
)

OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
# kustomize, the schemas and psscheck are built or fetched once (scripts/install-kube-tools.sh);
# then the module takes seconds, most of them `detectord check config` loading the model set.
pytestmark = pytest.mark.slow

REMOTE_WRITE = sorted((KUBE / "prometheus-remote-write").glob("*.yaml"))
STANDARD_LABELS = {
    "app.kubernetes.io/name": "detectord",
    "app.kubernetes.io/instance": "detectord",
    "app.kubernetes.io/version": detectord.__version__,
    "app.kubernetes.io/component": "anomaly-detector",
    "app.kubernetes.io/part-of": "detectord",
    "app.kubernetes.io/managed-by": "kustomize",
}


@pytest.fixture(scope="session")
def kube_tools() -> KubeTools:
    return install_kube_tools()


@pytest.fixture(scope="session")
def schemas(kube_tools: KubeTools) -> Schemas:
    return Schemas(kube_tools.swagger, kube_tools.crds)


@pytest.fixture(scope="session")
def built(kube_tools: KubeTools) -> dict[str, list[Obj]]:
    return {name: kustomize_build(kube_tools, KUBE / "overlays" / name) for name in OVERLAYS}


def _one(objects: list[Obj], kind: str, name: str = "detectord") -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def _container(workload: Obj) -> Obj:
    containers: list[Obj] = workload["spec"]["template"]["spec"]["containers"]
    return containers[0]


def test_the_overlays_are_there() -> None:
    assert set(OVERLAYS) >= {"single", "sharded", "gpu", "prometheus-operator", "sharded-prometheus-operator"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_pinned_schemas(
    overlay: str, built: dict[str, list[Obj]], schemas: Schemas
) -> None:
    errors = [e for obj in built[overlay] for e in schemas.errors(obj)]
    assert errors == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(
    overlay: str, built: dict[str, list[Obj]], kube_tools: KubeTools
) -> None:
    templates = list(pod_templates(built[overlay]))
    assert templates
    results = pod_security(kube_tools, templates)
    assert [(r.name, r.reasons) for r in results if not r.allowed] == []
    namespace = _one(built[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_has_the_standard_labels_and_namespace(overlay: str, built: dict[str, list[Obj]]) -> None:
    for obj in built[overlay]:
        labels = obj["metadata"].get("labels", {})
        assert {k: labels.get(k) for k in STANDARD_LABELS} == STANDARD_LABELS, obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "detectord", f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_restricted_check_refuses_a_pod_that_may_run_as_root(
    built: dict[str, list[Obj]], kube_tools: KubeTools
) -> None:
    deployment = copy.deepcopy(_one(built["single"], "Deployment"))
    pod = deployment["spec"]["template"]
    del pod["spec"]["securityContext"]["runAsNonRoot"]
    del pod["spec"]["containers"][0]["securityContext"]["runAsNonRoot"]
    escalating = copy.deepcopy(_one(built["single"], "Deployment"))["spec"]["template"]
    escalating["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    [root, escalate] = pod_security(kube_tools, [("root", pod), ("escalate", escalating)])
    assert not root.allowed
    assert any("runAsNonRoot" in r for r in root.reasons), root.reasons
    assert not escalate.allowed
    assert any("allowPrivilegeEscalation" in r for r in escalate.reasons), escalate.reasons
    # A misspelled field is an error, not a pod judged on less than it says.
    misspelled = copy.deepcopy(_one(built["single"], "Deployment"))["spec"]["template"]
    misspelled["spec"]["securityContext"]["runAsNonRot"] = misspelled["spec"]["securityContext"].pop("runAsNonRoot")
    with pytest.raises(AssertionError, match='unknown field "runAsNonRot"'):
        pod_security(kube_tools, [("misspelled", misspelled)])


def test_schema_validation_refuses_unknown_fields_and_bad_values(built: dict[str, list[Obj]], schemas: Schemas) -> None:
    objects = built["prometheus-operator"]
    deployment = copy.deepcopy(_one(objects, "Deployment"))
    container = _container(deployment)
    container["securityContxt"] = container.pop("securityContext")
    container["resources"]["limits"]["memory"] = "2Gb"
    errors = schemas.errors(deployment)
    assert any("'securityContxt' was unexpected" in e for e in errors), errors
    assert any("limits.memory" in e for e in errors), errors

    monitor = copy.deepcopy(_one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "30s"
    errors = schemas.errors(monitor)
    assert any("'scrapeInterval' was unexpected" in e for e in errors), errors

    rule = copy.deepcopy(_one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["annotation"] = {}
    assert any("'annotation' was unexpected" in e for e in schemas.errors(rule))
    assert schemas.errors({"apiVersion": "apps/v1", "kind": "Deploymnt", "metadata": {"name": "x"}}) != []


def _configs(built: dict[str, list[Obj]]) -> dict[str, str]:
    return {
        f"{overlay}/{obj['metadata']['name']}": obj["data"]["detectord.yml"]
        for overlay, objects in built.items()
        for obj in objects
        if obj["kind"] == "ConfigMap" and "detectord.yml" in obj.get("data", {})
    }


def test_every_shipped_config_passes_detectord_check_config(
    built: dict[str, list[Obj]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = _configs(built)
    assert len(set(configs.values())) == 2  # the single replica's and the shards'
    for i, text in enumerate(sorted(set(configs.values()))):
        path = tmp_path / f"{i}" / "detectord.yml"
        path.parent.mkdir()
        path.write_text(text)
        # In-process, as the command runs it: it loads the packaged model set to check the step.
        rc = cli_main(["check", "config", str(path)])
        out = capsys.readouterr()
        assert rc == 0, f"{text}\n{out.out}{out.err}"
        assert "OK" in out.out


def test_the_configs_match_the_mounts_and_the_network_policy(built: dict[str, list[Obj]]) -> None:
    for name, text in _configs(built).items():
        cfg = yaml.safe_load(text)
        assert cfg["state"]["dir"].startswith("/var/lib/detectord/"), name
        for am in cfg["alerting"]["alertmanagers"]:
            assert am["url"].endswith(":9093"), name
        assert cfg["backfill"]["url"] in ("", "http://prometheus-operated.monitoring.svc:9090/api/v1/read"), name
    # A shard backfilling would take in (and report down) the other shards' instances.
    sharded = yaml.safe_load(_configs({"sharded": built["sharded"]}).popitem()[1])
    assert sharded["backfill"]["url"] == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_runs_detectord_on_its_port_with_its_probes(overlay: str, built: dict[str, list[Obj]]) -> None:
    [workload] = [o for o in built[overlay] if o["kind"] in ("Deployment", "StatefulSet")]
    container = _container(workload)
    assert container["command"][:2] == ["detectord", "serve"]
    config_path = container["command"][container["command"].index("--config.file") + 1]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert config_path == f"{mounts['config']['mountPath']}/detectord.yml"
    assert mounts["state"]["mountPath"] == "/var/lib/detectord"
    assert container["ports"] == [{"name": "http", "containerPort": 9464, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a model load, a state restore
    assert container["image"].startswith(f"docker.io/detectord/detectord:{detectord.__version__}")
    if overlay == "gpu":
        assert container["image"].endswith("-cuda")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "KERAS_BACKEND", "value": "jax"} in container["env"]
        assert workload["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    configmaps = {o["metadata"]["name"] for o in built[overlay] if o["kind"] == "ConfigMap"}
    assert volumes["config"]["configMap"]["name"] in configmaps
    if workload["kind"] == "Deployment":
        assert workload["spec"]["strategy"]["type"] == "Recreate"
        claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
        assert _one(built[overlay], "PersistentVolumeClaim", claim)
    else:
        assert [t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]] == ["state"]
        assert not [o for o in built[overlay] if o["kind"] in ("Deployment", "PersistentVolumeClaim")]


def test_the_shards_run_the_same_pod_as_the_single_replica(built: dict[str, list[Obj]]) -> None:
    single = copy.deepcopy(_one(built["single"], "Deployment")["spec"]["template"])
    shard = copy.deepcopy(_one(built["sharded"], "StatefulSet")["spec"]["template"])
    single["spec"]["volumes"] = [v for v in single["spec"]["volumes"] if v["name"] != "state"]
    for t in (single, shard):  # the configs differ (no backfill for shards), so do their hashed names
        [config] = [v for v in t["spec"]["volumes"] if v["name"] == "config"]
        config["configMap"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", config["configMap"]["name"])
    assert shard == single


@pytest.mark.parametrize("overlay", ["sharded", "sharded-prometheus-operator"])
def test_each_shard_has_its_dns_name(overlay: str, built: dict[str, list[Obj]]) -> None:
    statefulset = _one(built[overlay], "StatefulSet")
    headless = _one(built[overlay], "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert matches({"matchLabels": headless["spec"]["selector"]}, statefulset["spec"]["template"]["metadata"]["labels"])
    assert statefulset["spec"]["replicas"] == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_the_servicemonitor_scrapes_each_once(
    overlay: str, built: dict[str, list[Obj]]
) -> None:
    objects = built[overlay]
    [workload] = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert matches(workload["spec"]["selector"], pod_labels)
    assert matches(_one(objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert matches(_one(objects, "NetworkPolicy")["spec"]["podSelector"], pod_labels)
    services = [o for o in objects if o["kind"] == "Service"]
    for service in services:
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    if overlay.endswith("prometheus-operator"):
        [monitor] = monitors
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        scraped = [
            s["metadata"]["name"] for s in services if matches(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert scraped == ["detectord"]
        assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    else:
        assert monitors == []


def test_the_network_policy_lets_in_only_prometheus_and_out_only_its_peers(built: dict[str, list[Obj]]) -> None:
    policy = _one(built["single"], "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    [ingress] = policy["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": monitoring, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    assert ingress["ports"] == [{"port": 9464, "protocol": "TCP"}]
    egress = {
        (
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            *sorted(peer["podSelector"]["matchLabels"].items()),
            port["port"],
            port["protocol"],
        )
        for rule in policy["egress"]
        for peer in rule["to"]
        for port in rule["ports"]
    }
    name = "app.kubernetes.io/name"
    assert egress == {
        ("monitoring", (name, "alertmanager"), 9093, "TCP"),
        ("monitoring", (name, "prometheus"), 9090, "TCP"),
        ("kube-system", ("k8s-app", "kube-dns"), 53, "UDP"),
        ("kube-system", ("k8s-app", "kube-dns"), 53, "TCP"),
    }


def _rules(built: dict[str, list[Obj]]) -> dict[str, Obj]:
    rule = _one(built["prometheus-operator"], "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_the_prometheus_rule_has_detectords_health_alerts(built: dict[str, list[Obj]]) -> None:
    rules = _rules(built)
    assert set(rules) >= {
        "DetectordDown",
        "DetectordIngestErrors",
        "DetectordDroppingWindows",
        "DetectordAlertmanagerDeliveryFailing",
        "DetectordInstancesStuckWarming",
    }
    package = Path(detectord.__file__).parent
    source = "\n".join(p.read_text() for p in package.rglob("*.py"))
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        for metric in re.findall(r"\b(detectord_[a-z_]+?)(?:_total)?\b", rule["expr"]):
            assert f'"{metric}' in source, f"{name}: {metric} is not a metric of detectord"
    assert 'state="warming"' in rules["DetectordInstancesStuckWarming"]["expr"]
    assert 'code=~"4..|5.."' in rules["DetectordIngestErrors"]["expr"]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps)")
    return promtool


def test_the_alert_rules_pass_promtool(built: dict[str, list[Obj]], tmp_path: Path) -> None:
    rule = _one(built["prometheus-operator"], "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run(
        [_promtool(), "check", "rules", "--lint=all", "--lint-fatal", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _remote_writes(path: Path) -> list[Obj]:
    writes: list[Obj] = yaml.safe_load(path.read_text())["spec"]["remoteWrite"]
    return writes


@pytest.mark.parametrize("path", REMOTE_WRITE, ids=lambda p: p.name)
def test_the_remote_write_snippets_are_valid_prometheus_resources(path: Path, schemas: Schemas) -> None:
    snippet = yaml.safe_load(path.read_text())
    assert schemas.errors(snippet) == []
    # In a whole Prometheus object, as kube-prometheus-stack makes it.
    full: Obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": "kube-prometheus-stack-prometheus", "namespace": "monitoring"},
        "spec": {
            "replicas": 1,
            "serviceAccountName": "kube-prometheus-stack-prometheus",
            "serviceMonitorSelector": {"matchLabels": {"release": "kube-prometheus-stack"}},
            "ruleSelector": {"matchLabels": {"release": "kube-prometheus-stack"}},
            "scrapeInterval": "30s",
            "retention": "10d",
            "remoteWrite": snippet["spec"]["remoteWrite"],
        },
    }
    assert schemas.errors(full) == []
    for write in _remote_writes(path):
        keep = write["writeRelabelConfigs"][0]
        assert keep == {
            "sourceLabels": ["__name__"],
            "regex": "coredns_.*|process_.*|go_goroutines|up",
            "action": "keep",
        }


def _hashmod(values: list[str], modulus: int) -> int:
    """Prometheus's hashmod (model/relabel): the last 8 bytes of the md5 of the joined values."""
    digest = hashlib.md5(";".join(values).encode()).digest()
    return int.from_bytes(digest[8:], "big") % modulus


def _keeps(write: Obj, labels: dict[str, str]) -> bool:
    """Whether `write`'s relabelling keeps a series with `labels`, the way Prometheus runs it."""
    labels = dict(labels)
    for rc in write["writeRelabelConfigs"]:
        value = ";".join(labels.get(n, "") for n in rc.get("sourceLabels", []))
        if rc["action"] == "keep":
            if not re.fullmatch(rc["regex"], value):
                return False
        elif rc["action"] == "hashmod":
            labels[rc["targetLabel"]] = str(_hashmod([labels.get(n, "") for n in rc["sourceLabels"]], rc["modulus"]))
        else:
            raise AssertionError(f"unexpected action {rc['action']}")
    return True


def test_the_sharded_remote_write_sends_each_instance_to_exactly_one_shard(built: dict[str, list[Obj]]) -> None:
    writes = _remote_writes(KUBE / "prometheus-remote-write" / "sharded.yaml")
    statefulset = _one(built["sharded"], "StatefulSet")
    n = statefulset["spec"]["replicas"]
    assert len(writes) == n
    for i, write in enumerate(writes):
        assert (
            write["url"] == f"http://detectord-{i}.{statefulset['spec']['serviceName']}.detectord.svc:9464/api/v1/write"
        )
        [hashmod] = [rc for rc in write["writeRelabelConfigs"] if rc["action"] == "hashmod"]
        assert hashmod["sourceLabels"] == ["job", "instance"] and hashmod["modulus"] == n
    shards_used = set()
    for k in range(200):
        instance = {"job": "coredns", "instance": f"10.0.{k // 250}.{k % 250}:9153"}
        series = [
            {"__name__": m, **instance} for m in ("coredns_dns_requests_total", "up", "process_cpu_seconds_total")
        ]
        kept_by = {i for i, w in enumerate(writes) for s in series if _keeps(w, s)}
        assert len(kept_by) == 1, instance  # all of an instance's series, to one shard
        shards_used |= kept_by
        assert not any(_keeps(w, {"__name__": "node_cpu_seconds_total", **instance}) for w in writes)
    assert shards_used == set(range(n))


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _prometheus_config(writes: list[Obj]) -> dict[str, Any]:
    """The remote_write section the Prometheus Operator generates from spec.remoteWrite."""
    out = []
    for w in writes:
        entry: dict[str, Any] = {"url": w["url"]}
        if "name" in w:
            entry["name"] = w["name"]
        entry["write_relabel_configs"] = [{_snake(k): v for k, v in rc.items()} for rc in w["writeRelabelConfigs"]]
        entry["queue_config"] = {_snake(k): v for k, v in w.get("queueConfig", {}).items()}
        out.append(entry)
    return {"global": {"scrape_interval": "30s"}, "remote_write": out}


@pytest.mark.parametrize("path", REMOTE_WRITE, ids=lambda p: p.name)
def test_the_remote_write_relabelling_passes_promtool(path: Path, tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(_remote_writes(path))))
    proc = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("name", "shards"), [("single.yaml", 1), ("sharded.yaml", 2)])
def test_the_snippets_are_what_detectord_remote_write_prints(
    name: str, shards: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://detectord-{shard}.detectord-headless.detectord.svc:9464/api/v1/write"
    if shards == 1:
        url = _remote_writes(KUBE / "prometheus-remote-write" / name)[0]["url"]
    assert cli_main(["remote-write", "--operator", "--shards", str(shards), "--url", url]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["remoteWrite"]
    assert printed == _remote_writes(KUBE / "prometheus-remote-write" / name)

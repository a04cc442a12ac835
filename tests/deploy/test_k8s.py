"""deploy/k8s checked offline: built-in kinds against Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict, oldest and newest supported versions), custom resources against
minimal schemas of the fields we use (their pod templates against the core schema), the
kustomizations rendered by `kubectl kustomize`, and the numbers that must agree (shutdown
timing, probes, selectors, metrics, parallelism)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# Oldest Kubernetes these manifests are written for (preStop `sleep`, PDB
# unhealthyPodEvictionPolicy) and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
IMAGE_UID = 10001  # the Dockerfile's USER


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict]:
    """Every resource by (kind, name)."""
    found = {}
    for path in _manifest_files():
        for doc in _load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


# Minimal schemas of the custom resources, covering the fields these manifests set; written
# from the projects' API references, not copied from their CRDs.
_SELECTOR = {"type": "object", "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
_OBJECT = {"type": "object"}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {"selector": _SELECTOR, "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                               "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"}}}}}}}},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["parentRefs", "rules"], "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"]}},
                "hostnames": {"type": "array", "items": {"type": "string"}},
                "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "matches": {"type": "array"},
                        "backendRefs": {"type": "array", "items": {
                            "type": "object", "required": ["name", "port"]}},
                        "retry": {"type": "object", "additionalProperties": False, "properties": {
                            "codes": {"type": "array", "items": {"type": "integer", "minimum": 400, "maximum": 599}},
                            "attempts": {"type": "integer"}, "backoff": {"type": "string"}}},
                        "timeouts": {"type": "object", "additionalProperties": False, "properties": {
                            "request": {"type": "string"}, "backendRequest": {"type": "string"}}}}}}}}}},
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["targetRefs"],
            "properties": {"targetRefs": {"type": "array", "items": {
                "type": "object", "required": ["group", "kind", "name"]}},
                "loadBalancer": {"type": "object", "required": ["type"], "properties": {"type": {
                    "enum": ["ConsistentHash", "LeastRequest", "Random", "RoundRobin"]}}},
                "timeout": {"type": "object", "additionalProperties": False, "properties": {
                    "tcp": {"type": "object"}, "http": {"type": "object", "additionalProperties": False,
                                                        "properties": {
                        "connectionIdleTimeout": {"type": "string"}, "maxConnectionDuration": {"type": "string"},
                        "requestTimeout": {"type": "string"}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "properties": {"scaleTargetRef": {"type": "object", "required": ["name"]},
                           "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
                           "triggers": {"type": "array", "items": {
                               "type": "object", "required": ["type", "metadata"],
                               "properties": {"metadata": {"type": "object", "required": [
                                   "serverAddress", "query", "threshold"]}}}}}}}},
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["leaderWorkerTemplate"],
            "properties": {"replicas": {"type": "integer", "minimum": 0},
                           "leaderWorkerTemplate": {
                               "type": "object", "required": ["size", "workerTemplate"],
                               "additionalProperties": False,
                               "properties": {"size": {"type": "integer", "minimum": 1},
                                              "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                                              "leaderTemplate": _OBJECT, "workerTemplate": _OBJECT}}}}}},
}


def _validate_core(doc: dict) -> None:
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path):
    for doc in _load(path):
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
            if doc["kind"] == "LeaderWorkerSet":
                for role in ("leaderTemplate", "workerTemplate"):
                    template = doc["spec"]["leaderWorkerTemplate"][role]
                    _validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                                    "metadata": {"name": f"lws-{role.lower()}"}, "template": template})
        else:
            _validate_core(doc)


def test_core_validation_rejects_a_typo():
    """Strict validation catches a misspelt field, so the checks above mean something."""
    doc = _load(K8S / "deployment.yaml")[0]
    doc["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(doc)


@pytest.mark.parametrize("directory", ["", "multinode"])
def test_kustomization_renders_and_validates(find_tool, directory):
    kubectl = find_tool("kubectl", "install kubectl (it renders the kustomizations offline)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    listed = yaml.safe_load((K8S / directory / "kustomization.yaml").read_text())["resources"]
    assert len(docs) == sum(len(_load(K8S / directory / f)) for f in listed)
    for doc in docs:
        assert doc["metadata"]["namespace"] == "qwen-vl-serve"
        if (doc["apiVersion"], doc["kind"]) not in CRD_SCHEMAS:
            _validate_core(doc)


def _pod_spec(resources, kind: str, name: str) -> dict:
    return resources[(kind, name)]["spec"]["template"]["spec"]


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def test_shutdown_outlasts_the_drain(resources):
    """preStop sleep + drain timeout < terminationGracePeriodSeconds, or the kubelet kills
    generations the server is still finishing."""
    cases = [(_pod_spec(resources, "Deployment", "qwen-vl-serve"), resources[("ConfigMap", "qwen-vl-serve")])]
    lws = resources[("LeaderWorkerSet", "qwen-vl-serve-multinode")]["spec"]["leaderWorkerTemplate"]
    cases.append((lws["leaderTemplate"]["spec"], resources[("ConfigMap", "qwen-vl-serve-multinode")]))
    for pod, config in cases:
        drain = float(config["data"]["QWENVL_DRAIN_TIMEOUT"])
        pre_stop = _container(pod)["lifecycle"]["preStop"]["sleep"]["seconds"]
        # after the drain: up to 5 s for aborted requests, 5 s of uvicorn's shutdown, vLLM's teardown
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 20
    # A multinode worker outlives its leader's drain: the engine needs its shard until then.
    leader_pod, config = cases[1]
    leader_done = _container(leader_pod)["lifecycle"]["preStop"]["sleep"]["seconds"] + float(
        config["data"]["QWENVL_DRAIN_TIMEOUT"]) + 10
    worker_pod = lws["workerTemplate"]["spec"]
    worker_stop = _container(worker_pod)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert worker_stop >= leader_done
    assert worker_pod["terminationGracePeriodSeconds"] >= worker_stop + 10


def test_probes_fit_the_server(resources):
    pods = [_pod_spec(resources, "Deployment", "qwen-vl-serve"),
            resources[("LeaderWorkerSet", "qwen-vl-serve-multinode")]["spec"]["leaderWorkerTemplate"]
            ["leaderTemplate"]["spec"]]
    for pod in pods:
        c = _container(pod)
        assert c["startupProbe"]["httpGet"]["path"] == "/ready"
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert budget >= 600, "a 10 B model needs minutes to load"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_pods_are_non_root_gpu_pods_with_weights_from_the_volume(resources):
    claims = {name for kind, name in resources if kind == "PersistentVolumeClaim"}
    pods = [_pod_spec(resources, "Deployment", "qwen-vl-serve")]
    lws = resources[("LeaderWorkerSet", "qwen-vl-serve-multinode")]["spec"]["leaderWorkerTemplate"]
    pods += [lws["leaderTemplate"]["spec"], lws["workerTemplate"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == IMAGE_UID
        c = _container(pod)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        assert models["persistentVolumeClaim"]["claimName"] in claims
        assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in c["volumeMounts"])


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_connect(resources):
    deployment = resources[("Deployment", "qwen-vl-serve")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resources[("Service", "qwen-vl-serve")]
    assert _labels_match(service["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in _container(deployment["spec"]["template"]["spec"])["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert _labels_match(resources[("PodDisruptionBudget", "qwen-vl-serve")]["spec"]["selector"]["matchLabels"],
                         pod_labels)
    monitor = resources[("ServiceMonitor", "qwen-vl-serve")]["spec"]
    assert _labels_match(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    for kind in ("HorizontalPodAutoscaler",):
        assert resources[(kind, "qwen-vl-serve")]["spec"]["scaleTargetRef"]["name"] == "qwen-vl-serve"
    assert resources[("ScaledObject", "qwen-vl-serve")]["spec"]["scaleTargetRef"]["name"] == "qwen-vl-serve"

    lws = resources[("LeaderWorkerSet", "qwen-vl-serve-multinode")]["spec"]["leaderWorkerTemplate"]
    leader_labels = lws["leaderTemplate"]["metadata"]["labels"]
    worker_labels = lws["workerTemplate"]["metadata"]["labels"]
    selector = resources[("Service", "qwen-vl-serve-multinode")]["spec"]["selector"]
    assert _labels_match(selector, leader_labels) and not _labels_match(selector, worker_labels)


def _exported_series() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes.get(f.type, [""])}


def test_autoscaling_reads_metrics_the_server_exports(resources):
    exported = _exported_series()
    adapter = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    published = {}
    for rule in adapter["rules"]["custom"]:
        published[rule["name"]["as"]] = rule
        for name in re.findall(r"\b(qwenvl_\w+)", rule["seriesQuery"] + rule["metricsQuery"]):
            assert name in exported, name
    hpa = resources[("HorizontalPodAutoscaler", "qwen-vl-serve")]["spec"]
    for metric in hpa["metrics"]:
        assert metric["pods"]["metric"]["name"] in published
    assert hpa["minReplicas"] >= 2, "one replica left cannot drain without an outage"
    keda = resources[("ScaledObject", "qwen-vl-serve")]["spec"]
    for trigger in keda["triggers"]:
        for name in re.findall(r"\b(qwenvl_\w+)", trigger["metadata"]["query"]):
            assert name in exported, name


def test_config_maps_hold_only_real_settings(resources):
    fields = {name.upper() for name in Settings.model_fields}
    for name in ("qwen-vl-serve", "qwen-vl-serve-multinode"):
        for key in resources[("ConfigMap", name)]["data"]:
            if key.startswith("QWENVL_"):
                assert key.removeprefix("QWENVL_") in fields, key
            else:
                assert key.startswith("VLLM_") or key.endswith(".sh"), key
    assert not any(kind == "Secret" for kind, _ in resources), "no Secret belongs in the repository"


def test_public_routes_expose_only_the_api_with_long_timeouts(resources):
    route = resources[("HTTPRoute", "qwen-vl-serve")]["spec"]
    request_timeout = Settings.model_fields["request_timeout"].default
    for rule in route["rules"]:
        assert [m["path"]["value"] for m in rule["matches"]] == ["/v1"]
        assert float(rule["timeouts"]["request"].rstrip("s")) > request_timeout
        assert 429 not in rule["retry"]["codes"]
    ingress = resources[("Ingress", "qwen-vl-serve")]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert float(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > request_timeout
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert paths == ["/v1"]


def test_multinode_group_matches_the_parallelism(resources):
    config = resources[("ConfigMap", "qwen-vl-serve-multinode")]["data"]
    tp, pp = int(config["QWENVL_TENSOR_PARALLEL_SIZE"]), int(config["QWENVL_PIPELINE_PARALLEL_SIZE"])
    assert config["QWENVL_DISTRIBUTED_EXECUTOR_BACKEND"] == "ray"
    lws = resources[("LeaderWorkerSet", "qwen-vl-serve-multinode")]["spec"]["leaderWorkerTemplate"]
    gpus_per_pod = {int(_container(lws[t]["spec"])["resources"]["limits"]["nvidia.com/gpu"])
                    for t in ("leaderTemplate", "workerTemplate")}
    assert gpus_per_pod == {tp}, "one tensor-parallel group per node"
    assert lws["size"] == pp, "one pipeline stage per node"


def test_ray_start_script_parses(tmp_path):
    script = yaml.safe_load((K8S / "multinode" / "configmap.yaml").read_text())["data"]["ray-node.sh"]
    path = tmp_path / "ray-node.sh"
    path.write_text(script)
    out = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    python = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    compile(python, "ray-node.sh:python", "exec")


def test_the_autoscaler_owns_the_replica_count(resources):
    """A count in the Deployment would reset the autoscaler's on every `kubectl apply`."""
    assert resources[("HorizontalPodAutoscaler", "qwen-vl-serve")]["spec"]["scaleTargetRef"]["name"] == "qwen-vl-serve"
    assert "replicas" not in resources[("Deployment", "qwen-vl-serve")]["spec"]

"""deploy/compose checked offline: the compose file against the Compose Specification schema
(shipped inside check-jsonschema), the wiring between its parts (replicas, nginx upstreams,
Prometheus targets, Grafana provisioning), and the Grafana dashboard against the metrics the
server really exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "qwen-vl-serve.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def replicas(compose) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items()
            if svc.get("build", {}).get("target") == "gpu"}


def _check_compose_schema(find_tool, path: Path) -> subprocess.CompletedProcess:
    tool = find_tool("check-jsonschema", "pip install check-jsonschema (a test dependency)")
    return subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec(find_tool):
    out = _check_compose_schema(find_tool, COMPOSE_FILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_schema_check_catches_a_typo(find_tool, tmp_path):
    """The schema is strict (a misspelt key fails), so the check above means something."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_perod:", 1))
    assert _check_compose_schema(find_tool, broken).returncode != 0


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", str(value))
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_replicas_each_get_their_own_gpu_and_drain_before_being_killed(replicas):
    assert len(replicas) >= 2
    gpus = []
    for name, svc in replicas.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        gpus += device["device_ids"]
        drain = float(svc["environment"]["QWENVL_DRAIN_TIMEOUT"])
        assert _seconds(svc["stop_grace_period"]) >= drain + 20, name  # (+ abort wait, uvicorn, vLLM)
        assert "ports" not in svc, f"{name}: replicas are reached through nginx only"
    assert len(gpus) == len(set(gpus)), f"GPUs shared between replicas: {gpus}"


def test_replica_settings_are_real_and_carry_no_secret(replicas):
    fields = {name.upper() for name in Settings.model_fields}
    for svc in replicas.values():
        for key in svc["environment"]:
            assert key.startswith("QWENVL_") and key.removeprefix("QWENVL_") in fields, key
        assert "QWENVL_API_KEYS" not in svc["environment"], "keys belong in a secret file"
        assert svc["environment"]["QWENVL_API_KEY_FILE"].startswith("/run/secrets/")


def test_nginx_and_prometheus_know_every_replica(compose, replicas):
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", (COMPOSE_DIR / "nginx" / "upstreams.conf").read_text(),
                           flags=re.M)
    assert sorted(upstreams) == sorted((name, "8000") for name in replicas)

    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{name}:8000" for name in replicas)

    mounts = compose["services"]["nginx"]["volumes"]
    assert "../nginx/qwen-vl-serve.conf:/etc/nginx/conf.d/default.conf:ro" in mounts
    assert "./nginx/upstreams.conf:/etc/nginx/qwen-vl-serve/upstreams.conf:ro" in mounts


def test_bind_mounted_files_exist(compose):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and "${" not in source:
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} missing"


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose):
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/qwen-vl-serve.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    datasource = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = datasource["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# The parts of Grafana's dashboard model this dashboard uses, as a JSON Schema (Grafana
# publishes no JSON Schema of its own; its schema is written in CUE).
_GRID = {"type": "object", "required": ["h", "w", "x", "y"],
         "properties": {k: {"type": "integer", "minimum": 0} for k in ("h", "w", "x", "y")}}
_TARGET = {"type": "object", "required": ["refId", "expr"],
           "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1}}}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"]}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "text"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": _GRID,
                "datasource": {"type": "object", "required": ["type", "uid"]},
                "targets": {"type": "array", "items": _TARGET},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "else": {"required": ["datasource", "targets"], "properties": {"targets": {"minItems": 1}}},
        }},
    },
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_matches_the_schema(dashboard):
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)


def test_dashboard_layout_is_consistent(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def _exported_series() -> set[str]:
    """Every series name the server's registry can export."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_the_server_exports(dashboard):
    exported = _exported_series()
    for expr in _exprs(dashboard):
        for name in re.findall(r"\b(qwenvl_\w+)", expr):
            assert name in exported, f"{name} is not exported by server/metrics.py"


def test_dashboard_covers_what_operators_watch(dashboard):
    used = " ".join(_exprs(dashboard))
    for metric in ("qwenvl_requests_total", "qwenvl_errors_total",
                   "qwenvl_time_to_first_token_seconds_bucket", "qwenvl_time_per_output_token_seconds_bucket",
                   "qwenvl_completion_tokens_total", "qwenvl_admission_queued_requests", "qwenvl_requests_waiting",
                   "qwenvl_kv_cache_usage_ratio", "qwenvl_image_fetch_seconds_bucket",
                   "qwenvl_image_decode_seconds_bucket"):
        assert metric in used, f"no panel shows {metric}"
    assert "histogram_quantile(0.99" in used

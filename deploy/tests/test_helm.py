"""The Helm chart renders with real Helm (helm-python-sdk bundles Helm v4 as a library), lints
clean, and every manifest validates against the Kubernetes OpenAPI schemas.

Chart dependencies (official NATS chart, Altinity operator) are declared in Chart.yaml with
conditions that default to false and are not vendored (no network here). Rendering does not
need them while disabled; `helm lint` reports them as missing, so lint runs on a copy of the
chart whose Chart.yaml has the `dependencies` list removed, and a separate test checks the
declarations themselves.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml

from conftest import (
    CHART,
    CLUSTER_VALUES,
    CRD_KINDS,
    DEPLOY,
    K8S_VERSIONS,
    NAMESPACE,
    by_kind,
    cluster_values,
    helm,
    one,
    render,
)

try:
    import kubernetes_validate
except ImportError as err:  # pragma: no cover - environment problem
    raise ImportError(
        f"kubernetes-validate is missing ({err}): .venv/bin/pip install -r deploy/requirements.txt"
    ) from err

SERVICES = ("ingestor", "aggregator", "query-api")


def lint_report(tmp_path, values: dict | None) -> dict:
    chart = tmp_path / "chute"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        meta.pop("dependencies")
        (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return helm().lint(chart, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")


@pytest.mark.parametrize("mode", ["default", "cluster"])
def test_chart_lints_clean(tmp_path, mode):
    values = None if mode == "default" else cluster_values()
    report = lint_report(tmp_path, values)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert not problems, problems


def test_only_lint_finding_on_the_real_chart_is_the_unvendored_dependencies():
    report = helm().lint(CHART, None, namespace=NAMESPACE, kube_version="v1.30.0")
    findings = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert findings == [
        "chart directory is missing these dependencies: nats,altinity-clickhouse-operator"
    ], findings


def test_dependencies_are_optional_and_off_by_default():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    deps = {d["name"]: d for d in meta["dependencies"]}
    assert set(deps) == {"nats", "altinity-clickhouse-operator"}
    for dep in deps.values():
        key, flag = dep["condition"].split(".")
        assert flag == "enabled"
        assert values[key]["enabled"] is False
    # The NATS subchart is wired for JetStream with 3 replicas when enabled.
    assert values["nats"]["config"]["jetstream"]["enabled"] is True
    assert values["nats"]["config"]["cluster"]["replicas"] == 3


@pytest.mark.parametrize("mode", ["default", "cluster"])
def test_manifests_validate_against_kubernetes_schemas(mode, default_docs, cluster_docs):
    docs = default_docs if mode == "default" else cluster_docs
    skipped, validated = set(), 0
    for doc in docs:
        doc = {k: v for k, v in doc.items() if k != "__source__"}
        if doc["kind"] in CRD_KINDS:
            skipped.add(doc["kind"])  # no OpenAPI schema for CRDs: see conftest.CRD_KINDS
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): {err.message}")
        validated += 1
    assert validated >= 12
    if mode == "cluster":
        assert skipped == {
            "ServiceMonitor",
            "PrometheusRule",
            "ClickHouseInstallation",
            "ClickHouseKeeperInstallation",
        }


def test_default_render_resources(default_docs):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default_docs)
    for svc in SERVICES:
        assert ("Deployment", f"chute-{svc}") in kinds
        assert ("Service", f"chute-{svc}") in kinds
        assert ("PodDisruptionBudget", f"chute-{svc}") in kinds
    assert ("HorizontalPodAutoscaler", "chute-ingestor") in kinds
    assert ("HorizontalPodAutoscaler", "chute-query-api") in kinds
    assert ("HorizontalPodAutoscaler", "chute-aggregator") not in kinds  # mode none by default
    assert ("Job", "chute-migrate") in kinds
    assert ("ConfigMap", "chute-config") in kinds
    assert not by_kind(default_docs, "NetworkPolicy")
    assert not {d["kind"] for d in default_docs} & CRD_KINDS


@pytest.mark.parametrize("mode", ["default", "cluster"])
def test_pods_are_locked_down(mode, default_docs, cluster_docs):
    docs = default_docs if mode == "default" else cluster_docs
    pods = [(d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 4
    for doc, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_probes(default_docs):
    ing = one(default_docs, "Deployment", "chute-ingestor")["spec"]["template"]["spec"]["containers"][0]
    assert ing["readinessProbe"]["grpc"] == {"port": 7400, "service": "chute.v1.IngestService"}
    assert ing["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in ing["env"]}
    assert env["CHUTE_INGEST_GRPC_LISTEN"] == "0.0.0.0:7400"
    assert env["CHUTE_INGEST_ADMIN_LISTEN"] == "0.0.0.0:7401"
    for name, port in (("chute-aggregator", "metrics"), ("chute-query-api", "http")):
        c = one(default_docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_config_and_secrets_wiring(default_docs):
    cm = one(default_docs, "ConfigMap", "chute-config")["data"]
    assert cm["CHUTE_NATS_URL"] == "nats://nats:4222"
    assert cm["CHUTE_CLICKHOUSE_URL"] == "http://clickhouse:8123"
    assert cm["CHUTE_PARTITIONS"] == "16"
    assert "CHUTE_CLICKHOUSE_CLUSTER" not in cm
    agg = one(default_docs, "Deployment", "chute-aggregator")["spec"]["template"]["spec"]["containers"][0]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in agg["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env["CHUTE_CLICKHOUSE_PASSWORD"] == {"name": "chute", "key": "clickhouse-password"}
    assert "clickhouse-password" in one(default_docs, "Secret", "chute")["stringData"]


def test_migration_hook_job_single_node(default_docs):
    job = one(default_docs, "Job", "chute-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["migrate"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CHUTE_CLICKHOUSE_DATABASE"] == "chute" and "CHUTE_CLICKHOUSE_CLUSTER" not in env
    assert c["image"].endswith("/chute-aggregator:0.1.0")
    # Hook Secret created before the Job (lower weight), since the release Secret does not exist yet.
    hook_secret = one(default_docs, "Secret", "chute-migrate")
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )


def test_cluster_mode_wiring(cluster_docs):
    cm = one(cluster_docs, "ConfigMap", "chute-config")["data"]
    assert cm["CHUTE_STREAM_REPLICAS"] == "3"
    assert cm["CHUTE_CLICKHOUSE_CLUSTER"] == "chute"
    assert cm["CHUTE_CLICKHOUSE_URL"] == "http://clickhouse-chute.chute.svc:8123"
    job = one(cluster_docs, "Job", "chute-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate", "--cluster", "chute"]
    assert cm["CHUTE_AGGREGATOR_REPLICAS"] == "3"
    # The ClickHouseInstallation is part of this release: migrate after install, before upgrades.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    chi = one(cluster_docs, "ClickHouseInstallation", "chute")["spec"]
    assert chi["configuration"]["clusters"][0] == {
        "name": "chute", "layout": {"shardsCount": 2, "replicasCount": 2}
    }
    assert chi["configuration"]["zookeeper"]["nodes"] == [{"host": "keeper-chute", "port": 2181}]
    assert one(cluster_docs, "ClickHouseKeeperInstallation", "chute")
    # existingSecret: no chart Secret for credentials/keys, no hook Secret.
    assert not by_kind(cluster_docs, "Secret")
    ing = one(cluster_docs, "Deployment", "chute-ingestor")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in ing["containers"][0]["env"]}
    assert env["CHUTE_API_KEYS_FILE"] == "/etc/chute/api-keys/api-keys"
    assert {"name": "api-keys", "secret": {"secretName": "chute-api-keys", "items": [{"key": "api-keys", "path": "api-keys"}]}} in ing["volumes"]
    assert len(by_kind(cluster_docs, "NetworkPolicy")) == 3
    assert len(by_kind(cluster_docs, "ServiceMonitor")) == 3


def test_aggregator_hpa_on_consumer_lag(cluster_docs):
    hpa = one(cluster_docs, "HorizontalPodAutoscaler", "chute-aggregator")["spec"]
    assert hpa["maxReplicas"] == 32 == cluster_values()["config"]["partitions"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "chute_aggregator_partition_pending"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "20000"}
    deploy = one(cluster_docs, "Deployment", "chute-aggregator")
    assert "replicas" not in deploy["spec"]  # owned by the HPA


def test_aggregator_keda_scaledobject():
    docs = render({"aggregator": {"autoscaling": {"mode": "keda", "maxReplicas": 16}}})
    so = one(docs, "ScaledObject", "chute-aggregator")["spec"]
    assert so["maxReplicaCount"] == 16
    (trigger,) = so["triggers"]
    assert trigger["type"] == "prometheus"
    assert "chute_aggregator_partition_pending" in trigger["metadata"]["query"]
    assert 'namespace="chute"' in trigger["metadata"]["query"]
    assert not by_kind(docs, "HorizontalPodAutoscaler") or all(
        d["metadata"]["name"] != "chute-aggregator" for d in by_kind(docs, "HorizontalPodAutoscaler")
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"aggregator": {"autoscaling": {"mode": "hpa", "maxReplicas": 17}}}, "must not exceed config.partitions"),
        ({"aggregator": {"autoscaling": {"mode": "keda", "maxReplicas": 9}}, "config": {"partitions": 8}}, "must not exceed config.partitions"),
        ({"aggregator": {"replicas": 20}}, "must not exceed config.partitions"),
        ({"aggregator": {"autoscaling": {"mode": "bogus"}}}, "none"),
        ({"auth": {"enabled": True}}, "auth.enabled needs"),
        ({"auth": {"enabled": True, "apiKeys": [{"tenant": "acme", "key": "short"}]}}, "key"),
        ({"jetstream": {"url": ""}}, "jetstream.url is required"),
        ({"clickhouse": {"url": ""}}, "clickhouse.url is required"),
        ({"ingestor": {"replica": 3}}, "additional properties"),
    ],
)
def test_invalid_values_fail_the_render(values, message):
    h = helm()
    with pytest.raises(h.HelmError) as err:
        render(values)
    assert message in str(err.value)


def test_api_keys_secret_from_values():
    docs = render({"auth": {"enabled": True, "apiKeys": [
        {"tenant": "acme", "key": "k" * 24}, {"tenant": "beta", "key": "b" * 16}]}})
    keys = one(docs, "Secret", "chute")["stringData"]["api-keys"]
    assert keys.split("\n")[:2] == ["acme " + "k" * 24, "beta " + "b" * 16]


def test_prometheus_rule_is_the_alert_file():
    """The chart ships a copy of deploy/prometheus/alerts.yml (charts cannot read files outside
    their directory); the copy must stay identical and render unchanged."""
    src = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    copy_ = (CHART / "files" / "alerts.yml").read_text()
    assert copy_ == src, "run: cp deploy/prometheus/alerts.yml helm/chute/files/alerts.yml"
    docs = render({"metrics": {"prometheusRule": {"enabled": True}}})
    rule = one(docs, "PrometheusRule", "chute")
    assert rule["spec"]["groups"] == yaml.safe_load(src)["groups"]
    assert "{{ $labels.job }}" in yaml.safe_dump(rule["spec"])


def test_service_monitors_use_the_alert_job_names(cluster_docs):
    for sm in by_kind(cluster_docs, "ServiceMonitor"):
        assert sm["spec"]["jobLabel"] == "chute.dev/job"
        svc = one(cluster_docs, "Service", sm["metadata"]["name"])
        assert svc["metadata"]["labels"]["chute.dev/job"] == "chute-" + sm["metadata"]["name"].removeprefix("chute-")
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        assert sm["spec"]["endpoints"][0]["port"] in port_names
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in prom["scrape_configs"]} >= {f"chute-{s}" for s in SERVICES}


def test_values_schema_accepts_ci_values():
    h = helm()
    with h.Chart.load(CHART) as chart:
        assert chart.schema is not None
        chart.validate_schema(copy.deepcopy(cluster_values()))
        chart.validate_schema({})
    assert CLUSTER_VALUES.exists()

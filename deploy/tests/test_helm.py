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
    assert len(by_kind(default_docs, "NetworkPolicy")) == 4  # secure default (router included)
    assert {("Secret", "chute"), ("Secret", "chute-nats-auth"), ("Secret", "chute-migrate")} <= set(kinds)
    assert not {d["kind"] for d in default_docs} & CRD_KINDS


@pytest.mark.parametrize("mode", ["default", "cluster"])
def test_pods_are_locked_down(mode, default_docs, cluster_docs):
    docs = default_docs if mode == "default" else cluster_docs
    pods = [(d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 5  # ingestor, aggregator, query API, router, migration Job
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
    agg = one(default_docs, "Deployment", "chute-aggregator")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in agg["containers"][0]["env"]}
    # Its own ClickHouse user, the password as a file holding only its own key.
    assert env["CHUTE_CLICKHOUSE_USER"] == "chute_aggregator"
    assert env["CHUTE_CLICKHOUSE_PASSWORD_FILE"] == "/etc/chute/clickhouse/password"
    assert {"name": "clickhouse", "secret": {"secretName": "chute", "items": [
        {"key": "clickhouse-aggregator-password", "path": "password"}]}} in agg["volumes"]
    assert "clickhouse-aggregator-password" in one(default_docs, "Secret", "chute")["stringData"]
    # The administrative login stays with the migration Job.
    assert "clickhouse-password" in one(default_docs, "Secret", "chute")["stringData"]
    assert "CHUTE_CLICKHOUSE_PASSWORD" not in env


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
    # The ledger buckets follow the streams (R3), unless set on their own.
    assert cm["CHUTE_LEDGER_REPLICAS"] == "3"
    # The ClickHouseInstallation is part of this release: migrate after install, before upgrades.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    chi = one(cluster_docs, "ClickHouseInstallation", "chute")["spec"]
    assert chi["configuration"]["clusters"][0] == {
        "name": "chute", "layout": {"shardsCount": 2, "replicasCount": 2}
    }
    assert chi["configuration"]["zookeeper"]["nodes"] == [{"host": "keeper-chute", "port": 2181}]
    assert one(cluster_docs, "ClickHouseKeeperInstallation", "chute")
    # existingSecret everywhere: no chart Secret for credentials/keys, no hook Secret.
    assert not by_kind(cluster_docs, "Secret")
    job_volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "clickhouse-users", "secret": {"secretName": "chute-clickhouse-users", "items": [
        {"key": r, "path": r} for r in ("aggregator", "query", "migrate")]}} in job_volumes
    ing = one(cluster_docs, "Deployment", "chute-ingestor")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in ing["containers"][0]["env"]}
    assert env["CHUTE_API_KEYS_FILE"] == "/etc/chute/api-keys/api-keys"
    assert {"name": "api-keys", "secret": {"secretName": "chute-api-keys", "items": [{"key": "api-keys", "path": "api-keys"}]}} in ing["volumes"]
    assert len(by_kind(cluster_docs, "NetworkPolicy")) == 4  # with the router
    assert len(by_kind(cluster_docs, "ServiceMonitor")) == 4  # with the router


def test_ledger_replicas_follow_the_streams_unless_set(default_docs):
    assert one(default_docs, "ConfigMap", "chute-config")["data"]["CHUTE_LEDGER_REPLICAS"] == "1"
    docs = render({"jetstream": {"streamReplicas": 3, "ledgerReplicas": 1}})
    assert one(docs, "ConfigMap", "chute-config")["data"]["CHUTE_LEDGER_REPLICAS"] == "1"


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
        ({"auth": {"generatedTenants": []}}, "auth.enabled needs"),
        ({"auth": {"enabled": False}}, "set insecure: true"),
        ({"networkPolicy": {"enabled": False}}, "set insecure: true"),
        ({"jetstream": {"auth": {"method": "nkey"}}}, "needs jetstream.auth.existingSecret"),
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
        ({"tls": {"clientCa": {"enabled": True}}}, "tls.clientCa.enabled needs tls.enabled"),
        ({"auth": {"clientCerts": [{"tenant": "acme", "name": "ingest.acme"}]}}, "needs tls.clientCa.enabled"),
        ({"insecure": "yes"}, "insecure"),
        # The bundled NATS would read a Secret the chart does not render.
        ({"insecure": True, "nats": {"enabled": True}, "jetstream": {"url": ""}}, "nats.config.merge.authorization=null"),
        ({"nats": {"enabled": True}, "jetstream": {"url": "", "auth": {"existingSecret": "mine"}}}, "set both to the same Secret"),
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
    assert {j["job_name"] for j in prom["scrape_configs"]} >= {f"chute-{s}" for s in SERVICES + ("router",)}
    assert {sm["metadata"]["name"] for sm in by_kind(cluster_docs, "ServiceMonitor")} == {
        f"chute-{s}" for s in SERVICES + ("router",)}


def test_values_schema_accepts_ci_values():
    h = helm()
    with h.Chart.load(CHART) as chart:
        assert chart.schema is not None
        chart.validate_schema(copy.deepcopy(cluster_values()))
        chart.validate_schema({})
    assert CLUSTER_VALUES.exists()


# ---------------------------------------------------------------------------------------------
# Secure defaults (issue 11): `helm install` with no values gives API keys on ingest and query,
# each service its own NATS and ClickHouse user with a generated password, and NetworkPolicies.
# `insecure: true` turns them off, and then NOTES.txt must say so loudly.
# ---------------------------------------------------------------------------------------------

INSECURE_BANNER = "WARNING: insecure=true. THIS INSTALL IS OPEN."


def render_with_notes(values: dict | None = None, chart=CHART) -> tuple[list[dict], str]:
    """Like conftest.render, plus the rendered NOTES.txt."""
    h = helm()
    with h.Chart.load(chart) as loaded:
        rendered = loaded.render(values=values or {}, name="chute", namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for source, text in sorted(rendered.items()):
        if source.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = source
                docs.append(doc)
    return docs, notes


def validate_k8s(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        doc = {k: v for k, v in doc.items() if k != "__source__"}
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): {err.message}")


def secret_value(docs: list[dict], name: str, key: str) -> str | None:
    """The value of `key` in the rendered Secret `name` (None when the chart does not render it)."""
    found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    if not found:
        return None
    return found[0].get("stringData", {}).get(key)


def container_of(docs: list[dict], kind: str, name: str) -> tuple[dict, dict]:
    pod = one(docs, kind, name)["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def mounted_secret_file(docs: list[dict], pod: dict, container: dict, path: str) -> str | None:
    """The content of the file at `path` in the container when it comes from a Secret the chart
    renders; None when the file is not mounted or its Secret is not rendered."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        if "secret" not in volume:
            return None
        item = next((i for i in volume["secret"].get("items", []) if i["path"] == path[len(prefix):]), None)
        if item is None:
            return None
        return secret_value(docs, volume["secret"]["secretName"], item["key"])
    return None


def security_problems(docs: list[dict]) -> list[str]:
    """Every way the render falls short of the secure defaults, as readable sentences."""
    problems = []
    secret_keys = ("ingestor", "aggregator", "query-api", "router", "operator")  # <release>-nats-auth
    for secret in by_kind(docs, "Secret"):
        for key, value in secret.get("stringData", {}).items():
            if ("password" in key or key.startswith("api-key") or key in secret_keys) and not str(value).strip():
                problems.append(f"empty password: Secret {secret['metadata']['name']} key {key}")
    services = {
        "ingestor": ("chute-ingestor", True, False),
        "aggregator": ("chute-aggregator", False, True),
        "query-api": ("chute-query-api", True, True),
    }
    if any(d["kind"] == "Deployment" and d["metadata"]["name"] == "chute-router" for d in docs):
        services["router"] = ("chute-router", False, True)
    clickhouse_users = {}
    for svc, (deploy, takes_keys, uses_clickhouse) in services.items():
        pod, c = container_of(docs, "Deployment", deploy)
        env = {e["name"]: e.get("value") for e in c["env"]}
        if takes_keys:
            path = env.get("CHUTE_API_KEYS_FILE")
            if not path:
                problems.append(f"auth disabled: {svc} has no CHUTE_API_KEYS_FILE")
            else:
                keys = mounted_secret_file(docs, pod, c, path)
                if keys is not None:  # None: an existing Secret the chart does not render
                    lines = [l.split() for l in keys.splitlines() if l.strip() and not l.startswith("#")]
                    api = [l for l in lines[: next((i for i, l in enumerate(lines) if l == ["[client-certs]"]), len(lines))]]
                    if not api or any(len(l) != 2 or len(l[1]) < 16 for l in api):
                        problems.append(f"auth disabled: {svc}'s keys file has no usable key: {keys!r}")
        if "CHUTE_NATS_USER" in env:
            password = mounted_secret_file(docs, pod, c, env.get("CHUTE_NATS_PASSWORD_FILE") or "")
            if not env.get("CHUTE_NATS_PASSWORD_FILE"):
                problems.append(f"NATS auth disabled: {svc} has a NATS user but no password file")
            elif password is not None and not password.strip():
                problems.append(f"empty password: {svc}'s NATS password")
        elif not ({"CHUTE_NATS_NKEY_SEED_FILE", "CHUTE_NATS_CREDS"} & set(env)):
            problems.append(f"NATS auth disabled: {svc} connects to NATS without credentials")
        if uses_clickhouse:
            user = env.get("CHUTE_CLICKHOUSE_USER")
            password_file = env.get("CHUTE_CLICKHOUSE_PASSWORD_FILE")
            if not user or not password_file:
                problems.append(f"ClickHouse: {svc} has no user of its own with a password file")
            else:
                clickhouse_users[svc] = user
                password = mounted_secret_file(docs, pod, c, password_file)
                if password is not None and not password.strip():
                    problems.append(f"empty password: {svc}'s ClickHouse password")
    # The router reads events and rollups with the query API's read-only user (SELECT only); any
    # other sharing is a hole.
    router_user = clickhouse_users.pop("router", None)
    if router_user is not None and router_user != clickhouse_users.get("query-api"):
        problems.append(f"ClickHouse: the router logs in as {router_user}, not the read-only query user")
    if len(set(clickhouse_users.values())) < len(clickhouse_users):
        problems.append(f"ClickHouse: services share a user: {clickhouse_users}")
    policies = by_kind(docs, "NetworkPolicy")
    for svc in services:
        selecting = [
            p for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == svc
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        ]
        if not selecting:
            problems.append(f"missing NetworkPolicy for {svc}")
    _, job = container_of(docs, "Job", "chute-migrate")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in job["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    if "CHUTE_CLICKHOUSE_PASSWORD" in refs:
        password = secret_value(docs, refs["CHUTE_CLICKHOUSE_PASSWORD"]["name"], refs["CHUTE_CLICKHOUSE_PASSWORD"]["key"])
        if password is not None and not password:
            problems.append("empty password: the migration Job's ClickHouse login")
    return problems


def assert_secure_or_loudly_warned(docs: list[dict], notes: str) -> None:
    problems = security_problems(docs)
    if not problems:
        assert INSECURE_BANNER not in notes, "a secure install must not print the insecure warning"
        return
    assert INSECURE_BANNER in notes, f"insecure render without the NOTES warning: {problems}"
    for words in ("WITHOUT API keys", "WITHOUT credentials", "EMPTY password", "no NetworkPolicy"):
        assert words in notes, f"the insecure warning does not say {words!r}: {notes}"


def test_default_install_is_secure():
    docs, notes = render_with_notes()
    assert security_problems(docs) == []
    assert_secure_or_loudly_warned(docs, notes)
    # The keys the services read are the generated ones, printed how to read in NOTES.
    key = secret_value(docs, "chute", "api-key-default")
    assert len(key) == 32 and key.isalnum()
    assert secret_value(docs, "chute", "api-keys") == f"default {key}\n"
    assert "kubectl get secret -n chute chute -o jsonpath='{.data.api-key-default}' | base64 -d" in notes
    assert "jsonpath='{.data.clickhouse-password}'" in notes
    # Every generated secret is 32 random characters, and no two are the same.
    generated = [v for d in by_kind(docs, "Secret") for k, v in d["stringData"].items() if k != "clickhouse-user" and k != "api-keys"]
    assert all(len(v) == 32 for v in generated), generated
    main = one(docs, "Secret", "chute")["stringData"]
    nats = one(docs, "Secret", "chute-nats-auth")["stringData"]
    assert len(set(main.values()) | set(nats.values())) == len(main) + len(nats)
    # Each service mounts only its own NATS credential, with its user and inbox prefix.
    for svc, user, inbox in (
        ("ingestor", "chute-ingestor", "_INBOX_ingestor"),
        ("aggregator", "chute-aggregator", "_INBOX_aggregator"),
        ("query-api", "chute-query-api", None),
    ):
        pod, c = container_of(docs, "Deployment", f"chute-{svc}")
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CHUTE_NATS_USER"] == user
        assert env.get("CHUTE_NATS_INBOX_PREFIX") == inbox
        (volume,) = [v for v in pod["volumes"] if v["name"] == "nats-auth"]
        assert volume["secret"] == {"secretName": "chute-nats-auth", "items": [{"key": svc, "path": "credential"}]}
    # The migration Job creates the users with the very passwords the services read.
    job_pod, job = container_of(docs, "Job", "chute-migrate")
    job_env = {e["name"]: e.get("value") for e in job["env"]}
    for role, svc in (("aggregator", "aggregator"), ("query", "query-api")):
        pod, c = container_of(docs, "Deployment", f"chute-{svc}")
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert job_env[f"CHUTE_CLICKHOUSE_{role.upper()}_USER"] == env["CHUTE_CLICKHOUSE_USER"]
        assert mounted_secret_file(docs, job_pod, job, job_env[f"CHUTE_CLICKHOUSE_{role.upper()}_PASSWORD_FILE"]) == \
            mounted_secret_file(docs, pod, c, env["CHUTE_CLICKHOUSE_PASSWORD_FILE"])
    assert mounted_secret_file(docs, job_pod, job, job_env["CHUTE_CLICKHOUSE_MIGRATE_PASSWORD_FILE"]) == main["clickhouse-migrate-password"]
    assert secret_value(docs, "chute-migrate", "clickhouse-password") == main["clickhouse-password"]


def test_the_security_check_catches_each_hole():
    """The check above can fail: each hole punched into a secure render is reported."""
    docs, notes = render_with_notes()

    def punched(change):
        broken = copy.deepcopy(docs)
        change(broken)
        return security_problems(broken)

    def blank(name, key):
        def change(broken):
            one(broken, "Secret", name)["stringData"][key] = ""
        return change

    def drop_env(deploy, var):
        def change(broken):
            c = container_of(broken, "Deployment", deploy)[1]
            c["env"] = [e for e in c["env"] if e["name"] != var]
        return change

    def drop_policy(component):
        def change(broken):
            broken[:] = [d for d in broken if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == f"chute-{component}")]
        return change

    assert any("empty password" in p for p in punched(blank("chute", "clickhouse-query-password")))
    assert any("empty password" in p for p in punched(blank("chute-nats-auth", "ingestor")))
    assert any("empty password" in p for p in punched(blank("chute", "clickhouse-password")))
    assert any("auth disabled: ingestor" in p for p in punched(drop_env("chute-ingestor", "CHUTE_API_KEYS_FILE")))
    assert any("auth disabled: query-api" in p for p in punched(drop_env("chute-query-api", "CHUTE_API_KEYS_FILE")))
    assert any("auth disabled" in p for p in punched(blank("chute", "api-keys")))
    assert any("NATS auth disabled: aggregator" in p for p in punched(drop_env("chute-aggregator", "CHUTE_NATS_USER")))
    assert any("NATS auth disabled: router" in p for p in punched(drop_env("chute-router", "CHUTE_NATS_USER")))
    assert any("ClickHouse: router" in p for p in punched(drop_env("chute-router", "CHUTE_CLICKHOUSE_PASSWORD_FILE")))
    assert any("missing NetworkPolicy for router" in p for p in punched(drop_policy("router")))
    assert any("missing NetworkPolicy for query-api" in p for p in punched(drop_policy("query-api")))
    with pytest.raises(AssertionError, match="without the NOTES warning"):
        broken = copy.deepcopy(docs)
        drop_policy("ingestor")(broken)
        assert_secure_or_loudly_warned(broken, notes)


def test_insecure_turns_everything_off_and_warns_loudly():
    docs, notes = render_with_notes({"insecure": True})
    problems = security_problems(docs)
    for expected in ("auth disabled: ingestor", "auth disabled: query-api", "NATS auth disabled: aggregator",
                     "ClickHouse: query-api has no user", "empty password: the migration Job", "missing NetworkPolicy for ingestor"):
        assert any(expected in p for p in problems), (expected, problems)
    assert_secure_or_loudly_warned(docs, notes)
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == "chute-nats-auth"]
    validate_k8s(docs)
    # The same render without the banner does not pass.
    with pytest.raises(AssertionError, match="without the NOTES warning"):
        assert_secure_or_loudly_warned(docs, notes.replace(INSECURE_BANNER, ""))


def test_generated_secrets_start_with_a_letter():
    """nats-server reads the generated passwords through `$VARIABLE` references, which it parses as
    config values: one starting with digits can parse as a number or a size and stop the server
    (CI once rendered such an operator password). Every generated value starts with a letter."""
    values = []
    for _ in range(4):
        docs = render({"auth": {"generatedTenants": ["default", "acme", "beta"]}})
        for secret in by_kind(docs, "Secret"):
            values += [v for k, v in secret.get("stringData", {}).items() if k not in ("api-keys", "clickhouse-user")]
    assert len(values) >= 40, values
    assert all(len(v) == 32 and v[0].isalpha() and v.isalnum() for v in values), values


def test_generated_secrets_survive_an_upgrade(tmp_path):
    """`helm upgrade` reads the generated values back from the release's Secrets (`lookup`). No
    cluster here, so a copy of the chart answers the one lookup with Secrets as a previous
    install left them: their values are kept, what they lack is generated, explicit values win."""
    import base64

    chart = tmp_path / "chute"
    shutil.copytree(CHART, chart)
    security = chart / "templates" / "_security.tpl"
    text = security.read_text()
    call = 'lookup "v1" "Secret" $root.Release.Namespace .secret'
    assert text.count(call) == 1, "the generated-secret helper's lookup moved: update this test"

    def b64(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    previous = {
        "chute": {"api-key-default": "previous-api-key-of-default-0001", "clickhouse-query-password": "previous-query-password"},
        "chute-nats-auth": {"ingestor": "previous-ingestor-nats-password"},
    }
    literal = "(dict " + " ".join(
        f'"{name}" (dict "data" (dict ' + " ".join(f'"{k}" "{b64(v)}"' for k, v in data.items()) + "))"
        for name, data in previous.items()
    ) + ")"
    security.write_text(text.replace(call, f"get {literal} .secret"))

    docs, _ = render_with_notes({"auth": {"generatedTenants": ["default", "acme"]}}, chart=chart)
    main = one(docs, "Secret", "chute")["stringData"]
    assert main["api-key-default"] == "previous-api-key-of-default-0001"
    assert main["clickhouse-query-password"] == "previous-query-password"
    assert secret_value(docs, "chute-migrate", "clickhouse-query-password") == "previous-query-password"
    assert secret_value(docs, "chute-nats-auth", "ingestor") == "previous-ingestor-nats-password"
    # Not in the previous Secrets: generated now.
    assert len(main["api-key-acme"]) == 32 and main["api-key-acme"] != main["api-key-default"]
    assert main["api-keys"] == f"default previous-api-key-of-default-0001\nacme {main['api-key-acme']}\n"
    assert len(secret_value(docs, "chute-nats-auth", "aggregator")) == 32
    # An explicit value wins over the previous one.
    docs, _ = render_with_notes({"clickhouse": {"password": "given-admin-password"}}, chart=chart)
    assert secret_value(docs, "chute", "clickhouse-password") == "given-admin-password"
    assert secret_value(docs, "chute-migrate", "clickhouse-password") == "given-admin-password"


def test_given_keys_and_existing_secrets_replace_generation():
    docs, notes = render_with_notes({
        "auth": {"apiKeys": [{"tenant": "acme", "key": "a" * 20}]},
        "clickhouse": {"existingSecret": "ch-admin", "users": {"existingSecret": "ch-users"}},
        "jetstream": {"auth": {"existingSecret": "nats-users", "method": "creds"}},
    })
    assert security_problems(docs) == []
    main = one(docs, "Secret", "chute")["stringData"]
    assert main == {"api-keys": "acme " + "a" * 20 + "\n"}
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == "chute-nats-auth"]
    pod, c = container_of(docs, "Deployment", "chute-aggregator")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CHUTE_NATS_CREDS"] == "/etc/chute/nats-auth/credential" and "CHUTE_NATS_USER" not in env
    assert {"name": "nats-auth", "secret": {"secretName": "nats-users", "items": [{"key": "aggregator", "path": "credential"}]}} in pod["volumes"]
    assert {"name": "clickhouse", "secret": {"secretName": "ch-users", "items": [{"key": "aggregator", "path": "password"}]}} in pod["volumes"]
    assert "Secret ch-users" in notes and "GENERATED" not in notes


def test_tls_listeners_from_a_cert_manager_secret():
    docs, notes = render_with_notes({"tls": {"enabled": True, "existingSecret": "chute-tls"}})
    validate_k8s(docs)
    for svc in ("ingestor", "query-api"):
        pod, c = container_of(docs, "Deployment", f"chute-{svc}")
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CHUTE_TLS_CERT"] == "/etc/chute/tls/tls.crt" and env["CHUTE_TLS_KEY"] == "/etc/chute/tls/tls.key"
        assert "CHUTE_TLS_CLIENT_CA" not in env
        assert {"name": "tls", "secret": {"secretName": "chute-tls", "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}} in pod["volumes"]
    _, ing = container_of(docs, "Deployment", "chute-ingestor")
    # The kubelet's gRPC probe has no TLS: readiness moves to the admin server.
    assert ing["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    _, query = container_of(docs, "Deployment", "chute-query-api")
    assert query["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
    assert "https://chute-query-api.chute.svc:7420/v1/" in notes and "TLS on the ingest and query listeners is OFF" not in notes
    _, agg = container_of(docs, "Deployment", "chute-aggregator")
    assert not [e for e in agg["env"] if e["name"].startswith("CHUTE_TLS_")]

    docs, notes = render_with_notes({"tls": {"enabled": True, "existingSecret": "chute-tls", "queryApiSecret": "query-tls",
                                             "clientCa": {"enabled": True, "existingSecret": "clients-ca"}},
                                     "auth": {"clientCerts": [{"tenant": "acme", "name": "spiffe://acme/ingest"}]}})
    validate_k8s(docs)
    pod, query = container_of(docs, "Deployment", "chute-query-api")
    env = {e["name"]: e.get("value") for e in query["env"]}
    assert env["CHUTE_TLS_CLIENT_CA"] == "/etc/chute/tls-client-ca/ca.crt"
    assert {"name": "tls-client-ca", "secret": {"secretName": "clients-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in pod["volumes"]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "tls"] == ["query-tls"]
    # Mutual TLS: the kubelet has no client certificate, the probes only connect.
    assert query["readinessProbe"]["tcpSocket"] == {"port": "http"} and "httpGet" not in query["livenessProbe"]
    assert secret_value(docs, "chute", "api-keys").endswith("[client-certs]\nacme spiffe://acme/ingest\n")


def test_network_policy_ports_follow_the_urls():
    docs = render({"jetstream": {"url": "tls://nats-a.nats:4443,tls://nats-b.nats:4443"},
                   "clickhouse": {"url": "https://clickhouse.db:8443", "caSecret": "ch-ca"}})
    policy = one(docs, "NetworkPolicy", "chute-aggregator")["spec"]["egress"]
    assert [{"port": 4443, "protocol": "TCP"}] in [e["ports"] for e in policy]
    assert [{"port": 8443, "protocol": "TCP"}] in [e["ports"] for e in policy]
    docs = render({"clickhouse": {"url": "https://clickhouse.db"}, "networkPolicy": {"natsPort": 4223}})
    policy = one(docs, "NetworkPolicy", "chute-query-api")["spec"]["egress"]
    assert [{"port": 8443, "protocol": "TCP"}] in [e["ports"] for e in policy]
    assert [{"port": 4223, "protocol": "TCP"}] in [e["ports"] for e in policy]
    # The ClickHouse CA reaches every ClickHouse client, the migration Job included.
    docs = render({"clickhouse": {"url": "https://clickhouse.db:8443", "caSecret": "ch-ca"}})
    for kind, name in (("Deployment", "chute-aggregator"), ("Deployment", "chute-query-api"), ("Job", "chute-migrate")):
        pod, c = container_of(docs, kind, name)
        assert {"name": "CHUTE_CLICKHOUSE_CA", "value": "/etc/chute/clickhouse-ca/ca.crt"} in c["env"], name
        assert {"name": "clickhouse-ca", "secret": {"secretName": "ch-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in pod["volumes"]


def test_otlp_listeners_are_exposed_and_can_be_turned_off(default_docs):
    pod, c = container_of(default_docs, "Deployment", "chute-ingestor")
    assert {"name": "CHUTE_OTLP_GRPC_LISTEN", "value": "0.0.0.0:4317"} in c["env"]
    assert {"name": "CHUTE_OTLP_HTTP_LISTEN", "value": "0.0.0.0:4318"} in c["env"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}.items() >= {"otlp-grpc": 4317, "otlp-http": 4318}.items()
    service = one(default_docs, "Service", "chute-ingestor")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}.items() >= {"otlp-grpc": 4317, "otlp-http": 4318}.items()
    ingress = one(default_docs, "NetworkPolicy", "chute-ingestor")["spec"]["ingress"]
    assert {"port": 4318, "protocol": "TCP"} in ingress[0]["ports"]

    docs = render({"ingestor": {"otlp": {"enabled": False}}})
    pod, c = container_of(docs, "Deployment", "chute-ingestor")
    assert {"name": "CHUTE_OTLP_GRPC_LISTEN", "value": "off"} in c["env"]
    assert "otlp-http" not in {p["name"] for p in c["ports"]}
    service = one(docs, "Service", "chute-ingestor")
    assert "otlp-grpc" not in {p["name"] for p in service["spec"]["ports"]}


# ---------------------------------------------------------------------------------------------
# The bundled NATS chart's users (values `nats.config.merge`) are deploy/nats/chute-nats.conf's.
# ---------------------------------------------------------------------------------------------

NATS_CONF = DEPLOY / "nats" / "chute-nats.conf"


class NatsVar(str):
    """A `$NAME` reference in a NATS config file."""


def parse_nats_conf(text: str) -> dict:
    """A small parser for the NATS config syntax deploy/nats uses: `#` comments, `key = value`,
    `key: value` and `key { ... }` entries, maps, arrays (items split by newlines or commas),
    quoted strings, bare words and `$variables` (returned as NatsVar)."""
    import re

    token = re.compile(r'\s+|#[^\n]*|//[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\],;=:]|[^\s{}\[\],;=:#"]+')
    tokens = [t for t in token.findall(text) if t.strip() and not t.startswith(("#", "//"))]
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def scalar(t):
        if t.startswith('"'):
            return json.loads(t)
        if t.startswith("$"):
            return NatsVar(t[1:])
        return t

    def value():
        t = take()
        if t == "{":
            return entries("}")
        if t == "[":
            items = []
            while peek() != "]":
                if peek() in (",", ";"):
                    take()
                    continue
                items.append(value())
            take()
            return items
        return scalar(t)

    def entries(end):
        result = {}
        while peek() is not None and peek() != end:
            if peek() in (",", ";"):
                take()
                continue
            key = scalar(take())
            if peek() in ("=", ":"):
                take()
            result[str(key)] = value()
        if end is not None:
            assert take() == end
        return result

    import json

    return entries(None)


def test_nats_conf_parser_reads_the_shipped_file():
    conf = parse_nats_conf(NATS_CONF.read_text())
    users = conf["authorization"]["users"]
    assert [u["user"] for u in users] == ["chute-ingestor", "chute-aggregator", "chute-query-api", "chute-router",
                                          "chute-operator"]
    assert users[0]["password"] == NatsVar("CHUTE_NATS_INGESTOR_PASSWORD")
    assert isinstance(users[0]["permissions"], NatsVar)
    assert conf["CHUTE_QUERY_API_PERMISSIONS"] == {"publish": {"deny": [">"]}, "subscribe": {"allow": ["live.>"]}}
    assert parse_nats_conf('a = [1, "x"]\nb { c: $D }') == {"a": ["1", "x"], "b": {"c": NatsVar("D")}}


def bundled_nats_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())["nats"]


def test_bundled_nats_users_are_deploy_nats_users():
    conf = parse_nats_conf(NATS_CONF.read_text())
    shipped = {
        u["user"]: {"password": str(u["password"]), "permissions": conf[u["permissions"]]}
        for u in conf["authorization"]["users"]
    }
    nats_values = bundled_nats_values()
    bundled = {}
    for u in nats_values["config"]["merge"]["authorization"]["users"]:
        password = u["password"]
        assert password.startswith("<< $") and password.endswith(" >>"), password
        bundled[u["user"]] = {"password": password[4:-3], "permissions": u["permissions"]}
    assert bundled == shipped
    # The server's password variables come from the Secret the Chute chart renders, one key per
    # service, and the chart's users are the ones the services log in as.
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    users = chart_values["jetstream"]["auth"]["users"]
    env = nats_values["container"]["env"]
    docs = render()
    nats_secret = one(docs, "Secret", "chute-nats-auth")["stringData"]
    for service, values_key in (("ingestor", "ingestor"), ("aggregator", "aggregator"),
                                ("query-api", "queryApi"), ("router", "router"), ("operator", "operator")):
        user = users[values_key]["user"]
        variable = bundled[user]["password"]
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == {"$tplYaml": '{{ .Values.chuteAuthSecret | default (printf "%s-nats-auth" .Release.Name) }}'}
        assert ref["key"] == service and nats_secret[service]
        inbox = users[values_key]["inboxPrefix"] or "_INBOX"
        allowed = bundled[user]["permissions"]["subscribe"]["allow"]
        assert f"{inbox}.>" in allowed or service == "query-api", (service, allowed)
    assert nats_values["natsBox"]["enabled"] is False


def test_bundled_nats_secret_name_template_evaluates_in_the_nats_charts_context(tmp_path):
    """The NATS chart runs `$tplYaml` with its own context (its values, the release): evaluate the
    secret-name template the same way, in a throwaway chart, with real Helm."""
    template = bundled_nats_values()["container"]["env"]["CHUTE_NATS_INGESTOR_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]["$tplYaml"]
    chart = tmp_path / "nats"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: nats\nversion: 1.0.0\n")
    (chart / "values.yaml").write_text("chuteAuthSecret: \"\"\nexpr: \"\"\n")
    (chart / "templates" / "name.yaml").write_text("name: {{ tpl .Values.expr . }}\n")
    h = helm()
    with h.Chart.load(chart) as loaded:
        for values, expected in (({"expr": template}, "chute-nats-auth"),
                                 ({"expr": template, "chuteAuthSecret": "mine"}, "mine")):
            rendered = loaded.render(values=values, name="chute", namespace=NAMESPACE, is_install=True)
            assert yaml.safe_load(rendered["nats/templates/name.yaml"]) == {"name": expected}


def test_rendered_credentials_log_in_to_a_nats_server_configured_like_the_bundled_chart(tmp_path):
    """nats-server (real) with the bundled chart's `config.merge` formatted as the NATS chart
    formats it (JSON, `<< ... >>` unquoted) and the passwords of the rendered Secret in its
    environment, as `container.env` gives them: every service's mounted credential logs in, a
    wrong password is refused, and a permission holds (the query API cannot publish events)."""
    import asyncio
    import json
    import os
    import re
    import socket
    import subprocess
    import time

    import nats
    from nats.errors import Error as NatsError

    binary = os.environ.get("CHUTE_NATS_SERVER") or shutil.which("nats-server")
    assert binary, "nats-server not found (apt-get install nats-server)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nats_values = bundled_nats_values()
    config = re.sub(r'"<<\s+(.*?)\s+>>"', r"\1", json.dumps(nats_values["config"]["merge"], indent=2))
    (tmp_path / "nats.conf").write_text(config)
    docs = render()
    secret = one(docs, "Secret", "chute-nats-auth")["stringData"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUTE_")}
    for variable, spec in nats_values["container"]["env"].items():
        env[variable] = secret[spec["valueFrom"]["secretKeyRef"]["key"]]
    server = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port), "-c", str(tmp_path / "nats.conf")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert server.poll() is None, f"nats-server exited: {server.stderr.read().decode()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not listen within 10 s"
                time.sleep(0.05)

        async def check():
            url = f"nats://127.0.0.1:{port}"
            for svc in ("ingestor", "aggregator", "query-api", "router"):
                pod, c = container_of(docs, "Deployment", f"chute-{svc}")
                cenv = {e["name"]: e.get("value") for e in c["env"]}
                password = mounted_secret_file(docs, pod, c, cenv["CHUTE_NATS_PASSWORD_FILE"])
                errors = []

                async def on_error(err, errors=errors):
                    errors.append(str(err))

                client = await asyncio.wait_for(nats.connect(
                    url, user=cenv["CHUTE_NATS_USER"], password=password, connect_timeout=2,
                    allow_reconnect=False, max_reconnect_attempts=0, error_cb=on_error,
                    inbox_prefix=cenv.get("CHUTE_NATS_INBOX_PREFIX", "_INBOX")), 5)
                if svc == "query-api":
                    await client.publish("events.0", b"forged")
                    await client.flush(timeout=2)
                    deadline = time.monotonic() + 5
                    while not any("permissions violation" in e.lower() and "events.0" in e for e in errors):
                        assert time.monotonic() < deadline, f"forged publish not refused: {errors}"
                        await asyncio.sleep(0.05)
                else:
                    await client.flush(timeout=2)
                    assert not errors, (svc, errors)
                await client.close()
            with pytest.raises((NatsError, OSError, asyncio.TimeoutError)):
                async def ignore(err):
                    pass
                await asyncio.wait_for(nats.connect(
                    url, user="chute-ingestor", password="not-the-generated-one", connect_timeout=2,
                    allow_reconnect=False, max_reconnect_attempts=0, error_cb=ignore), 5)

        asyncio.run(check())
    finally:
        server.kill()
        server.wait(timeout=10)


def test_bundled_nats_with_insecure_or_own_secret_renders_once_told():
    docs = render({"insecure": True, "nats": {"enabled": True, "config": {"merge": {"authorization": None}},
                                              "container": {"env": None}}, "jetstream": {"url": ""}})
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == "chute-nats-auth"]
    docs = render({"nats": {"enabled": True, "chuteAuthSecret": "mine"},
                   "jetstream": {"url": "", "auth": {"existingSecret": "mine"}}})
    pod, c = container_of(docs, "Deployment", "chute-ingestor")
    assert {"name": "nats-auth", "secret": {"secretName": "mine", "items": [{"key": "ingestor", "path": "credential"}]}} in pod["volumes"]


def test_service_monitor_scrapes_the_query_api_over_tls():
    tls_config = {"ca": {"secret": {"name": "chute-tls", "key": "ca.crt"}}, "serverName": "chute-query-api.chute.svc"}
    docs = render({"tls": {"enabled": True, "existingSecret": "chute-tls"},
                   "metrics": {"serviceMonitor": {"enabled": True, "queryApiTlsConfig": tls_config}}})
    (endpoint,) = one(docs, "ServiceMonitor", "chute-query-api")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == tls_config
    (endpoint,) = one(docs, "ServiceMonitor", "chute-ingestor")["spec"]["endpoints"]
    assert "scheme" not in endpoint  # the ingestor's admin port stays plain HTTP


# ---------------------------------------------------------------------------------------------
# The router (issue 17): one replica, replaced with Recreate (alert windows are in memory), its
# own NATS user, the query API's read-only ClickHouse user, rules from a ConfigMap.
# ---------------------------------------------------------------------------------------------


def router_binary() -> str:
    for profile in ("debug", "release"):
        path = CHART.parents[1] / "target" / profile / "router"
        if path.is_file():
            return str(path)
    pytest.fail("no target/{debug,release}/router: cargo build -p chute-router", pytrace=False)


def router_check(rules_text: str, tmp_path, env: dict | None = None):
    """`router check` (the real binary) on a rules file with this text."""
    import os
    import subprocess

    path = tmp_path / "rules.yaml"
    path.write_text(rules_text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHUTE_")}
    return subprocess.run([router_binary(), "check", "--rules-file", str(path)], env=clean | (env or {}),
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode", ["default", "cluster"])
def test_router_is_one_replica_replaced_with_recreate(mode, default_docs, cluster_docs, tmp_path):
    docs = default_docs if mode == "default" else cluster_docs
    deploy = one(docs, "Deployment", "chute-router")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PodDisruptionBudget", "chute-router") not in kinds
    assert ("HorizontalPodAutoscaler", "chute-router") not in kinds
    pod, c = container_of(docs, "Deployment", "chute-router")
    assert c["image"].endswith("/chute-router:0.1.0")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CHUTE_ROUTER_ADMIN_LISTEN"] == "0.0.0.0:7430"
    assert env["CHUTE_ROUTER_CONSUMER"] == "chute-router"
    # Its streams and bucket follow the EVENTS stream's replicas (R3 in cluster mode).
    assert env["CHUTE_ROUTER_REPLICAS"] == ("3" if mode == "cluster" else "1")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The rules file: the ConfigMap's, where CHUTE_ROUTER_RULES_FILE points; by default no rules,
    # which the real router accepts.
    rules_path = env["CHUTE_ROUTER_RULES_FILE"]
    mount = next(m for m in c["volumeMounts"] if rules_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    text = cm["data"][rules_path.rsplit("/", 1)[1]]
    assert yaml.safe_load(text) == {"rules": []}
    done = router_check(text, tmp_path)
    assert done.returncode == 0 and "0 rules" in done.stdout, done.stdout + done.stderr
    # Metrics Service with the alert rules' job name.
    svc = one(docs, "Service", "chute-router")
    assert svc["metadata"]["labels"]["chute.dev/job"] == "chute-router"
    assert svc["spec"]["ports"][0]["port"] == 7430


def test_router_secure_wiring(default_docs):
    pod, c = container_of(default_docs, "Deployment", "chute-router")
    env = {e["name"]: e.get("value") for e in c["env"]}
    # Its own NATS user and inbox, its credential only.
    assert env["CHUTE_NATS_USER"] == "chute-router"
    assert env["CHUTE_NATS_INBOX_PREFIX"] == "_INBOX_router"
    assert {"name": "nats-auth", "secret": {"secretName": "chute-nats-auth", "items": [
        {"key": "router", "path": "credential"}]}} in pod["volumes"]
    assert len(secret_value(default_docs, "chute-nats-auth", "router")) == 32
    # Reads ClickHouse with the query API's read-only user; takes no API keys (serves no API).
    assert env["CHUTE_CLICKHOUSE_USER"] == "chute_query"
    assert "CHUTE_API_KEYS_FILE" not in env
    assert not any(v["name"] == "api-keys" for v in pod["volumes"])
    # NetworkPolicy: ingress on the metrics port only; egress DNS, NATS, ClickHouse and webhooks.
    policy = one(default_docs, "NetworkPolicy", "chute-router")["spec"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [7430]
    egress_ports = [{p["port"] for p in rule["ports"]} for rule in policy["egress"]]
    assert egress_ports == [{53}, {4222}, {8123}, {443, 80}]


def test_router_rules_and_webhook_secrets_from_values(tmp_path):
    rules = (DEPLOY / "rules.example.yaml").read_text()
    docs = render({"router": {"rules": rules, "webhookSecret": "chute-webhooks",
                              "webhookEgress": [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
                                                 "ports": [{"port": 8443, "protocol": "TCP"}]}]}})
    validate_k8s(docs)
    pod, c = container_of(docs, "Deployment", "chute-router")
    assert one(docs, "ConfigMap", "chute-router-rules")["data"]["rules.yaml"] == rules
    # Secret keys as variables (for secret_env) and as files (for secret_file).
    assert {"secretRef": {"name": "chute-webhooks"}} in c["envFrom"]
    assert {"name": "webhook-secrets", "secret": {"secretName": "chute-webhooks"}} in pod["volumes"]
    # The real router accepts the rendered file once the Secret's variable is set, and refuses
    # it, naming the variable, without.
    text = one(docs, "ConfigMap", "chute-router-rules")["data"]["rules.yaml"]
    assert router_check(text, tmp_path, {"CHUTE_WEBHOOK_OPS_SECRET": "s"}).returncode == 0
    refused = router_check(text, tmp_path)
    assert refused.returncode != 0 and "CHUTE_WEBHOOK_OPS_SECRET" in refused.stdout + refused.stderr
    policy = one(docs, "NetworkPolicy", "chute-router")["spec"]
    assert policy["egress"][-1] == {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
                                    "ports": [{"port": 8443, "protocol": "TCP"}]}
    # An existing ConfigMap instead of the chart's.
    docs = render({"router": {"existingRulesConfigMap": "my-rules"}})
    pod, _ = container_of(docs, "Deployment", "chute-router")
    assert next(v for v in pod["volumes"] if v["name"] == "rules")["configMap"]["name"] == "my-rules"
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == "chute-router-rules" for d in docs)


def test_router_can_be_turned_off():
    docs = render({"router": {"enabled": False}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert not [d for d in docs if "router" in d["metadata"]["name"]]
    assert security_problems(docs) == []
    docs = render({"router": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert one(docs, "ServiceMonitor", "chute-router")["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize(("values", "message"), [
    ({"router": {"start": "middle"}}, "start"),
    ({"router": {"rules": ""}}, "rules"),
    ({"router": {"replicas": 2}}, "replicas"),
])
def test_router_values_are_checked_by_the_schema(values, message):
    with pytest.raises(Exception, match=message):
        render(values)

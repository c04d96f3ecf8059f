"""docker-compose.yml and the Dockerfile, checked by reading (no Docker engine on CI machines):
official images, Dockerfile targets that exist, non-root read-only services, and only
environment variables the services define."""

from __future__ import annotations

import re

import yaml

from conftest import DEPLOY, by_kind

# CHUTE_* variables the services read: every `env = "CHUTE_..."` of their clap flags (the
# services' own crates and the shared ones), so a new flag is known as soon as it exists.
SERVICE_CRATES = ("ingestor", "aggregator", "query-api", "router", "common", "schema")
KNOWN_ENV = {
    name
    for crate in SERVICE_CRATES
    for source in (DEPLOY.parent / crate / "src").rglob("*.rs")
    for name in re.findall(r'env = "(CHUTE_[A-Z0-9_]+)"', source.read_text())
}
# Variables that only configure Grafana's provisioning files, not a Chute service.
GRAFANA_ENV = {"CHUTE_PROMETHEUS_URL", "CHUTE_CLICKHOUSE_HOST", "CHUTE_CLICKHOUSE_PORT"}

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def test_official_images_for_nats_and_clickhouse():
    services = COMPOSE["services"]
    assert services["nats"]["image"].startswith("nats:")
    assert "--jetstream" in services["nats"]["command"]
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["grafana"]["environment"]["GF_INSTALL_PLUGINS"] == "grafana-clickhouse-datasource"


def test_service_builds_use_existing_dockerfile_targets():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, re.M))
    assert {"ingestor", "aggregator", "query-api", "router"} <= targets
    for name in ("ingestor", "aggregator", "query-api", "router", "migrate"):
        svc = COMPOSE["services"][name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["build"]["target"] in targets
        assert svc["read_only"] is True and svc["user"] == "65532:65532"
        assert svc["cap_drop"] == ["ALL"]
    assert COMPOSE["services"]["migrate"]["command"][0] == "migrate"
    for name in ("aggregator", "query-api", "router"):
        assert COMPOSE["services"][name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_dockerfile_images_are_small_and_non_root():
    assert "distroless/cc-debian12:nonroot" in DOCKERFILE
    assert "USER 65532:65532" in DOCKERFILE
    assert "cargo build --release --locked -p chute-ingestor -p chute-aggregator -p chute-query-api -p chute-router" in DOCKERFILE
    for binary in ("ingestor", "aggregator", "query-api", "router"):
        assert f'ENTRYPOINT ["/usr/local/bin/{binary}"]' in DOCKERFILE


def test_known_variables_come_from_the_services_flags():
    assert {"CHUTE_NATS_URL", "CHUTE_CLICKHOUSE_URL", "CHUTE_LEDGER_REPLICAS", "CHUTE_OTLP_HTTP_LISTEN",
            "CHUTE_ROUTER_RULES_FILE"} <= KNOWN_ENV
    assert "CHUTE_NO_SUCH_FLAG" not in KNOWN_ENV


def test_only_known_environment_variables(default_docs, cluster_docs):
    used = set()
    for svc in COMPOSE["services"].values():
        used |= {k for k in (svc.get("environment") or {}) if k.startswith("CHUTE_")}
    used |= set(re.findall(r"\b(CHUTE_[A-Z_]+)=", DOCKERFILE))
    for docs in (default_docs, cluster_docs):
        for cm in by_kind(docs, "ConfigMap"):
            if not cm["metadata"]["name"].endswith("-rules"):  # the router's rules file, not env
                used |= set(cm["data"])
        for d in docs:
            if d["kind"] in ("Deployment", "Job"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    used |= {e["name"] for e in c.get("env", [])}
    unknown = used - KNOWN_ENV - GRAFANA_ENV - webhook_secret_variables()
    assert not unknown, unknown


def webhook_secret_variables() -> set[str]:
    """Variables the example rules file names as webhook secrets (`secret_env`)."""
    rules = yaml.safe_load((DEPLOY / "rules.example.yaml").read_text())
    return {hook["secret_env"] for hook in rules["webhooks"].values() if "secret_env" in hook}


def test_compose_router_runs_the_example_rules_with_their_secret():
    """The router mounts deploy/rules.example.yaml where CHUTE_ROUTER_RULES_FILE points and sets
    every secret variable the file names (else the router refuses the file at start)."""
    router = COMPOSE["services"]["router"]
    env = router["environment"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in router["volumes"]}
    assert mounts[env["CHUTE_ROUTER_RULES_FILE"]] == "./rules.example.yaml"
    assert webhook_secret_variables() and webhook_secret_variables() <= set(env)
    assert env["CHUTE_ROUTER_ADMIN_LISTEN"].endswith(":7430") and "7430:7430" in router["ports"]
    assert "replicas" not in str(router.get("deploy", {})), "one router only (alert windows are in memory)"


def test_example_rules_file_is_valid_for_the_router(tmp_path):
    """`router check` (the real binary) accepts deploy/rules.example.yaml with its secret set,
    and names the missing variable without it."""
    import os
    import subprocess

    router = next((p for p in (DEPLOY.parent / "target" / profile / "router" for profile in ("debug", "release"))
                   if p.is_file()), None)
    assert router, "no target/{debug,release}/router: cargo build -p chute-router"
    rules = DEPLOY / "rules.example.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUTE_")}
    secrets = {name: "example-secret" for name in webhook_secret_variables()}
    done = subprocess.run([str(router), "check", "--rules-file", str(rules)], env=env | secrets,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 rules" in done.stdout and "low_quality (route" in done.stdout, done.stdout
    assert "slow_p99 (threshold" in done.stdout and "traffic (anomaly" in done.stdout, done.stdout
    refused = subprocess.run([str(router), "check", "--rules-file", str(rules)], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "CHUTE_WEBHOOK_OPS_SECRET" in refused.stdout + refused.stderr

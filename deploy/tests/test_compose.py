"""docker-compose.yml and the Dockerfile, checked by reading (no Docker engine on CI machines):
official images, Dockerfile targets that exist, non-root read-only services, and only
environment variables the services define."""

from __future__ import annotations

import re

import yaml

from conftest import DEPLOY, by_kind

# CHUTE_* variables the services read: every `env = "CHUTE_..."` of their clap flags (the
# services' own crates and the shared ones), so a new flag is known as soon as it exists.
SERVICE_CRATES = ("ingestor", "aggregator", "query-api", "common", "schema")
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
    assert {"ingestor", "aggregator", "query-api"} <= targets
    for name in ("ingestor", "aggregator", "query-api", "migrate"):
        svc = COMPOSE["services"][name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["build"]["target"] in targets
        assert svc["read_only"] is True and svc["user"] == "65532:65532"
        assert svc["cap_drop"] == ["ALL"]
    assert COMPOSE["services"]["migrate"]["command"][0] == "migrate"
    for name in ("aggregator", "query-api"):
        assert COMPOSE["services"][name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_dockerfile_images_are_small_and_non_root():
    assert "distroless/cc-debian12:nonroot" in DOCKERFILE
    assert "USER 65532:65532" in DOCKERFILE
    assert "cargo build --release --locked -p chute-ingestor -p chute-aggregator -p chute-query-api" in DOCKERFILE
    for binary in ("ingestor", "aggregator", "query-api"):
        assert f'ENTRYPOINT ["/usr/local/bin/{binary}"]' in DOCKERFILE


def test_known_variables_come_from_the_services_flags():
    assert {"CHUTE_NATS_URL", "CHUTE_CLICKHOUSE_URL", "CHUTE_LEDGER_REPLICAS", "CHUTE_OTLP_HTTP_LISTEN"} <= KNOWN_ENV
    assert "CHUTE_NO_SUCH_FLAG" not in KNOWN_ENV


def test_only_known_environment_variables(default_docs, cluster_docs):
    used = set()
    for svc in COMPOSE["services"].values():
        used |= {k for k in (svc.get("environment") or {}) if k.startswith("CHUTE_")}
    used |= set(re.findall(r"\b(CHUTE_[A-Z_]+)=", DOCKERFILE))
    for docs in (default_docs, cluster_docs):
        for cm in by_kind(docs, "ConfigMap"):
            used |= set(cm["data"])
        for d in docs:
            if d["kind"] in ("Deployment", "Job"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    used |= {e["name"] for e in c.get("env", [])}
    unknown = used - KNOWN_ENV - GRAFANA_ENV
    assert not unknown, unknown

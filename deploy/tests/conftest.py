"""Shared helpers for the deploy tests: chart rendering with real Helm (helm-python-sdk), and
the fixed list of metric names the services export.

Every tool is imported or looked up eagerly: a missing tool fails the test run with a message
saying how to install it, never a silent skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "chute"
CLUSTER_VALUES = CHART / "ci" / "cluster-values.yaml"
RELEASE = "chute"
NAMESPACE = "chute"

# Kubernetes versions the rendered manifests are validated against (kubernetes-validate ships
# their schemas offline): the oldest the chart supports (kubeVersion >= 1.27) and a current one.
K8S_VERSIONS = ("1.27.0", "1.33.0")

# Custom resources: kubernetes-validate has no schema for CRDs, so these kinds are checked by
# the structural tests in test_helm.py instead of against an OpenAPI schema.
CRD_KINDS = {
    "ServiceMonitor",  # monitoring.coreos.com/v1
    "PrometheusRule",  # monitoring.coreos.com/v1
    "ScaledObject",  # keda.sh/v1alpha1
    "ClickHouseInstallation",  # clickhouse.altinity.com/v1
    "ClickHouseKeeperInstallation",  # clickhouse-keeper.altinity.com/v1
}

# Metric names exported by the services (fixed contract; see README "Metrics").
COUNTERS_GAUGES = {
    # ingestor
    "chute_ingest_requests_total",
    "chute_ingest_events_accepted_total",
    "chute_ingest_events_rejected_total",
    "chute_ingest_published_messages_total",
    "chute_ingest_duplicate_messages_total",
    "chute_ingest_publish_errors_total",
    "chute_ingest_inflight_publishes",
    # aggregator
    "chute_aggregator_partition_pending",
    "chute_aggregator_owned_partitions",
    "chute_aggregator_insert_retries_total",
    "chute_aggregator_insert_errors_total",
    "chute_aggregator_events_inserted_total",
    "chute_aggregator_dlq_messages_total",
    "chute_aggregator_dlq_size",
    "chute_aggregator_lease_takeovers_total",
    "chute_aggregator_stream_bytes",
    "chute_aggregator_stream_messages",
    "chute_aggregator_stream_max_bytes",
    "chute_aggregator_stream_trimmed_bytes_total",
    "chute_aggregator_stream_trimmed_messages_total",
    "chute_aggregator_partition_stalled",
    "chute_aggregator_events_lost_total",
    "chute_aggregator_replay_duplicates_total",
    "chute_aggregator_out_of_order_total",
    # query-api
    "chute_query_requests_total",
    "chute_query_cache_hits_total",
    "chute_query_cache_misses_total",
    "chute_query_cache_evictions_total",
    "chute_query_cache_bytes",
    "chute_query_clickhouse_queries_total",
    "chute_query_stream_subscribers",
    "chute_query_stream_events_total",
}
HISTOGRAMS = {
    "chute_ingest_request_duration_seconds",
    "chute_ingest_publish_duration_seconds",
    "chute_aggregator_batch_rows",
    "chute_aggregator_batch_bytes",
    "chute_aggregator_insert_duration_seconds",
    "chute_aggregator_ingest_to_insert_seconds",
    "chute_query_request_duration_seconds",
    "chute_query_clickhouse_duration_seconds",
}


# The router's (issue 17) metrics used by alerts.yml. test_metrics_exported.py runs the router in
# its pipeline and checks them (type, a sample) like the sets above.
ROUTER_COUNTERS_GAUGES = {
    "chute_router_webhook_attempts_total",
    "chute_router_webhook_failures_total",
    "chute_router_webhook_dead_lettered_total",
    "chute_router_webhook_in_flight",
    "chute_router_webhook_dlq_size",
    # the router's own (router/src/telemetry.rs, window.rs), used by its alerts
    "chute_router_rules_reload_failures_total",
    "chute_router_pending_messages",
    "chute_router_series_dropped_total",
}
ROUTER_HISTOGRAMS = {
    "chute_router_webhook_delivery_seconds",
}


def helm():
    try:
        import helm_python
    except ImportError as err:  # pragma: no cover - environment problem
        pytest.fail(
            f"helm-python-sdk is not installed ({err}): "
            ".venv/bin/pip install -r deploy/requirements.txt",
            pytrace=False,
        )
    return helm_python


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: {hint}", pytrace=False)
    return path


def render(values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Renders the chart with real Helm (as `helm template`, no cluster) and returns every
    manifest document as a dict, each tagged with `__source__` (the template path)."""
    h = helm()
    with h.Chart.load(CHART) as chart:
        rendered = chart.render(values=values or {}, name=name, namespace=namespace, is_install=True)
    docs = []
    for source, text in sorted(rendered.items()):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = source
                docs.append(doc)
    return docs


def cluster_values() -> dict:
    return yaml.safe_load(CLUSTER_VALUES.read_text())


@pytest.fixture(scope="session")
def default_docs() -> list[dict]:
    return render()


@pytest.fixture(scope="session")
def cluster_docs() -> list[dict]:
    return render(cluster_values())


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]

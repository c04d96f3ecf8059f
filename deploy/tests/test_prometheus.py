"""Alert rules and scrape config with the real promtool (Debian package `prometheus`), and the
metric names used by alerts and dashboards against the services' fixed metric list.

The fixed list is the contract in conftest.py; a test that scrapes the running services is
still to be added by the service owners (see deploy/README.md).
"""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from conftest import COUNTERS_GAUGES, DEPLOY, HISTOGRAMS, ROUTER_COUNTERS_GAUGES, ROUTER_HISTOGRAMS, require_binary

PROM = DEPLOY / "prometheus"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
METRIC = re.compile(r"\bchute_[a-z0-9_]+\b")


def promtool(*args: str) -> str:
    binary = require_binary("promtool", "apt-get install -y prometheus (Debian package ships promtool)")
    proc = subprocess.run([binary, *args], cwd=PROM, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_check_rules():
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out


def test_promtool_rule_unit_tests():
    """alerts_test.yml feeds series to every alert and checks when it fires (and when not)."""
    out = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    required = {
        "ChuteIngestLatencyAboveSLO", "ChuteConsumerLagGrowing", "ChuteDeadLetterQueueGrowing",
        "ChuteInsertErrors", "ChuteServiceDown", "ChuteQueryCacheHitRateCollapse",
        "ChuteEventsStreamNearlyFull", "ChuteWebhookDestinationFailing", "ChuteWebhookDeadLetters",
        "ChuteRouterRulesRefused", "ChuteRouterLagging", "ChuteRouterSeriesDropped",
    }
    assert required <= tested


def test_promtool_check_config():
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_alerts_cover_the_issue():
    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    slo = rules["ChuteIngestLatencyAboveSLO"]
    assert "0.99" in slo["expr"] and "> 0.010" in slo["expr"] and slo["for"] == "5m"
    assert "up{" in rules["ChuteServiceDown"]["expr"]
    for r in rules.values():
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def used_metric_names() -> dict[str, set[str]]:
    """Every chute_* name in alert expressions and dashboard queries, by file."""
    used: dict[str, set[str]] = {}
    for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            used.setdefault("alerts.yml", set()).update(METRIC.findall(rule["expr"]))
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                used.setdefault(path.name, set()).update(METRIC.findall(target.get("expr", "")))
    return used


def test_every_metric_name_is_exported():
    unknown = {}
    for source, names in used_metric_names().items():
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in COUNTERS_GAUGES | ROUTER_COUNTERS_GAUGES or (
                base in HISTOGRAMS | ROUTER_HISTOGRAMS and base != name
            ):
                continue
            unknown.setdefault(source, []).append(name)
    assert not unknown, f"metric names not exported by any service: {unknown}"


def test_dashboards_and_alerts_cover_the_key_signals():
    used = set().union(*used_metric_names().values())
    for name in (
        "chute_ingest_events_accepted_total",
        "chute_ingest_request_duration_seconds_bucket",
        "chute_aggregator_partition_pending",
        "chute_aggregator_dlq_size",
        "chute_aggregator_insert_errors_total",
        "chute_aggregator_stream_bytes",
        "chute_aggregator_stream_max_bytes",
        "chute_query_cache_hits_total",
        "chute_query_cache_misses_total",
    ):
        assert name in used, name

"""Grafana provisioning files, and every ClickHouse query of the analytics dashboard (panels and
template variables) run against the local ClickHouse dev server (clickhouse-dev/chserver.py, the
real ClickHouse 26.9 engine) after Grafana's macros are expanded the way the
grafana-clickhouse-datasource plugin (v4) expands them.

The schema is applied from sql/bootstrap.sql + sql/migrations/*.sql rendered for a single node
exactly as schema/src/render.rs renders them (placeholder table in its module docs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import DEPLOY, ROOT

GRAFANA = DEPLOY / "grafana"
ANALYTICS = GRAFANA / "dashboards" / "analytics.json"
PIPELINE = GRAFANA / "dashboards" / "pipeline-health.json"
# The one place the number lives is chute_schema::render::DEDUP_WINDOW; read it from there.
DEDUP_WINDOW = int(
    re.search(
        r"pub const DEDUP_WINDOW: u64 = ([\d_]+);", (ROOT / "schema" / "src" / "render.rs").read_text()
    ).group(1).replace("_", "")
)


# ---------------------------------------------------------------- provisioning files


def test_datasources_provisioning():
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "chute.yaml").read_text())
    ds = {d["uid"]: d for d in doc["datasources"]}
    ch = ds["chute-clickhouse"]
    assert ch["type"] == "grafana-clickhouse-datasource"
    assert ch["jsonData"]["protocol"] == "http"
    assert {"host", "port", "username", "defaultDatabase"} <= set(ch["jsonData"])
    assert "password" in ch["secureJsonData"]
    assert ds["chute-prometheus"]["type"] == "prometheus"


def test_dashboard_provider_points_at_the_compose_mount():
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "chute.yaml").read_text())
    (provider,) = doc["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


@pytest.mark.parametrize("path", [ANALYTICS, PIPELINE], ids=lambda p: p.name)
def test_dashboard_structure(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"].startswith("Chute")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    expected = "chute-clickhouse" if path == ANALYTICS else "chute-prometheus"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == expected
            assert target.get("rawSql" if expected == "chute-clickhouse" else "expr")


def test_pipeline_dashboard_has_the_required_panels():
    titles = " | ".join(p["title"] for p in json.loads(PIPELINE.read_text())["panels"])
    for needle in ("Ingest rate", "Ingest latency", "Consumer lag", "Dead-letter", "Insert errors", "Cache hit rate"):
        assert needle in titles


def test_analytics_queries_read_rollups_not_raw_events():
    dash = json.loads(ANALYTICS.read_text())
    for sql in all_clickhouse_queries(dash).values():
        tables = set(re.findall(r"\bFROM\s+chute\.(\w+)", sql))
        assert tables and tables <= {
            "events_1m_v", "metrics_1m_v", "events_1h_v", "metrics_1h_v", "sessions_v",
            "events_1m", "metrics_1m", "events_1h", "metrics_1h",
        }, (sql, tables)
        # Reading a state table directly must merge the states (or read keys / plain sums only).
        if tables & {"events_1m", "metrics_1m", "events_1h", "metrics_1h"} and re.search(r"_state\b|value_digest", sql):
            assert "Merge(" in sql or "SELECT DISTINCT" in sql, sql


# ---------------------------------------------------------------- macro expansion


def all_clickhouse_queries(dash: dict) -> dict[str, str]:
    queries = {}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            if "rawSql" in target:
                queries[f"panel {panel['title']!r} {target['refId']}"] = target["rawSql"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            queries[f"variable ${var['name']}"] = var["query"]
    return queries


def expand(sql: str, frm: datetime, to: datetime, interval_s: int, variables: dict[str, list[str]]) -> str:
    """Grafana + grafana-clickhouse-datasource v4 expansion (sqlutil macros)."""
    f, t = int(frm.timestamp()), int(to.timestamp())
    fms, tms = int(frm.timestamp() * 1000), int(to.timestamp() * 1000)
    macros = [
        (r"\$__timeFilter_ms\(([^)]+)\)", lambda m: f"{m[1]} >= fromUnixTimestamp64Milli({fms}) AND {m[1]} <= fromUnixTimestamp64Milli({tms})"),
        (r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m[1]} >= toDateTime({f}) AND {m[1]} <= toDateTime({t})"),
        (r"\$__dateFilter\(([^)]+)\)", lambda m: f"{m[1]} >= toDate({f}) AND {m[1]} <= toDate({t})"),
        (r"\$__timeInterval_ms\(([^)]+)\)", lambda m: f"toStartOfInterval(toDateTime64({m[1]}, 3), INTERVAL {interval_s * 1000} millisecond)"),
        (r"\$__timeInterval\(([^)]+)\)", lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)"),
        (r"\$__fromTime_ms\b", lambda m: f"fromUnixTimestamp64Milli({fms})"),
        (r"\$__toTime_ms\b", lambda m: f"fromUnixTimestamp64Milli({tms})"),
        (r"\$__fromTime\b", lambda m: f"toDateTime({f})"),
        (r"\$__toTime\b", lambda m: f"toDateTime({t})"),
        (r"\$__interval_ms\b", lambda m: str(interval_s * 1000)),
        (r"\$__interval_s\b", lambda m: str(interval_s)),
    ]
    for pattern, repl in macros:
        sql = re.sub(pattern, repl, sql)

    def var(m: re.Match) -> str:
        name, fmt = m["name"] or m["bare"], m["fmt"]
        values = variables[name]
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
        if fmt in (None, "raw"):
            return ",".join(values)
        raise AssertionError(f"template variable format {fmt!r} not supported by this test")

    sql = re.sub(r"\$\{(?P<name>\w+)(?::(?P<fmt>\w+))?\}|\$(?P<bare>[A-Za-z]\w*)", var, sql)
    assert "$" not in sql, f"unexpanded macro or variable in:\n{sql}"
    return sql


# ---------------------------------------------------------------- single-node schema rendering


def render_single(sql: str, database: str = "chute") -> list[str]:
    """schema/src/render.rs `render` for Target::single: returns the statements."""
    statements, buf, i, n = [], [], 0, len(sql)
    while i < n:  # strip comments, split on ';' outside strings / quoted identifiers
        c = sql[i]
        if sql.startswith("--", i):
            i = sql.find("\n", i) if "\n" in sql[i:] else n
            continue
        if sql.startswith("/*", i):
            i = sql.index("*/", i) + 2
            continue
        if c in "'`\"":
            j = i + 1
            while sql[j] != c:
                j += 2 if sql[j] == "\\" else 1
            buf.append(sql[i : j + 1])
            i = j + 1
            continue
        if c == ";":
            statements.append("".join(buf).strip())
            buf = []
        else:
            buf.append(c)
        i += 1
    assert not "".join(buf).strip(), "statement without a terminating ';'"

    def placeholder(m: re.Match) -> str:
        key, arg = m[1], m[2]
        if key == "db":
            return database
        if key == "on_cluster":
            return ""
        if key in ("local", "engine", "global_engine"):
            return arg
        if key == "dedup_window":
            return f"non_replicated_deduplication_window = {DEDUP_WINDOW}"
        raise AssertionError(f"unknown or cluster-only placeholder {{{{{key}}}}}")

    out = []
    for stmt in statements:
        if stmt.startswith("{{cluster_only}}"):
            continue
        assert "{{cluster_only}}" not in stmt
        out.append(re.sub(r"\{\{(\w+)(?::(.*?))?\}\}", placeholder, stmt))
    return [s for s in out if s]


def test_single_node_rendering_matches_golden_when_present():
    golden = ROOT / "sql" / "golden" / "single"
    if not golden.is_dir():  # golden files are optional; the ClickHouse test below is the check
        return
    for path in sorted((ROOT / "sql" / "migrations").glob("*.sql")):
        expected = golden / path.name
        if expected.exists():
            norm = lambda stmts: [re.sub(r"\s+", " ", s).strip() for s in stmts]
            assert norm(render_single(path.read_text())) == norm(render_single(expected.read_text())), path.name


# ---------------------------------------------------------------- ClickHouse dev server


class ClickHouse:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/"

    def query(self, sql: str, **params) -> str:
        url = self.url + "?" + urllib.parse.urlencode(params) if params else self.url
        req = urllib.request.Request(url, data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"ClickHouse error {err.code}: {err.read().decode()}\n--- query:\n{sql}") from None

    def json(self, sql: str) -> dict:
        return json.loads(self.query(sql + "\nFORMAT JSON"))


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    server = ROOT / "clickhouse-dev" / "chserver.py"
    assert server.exists(), f"{server} missing"
    try:
        import chdb  # noqa: F401
    except ImportError:
        pytest.fail("chdb-core is not installed: .venv/bin/pip install -r clickhouse-dev/requirements.txt", pytrace=False)
    work = tmp_path_factory.mktemp("clickhouse")
    ready = work / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(server), "--port", "0", "--ready-file", str(ready),
         "--data-dir", str(work / "data"), "--watch-stdin", "--log-level", "warning"],
        stdin=subprocess.PIPE, stderr=open(work / "server.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"chserver exited with {proc.returncode}: {(work / 'server.log').read_text()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail("chserver did not become ready in 60 s", pytrace=False)
            time.sleep(0.1)
        ch = ClickHouse(int(ready.read_text().strip()))
        for stmt in render_single((ROOT / "sql" / "bootstrap.sql").read_text()):
            ch.query(stmt)
        for path in sorted((ROOT / "sql" / "migrations").glob("*.sql")):
            for stmt in render_single(path.read_text()):
                ch.query(stmt)
        yield ch
    finally:
        proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


NOW = datetime.now(timezone.utc).replace(microsecond=0)


def sample_rows() -> list[dict]:
    rows = []
    for i in range(60):
        t = NOW - timedelta(minutes=i % 50, seconds=i)
        rows.append({
            "tenant": "acme" if i % 6 else "beta",
            "name": "llm.request" if i % 3 else "llm.feedback",
            "time": t.strftime("%Y-%m-%d %H:%M:%S.000"),
            "event_id": f"00000000-0000-7000-8000-{i:012d}",
            "session_id": f"s{i % 7}" if i % 5 else "",
            "user_id": f"u{i % 11}",
            "attributes": {"model": "m1" if i % 2 else "m2"},
            "metrics": {"latency_ms": 100.0 + i * 7, "tokens_in": float(i)},
            "body": "",
            "ingested_at": t.strftime("%Y-%m-%d %H:%M:%S.000"),
        })
    return rows


@pytest.fixture(scope="module")
def loaded(clickhouse):
    body = "\n".join(json.dumps(r) for r in sample_rows())
    clickhouse.query("INSERT INTO chute.events FORMAT JSONEachRow\n" + body)
    assert clickhouse.json("SELECT count() AS n FROM chute.events")["data"][0]["n"] in (60, "60")
    return clickhouse


def test_every_analytics_query_runs_on_clickhouse(loaded):
    dash = json.loads(ANALYTICS.read_text())
    queries = all_clickhouse_queries(dash)
    assert len(queries) >= 10
    variables = {"tenant": ["acme"], "name": ["llm.request", "llm.feedback"], "metric": ["latency_ms"]}
    empty = []
    for label, raw in queries.items():
        # A 6 h dashboard range at a 60 s interval, and a 1 h range at 20 s (Grafana picks
        # intervals below a minute for short ranges).
        for hours, interval_s in ((6, 60), (1, 20)):
            sql = expand(raw, NOW - timedelta(hours=hours), NOW + timedelta(minutes=1), interval_s, variables)
            result = loaded.json(sql)
            if not result["data"]:
                empty.append(label)
    assert not empty, f"queries returned no rows on the sample data: {sorted(set(empty))}"


def test_analytics_values_are_right(loaded):
    """Spot-check numbers against the raw sample data."""
    dash = json.loads(ANALYTICS.read_text())
    panels = {p["title"]: p["targets"][0]["rawSql"] for p in dash["panels"]}
    variables = {"tenant": ["acme"], "name": ["llm.request", "llm.feedback"], "metric": ["latency_ms"]}
    run = lambda title: loaded.json(expand(panels[title], NOW - timedelta(hours=6), NOW + timedelta(minutes=1), 60, variables))["data"]
    rows = [r for r in sample_rows() if r["tenant"] == "acme"]
    assert int(run("Events")[0]["events"]) == len(rows)
    assert int(run("Unique users")[0]["users"]) == len({r["user_id"] for r in rows})
    top = run("Top sessions")
    sessions = {}
    for r in rows:
        if r["session_id"]:
            sessions[r["session_id"]] = sessions.get(r["session_id"], 0) + 1
    assert {s["session_id"]: int(s["events"]) for s in top} == sessions
    assert int(top[0]["events"]) == max(sessions.values())
    per_min = run("Events/min by name")
    assert sum(float(r["events_per_min"]) for r in per_min) == pytest.approx(len(rows))
    p = run("${metric}: p50 / p99 (t-digest merged per interval)")
    assert all(float(r["p50"]) <= float(r["p99"]) for r in p)


def test_router_annotations_describe_anomalies_and_alerts(loaded):
    """The analytics dashboard marks the router's chute.anomaly / chute.alert events on its time axis."""
    t = (NOW - timedelta(minutes=10)).strftime("%Y-%m-%d %H:%M:%S.000")
    base = {"tenant": "ops", "time": t, "session_id": "", "user_id": "", "body": "", "ingested_at": t}
    rows = [
        {**base, "name": "chute.anomaly", "event_id": "00000000-0000-7000-9000-000000000001",
         "attributes": {"rule": "traffic", "series": "rate", "direction": "up", "group": ""},
         "metrics": {"value": 400.0, "expected": 33.0, "z": 51.2}},
        {**base, "name": "chute.alert", "event_id": "00000000-0000-7000-9000-000000000002",
         "attributes": {"rule": "slow_p99", "state": "firing", "alert_id": "a1", "group": "m1"},
         "metrics": {"value": 3010.0, "threshold": 2000.0, "events": 40.0, "window_seconds": 300.0}},
    ]
    loaded.query("INSERT INTO chute.events FORMAT JSONEachRow\n" + "\n".join(json.dumps(r) for r in rows))
    dash = json.loads(ANALYTICS.read_text())
    texts = {}
    for annotation in dash["annotations"]["list"]:
        assert annotation["datasource"]["uid"] == "chute-clickhouse"
        sql = expand(annotation["target"]["rawSql"], NOW - timedelta(hours=6), NOW + timedelta(minutes=1), 60, {"tenant": ["ops"]})
        data = loaded.json(sql)["data"]
        assert len(data) == 1 and {"time", "text", "tags"} <= set(data[0]), (annotation["name"], data)
        texts[annotation["name"]] = data[0]["text"]
    assert texts["Anomalies (router)"] == "anomaly traffic (rate up): 400 against 33 expected, z = 51.2"
    assert texts["Alerts (router)"] == "alert slow_p99 firing (m1): 3010 beyond 2000"

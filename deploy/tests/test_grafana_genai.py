"""The "GenAI usage" dashboard (deploy/grafana/dashboards/genai-usage.json): its structure, and
every ClickHouse query (panels and template variables) run against the ClickHouse dev server on
GenAI events shaped as the ingestor's OTLP mapping writes them, with the numbers checked.

Macro expansion and the schema come from test_grafana.py, so both dashboards are tested alike.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from test_grafana import GRAFANA, NOW, all_clickhouse_queries, clickhouse, expand  # noqa: F401 (fixture)

GENAI = GRAFANA / "dashboards" / "genai-usage.json"
MODELS = [("openai", "gpt-4o-2024-08-06"), ("anthropic", "claude-sonnet-4")]


def genai_rows() -> list[dict]:
    """40 chat spans (as mapped from OTLP) of tenant acme, one of tenant beta, one non-GenAI event."""
    rows = []
    for i in range(40):
        provider, model = MODELS[i % 2]
        t = NOW - timedelta(minutes=i % 30, seconds=i)
        error = i % 10 == 9
        metrics = {
            "duration_ms": 200.0 + 10 * i,
            "gen_ai.usage.input_tokens": float(100 + i),
            "gen_ai.usage.output_tokens": float(10 + i % 7),
            "gen_ai.usage.cache_read.input_tokens": float((i % 3) * 10),
            "cost_usd": 0.001 * (i + 1),
        }
        if i % 2 == 0:
            metrics["time_to_first_token_ms"] = 50.0 + i
        rows.append({
            "tenant": "acme", "name": "chat", "time": t.strftime("%Y-%m-%d %H:%M:%S.000"),
            "event_id": f"00000000-0000-5000-8000-{i:012d}", "session_id": f"conv-{i % 4}", "user_id": "",
            "attributes": {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                "gen_ai.request.model": model.split("-2024")[0], "gen_ai.response.model": model,
                "otel.status_code": "ERROR" if error else "OK",
            },
            "metrics": metrics, "body": "", "ingested_at": t.strftime("%Y-%m-%d %H:%M:%S.000"),
        })
    t = NOW.strftime("%Y-%m-%d %H:%M:%S.000")
    rows.append({**rows[0], "tenant": "beta", "event_id": "00000000-0000-5000-8000-100000000000", "time": t})
    rows.append({**rows[1], "name": "llm.request", "attributes": {"model": "m1"}, "metrics": {"latency_ms": 1.0},
                 "event_id": "00000000-0000-5000-8000-200000000000", "time": t})
    return rows


def acme_chat() -> list[dict]:
    return [r for r in genai_rows() if r["tenant"] == "acme" and r["name"] == "chat"]


@pytest.fixture(scope="module")
def loaded(clickhouse):  # noqa: F811 (the imported fixture)
    body = "\n".join(json.dumps(r) for r in genai_rows())
    clickhouse.query("INSERT INTO chute.events FORMAT JSONEachRow\n" + body)
    # Sent twice: the raw breakdowns read FINAL, so the repeat (same event ids) collapses there.
    clickhouse.query("INSERT INTO chute.events FORMAT JSONEachRow\n" + "\n".join(json.dumps(r) for r in genai_rows()[:5]))
    return clickhouse


VARIABLES = {"tenant": ["acme"], "model": [m for _, m in MODELS]}


def run(ch, sql: str, hours: int = 6, interval_s: int = 60) -> list[dict]:
    return ch.json(expand(sql, NOW - timedelta(hours=hours), NOW + timedelta(minutes=1), interval_s, VARIABLES))["data"]


def panels() -> dict[str, str]:
    dash = json.loads(GENAI.read_text())
    return {p["title"]: p["targets"][0]["rawSql"] for p in dash["panels"]}


def test_genai_dashboard_structure():
    dash = json.loads(GENAI.read_text())
    assert dash["uid"] == "chute-genai" and dash["title"] == "Chute / GenAI usage"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needle in ("Input tokens", "Output tokens", "Cost", "Error rate", "Latency p50 / p99",
                   "Time to first token", "By model and provider", "Top conversations"):
        assert needle in titles, needle
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "chute-clickhouse", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "chute-clickhouse"
            assert "tenant = '$tenant'" in target["rawSql"], panel["title"]


def test_every_genai_query_runs_and_returns_rows(loaded):
    dash = json.loads(GENAI.read_text())
    queries = all_clickhouse_queries(dash)
    assert len(queries) >= 12
    empty = []
    for label, raw in queries.items():
        for hours, interval_s in ((6, 60), (1, 20)):
            if not run(loaded, raw, hours, interval_s):
                empty.append(label)
    assert not empty, f"queries returned no rows on the sample data: {sorted(set(empty))}"


def test_genai_numbers_are_right(loaded):
    p = panels()
    rows = acme_chat()
    total = lambda key: sum(r["metrics"].get(key, 0.0) for r in rows)
    # Rollup totals count the 5 rows inserted twice again (they are separate inserts without a
    # dedup token here); the raw breakdowns (FINAL) do not.
    repeated = lambda key: sum(r["metrics"].get(key, 0.0) for r in genai_rows()[:5] if r["tenant"] == "acme")
    assert float(run(loaded, p["Input tokens"])[0]["input_tokens"]) == pytest.approx(
        total("gen_ai.usage.input_tokens") + repeated("gen_ai.usage.input_tokens"))
    assert float(run(loaded, p["Cost (USD)"])[0]["cost_usd"]) == pytest.approx(total("cost_usd") + repeated("cost_usd"))
    assert int(run(loaded, p["Calls"])[0]["calls"]) == len(rows)
    errors = sum(r["attributes"]["otel.status_code"] == "ERROR" for r in rows)
    assert float(run(loaded, p["Error rate"])[0]["error_rate"]) == pytest.approx(errors / len(rows))

    table = {r["model"]: r for r in run(loaded, p["By model and provider"])}
    assert set(table) == {m for _, m in MODELS}
    for provider, model in MODELS:
        mine = [r for r in rows if r["attributes"]["gen_ai.response.model"] == model]
        row = table[model]
        assert row["provider"] == provider
        assert int(row["calls"]) == len(mine)
        assert float(row["input_tokens"]) == pytest.approx(sum(r["metrics"]["gen_ai.usage.input_tokens"] for r in mine))
        assert float(row["cost_usd"]) == pytest.approx(sum(r["metrics"]["cost_usd"] for r in mine))
        assert float(row["latency_p50_ms"]) <= float(row["latency_p99_ms"])

    top = run(loaded, p["Top conversations"])
    expected = {}
    for r in rows:
        expected[r["session_id"]] = expected.get(r["session_id"], 0) + 1
    assert {t["conversation"]: int(t["calls"]) for t in top} == expected
    assert [float(t["tokens"]) for t in top] == sorted((float(t["tokens"]) for t in top), reverse=True)

    models = {r["model"] for r in run(loaded, json.loads(GENAI.read_text())["templating"]["list"][1]["query"])}
    assert models == {m for _, m in MODELS}, "the model variable lists GenAI models only"

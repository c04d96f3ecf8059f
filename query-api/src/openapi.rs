//! `GET /openapi.json`: the OpenAPI 3.1 description of the query API.

use serde_json::{json, Value};

fn parameter(name: &str, description: &str, required: bool) -> Value {
    json!({ "name": name, "in": "query", "required": required,
            "description": description, "schema": { "type": "string" } })
}

fn common(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|name| match *name {
            "tenant" => parameter("tenant", "Tenant ([a-z0-9_-]{1,64}). Required without API keys; with a key it must be the key's tenant (403 otherwise) and defaults to it.", false),
            "name" => parameter("name", "Event name filter ([A-Za-z0-9_.:-]{1,128}).", false),
            "metric" => parameter("metric", "Metric key ([A-Za-z0-9_.:-]{1,128}); required for sum, min, max, avg, p50, p90, p99.", false),
            "agg" => parameter("agg", "count (default), sum, min, max, avg, p50, p90, p99, uniq_users, uniq_sessions.", false),
            "from" => parameter("from", "Start, RFC 3339 or unix ms (default: one hour before `to`).", false),
            "to" => parameter("to", "End (exclusive), RFC 3339 or unix ms (default: now).", false),
            "limit" => parameter("limit", "Most rows (1..max result rows).", false),
            other => parameter(other, "", false),
        })
        .collect()
}

fn get(summary: &str, parameters: Vec<Value>, example: Value) -> Value {
    json!({ "get": {
        "summary": summary,
        "parameters": parameters,
        "security": [{ "bearer": [] }, {}],
        "responses": {
            "200": { "description": "OK (with Cache-Control and ETag)", "content": { "application/json": { "example": example } } },
            "304": { "description": "Not modified (If-None-Match matched the ETag)" },
            "400": { "$ref": "#/components/responses/Error" },
            "401": { "$ref": "#/components/responses/Error" },
            "403": { "$ref": "#/components/responses/Error" },
            "502": { "$ref": "#/components/responses/Error" },
            "503": { "description": "Every ClickHouse query slot and the queue are taken: retry after the Retry-After seconds",
                     "headers": { "Retry-After": { "schema": { "type": "integer" } } },
                     "content": { "application/json": { "schema": { "type": "object", "required": ["error"],
                         "properties": { "error": { "type": "string" } } } } } },
            "504": { "$ref": "#/components/responses/Error" }
        }
    }})
}

pub fn document() -> Value {
    let mut timeseries = common(&["tenant", "name", "metric", "agg", "from", "to"]);
    timeseries.push(parameter("step", "Bucket: 1m (default), 5m, 15m, 1h, 1d.", false));
    timeseries.push(parameter("window", "sliding:<duration>: each point aggregates the window ending at the end of its bucket; a whole number of steps.", false));
    let mut top = common(&["tenant", "name", "metric", "agg", "from", "to", "limit"]);
    top.insert(
        1,
        parameter(
            "by",
            "name (default, from rollups), user, session or attribute:<key> (raw events).",
            false,
        ),
    );
    let mut sessions = common(&["tenant", "from", "to", "limit"]);
    sessions.push(parameter(
        "min_events",
        "Only sessions with at least this many events.",
        false,
    ));
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Chute query API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": { "Error": { "description": "Error", "content": { "application/json": {
                "schema": { "type": "object", "required": ["error"], "properties": {
                    "error": { "type": "string" }, "parameter": { "type": "string" } } } } } } }
        },
        "paths": {
            "/v1/timeseries": get("Time series over the minute/hour rollups, tumbling or sliding", timeseries,
                json!({"points": [{"t": "2025-01-31T12:00:00Z", "value": 42.0}], "source": "rollup_1m",
                       "from": "2025-01-31T12:00:00Z", "to": "2025-01-31T12:01:00Z", "step_seconds": 60, "window_seconds": 60})),
            "/v1/top": get("Top-N names, users, sessions or attribute values", top,
                json!({"items": [{"key": "llm.request", "value": 1234.0}], "source": "rollup_1m"})),
            "/v1/sessions": get("Session windows overlapping the range, newest first", sessions,
                json!({"sessions": [{"session_id": "conv-1", "start": "2025-01-31T12:00:00Z", "end": "2025-01-31T12:05:00Z",
                        "duration_ms": 300000, "events": 12, "users": 1, "metric_sums": {"tokens_in": 3400.0}}]})),
            "/v1/events": get("Raw events, newest first, deduplicated", common(&["tenant", "name", "from", "to", "limit"]),
                json!({"events": [{"event_id": "…", "name": "llm.request", "time": "2025-01-31T12:00:00.123Z"}]})),
            "/v1/stream": { "get": {
                "summary": "Server-Sent Events: `event` (each accepted event), `summary` (every second: count, rate, total), `lagged` (missed count)",
                "parameters": common(&["tenant", "name"]),
                "responses": { "200": { "description": "text/event-stream" },
                               "503": { "$ref": "#/components/responses/Error" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text" } } } },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "ok" } } } },
            "/readyz": { "get": { "summary": "Readiness: ClickHouse answered and NATS is connected", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } }
        }
    })
}

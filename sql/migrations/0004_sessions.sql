-- Session windows: one logical row per (tenant, session_id), built from every event that carries
-- a session id (events without one are skipped). Rows are partial aggregates like the rollups;
-- read through `sessions_v`. Partitioned by the month of the session's first event seen in an
-- insert, so a session spanning a month boundary has a row in each partition until the view
-- merges them at query time.
CREATE TABLE IF NOT EXISTS {{db}}.{{local:sessions}} {{on_cluster}}
(
    tenant      LowCardinality(String),
    session_id  String,
    first_time  SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_time   SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    event_count SimpleAggregateFunction(sum, UInt64),
    users_state AggregateFunction(uniq, String),
    metric_sums AggregateFunction(sumMap, Map(String, Float64))
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(first_time)
ORDER BY (tenant, session_id)
TTL toDateTime(last_time) + INTERVAL 90 DAY
SETTINGS {{dedup_window}};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.sessions_mv {{on_cluster}}
TO {{db}}.{{local:sessions}}
AS SELECT
    tenant,
    session_id,
    min(time) AS first_time,
    max(time) AS last_time,
    count() AS event_count,
    uniqStateIf(user_id, user_id != '') AS users_state,
    sumMapState(CAST(metrics, 'Map(String, Float64)')) AS metric_sums
FROM {{db}}.{{local:events}}
WHERE session_id != ''
GROUP BY tenant, session_id;

{{cluster_only}}
CREATE TABLE IF NOT EXISTS {{db}}.sessions {{on_cluster}} AS {{db}}.sessions_local
ENGINE = Distributed({{cluster}}, {{db}}, sessions_local);

-- Hour rollups, same shape as the minute rollups, kept longer. The views read the raw events
-- table directly rather than cascading from the minute tables: each one aggregates the same
-- insert block, dedups by the same token in the same way, and does not depend on the minute
-- tables' retention or on chained-view semantics. The cost is one more small GROUP BY per insert.

CREATE TABLE IF NOT EXISTS {{db}}.{{local:events_1h}} {{on_cluster}}
(
    tenant         LowCardinality(String),
    name           LowCardinality(String),
    hour           DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    event_count    SimpleAggregateFunction(sum, UInt64),
    users_state    AggregateFunction(uniq, String),
    sessions_state AggregateFunction(uniq, String)
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, name, hour)
TTL hour + INTERVAL 400 DAY
SETTINGS {{dedup_window}};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.events_1h_mv {{on_cluster}}
TO {{db}}.{{local:events_1h}}
AS SELECT
    tenant,
    name,
    toStartOfHour(time) AS hour,
    count() AS event_count,
    uniqStateIf(user_id, user_id != '') AS users_state,
    uniqStateIf(session_id, session_id != '') AS sessions_state
FROM {{db}}.{{local:events}}
GROUP BY tenant, name, hour;

CREATE TABLE IF NOT EXISTS {{db}}.{{local:metrics_1h}} {{on_cluster}}
(
    tenant       LowCardinality(String),
    name         LowCardinality(String),
    metric       LowCardinality(String),
    hour         DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    value_count  SimpleAggregateFunction(sum, UInt64),
    value_sum    SimpleAggregateFunction(sum, Float64),
    value_min    SimpleAggregateFunction(min, Float64),
    value_max    SimpleAggregateFunction(max, Float64),
    value_digest AggregateFunction(quantileTDigest, Float64)
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, name, metric, hour)
TTL hour + INTERVAL 400 DAY
SETTINGS {{dedup_window}};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.metrics_1h_mv {{on_cluster}}
TO {{db}}.{{local:metrics_1h}}
AS SELECT
    tenant,
    name,
    metric,
    toStartOfHour(time) AS hour,
    count() AS value_count,
    sum(value) AS value_sum,
    min(value) AS value_min,
    max(value) AS value_max,
    quantileTDigestState(value) AS value_digest
FROM {{db}}.{{local:events}}
ARRAY JOIN mapKeys(metrics) AS metric, mapValues(metrics) AS value
GROUP BY tenant, name, metric, hour;

{{cluster_only}}
CREATE TABLE IF NOT EXISTS {{db}}.events_1h {{on_cluster}} AS {{db}}.events_1h_local
ENGINE = Distributed({{cluster}}, {{db}}, events_1h_local);

{{cluster_only}}
CREATE TABLE IF NOT EXISTS {{db}}.metrics_1h {{on_cluster}} AS {{db}}.metrics_1h_local
ENGINE = Distributed({{cluster}}, {{db}}, metrics_1h_local);

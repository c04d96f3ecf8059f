-- Minute rollups, fed by materialized views from the raw events table. Each view aggregates the
-- block of one insert, so a rollup row is a partial aggregate: read through the `_v` views (or
-- GROUP BY with -Merge) rather than the tables directly. The dedup window on every target is what
-- makes a repeated insert (same insert_deduplication_token) count once here too.

CREATE TABLE IF NOT EXISTS {{db}}.{{local:events_1m}} {{on_cluster}}
(
    tenant         LowCardinality(String),
    name           LowCardinality(String),
    minute         DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    event_count    SimpleAggregateFunction(sum, UInt64),
    -- Empty user / session ids are not counted as a user / session.
    users_state    AggregateFunction(uniq, String),
    sessions_state AggregateFunction(uniq, String)
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, name, minute)
TTL minute + INTERVAL 90 DAY
SETTINGS {{dedup_window}};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.events_1m_mv {{on_cluster}}
TO {{db}}.{{local:events_1m}}
AS SELECT
    tenant,
    name,
    toStartOfMinute(time) AS minute,
    count() AS event_count,
    uniqStateIf(user_id, user_id != '') AS users_state,
    uniqStateIf(session_id, session_id != '') AS sessions_state
FROM {{db}}.{{local:events}}
GROUP BY tenant, name, minute;

-- One row per (tenant, name, metric, minute) for every key of the `metrics` map. The t-digest
-- state merges over any window, so p50/p90/p99 (or any level) can be read for arbitrary ranges.
CREATE TABLE IF NOT EXISTS {{db}}.{{local:metrics_1m}} {{on_cluster}}
(
    tenant       LowCardinality(String),
    name         LowCardinality(String),
    metric       LowCardinality(String),
    minute       DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    value_count  SimpleAggregateFunction(sum, UInt64),
    value_sum    SimpleAggregateFunction(sum, Float64),
    value_min    SimpleAggregateFunction(min, Float64),
    value_max    SimpleAggregateFunction(max, Float64),
    value_digest AggregateFunction(quantileTDigest, Float64)
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, name, metric, minute)
TTL minute + INTERVAL 90 DAY
SETTINGS {{dedup_window}};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.metrics_1m_mv {{on_cluster}}
TO {{db}}.{{local:metrics_1m}}
AS SELECT
    tenant,
    name,
    metric,
    toStartOfMinute(time) AS minute,
    count() AS value_count,
    sum(value) AS value_sum,
    min(value) AS value_min,
    max(value) AS value_max,
    quantileTDigestState(value) AS value_digest
FROM {{db}}.{{local:events}}
ARRAY JOIN mapKeys(metrics) AS metric, mapValues(metrics) AS value
GROUP BY tenant, name, metric, minute;

{{cluster_only}}
CREATE TABLE IF NOT EXISTS {{db}}.events_1m {{on_cluster}} AS {{db}}.events_1m_local
ENGINE = Distributed({{cluster}}, {{db}}, events_1m_local);

{{cluster_only}}
CREATE TABLE IF NOT EXISTS {{db}}.metrics_1m {{on_cluster}} AS {{db}}.metrics_1m_local
ENGINE = Distributed({{cluster}}, {{db}}, metrics_1m_local);

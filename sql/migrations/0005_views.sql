-- Finalized views for Grafana and humans: one row per group with plain numbers. Filters on the
-- group keys (tenant, name, metric, minute/hour, session_id) are pushed into the scan of the
-- rollup table. `quantiles` is the t-digest estimate (Float32 precision) behind p50/p90/p99.
-- In cluster mode they read the Distributed tables, so they see every shard.

CREATE VIEW IF NOT EXISTS {{db}}.events_1m_v {{on_cluster}} AS
SELECT
    tenant,
    name,
    minute,
    sum(event_count) AS events,
    uniqMerge(users_state) AS users,
    uniqMerge(sessions_state) AS sessions
FROM {{db}}.events_1m
GROUP BY tenant, name, minute;

CREATE VIEW IF NOT EXISTS {{db}}.events_1h_v {{on_cluster}} AS
SELECT
    tenant,
    name,
    hour,
    sum(event_count) AS events,
    uniqMerge(users_state) AS users,
    uniqMerge(sessions_state) AS sessions
FROM {{db}}.events_1h
GROUP BY tenant, name, hour;

CREATE VIEW IF NOT EXISTS {{db}}.metrics_1m_v {{on_cluster}} AS
SELECT
    tenant,
    name,
    metric,
    minute,
    sum(value_count) AS count,
    sum(value_sum) AS sum,
    toFloat64(min(value_min)) AS min,
    toFloat64(max(value_max)) AS max,
    sum / count AS avg,
    quantilesTDigestMerge(0.5, 0.9, 0.99)(value_digest) AS quantiles,
    toFloat64(quantiles[1]) AS p50,
    toFloat64(quantiles[2]) AS p90,
    toFloat64(quantiles[3]) AS p99
FROM {{db}}.metrics_1m
GROUP BY tenant, name, metric, minute;

CREATE VIEW IF NOT EXISTS {{db}}.metrics_1h_v {{on_cluster}} AS
SELECT
    tenant,
    name,
    metric,
    hour,
    sum(value_count) AS count,
    sum(value_sum) AS sum,
    toFloat64(min(value_min)) AS min,
    toFloat64(max(value_max)) AS max,
    sum / count AS avg,
    quantilesTDigestMerge(0.5, 0.9, 0.99)(value_digest) AS quantiles,
    toFloat64(quantiles[1]) AS p50,
    toFloat64(quantiles[2]) AS p90,
    toFloat64(quantiles[3]) AS p99
FROM {{db}}.metrics_1h
GROUP BY tenant, name, metric, hour;

CREATE VIEW IF NOT EXISTS {{db}}.sessions_v {{on_cluster}} AS
SELECT
    tenant,
    session_id,
    CAST(min(first_time) AS DateTime64(3, 'UTC')) AS start,
    CAST(max(last_time) AS DateTime64(3, 'UTC')) AS end,
    dateDiff('millisecond', start, end) AS duration_ms,
    sum(event_count) AS events,
    uniqMerge(users_state) AS users,
    sumMapMerge(metric_sums) AS metrics
FROM {{db}}.sessions
GROUP BY tenant, session_id;

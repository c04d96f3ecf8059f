//! Named telemetry events: each call logs (when notable) and updates the metrics together.
//! Each metric is one [`MetricDescription`] below, all of them listed in [`METRICS`];
//! `query-api/README.md` documents the names, and dashboards depend on them.

use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge, histogram, Unit};

pub const REQUESTS: MetricDescription = MetricDescription {
    name: "chute_query_requests_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "HTTP requests by endpoint and status code",
    zero_at_start: false,
};

pub const REQUEST_DURATION: MetricDescription = MetricDescription {
    name: "chute_query_request_duration_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "request latency by endpoint (for /v1/stream: until the stream is set up)",
    zero_at_start: false,
};

pub const CACHE_HITS: MetricDescription = MetricDescription {
    name: "chute_query_cache_hits_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "answers served from the response cache",
    zero_at_start: true,
};

pub const CACHE_MISSES: MetricDescription = MetricDescription {
    name: "chute_query_cache_misses_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "answers that ran a ClickHouse query (concurrent identical misses count once)",
    zero_at_start: true,
};

pub const CACHE_EVICTIONS: MetricDescription = MetricDescription {
    name: "chute_query_cache_evictions_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "cache entries evicted to stay within the capacity",
    zero_at_start: true,
};

pub const CACHE_BYTES: MetricDescription = MetricDescription {
    name: "chute_query_cache_bytes",
    kind: MetricKind::Gauge,
    unit: Some(Unit::Bytes),
    help: "bytes held by the response cache",
    zero_at_start: true,
};

pub const CLICKHOUSE_QUERIES: MetricDescription = MetricDescription {
    name: "chute_query_clickhouse_queries_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "ClickHouse queries by outcome",
    zero_at_start: false,
};

pub const CLICKHOUSE_DURATION: MetricDescription = MetricDescription {
    name: "chute_query_clickhouse_duration_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "ClickHouse query latency, send to last row",
    zero_at_start: false,
};

pub const STREAM_SUBSCRIBERS: MetricDescription = MetricDescription {
    name: "chute_query_stream_subscribers",
    kind: MetricKind::Gauge,
    unit: None,
    help: "open /v1/stream connections",
    zero_at_start: true,
};

pub const STREAM_EVENTS: MetricDescription = MetricDescription {
    name: "chute_query_stream_events_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events received from NATS on the live.<tenant> subjects of tenants with subscribers",
    zero_at_start: true,
};

pub const STREAM_TENANT_SUBSCRIPTIONS: MetricDescription = MetricDescription {
    name: "chute_query_stream_tenant_subscriptions",
    kind: MetricKind::Gauge,
    unit: None,
    help: "live.<tenant> NATS subscriptions held (one per tenant with open /v1/stream connections)",
    zero_at_start: true,
};

/// Every metric the query API exports, described when it starts.
pub const METRICS: &[MetricDescription] = &[
    REQUESTS,
    REQUEST_DURATION,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_EVICTIONS,
    CACHE_BYTES,
    CLICKHOUSE_QUERIES,
    CLICKHOUSE_DURATION,
    STREAM_SUBSCRIBERS,
    STREAM_EVENTS,
    STREAM_TENANT_SUBSCRIPTIONS,
];

/// Installs the Prometheus recorder and registers [`METRICS`], so `/metrics` shows HELP lines
/// from the start.
pub fn describe() {
    chute_common::telemetry::describe(METRICS);
}

pub fn request_finished(endpoint: &'static str, status: u16, elapsed: Duration) {
    counter!(REQUESTS.name, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
    histogram!(REQUEST_DURATION.name, "endpoint" => endpoint).record(elapsed.as_secs_f64());
}

pub fn cache_hit() {
    counter!(CACHE_HITS.name).increment(1);
}

pub fn cache_miss() {
    counter!(CACHE_MISSES.name).increment(1);
}

pub fn cache_evicted(bytes: u64) {
    tracing::debug!(bytes, "cache entry evicted for capacity");
    counter!(CACHE_EVICTIONS.name).increment(1);
}

pub fn cache_bytes(bytes: u64) {
    gauge!(CACHE_BYTES.name).set(bytes as f64);
}

pub fn clickhouse_query(elapsed: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(CLICKHOUSE_QUERIES.name, "outcome" => outcome).increment(1);
    histogram!(CLICKHOUSE_DURATION.name).record(elapsed.as_secs_f64());
    if elapsed > Duration::from_secs(1) {
        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "slow clickhouse query");
    }
}

pub fn stream_subscribed(tenant: &str) {
    tracing::debug!(tenant, "live stream subscriber connected");
    gauge!(STREAM_SUBSCRIBERS.name).increment(1.0);
}

pub fn stream_unsubscribed() {
    gauge!(STREAM_SUBSCRIBERS.name).decrement(1.0);
}

pub fn stream_events(count: usize) {
    counter!(STREAM_EVENTS.name).increment(count as u64);
}

pub fn stream_tenant_subscribed(tenant: &str) {
    tracing::debug!(tenant, "live stream subscribed to the tenant's live subject");
    gauge!(STREAM_TENANT_SUBSCRIPTIONS.name).increment(1.0);
}

pub fn stream_tenant_unsubscribed(tenant: &str) {
    tracing::debug!(tenant, "live stream dropped the tenant's live subject");
    gauge!(STREAM_TENANT_SUBSCRIPTIONS.name).decrement(1.0);
}

pub fn stream_lagged(tenant: &str, missed: u64) {
    tracing::warn!(tenant, missed, "live stream subscriber lagged; events skipped");
}

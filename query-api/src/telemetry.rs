//! Named telemetry events: each call logs (when notable) and updates the metrics together.
//! Metric names are documented in `query-api/README.md`; dashboards depend on them.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const REQUESTS: &str = "chute_query_requests_total";
pub const REQUEST_DURATION: &str = "chute_query_request_duration_seconds";
pub const CACHE_HITS: &str = "chute_query_cache_hits_total";
pub const CACHE_MISSES: &str = "chute_query_cache_misses_total";
pub const CACHE_EVICTIONS: &str = "chute_query_cache_evictions_total";
pub const CACHE_BYTES: &str = "chute_query_cache_bytes";
pub const CLICKHOUSE_QUERIES: &str = "chute_query_clickhouse_queries_total";
pub const CLICKHOUSE_DURATION: &str = "chute_query_clickhouse_duration_seconds";
pub const STREAM_SUBSCRIBERS: &str = "chute_query_stream_subscribers";
pub const STREAM_EVENTS: &str = "chute_query_stream_events_total";

/// Installs the Prometheus recorder and registers descriptions, so `/metrics` shows HELP lines
/// from the start.
pub fn describe() {
    chute_common::telemetry::prometheus_handle();
    metrics::describe_counter!(REQUESTS, "HTTP requests by endpoint and status code");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "request latency by endpoint (for /v1/stream: until the stream is set up)"
    );
    metrics::describe_counter!(CACHE_HITS, "answers served from the response cache");
    metrics::describe_counter!(
        CACHE_MISSES,
        "answers that ran a ClickHouse query (concurrent identical misses count once)"
    );
    metrics::describe_counter!(CACHE_EVICTIONS, "cache entries evicted to stay within the capacity");
    metrics::describe_gauge!(CACHE_BYTES, metrics::Unit::Bytes, "bytes held by the response cache");
    metrics::describe_counter!(CLICKHOUSE_QUERIES, "ClickHouse queries by outcome");
    metrics::describe_histogram!(
        CLICKHOUSE_DURATION,
        metrics::Unit::Seconds,
        "ClickHouse query latency, send to last row"
    );
    metrics::describe_gauge!(STREAM_SUBSCRIBERS, "open /v1/stream connections");
    metrics::describe_counter!(
        STREAM_EVENTS,
        "events received from NATS for the live stream (before tenant filtering)"
    );
    // Register the unlabelled series at zero so dashboards see them before the first event.
    for name in [CACHE_HITS, CACHE_MISSES, CACHE_EVICTIONS, STREAM_EVENTS] {
        counter!(name).increment(0);
    }
    gauge!(STREAM_SUBSCRIBERS).increment(0.0);
    gauge!(CACHE_BYTES).increment(0.0);
}

pub fn request_finished(endpoint: &'static str, status: u16, elapsed: Duration) {
    counter!(REQUESTS, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
    histogram!(REQUEST_DURATION, "endpoint" => endpoint).record(elapsed.as_secs_f64());
}

pub fn cache_hit() {
    counter!(CACHE_HITS).increment(1);
}

pub fn cache_miss() {
    counter!(CACHE_MISSES).increment(1);
}

pub fn cache_evicted(bytes: u64) {
    tracing::debug!(bytes, "cache entry evicted for capacity");
    counter!(CACHE_EVICTIONS).increment(1);
}

pub fn cache_bytes(bytes: u64) {
    gauge!(CACHE_BYTES).set(bytes as f64);
}

pub fn clickhouse_query(elapsed: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(CLICKHOUSE_QUERIES, "outcome" => outcome).increment(1);
    histogram!(CLICKHOUSE_DURATION).record(elapsed.as_secs_f64());
    if elapsed > Duration::from_secs(1) {
        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "slow clickhouse query");
    }
}

pub fn stream_subscribed(tenant: &str) {
    tracing::debug!(tenant, "live stream subscriber connected");
    gauge!(STREAM_SUBSCRIBERS).increment(1.0);
}

pub fn stream_unsubscribed() {
    gauge!(STREAM_SUBSCRIBERS).decrement(1.0);
}

pub fn stream_events(count: usize) {
    counter!(STREAM_EVENTS).increment(count as u64);
}

pub fn stream_lagged(tenant: &str, missed: u64) {
    tracing::warn!(tenant, missed, "live stream subscriber lagged; events skipped");
}

//! Named telemetry events: each call logs (when notable) and updates the metrics together.
//! Metric names are documented in the README's metrics table.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const REQUESTS: &str = "chute_ingest_requests_total";
pub const EVENTS_ACCEPTED: &str = "chute_ingest_events_accepted_total";
pub const EVENTS_REJECTED: &str = "chute_ingest_events_rejected_total";
pub const REQUEST_DURATION: &str = "chute_ingest_request_duration_seconds";
pub const PUBLISH_DURATION: &str = "chute_ingest_publish_duration_seconds";
pub const PUBLISHED_MESSAGES: &str = "chute_ingest_published_messages_total";
pub const PUBLISH_ERRORS: &str = "chute_ingest_publish_errors_total";
pub const INFLIGHT_PUBLISHES: &str = "chute_ingest_inflight_publishes";
pub const DUPLICATE_MESSAGES: &str = "chute_ingest_duplicate_messages_total";

/// Installs the Prometheus recorder and registers descriptions, so `/metrics` shows HELP lines
/// from the start.
pub fn describe() {
    chute_common::telemetry::prometheus_handle();
    metrics::describe_counter!(REQUESTS, "gRPC ingest calls by method and status code");
    metrics::describe_counter!(
        EVENTS_ACCEPTED,
        "events stored in JetStream and acknowledged to the caller"
    );
    metrics::describe_counter!(EVENTS_REJECTED, "events refused by validation, by field");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "ingest call latency, receive to response"
    );
    metrics::describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "JetStream publish latency, send to PubAck"
    );
    metrics::describe_counter!(PUBLISHED_MESSAGES, "JetStream messages acknowledged");
    metrics::describe_counter!(
        PUBLISH_ERRORS,
        "JetStream publishes that failed (call answered UNAVAILABLE)"
    );
    metrics::describe_gauge!(INFLIGHT_PUBLISHES, "JetStream publishes awaiting their PubAck");
    metrics::describe_counter!(
        DUPLICATE_MESSAGES,
        "messages JetStream reported as duplicates (retried requests)"
    ); // Counters that only move on failures exist from the start, so alerts see a 0, not no data.
    counter!(PUBLISH_ERRORS).increment(0);
    counter!(DUPLICATE_MESSAGES).increment(0);
    gauge!(INFLIGHT_PUBLISHES).increment(0.0);
}

pub fn request_finished(method: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!(REQUESTS, "method" => method, "code" => code_label(code)).increment(1);
    histogram!(REQUEST_DURATION, "method" => method).record(elapsed.as_secs_f64());
}

pub fn events_accepted(count: usize) {
    counter!(EVENTS_ACCEPTED).increment(count as u64);
}

pub fn event_rejected(field: &str) {
    let field = match field {
        "tenant" | "event_id" | "name" | "time" | "session_id" | "user_id" | "attributes" | "metrics" | "body" => field,
        _ => "other",
    };
    counter!(EVENTS_REJECTED, "field" => field.to_owned()).increment(1);
}

pub fn published(events: usize, duplicate: bool, elapsed: Duration) {
    histogram!(PUBLISH_DURATION).record(elapsed.as_secs_f64());
    counter!(PUBLISHED_MESSAGES).increment(1);
    if duplicate {
        tracing::debug!(events, "jetstream dropped a duplicate message (retried request)");
        counter!(DUPLICATE_MESSAGES).increment(1);
    }
}

pub fn publish_failed(err: &dyn std::error::Error) {
    tracing::warn!(error = %err, "jetstream publish failed");
    counter!(PUBLISH_ERRORS).increment(1);
}

/// Counts a publish in flight for as long as it lives.
pub struct InflightGuard;

impl InflightGuard {
    pub fn enter() -> Self {
        gauge!(INFLIGHT_PUBLISHES).increment(1.0);
        Self
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        gauge!(INFLIGHT_PUBLISHES).decrement(1.0);
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Cancelled => "CANCELLED",
        _ => "OTHER",
    }
}

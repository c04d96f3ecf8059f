//! Named telemetry events: each call logs (when notable) and updates the metrics together.
//! Each metric is one [`MetricDescription`] below, all of them listed in [`METRICS`]; the README's
//! metrics table documents the names.

use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge, histogram, Unit};

pub const REQUESTS: MetricDescription = MetricDescription {
    name: "chute_ingest_requests_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "gRPC ingest calls by method and status code",
    zero_at_start: false,
};

pub const EVENTS_ACCEPTED: MetricDescription = MetricDescription {
    name: "chute_ingest_events_accepted_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events stored in JetStream and acknowledged to the caller",
    zero_at_start: false,
};

pub const EVENTS_REJECTED: MetricDescription = MetricDescription {
    name: "chute_ingest_events_rejected_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events refused by validation, by field",
    zero_at_start: false,
};

pub const REQUEST_DURATION: MetricDescription = MetricDescription {
    name: "chute_ingest_request_duration_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "ingest call latency, receive to response",
    zero_at_start: false,
};

pub const PUBLISH_DURATION: MetricDescription = MetricDescription {
    name: "chute_ingest_publish_duration_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "JetStream publish latency, send to PubAck",
    zero_at_start: false,
};

pub const PUBLISHED_MESSAGES: MetricDescription = MetricDescription {
    name: "chute_ingest_published_messages_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "JetStream messages acknowledged",
    zero_at_start: false,
};

pub const PUBLISH_ERRORS: MetricDescription = MetricDescription {
    name: "chute_ingest_publish_errors_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "JetStream publishes that failed (call answered UNAVAILABLE)",
    zero_at_start: true,
};

pub const INFLIGHT_PUBLISHES: MetricDescription = MetricDescription {
    name: "chute_ingest_inflight_publishes",
    kind: MetricKind::Gauge,
    unit: None,
    help: "JetStream publishes awaiting their PubAck",
    zero_at_start: true,
};

pub const DUPLICATE_MESSAGES: MetricDescription = MetricDescription {
    name: "chute_ingest_duplicate_messages_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "messages JetStream reported as duplicates (retried requests)",
    zero_at_start: true,
};

pub const LIVE_COPIES: MetricDescription = MetricDescription {
    name: "chute_ingest_live_copies_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "live copies of stored messages on live.<tenant>, by outcome (queued, buffer_full, error)",
    zero_at_start: false,
};

/// Every metric the ingestor exports, described when it starts.
pub const METRICS: &[MetricDescription] = &[
    REQUESTS,
    EVENTS_ACCEPTED,
    EVENTS_REJECTED,
    REQUEST_DURATION,
    PUBLISH_DURATION,
    PUBLISHED_MESSAGES,
    PUBLISH_ERRORS,
    INFLIGHT_PUBLISHES,
    DUPLICATE_MESSAGES,
    LIVE_COPIES,
];

/// Installs the Prometheus recorder and registers [`METRICS`], so `/metrics` shows HELP lines
/// from the start.
pub fn describe() {
    chute_common::telemetry::describe(METRICS);
}

pub fn request_finished(method: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!(REQUESTS.name, "method" => method, "code" => code_label(code)).increment(1);
    histogram!(REQUEST_DURATION.name, "method" => method).record(elapsed.as_secs_f64());
}

pub fn events_accepted(count: usize) {
    counter!(EVENTS_ACCEPTED.name).increment(count as u64);
}

pub fn event_rejected(field: &str) {
    let field = match field {
        "tenant" | "event_id" | "name" | "time" | "session_id" | "user_id" | "attributes" | "metrics" | "body" => field,
        _ => "other",
    };
    counter!(EVENTS_REJECTED.name, "field" => field.to_owned()).increment(1);
}

pub fn published(events: usize, duplicate: bool, elapsed: Duration) {
    histogram!(PUBLISH_DURATION.name).record(elapsed.as_secs_f64());
    counter!(PUBLISHED_MESSAGES.name).increment(1);
    if duplicate {
        tracing::debug!(events, "jetstream dropped a duplicate message (retried request)");
        counter!(DUPLICATE_MESSAGES.name).increment(1);
    }
}

pub fn publish_failed(err: &dyn std::error::Error) {
    tracing::warn!(error = %err, "jetstream publish failed");
    counter!(PUBLISH_ERRORS.name).increment(1);
}

pub fn live_copy_queued() {
    counter!(LIVE_COPIES.name, "outcome" => "queued").increment(1);
}

/// A live copy not sent: the live stream misses it, the event itself is stored.
pub fn live_copy_dropped(outcome: &'static str, err: Option<&dyn std::error::Error>) {
    match err {
        Some(err) => tracing::debug!(outcome, error = %err, "live copy dropped"),
        None => tracing::debug!(outcome, "live copy dropped"),
    }
    counter!(LIVE_COPIES.name, "outcome" => outcome).increment(1);
}

/// Counts a publish in flight for as long as it lives.
pub struct InflightGuard;

impl InflightGuard {
    pub fn enter() -> Self {
        gauge!(INFLIGHT_PUBLISHES.name).increment(1.0);
        Self
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        gauge!(INFLIGHT_PUBLISHES.name).decrement(1.0);
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

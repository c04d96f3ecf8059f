//! The router's metrics: each is one [`MetricDescription`], all listed in [`metrics()`] together
//! with the ones the window, anomaly and webhook modules define; the README's metrics table
//! documents the names.

use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge, histogram, Unit};

pub const EVENTS: MetricDescription = MetricDescription {
    name: "chute_router_events_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events read from EVENTS and evaluated against the rules",
    zero_at_start: true,
};

pub const SKIPPED: MetricDescription = MetricDescription {
    name: "chute_router_events_skipped_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events not evaluated: a message that does not decode or an event with an invalid tenant or name",
    zero_at_start: true,
};

pub const MATCHES: MetricDescription = MetricDescription {
    name: "chute_router_matches_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events that matched a rule, by rule and kind (route, threshold, anomaly)",
    zero_at_start: false,
};

pub const ROUTED: MetricDescription = MetricDescription {
    name: "chute_router_routed_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events published to ROUTES, by rule (a redelivered copy JetStream drops as a duplicate counts once)",
    zero_at_start: false,
};

pub const RULES_LOADED: MetricDescription = MetricDescription {
    name: "chute_router_rules",
    kind: MetricKind::Gauge,
    unit: None,
    help: "rules active now",
    zero_at_start: true,
};

pub const RULES_RELOAD_FAILURES: MetricDescription = MetricDescription {
    name: "chute_router_rules_reload_failures_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "rules files refused (the previous rules stayed active)",
    zero_at_start: true,
};

pub const LAG: MetricDescription = MetricDescription {
    name: "chute_router_pending_messages",
    kind: MetricKind::Gauge,
    unit: None,
    help: "EVENTS messages not yet delivered to the router's consumer",
    zero_at_start: true,
};

pub const PROCESS_SECONDS: MetricDescription = MetricDescription {
    name: "chute_router_process_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "time to evaluate a group of messages and store what they routed, before acknowledging them",
    zero_at_start: false,
};

pub const SEED_SECONDS: MetricDescription = MetricDescription {
    name: "chute_router_seed_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "time to rebuild windows and baselines from ClickHouse at start or on a rules change",
    zero_at_start: false,
};

/// The router's own metrics (see [`metrics()`] for all of them).
pub const OWN: &[MetricDescription] = &[
    EVENTS,
    SKIPPED,
    MATCHES,
    ROUTED,
    RULES_LOADED,
    RULES_RELOAD_FAILURES,
    LAG,
    PROCESS_SECONDS,
    SEED_SECONDS,
];

/// Every metric the router exports.
pub fn metrics() -> Vec<MetricDescription> {
    [
        OWN,
        crate::window::METRICS,
        crate::alert::METRICS,
        crate::anomaly::METRICS,
        crate::webhook::METRICS,
    ]
    .concat()
}

pub fn describe() {
    chute_common::telemetry::describe(&metrics());
}

pub fn events(count: usize) {
    counter!(EVENTS.name).increment(count as u64);
}

pub fn skipped(count: usize, reason: &str) {
    counter!(SKIPPED.name).increment(count as u64);
    tracing::debug!(count, reason, "events skipped");
}

pub fn matched(rule: &crate::spec::Rule, count: u64) {
    let kind = match rule.kind {
        crate::spec::RuleKind::Route => "route",
        crate::spec::RuleKind::Threshold(_) => "threshold",
        crate::spec::RuleKind::Anomaly(_) => "anomaly",
    };
    counter!(MATCHES.name, "rule" => rule.name.clone(), "kind" => kind).increment(count);
}

pub fn routed(rule: &str, duplicate: bool) {
    if !duplicate {
        counter!(ROUTED.name, "rule" => rule.to_owned()).increment(1);
    }
}

/// `kind`: `fired` or `resolved`.
pub fn alert(rule: &str, kind: &'static str) {
    counter!(crate::alert::ALERT_TRANSITIONS.name, "rule" => rule.to_owned(), "kind" => kind).increment(1);
}

pub fn alerts_firing(count: usize) {
    gauge!(crate::alert::ALERTS_FIRING.name).set(count as f64);
}

pub fn anomaly(rule: &str) {
    counter!(crate::anomaly::ANOMALIES.name, "rule" => rule.to_owned()).increment(1);
}

pub fn rules_loaded(count: usize) {
    gauge!(RULES_LOADED.name).set(count as f64);
}

pub fn rules_refused(error: &dyn std::fmt::Display) {
    counter!(RULES_RELOAD_FAILURES.name).increment(1);
    tracing::error!(%error, "rules file refused; the previous rules stay active");
}

pub fn pending(messages: u64) {
    gauge!(LAG.name).set(messages as f64);
}

pub fn processed(elapsed: Duration) {
    histogram!(PROCESS_SECONDS.name).record(elapsed.as_secs_f64());
}

pub fn seeded(elapsed: Duration) {
    histogram!(SEED_SECONDS.name).record(elapsed.as_secs_f64());
}

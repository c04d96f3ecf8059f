//! Logs and metrics setup shared by the services.

use std::sync::OnceLock;

use metrics::{counter, gauge, KeyName, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Latency buckets (seconds) for every `*_seconds` histogram: 100 µs .. 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for batch sizes (`*_rows`, `*_events`, `*_bytes` histograms).
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 5e3, 1e4, 5e4, 1e5, 5e5, 1e6, 1e7, 1e8];

/// The process-wide Prometheus recorder, installed on first use. Every service in the process
/// (tests run several) shares it.
pub fn prometheus_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_rows".into()), SIZE_BUCKETS))
            .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), SIZE_BUCKETS))
            .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_events".into()), SIZE_BUCKETS))
            .expect("static bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only this one");
        }
        handle
    })
}

/// What a metric is on `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric of a service: the name, type, unit and HELP text `/metrics` shows. Each service
/// lists its metrics in one `METRICS` table and hands it to [`describe`] at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricDescription {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// The unlabelled series exists from the start at 0, so an alert on a failure counter sees
    /// a 0 rather than no data. Counters and gauges only: a histogram has no zero to show.
    pub zero_at_start: bool,
}

/// Installs the Prometheus recorder, registers the HELP text, type and unit of every metric in
/// `metrics` so `/metrics` shows them from the start, and starts the `zero_at_start` series at 0.
pub fn describe(metrics: &[MetricDescription]) {
    prometheus_handle();
    for metric in metrics {
        let name = KeyName::from_const_str(metric.name);
        let help = SharedString::const_str(metric.help);
        metrics::with_recorder(|recorder| match metric.kind {
            MetricKind::Counter => recorder.describe_counter(name, metric.unit, help),
            MetricKind::Gauge => recorder.describe_gauge(name, metric.unit, help),
            MetricKind::Histogram => recorder.describe_histogram(name, metric.unit, help),
        });
        if !metric.zero_at_start {
            continue;
        }
        match metric.kind {
            MetricKind::Counter => counter!(metric.name).increment(0),
            MetricKind::Gauge => gauge!(metric.name).increment(0.0),
            MetricKind::Histogram => debug_assert!(false, "{}: a histogram cannot start at zero", metric.name),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Starts structured logging to stderr. The filter comes from `RUST_LOG`-style `filter`
/// (e.g. `info,chute_ingestor=debug`).
pub fn init_tracing(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(err) = result {
        eprintln!("tracing already initialised: {err}");
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (expected text or json)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics::histogram;

    use super::*;

    const FAILURES: MetricDescription = MetricDescription {
        name: "chute_test_describe_failures_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "failures of the describe test",
        zero_at_start: true,
    };
    const PENDING: MetricDescription = MetricDescription {
        name: "chute_test_describe_pending",
        kind: MetricKind::Gauge,
        unit: None,
        help: "work the describe test has pending",
        zero_at_start: true,
    };
    const SUCCESSES: MetricDescription = MetricDescription {
        name: "chute_test_describe_successes_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "successes of the describe test",
        zero_at_start: false,
    };
    const LATENCY: MetricDescription = MetricDescription {
        name: "chute_test_describe_latency_seconds",
        kind: MetricKind::Histogram,
        unit: Some(Unit::Seconds),
        help: "latency of the describe test",
        zero_at_start: false,
    };

    #[test]
    fn describe_shows_help_and_type_and_starts_only_the_marked_series_at_zero() {
        describe(&[FAILURES, PENDING, SUCCESSES, LATENCY]);
        counter!(SUCCESSES.name).increment(2);
        histogram!(LATENCY.name).record(0.5);
        let text = prometheus_handle().render();

        for expected in [
            "# HELP chute_test_describe_failures_total failures of the describe test\n\
             # TYPE chute_test_describe_failures_total counter\n\
             chute_test_describe_failures_total 0\n",
            "# TYPE chute_test_describe_pending gauge\nchute_test_describe_pending 0\n",
            "# HELP chute_test_describe_successes_total successes of the describe test\n\
             # TYPE chute_test_describe_successes_total counter\n\
             chute_test_describe_successes_total 2\n",
            "# HELP chute_test_describe_latency_seconds latency of the describe test\n\
             # TYPE chute_test_describe_latency_seconds histogram\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}

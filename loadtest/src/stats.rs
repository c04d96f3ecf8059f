//! Counting what happened: ack latencies (HDR histogram), counters, errors by gRPC code.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, up to an hour, with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Quantiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summary of a histogram of microseconds (all zero when empty).
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p90_ms: ms(histogram.value_at_quantile(0.9)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// The outcome of one request after its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the events the ingestor accepted and rejected.
    Acked { accepted: u64, rejected: u64 },
    /// Gave up. `maybe_stored` when the last failure does not prove the events were refused
    /// (a timeout or an unavailable server may have stored them before failing).
    Failed { events: u64, maybe_stored: bool },
}

/// Shared, lock-light counters of a run (atomics; the histogram and error map behind mutexes
/// that are touched once per request, a few thousand times a second at most).
pub struct Recorder {
    latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    pub requests_sent: AtomicU64,
    pub requests_acked: AtomicU64,
    pub requests_failed: AtomicU64,
    pub retries: AtomicU64,
    pub events_acked: AtomicU64,
    pub events_rejected: AtomicU64,
    pub events_failed: AtomicU64,
    /// Events of failed requests that may nevertheless have been stored.
    pub events_unknown: AtomicU64,
    pub inflight: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: Mutex::new(new_histogram()),
            errors: Mutex::default(),
            requests_sent: AtomicU64::new(0),
            requests_acked: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            events_acked: AtomicU64::new(0),
            events_rejected: AtomicU64::new(0),
            events_failed: AtomicU64::new(0),
            events_unknown: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
        }
    }
}

impl Recorder {
    /// One failed attempt (it may still be retried), by gRPC code name.
    pub fn error(&self, code: tonic::Code) {
        let name = format!("{code:?}");
        *self.errors.lock().expect("errors lock").entry(name).or_default() += 1;
    }

    /// The final outcome of a request whose latency (intended send -> ack) is `latency`.
    pub fn finish(&self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Acked { accepted, rejected } => {
                self.latency
                    .lock()
                    .expect("latency lock")
                    .saturating_record(latency.as_micros().max(1) as u64);
                self.requests_acked.fetch_add(1, Ordering::Relaxed);
                self.events_acked.fetch_add(accepted, Ordering::Relaxed);
                self.events_rejected.fetch_add(rejected, Ordering::Relaxed);
            }
            Outcome::Failed { events, maybe_stored } => {
                self.requests_failed.fetch_add(1, Ordering::Relaxed);
                self.events_failed.fetch_add(events, Ordering::Relaxed);
                if maybe_stored {
                    self.events_unknown.fetch_add(events, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().expect("errors lock").clone()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.lock().expect("errors lock").values().sum()
    }

    pub fn latency(&self) -> LatencySummary {
        LatencySummary::from_micros(&self.latency.lock().expect("latency lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_quantiles_in_milliseconds() {
        let mut histogram = new_histogram();
        for micros in 1..=10_000u64 {
            histogram.record(micros * 100).unwrap(); // 0.1 ms .. 1000 ms, uniform
        }
        let summary = LatencySummary::from_micros(&histogram);
        assert_eq!(summary.count, 10_000);
        // Three significant digits: within 0.1% of the exact quantile.
        assert!((summary.p50_ms - 500.0).abs() <= 0.5, "{summary:?}");
        assert!((summary.p90_ms - 900.0).abs() <= 0.9, "{summary:?}");
        assert!((summary.p99_ms - 990.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.p999_ms - 999.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.max_ms - 1000.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.mean_ms - 500.05).abs() <= 0.5, "{summary:?}");
    }

    #[test]
    fn empty_histogram_summarizes_to_zeros() {
        assert_eq!(LatencySummary::from_micros(&new_histogram()), LatencySummary::default());
    }

    #[test]
    fn recorder_counts_outcomes_and_errors() {
        let recorder = Recorder::default();
        recorder.error(tonic::Code::Unavailable);
        recorder.error(tonic::Code::Unavailable);
        recorder.error(tonic::Code::DeadlineExceeded);
        recorder.finish(
            Outcome::Acked {
                accepted: 99,
                rejected: 1,
            },
            Duration::from_millis(3),
        );
        recorder.finish(
            Outcome::Failed {
                events: 100,
                maybe_stored: true,
            },
            Duration::from_secs(1),
        );
        recorder.finish(
            Outcome::Failed {
                events: 100,
                maybe_stored: false,
            },
            Duration::from_secs(1),
        );
        assert_eq!(recorder.events_acked.load(Ordering::Relaxed), 99);
        assert_eq!(recorder.events_rejected.load(Ordering::Relaxed), 1);
        assert_eq!(recorder.events_failed.load(Ordering::Relaxed), 200);
        assert_eq!(recorder.events_unknown.load(Ordering::Relaxed), 100);
        assert_eq!(recorder.errors()["Unavailable"], 2);
        assert_eq!(recorder.error_count(), 3);
        // Only acknowledged requests have an ack latency.
        assert_eq!(recorder.latency().count, 1);
    }
}

//! The JetStream backlog during a run, from the aggregator's own gauges.
//!
//! `--backlog-metrics-url` points at the aggregator's Prometheus endpoint (`/metrics` on its admin
//! port). Once a second during the load the sampler sums `chute_aggregator_partition_pending`
//! (messages of each partition not yet read: the consumer lag) over every partition. The
//! steady-state search ([`crate::steady`]) reads the result to tell a rate the pipeline keeps up
//! with from one where the backlog grows, and stops a probe early once it clearly does not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// The gauge summed over partitions.
pub const PENDING_METRIC: &str = "chute_aggregator_partition_pending";
/// How often the gauge is read.
const INTERVAL: Duration = Duration::from_secs(1);
/// The start and the end of the window are each the mean of this much of it.
const EDGE_SECONDS: f64 = 10.0;

/// Sum of every sample of `metric` in a Prometheus text exposition (`None` when it is absent).
pub fn metric_total(text: &str, metric: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        // `name{labels} value` or `name value`; not a longer name that starts the same.
        let value = match rest.as_bytes().first() {
            Some(b'{') => rest.rsplit_once('}').map(|(_, value)| value),
            Some(b' ') => Some(rest),
            _ => None,
        };
        if let Some(value) = value.and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// The backlog over one load window, in messages (the gauge's unit) and in events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BacklogReport {
    pub samples: usize,
    /// Reads of the endpoint that failed (connection refused, no gauge yet).
    pub failed_reads: u64,
    /// Mean of the first 10 s of samples, messages.
    pub start_messages: f64,
    /// Mean of the last 10 s of samples, messages.
    pub end_messages: f64,
    pub max_messages: f64,
    /// `end - start`, messages; times the events per message, events.
    pub growth_messages: f64,
    pub growth_events: f64,
    /// Set when the sampler stopped the load early because the backlog passed its limit.
    pub stopped_early: bool,
}

/// `samples` are `(seconds since the load started, messages pending)`.
pub fn summarize(samples: &[(f64, f64)], events_per_message: f64) -> BacklogReport {
    let Some(&(last, _)) = samples.last() else {
        return BacklogReport::default();
    };
    let mean = |keep: &dyn Fn(f64) -> bool| {
        let picked: Vec<f64> = samples.iter().filter(|(t, _)| keep(*t)).map(|(_, v)| *v).collect();
        picked.iter().sum::<f64>() / picked.len().max(1) as f64
    };
    // Windows shorter than 20 s compare their halves; one sample is both ends.
    let edge = EDGE_SECONDS.min(last / 2.0);
    let start_messages = mean(&|t| t <= edge);
    let end_messages = mean(&|t| t >= last - edge);
    let growth_messages = end_messages - start_messages;
    BacklogReport {
        samples: samples.len(),
        failed_reads: 0,
        start_messages,
        end_messages,
        max_messages: samples.iter().map(|(_, v)| *v).fold(0.0, f64::max),
        growth_messages,
        growth_events: growth_messages * events_per_message,
        stopped_early: false,
    }
}

/// What the sampling task hands back.
#[derive(Default)]
struct Sampled {
    samples: Vec<(f64, f64)>,
    failed_reads: u64,
    stopped_early: bool,
}

/// Reads the gauge once a second until [`BacklogSampler::finish`]. When `stop_above` messages are
/// pending it raises `stop` (the open loop stops sending: the rate is clearly too high).
pub struct BacklogSampler {
    task: JoinHandle<Sampled>,
    done: Arc<AtomicBool>,
    events_per_message: f64,
}

impl BacklogSampler {
    pub fn start(url: String, events_per_message: f64, stop_above: Option<f64>, stop: Arc<AtomicBool>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let task = tokio::spawn(async move {
            let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let started = Instant::now();
            let (mut samples, mut failed, mut stopped) = (Vec::new(), 0u64, false);
            let mut tick = tokio::time::interval(INTERVAL);
            while !finished.load(Ordering::Relaxed) {
                tick.tick().await;
                match read_pending(&client, &url).await {
                    Some(pending) => {
                        samples.push((started.elapsed().as_secs_f64(), pending));
                        if stop_above.is_some_and(|limit| pending > limit) && !stopped {
                            stopped = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    None => failed += 1,
                }
            }
            Sampled {
                samples,
                failed_reads: failed,
                stopped_early: stopped,
            }
        });
        Self {
            task,
            done,
            events_per_message,
        }
    }

    pub async fn finish(self) -> BacklogReport {
        self.done.store(true, Ordering::Relaxed);
        let sampled = self.task.await.unwrap_or_default();
        BacklogReport {
            failed_reads: sampled.failed_reads,
            stopped_early: sampled.stopped_early,
            ..summarize(&sampled.samples, self.events_per_message)
        }
    }
}

async fn read_pending(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Option<f64> {
    let uri: hyper::Uri = url.parse().ok()?;
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
        .await
        .ok()?
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    metric_total(std::str::from_utf8(&body).ok()?, PENDING_METRIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_gauge_over_partitions_and_ignores_longer_names() {
        let text = "# HELP chute_aggregator_partition_pending lag\n\
                    # TYPE chute_aggregator_partition_pending gauge\n\
                    chute_aggregator_partition_pending{partition=\"0\"} 12\n\
                    chute_aggregator_partition_pending{partition=\"1\"} 30.5\n\
                    chute_aggregator_partition_pending_other 1000\n\
                    chute_aggregator_owned_partitions 16\n";
        assert_eq!(metric_total(text, PENDING_METRIC), Some(42.5));
        assert_eq!(
            metric_total("chute_aggregator_partition_pending 7\n", PENDING_METRIC),
            Some(7.0)
        );
        assert_eq!(
            metric_total("chute_aggregator_owned_partitions 16\n", PENDING_METRIC),
            None
        );
    }

    #[test]
    fn growth_compares_the_first_and_last_ten_seconds() {
        // Flat at 5 messages for 60 s: no growth.
        let flat: Vec<(f64, f64)> = (0..60).map(|t| (t as f64, 5.0)).collect();
        let report = summarize(&flat, 100.0);
        assert_eq!(report.samples, 60);
        assert!((report.start_messages - 5.0).abs() < 1e-9, "{report:?}");
        assert!(report.growth_messages.abs() < 1e-9, "{report:?}");
        // Growing by 10 messages a second: the first 10 s (0..=10) average 50, the last (49..=59) 540.
        let growing: Vec<(f64, f64)> = (0..60).map(|t| (t as f64, 10.0 * t as f64)).collect();
        let report = summarize(&growing, 100.0);
        assert!((report.growth_messages - 490.0).abs() < 1e-9, "{report:?}");
        assert!((report.growth_events - 49_000.0).abs() < 1e-6, "{report:?}");
        assert_eq!(report.max_messages, 590.0);
        // A short window still splits into halves.
        let short = [(0.0, 1.0), (1.0, 1.0), (2.0, 9.0), (3.0, 9.0)];
        assert!((summarize(&short, 1.0).growth_messages - 8.0).abs() < 1e-9);
        assert_eq!(summarize(&[(0.0, 3.0)], 1.0).growth_messages, 0.0);
        assert_eq!(summarize(&[], 100.0), BacklogReport::default());
    }
}

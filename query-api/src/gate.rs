//! The cap on concurrent ClickHouse queries, so that a burst of expensive queries (say 200
//! dashboards over 30 days) queues here instead of starving the aggregator's inserts.
//!
//! At most `--max-concurrent-queries` run at once; at most `--max-queued-queries` more wait,
//! each for at most `--query-queue-wait`. Beyond that a query is refused at once with
//! [`Error::Overloaded`] (503 with `Retry-After`). Only cache misses come here, and concurrent
//! identical misses share one query (`cache`), so the gate counts distinct queries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

pub const METRICS: &[MetricDescription] = &[
    MetricDescription {
        name: "chute_query_clickhouse_queued",
        kind: MetricKind::Gauge,
        unit: None,
        help: "ClickHouse queries waiting for a slot (--max-concurrent-queries).",
        zero_at_start: true,
    },
    MetricDescription {
        name: "chute_query_overloaded_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "Queries refused with 503 because every slot was taken, by reason: queue_full, queue_wait.",
        zero_at_start: true,
    },
];

/// Slots for running queries and a bounded queue in front of them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct QueryGate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    slots: Arc<Semaphore>,
    max_running: usize,
    queued: AtomicUsize,
    max_queued: usize,
    max_wait: Duration,
}

impl QueryGate {
    pub fn new(max_running: usize, max_queued: usize, max_wait: Duration) -> Self {
        chute_common::telemetry::describe(METRICS);
        let max_running = max_running.max(1);
        Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(max_running)),
                max_running,
                queued: AtomicUsize::new(0),
                max_queued,
                max_wait,
            }),
        }
    }

    /// A slot to run one query; hold it until the query is done.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit> {
        let inner = &self.inner;
        if let Ok(slot) = inner.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let queued = Queued::join(inner);
        if queued.position >= inner.max_queued {
            return Err(self.overloaded("queue_full"));
        }
        match tokio::time::timeout(inner.max_wait, inner.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) | Err(_) => Err(self.overloaded("queue_wait")),
        }
    }

    fn overloaded(&self, reason: &'static str) -> Error {
        metrics::counter!("chute_query_overloaded_total", "reason" => reason).increment(1);
        Error::Overloaded {
            running: self.inner.max_running,
            queued: self.inner.max_queued,
        }
    }
}

/// A place in the queue, left on drop (whether the query got a slot, timed out or was cancelled).
struct Queued<'a> {
    inner: &'a Inner,
    /// How many were queued before this one.
    position: usize,
}

impl<'a> Queued<'a> {
    fn join(inner: &'a Inner) -> Self {
        let position = inner.queued.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("chute_query_clickhouse_queued").set((position + 1) as f64);
        Self { inner, position }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let left = self.inner.queued.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("chute_query_clickhouse_queued").set(left as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[tokio::test]
    async fn slots_then_a_bounded_queue_then_503() {
        let gate = QueryGate::new(2, 1, Duration::from_millis(100));
        let first = gate.enter().await.unwrap();
        let _second = gate.enter().await.unwrap();

        // The third waits in the queue; the fourth finds the queue full at once.
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = gate.enter().await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Overloaded);
        assert_eq!(refused.code().http_status(), 503);
        drop(first);
        assert!(waiting.await.unwrap().is_ok(), "a freed slot goes to the queued query");

        // Nobody frees a slot: the queued query gives up after the wait.
        let _third = gate.enter().await.unwrap();
        let started = std::time::Instant::now();
        assert!(gate.enter().await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert_eq!(gate.inner.queued.load(Ordering::SeqCst), 0);
    }
}

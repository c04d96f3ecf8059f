//! ClickHouse I/O: how many of a run's events landed, and how long they took.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::stats::LatencySummary;
use crate::verify::{self, Sent, Stored, Verdict};

/// Stop waiting for the drain when the count has not moved for this long.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What ClickHouse says about a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub stored: Stored,
    pub sent: Sent,
    #[serde(flatten)]
    pub verdict: Verdict,
    pub ok: bool,
    /// Whether every acknowledged event arrived within the drain timeout.
    pub drained: bool,
    /// From the end of the load until the last poll.
    pub drain_seconds: f64,
    /// `inserted_at - ingested_at` (accepted -> queryable), in milliseconds: ClickHouse stores
    /// both with millisecond precision.
    pub accepted_to_inserted: LatencySummary,
    /// Events of the run in ClickHouse per second, from the first acceptance to the last
    /// insert (the end-to-end rate, drain included).
    pub end_to_end_rate: f64,
    pub first_ingested_ms: i64,
    pub last_inserted_ms: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct CountRow {
    unique: u64,
    rows: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LatencyRow {
    count: u64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    first_ingested: i64,
    last_inserted: i64,
}

/// Filters to the run's events: by tenant and event time first (the table's sort key prunes
/// with them), then by the run id attribute.
const RUN_FILTER: &str = "tenant IN {tenants:Array(String)} \
     AND time >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') \
     AND attributes['run_id'] = {run_id:String}";

/// The run as ClickHouse sees it.
pub struct RunQuery<'a> {
    pub client: &'a clickhouse::Client,
    pub run_id: &'a str,
    pub tenants: &'a [String],
    /// Event times of the run are at or after this (unix ms).
    pub since_ms: i64,
}

impl RunQuery<'_> {
    fn query(&self, sql: &str) -> clickhouse::query::Query {
        self.client
            .query(sql)
            .param("tenants", self.tenants)
            .param("since_ms", self.since_ms)
            .param("run_id", self.run_id)
    }

    pub async fn stored(&self) -> Result<Stored> {
        let row: CountRow = self
            .query(&format!(
                "SELECT uniqExact(event_id) AS unique, count() AS rows FROM events WHERE {RUN_FILTER}"
            ))
            .fetch_one()
            .await?;
        Ok(Stored {
            unique: row.unique,
            rows: row.rows,
        })
    }

    /// Polls until the pipeline has delivered every acknowledged event, then measures latency
    /// and the verdict. Gives up after `timeout`, or after [`STALL_TIMEOUT`] without progress
    /// (e.g. the aggregator is gone).
    pub async fn wait_and_verify(&self, sent: Sent, timeout: Duration, poll: Duration) -> Result<DeliveryReport> {
        let started = Instant::now();
        let mut last = None;
        let mut last_progress = Instant::now();
        let mut unchanged = 0;
        let (stored, drained) = loop {
            let stored = self.stored().await?;
            if last == Some(stored) {
                unchanged += 1;
            } else {
                unchanged = 0;
                last_progress = Instant::now();
            }
            last = Some(stored);
            if verify::drained(sent, stored, unchanged) {
                break (stored, true);
            }
            if started.elapsed() >= timeout || last_progress.elapsed() >= STALL_TIMEOUT {
                break (stored, false);
            }
            tokio::time::sleep(poll).await;
        };
        let drain_seconds = started.elapsed().as_secs_f64();
        let latency: LatencyRow = self
            .query(&format!(
                "SELECT count() AS count, \
                 ifNotFinite(avg(d), 0) AS mean, \
                 quantileExact(0.5)(d) AS p50, quantileExact(0.9)(d) AS p90, \
                 quantileExact(0.99)(d) AS p99, quantileExact(0.999)(d) AS p999, \
                 max(d) AS max, \
                 min(toUnixTimestamp64Milli(ingested_at)) AS first_ingested, \
                 max(toUnixTimestamp64Milli(inserted_at)) AS last_inserted \
                 FROM (SELECT toFloat64(toUnixTimestamp64Milli(inserted_at) - toUnixTimestamp64Milli(ingested_at)) AS d, \
                       ingested_at, inserted_at FROM events WHERE {RUN_FILTER})"
            ))
            .fetch_one()
            .await?;
        let span_seconds = (latency.last_inserted - latency.first_ingested).max(1) as f64 / 1000.0;
        let verdict = verify::verdict(sent, stored);
        Ok(DeliveryReport {
            stored,
            sent,
            ok: verdict.is_ok() && drained,
            verdict,
            drained,
            drain_seconds,
            accepted_to_inserted: LatencySummary {
                count: latency.count,
                mean_ms: latency.mean,
                p50_ms: latency.p50,
                p90_ms: latency.p90,
                p99_ms: latency.p99,
                p999_ms: latency.p999,
                max_ms: latency.max,
            },
            end_to_end_rate: if latency.count == 0 {
                0.0
            } else {
                latency.count as f64 / span_seconds
            },
            first_ingested_ms: latency.first_ingested,
            last_inserted_ms: latency.last_inserted,
        })
    }
}

//! ClickHouse I/O: one insert with a dedup token, and the backoff policy the commit path
//! ([`crate::commit`]) retries transient failures with.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chute_schema::row::{EventsRow, EVENTS_TABLE};

use crate::error::Result;
use crate::telemetry;

/// Retry policy for inserts (and dead-letter publishes).
#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (1-based): initial * 2^(attempt-1), capped, with
    /// "equal jitter" (half fixed, half random) so replicas do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self.initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exponential.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Bytes per `send`: each is compressed as one LZ4 block (the `clickhouse` crate's own `Insert`
/// flushes at 256 KiB too).
const SEND_CHUNK_BYTES: usize = 256 * 1024;

/// `INSERT INTO events(<the columns of EventsRow>) FORMAT RowBinary`: the statement the
/// `clickhouse` crate's `insert::<EventsRow>` sends, without its schema round trip (it
/// describes the table first and sends `RowBinaryWithNamesAndTypes`). The column types are
/// pinned by `row::reference` and the proptest instead; a table that drifted from them makes
/// ClickHouse refuse the rows as unparsable.
pub fn insert_statement() -> String {
    let columns = <EventsRow as clickhouse::Row>::COLUMN_NAMES;
    debug_assert!(columns
        .iter()
        .all(|name| name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    format!("INSERT INTO {EVENTS_TABLE}({}) FORMAT RowBinary", columns.join(","))
}

/// Inserts `row_count` RowBinary rows (from [`crate::row::encode`]) into `events` with the
/// settings that make the token protect every rollup. LZ4-compressed like every insert of the
/// client.
pub async fn insert_batch(client: &clickhouse::Client, rows: Bytes, row_count: usize, token: &str) -> Result<()> {
    let started = Instant::now();
    let mut insert = client
        .insert_formatted_with(insert_statement())
        .with_setting("insert_deduplicate", "1")
        .with_setting("insert_deduplication_token", token)
        .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
        // A real 26.x server defaults to async inserts over HTTP, where tokens do not dedup.
        .with_setting("async_insert", "0")
        .with_setting("optimize_on_insert", "0")
        .with_setting("max_insert_block_size", "2000000")
        // Cluster mode inserts into a Distributed table: acknowledge only once every shard has
        // the block (the dedup argument needs the insert done, not queued). No effect on a
        // plain table; the old name works on every server >= 23.8.
        .with_setting("insert_distributed_sync", "1")
        .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
    let mut offset = 0;
    while offset < rows.len() {
        let end = rows.len().min(offset + SEND_CHUNK_BYTES);
        insert.send(rows.slice(offset..end)).await?;
        offset = end;
    }
    insert.end().await?;
    telemetry::inserted(row_count, started.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_names_every_column_but_inserted_at() {
        assert_eq!(
            insert_statement(),
            "INSERT INTO events(tenant,name,time,event_id,session_id,user_id,attributes,metrics,body,ingested_at) FORMAT RowBinary"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let backoff = Backoff::default();
        for attempt in 1..30 {
            let delay = backoff.delay(attempt);
            let ceiling = (backoff.initial * 2u32.pow((attempt - 1).min(16))).min(backoff.max);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?} vs {ceiling:?}"
            );
        }
        assert!(backoff.delay(40) <= Duration::from_secs(5));
    }
}

//! Named telemetry events for the aggregator (metric names are in the README's table).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const PARTITION_PENDING: &str = "chute_aggregator_partition_pending";
pub const OWNED_PARTITIONS: &str = "chute_aggregator_owned_partitions";
pub const BATCH_ROWS: &str = "chute_aggregator_batch_rows";
pub const BATCH_BYTES: &str = "chute_aggregator_batch_bytes";
pub const INSERT_DURATION: &str = "chute_aggregator_insert_duration_seconds";
pub const INSERT_RETRIES: &str = "chute_aggregator_insert_retries_total";
pub const INSERT_ERRORS: &str = "chute_aggregator_insert_errors_total";
pub const EVENTS_INSERTED: &str = "chute_aggregator_events_inserted_total";
pub const DLQ_MESSAGES: &str = "chute_aggregator_dlq_messages_total";
pub const DLQ_SIZE: &str = "chute_aggregator_dlq_size";
pub const INGEST_TO_INSERT: &str = "chute_aggregator_ingest_to_insert_seconds";
pub const LEASE_TAKEOVERS: &str = "chute_aggregator_lease_takeovers_total";
pub const BATCHES_REPLAYED: &str = "chute_aggregator_batches_replayed_total";
pub const BATCHES_COMMITTED: &str = "chute_aggregator_batches_committed_total";
pub const PARTITIONS_LOST: &str = "chute_aggregator_partitions_lost_total";

pub fn describe() {
    chute_common::telemetry::prometheus_handle();
    metrics::describe_gauge!(
        PARTITION_PENDING,
        "messages of a partition not yet read (consumer lag; the autoscaling signal)"
    );
    metrics::describe_gauge!(OWNED_PARTITIONS, "partitions this aggregator holds the lease for");
    metrics::describe_histogram!(BATCH_ROWS, "rows per ClickHouse insert");
    metrics::describe_histogram!(BATCH_BYTES, "payload bytes per batch");
    metrics::describe_histogram!(INSERT_DURATION, metrics::Unit::Seconds, "ClickHouse insert latency");
    metrics::describe_counter!(INSERT_RETRIES, "insert attempts that failed and were retried");
    metrics::describe_counter!(INSERT_ERRORS, "insert errors (each retried until success)");
    metrics::describe_counter!(
        EVENTS_INSERTED,
        "rows inserted into events (including deduplicated replays)"
    );
    metrics::describe_counter!(DLQ_MESSAGES, "poison messages published to EVENTS_DLQ");
    metrics::describe_gauge!(DLQ_SIZE, "messages in EVENTS_DLQ");
    metrics::describe_histogram!(
        INGEST_TO_INSERT,
        metrics::Unit::Seconds,
        "ingestor receive -> ClickHouse insert done, per message"
    );
    metrics::describe_counter!(LEASE_TAKEOVERS, "partitions taken over from another (expired) owner");
    metrics::describe_counter!(
        BATCHES_REPLAYED,
        "recorded batches of a dead owner replayed by this one"
    );
    metrics::describe_counter!(BATCHES_COMMITTED, "batches committed");
    metrics::describe_counter!(
        PARTITIONS_LOST,
        "partitions found taken over by another owner (fenced; nothing written)"
    ); // Counters that only move on failures exist from the start, so alerts see a 0, not no data.
    for name in [
        INSERT_ERRORS,
        INSERT_RETRIES,
        DLQ_MESSAGES,
        LEASE_TAKEOVERS,
        BATCHES_REPLAYED,
        PARTITIONS_LOST,
    ] {
        counter!(name).increment(0);
    }
    gauge!(DLQ_SIZE).increment(0.0);
}

pub fn inserted(rows: usize, elapsed: Duration) {
    histogram!(INSERT_DURATION).record(elapsed.as_secs_f64());
    histogram!(BATCH_ROWS).record(rows as f64);
    counter!(EVENTS_INSERTED).increment(rows as u64);
}

pub fn insert_failed(attempt: u32, token: &str, error: &dyn std::fmt::Display, retry_in: Duration) {
    tracing::warn!(attempt, token, error = %error, ?retry_in, "clickhouse insert failed; retrying");
    counter!(INSERT_ERRORS).increment(1);
    counter!(INSERT_RETRIES).increment(1);
}

pub fn batch_committed(rows: usize, bytes: usize, partitions: usize, received_ms: &[i64]) {
    histogram!(BATCH_BYTES).record(bytes as f64);
    counter!(BATCHES_COMMITTED).increment(1);
    let now_ms = crate::pipeline::now_ms() as i64;
    for received in received_ms {
        histogram!(INGEST_TO_INSERT).record((now_ms - received).max(0) as f64 / 1000.0);
    }
    tracing::debug!(rows, bytes, partitions, "batch committed");
}

pub fn dead_lettered(partition: u32, sequence: u64, error: &str) {
    tracing::warn!(partition, sequence, error, "poison message sent to EVENTS_DLQ");
    counter!(DLQ_MESSAGES).increment(1);
}

pub fn dlq_size(messages: u64) {
    gauge!(DLQ_SIZE).set(messages as f64);
}

pub fn partition_pending(partition: u32, pending: u64) {
    gauge!(PARTITION_PENDING, "partition" => partition.to_string()).set(pending as f64);
}

pub fn ownership(owned: usize, acquired: &[u32], released: &[u32], takeovers: usize) {
    gauge!(OWNED_PARTITIONS).set(owned as f64);
    if !acquired.is_empty() || !released.is_empty() {
        tracing::info!(owned, ?acquired, ?released, takeovers, "partition ownership changed");
    }
    counter!(LEASE_TAKEOVERS).increment(takeovers as u64);
    for partition in released {
        partition_pending(*partition, 0);
    }
}

pub fn replayed(token: &str) {
    tracing::info!(token, "replaying a recorded batch of a previous owner");
    counter!(BATCHES_REPLAYED).increment(1);
}

/// Fencing: partitions another owner took while we were stalled; their buffered messages are
/// dropped unwritten.
pub fn partitions_lost(partitions: &[u32]) {
    if partitions.is_empty() {
        return;
    }
    tracing::warn!(
        ?partitions,
        "lease lost to another owner; dropping these partitions without writing"
    );
    counter!(PARTITIONS_LOST).increment(partitions.len() as u64);
    for partition in partitions {
        partition_pending(*partition, 0);
    }
}

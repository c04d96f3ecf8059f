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
pub const INSERTS_REFUSED: &str = "chute_aggregator_inserts_refused_total";
pub const BATCH_SPLITS: &str = "chute_aggregator_batch_splits_total";
pub const DLQ_PUBLISH_ERRORS: &str = "chute_aggregator_dlq_publish_errors_total";
pub const PARTITION_STALLED: &str = "chute_aggregator_partition_stalled";
pub const PARTITION_PROGRESS_AGE: &str = "chute_aggregator_partition_progress_age_seconds";
pub const EVENTS_LOST: &str = "chute_aggregator_events_lost_total";
pub const REPLAY_DUPLICATES: &str = "chute_aggregator_replay_duplicates_total";

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
    );
    metrics::describe_counter!(
        INSERTS_REFUSED,
        "inserts ClickHouse refused for good (permanent error); the batch is split to isolate the cause"
    );
    metrics::describe_counter!(BATCH_SPLITS, "batch parts split in two while isolating refused rows");
    metrics::describe_counter!(DLQ_PUBLISH_ERRORS, "failed publishes to EVENTS_DLQ (retried)");
    metrics::describe_gauge!(
        PARTITION_STALLED,
        "1 while a partition has work but its position has not moved for --stall-after"
    );
    metrics::describe_gauge!(
        PARTITION_PROGRESS_AGE,
        metrics::Unit::Seconds,
        "time since a partition last committed or was idle (0 when idle)"
    );
    metrics::describe_counter!(
        EVENTS_LOST,
        "stream messages (each one request's events) that left the stream before they were inserted (a gap)"
    );
    metrics::describe_counter!(
        REPLAY_DUPLICATES,
        "re-published dead-letter messages dropped because another copy was already claimed"
    );
    metrics::describe_counter!(
        crate::batcher::OUT_OF_ORDER,
        "messages the batcher refused: not after the last one it took from their partition"
    );
    // Counters that only move on failures exist from the start, so alerts see a 0, not no data.
    for name in [
        REPLAY_DUPLICATES,
        crate::batcher::OUT_OF_ORDER,
        INSERTS_REFUSED,
        BATCH_SPLITS,
        DLQ_PUBLISH_ERRORS,
        EVENTS_LOST,
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

/// ClickHouse refused an insert for good: the unit is split (or, one message, dead-lettered).
pub fn insert_refused(token: &str, code: u32, reason: &str, messages: usize) {
    tracing::warn!(
        token,
        code,
        reason,
        messages,
        "clickhouse refused the insert for good; isolating the cause"
    );
    counter!(INSERT_ERRORS).increment(1);
    counter!(INSERTS_REFUSED).increment(1);
    if messages > 1 {
        counter!(BATCH_SPLITS).increment(1);
    }
}

pub fn dead_letter_failed(attempt: u32, token: &str, error: &dyn std::fmt::Display, retry_in: Duration) {
    tracing::warn!(attempt, token, error = %error, ?retry_in, "dead-letter publish failed; retrying");
    counter!(DLQ_PUBLISH_ERRORS).increment(1);
}

/// The stream is above half its cap: committed history is trimmed regardless of the window.
pub fn trim_under_pressure(bytes: u64, max_bytes: i64) {
    tracing::warn!(
        bytes,
        max_bytes,
        "EVENTS above half its cap: trimming committed history regardless of --stream-keep-committed"
    );
}

/// A second copy of a replayed dead-letter message: not inserted.
pub fn replay_duplicate(replay_id: &str, partition: u32, sequence: u64) {
    tracing::info!(
        replay_id,
        partition,
        sequence,
        "replayed message already inserted by another copy; dropped"
    );
    counter!(REPLAY_DUPLICATES).increment(1);
}

/// Messages that left the stream before they were inserted.
pub fn gap(lost_messages: u64, first_sequence: u64) {
    tracing::error!(
        lost_messages,
        first_sequence,
        "GAP: stream messages were removed before they were inserted (aged out, capped or purged); their events are lost"
    );
    counter!(EVENTS_LOST).increment(lost_messages);
}

/// A recorded batch whose messages are partly gone from the stream.
pub fn replay_gap(token: &str, partition: u32, expected: u32, found: usize) {
    tracing::error!(
        token,
        partition,
        expected,
        found,
        "GAP: a recorded batch's messages are gone from the stream; inserting what is left"
    );
    counter!(EVENTS_LOST).increment(u64::from(expected).saturating_sub(found as u64));
}

/// Per-partition progress: seconds since it last committed while having work, and whether
/// that exceeds the stall threshold.
pub fn partition_progress(partition: u32, age: Duration, stalled: bool) {
    let label = partition.to_string();
    gauge!(PARTITION_PROGRESS_AGE, "partition" => label.clone()).set(age.as_secs_f64());
    gauge!(PARTITION_STALLED, "partition" => label).set(if stalled { 1.0 } else { 0.0 });
}

pub fn batch_committed(rows: usize, bytes: usize, partitions: usize, received_ms: &[i64]) {
    histogram!(BATCH_BYTES).record(bytes as f64);
    counter!(BATCHES_COMMITTED).increment(1);
    let now_ms = crate::ledger::now_ms() as i64;
    for received in received_ms {
        histogram!(INGEST_TO_INSERT).record((now_ms - received).max(0) as f64 / 1000.0);
    }
    tracing::debug!(rows, bytes, partitions, "batch committed");
}

pub fn dead_lettered(partition: u32, sequence: u64, error: &str) {
    // Once per message: the ledger records that a batch's poison was dead-lettered.
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

// Trimming the EVENTS stream (`trim.rs`).

pub const STREAM_BYTES: &str = "chute_aggregator_stream_bytes";
pub const STREAM_MESSAGES: &str = "chute_aggregator_stream_messages";
pub const STREAM_MAX_BYTES: &str = "chute_aggregator_stream_max_bytes";
pub const STREAM_TRIMMED_BYTES: &str = "chute_aggregator_stream_trimmed_bytes_total";
pub const STREAM_TRIMMED_MESSAGES: &str = "chute_aggregator_stream_trimmed_messages_total";

pub fn describe_trimming() {
    chute_common::telemetry::prometheus_handle();
    metrics::describe_gauge!(STREAM_BYTES, metrics::Unit::Bytes, "bytes stored in the EVENTS stream");
    metrics::describe_gauge!(STREAM_MESSAGES, "messages stored in the EVENTS stream");
    metrics::describe_gauge!(
        STREAM_MAX_BYTES,
        metrics::Unit::Bytes,
        "size cap of the EVENTS stream (publishes are refused beyond it)"
    );
    metrics::describe_counter!(
        STREAM_TRIMMED_BYTES,
        metrics::Unit::Bytes,
        "bytes of committed messages purged from EVENTS by this aggregator (estimated at the mean message size)"
    );
    metrics::describe_counter!(
        STREAM_TRIMMED_MESSAGES,
        "committed messages purged from EVENTS by this aggregator"
    );
    counter!(STREAM_TRIMMED_BYTES).increment(0);
    counter!(STREAM_TRIMMED_MESSAGES).increment(0);
}

pub fn stream_size(bytes: u64, messages: u64, max_bytes: i64) {
    gauge!(STREAM_BYTES).set(bytes as f64);
    gauge!(STREAM_MESSAGES).set(messages as f64);
    gauge!(STREAM_MAX_BYTES).set(max_bytes as f64);
}

pub fn stream_trimmed(partition: u32, through: u64, messages: u64, bytes: u64) {
    tracing::debug!(
        partition,
        through,
        messages,
        bytes,
        "committed messages trimmed from EVENTS"
    );
    counter!(STREAM_TRIMMED_MESSAGES).increment(messages);
    counter!(STREAM_TRIMMED_BYTES).increment(bytes);
}

pub fn trim_failed(error: &dyn std::fmt::Display) {
    tracing::warn!(error = %error, "trimming EVENTS failed; retrying next round");
}

/// The ledger is bound to another incarnation of EVENTS than the one in NATS: no trimming.
pub fn trim_other_stream(ledger_epoch: i64, stream_epoch: i64) {
    tracing::warn!(
        ledger_epoch,
        stream_epoch,
        "the ledger describes another EVENTS stream (recreated?); not trimming"
    );
}

/// The ledger's position is past the end of the stream: it describes another stream. Trimming
/// on it could remove messages that were never inserted, so that partition is left alone.
pub fn committed_ahead_of_stream(partition: u32, committed: u64, last_sequence: u64) {
    tracing::warn!(
        partition,
        committed,
        last_sequence,
        "committed position is beyond the stream's last sequence; not trimming this partition"
    );
}

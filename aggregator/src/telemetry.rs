//! Named telemetry events for the aggregator. Each metric is one [`MetricDescription`] below, all
//! of them listed in [`METRICS`]; the README's metrics table documents the names.

use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge, histogram, Unit};

pub const PARTITION_PENDING: MetricDescription = MetricDescription {
    name: "chute_aggregator_partition_pending",
    kind: MetricKind::Gauge,
    unit: None,
    help: "messages of a partition not yet read (consumer lag; the autoscaling signal)",
    zero_at_start: false,
};

pub const OWNED_PARTITIONS: MetricDescription = MetricDescription {
    name: "chute_aggregator_owned_partitions",
    kind: MetricKind::Gauge,
    unit: None,
    help: "partitions this aggregator holds the lease for",
    zero_at_start: false,
};

pub const BATCH_ROWS: MetricDescription = MetricDescription {
    name: "chute_aggregator_batch_rows",
    kind: MetricKind::Histogram,
    unit: None,
    help: "rows per ClickHouse insert",
    zero_at_start: false,
};

pub const BATCH_BYTES: MetricDescription = MetricDescription {
    name: "chute_aggregator_batch_bytes",
    kind: MetricKind::Histogram,
    unit: None,
    help: "payload bytes per batch",
    zero_at_start: false,
};

pub const INSERT_DURATION: MetricDescription = MetricDescription {
    name: "chute_aggregator_insert_duration_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "ClickHouse insert latency",
    zero_at_start: false,
};

pub const INSERT_RETRIES: MetricDescription = MetricDescription {
    name: "chute_aggregator_insert_retries_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "insert attempts that failed and were retried",
    zero_at_start: true,
};

pub const INSERT_ERRORS: MetricDescription = MetricDescription {
    name: "chute_aggregator_insert_errors_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "insert errors (each retried until success)",
    zero_at_start: true,
};

pub const EVENTS_INSERTED: MetricDescription = MetricDescription {
    name: "chute_aggregator_events_inserted_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "rows inserted into events (including deduplicated replays)",
    zero_at_start: false,
};

pub const DLQ_MESSAGES: MetricDescription = MetricDescription {
    name: "chute_aggregator_dlq_messages_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "poison messages published to EVENTS_DLQ",
    zero_at_start: true,
};

pub const DLQ_SIZE: MetricDescription = MetricDescription {
    name: "chute_aggregator_dlq_size",
    kind: MetricKind::Gauge,
    unit: None,
    help: "messages in EVENTS_DLQ",
    zero_at_start: true,
};

pub const INGEST_TO_INSERT: MetricDescription = MetricDescription {
    name: "chute_aggregator_ingest_to_insert_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "ingestor receive -> ClickHouse insert done, per message",
    zero_at_start: false,
};

pub const LEASE_TAKEOVERS: MetricDescription = MetricDescription {
    name: "chute_aggregator_lease_takeovers_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "partitions taken over from another (expired) owner",
    zero_at_start: true,
};

pub const BATCHES_REPLAYED: MetricDescription = MetricDescription {
    name: "chute_aggregator_batches_replayed_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "recorded batches of a dead owner replayed by this one",
    zero_at_start: true,
};

pub const BATCHES_COMMITTED: MetricDescription = MetricDescription {
    name: "chute_aggregator_batches_committed_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "batches committed",
    zero_at_start: false,
};

pub const PARTITIONS_LOST: MetricDescription = MetricDescription {
    name: "chute_aggregator_partitions_lost_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "partitions found taken over by another owner (fenced; nothing written)",
    zero_at_start: true,
};

pub const LEDGER_CATCH_UPS: MetricDescription = MetricDescription {
    name: "chute_aggregator_ledger_catch_ups_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "ledger writes that timed out and were followed by catch-up messages (nats-server < 2.9.21 stale leader sequence, see ledger.rs); label answered=true when the leader answered again",
    zero_at_start: true,
};

pub const READERS_STUCK: MetricDescription = MetricDescription {
    name: "chute_aggregator_readers_stuck_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "partition consumers reopened because they delivered nothing while the stream held messages for them",
    zero_at_start: true,
};

pub const INSERTS_REFUSED: MetricDescription = MetricDescription {
    name: "chute_aggregator_inserts_refused_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "inserts ClickHouse refused for good (permanent error); the batch is split to isolate the cause",
    zero_at_start: true,
};

pub const BATCH_SPLITS: MetricDescription = MetricDescription {
    name: "chute_aggregator_batch_splits_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "batch parts split in two while isolating refused rows",
    zero_at_start: true,
};

pub const DLQ_PUBLISH_ERRORS: MetricDescription = MetricDescription {
    name: "chute_aggregator_dlq_publish_errors_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "failed publishes to EVENTS_DLQ (retried)",
    zero_at_start: true,
};

pub const PARTITION_STALLED: MetricDescription = MetricDescription {
    name: "chute_aggregator_partition_stalled",
    kind: MetricKind::Gauge,
    unit: None,
    help: "1 while a partition has work but its position has not moved for --stall-after",
    zero_at_start: false,
};

pub const PARTITION_PROGRESS_AGE: MetricDescription = MetricDescription {
    name: "chute_aggregator_partition_progress_age_seconds",
    kind: MetricKind::Gauge,
    unit: Some(Unit::Seconds),
    help: "time since a partition last committed or was idle (0 when idle)",
    zero_at_start: false,
};

pub const EVENTS_LOST: MetricDescription = MetricDescription {
    name: "chute_aggregator_events_lost_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "stream messages (each one request's events) that left the stream before they were inserted (a gap)",
    zero_at_start: true,
};

pub const REPLAY_DUPLICATES: MetricDescription = MetricDescription {
    name: "chute_aggregator_replay_duplicates_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "re-published dead-letter messages dropped because another copy was already claimed",
    zero_at_start: true,
};

/// Counted by [`crate::batcher::OutOfOrder::report`].
pub const OUT_OF_ORDER: MetricDescription = MetricDescription {
    name: "chute_aggregator_out_of_order_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "messages the batcher refused: not after the last one it took from their partition",
    zero_at_start: true,
};

/// Every metric the aggregator exports, described when it starts.
pub const METRICS: &[MetricDescription] = &[
    PARTITION_PENDING,
    OWNED_PARTITIONS,
    BATCH_ROWS,
    BATCH_BYTES,
    INSERT_DURATION,
    INSERT_RETRIES,
    INSERT_ERRORS,
    EVENTS_INSERTED,
    DLQ_MESSAGES,
    DLQ_SIZE,
    INGEST_TO_INSERT,
    LEASE_TAKEOVERS,
    BATCHES_REPLAYED,
    BATCHES_COMMITTED,
    PARTITIONS_LOST,
    READERS_STUCK,
    LEDGER_CATCH_UPS,
    INSERTS_REFUSED,
    BATCH_SPLITS,
    DLQ_PUBLISH_ERRORS,
    PARTITION_STALLED,
    PARTITION_PROGRESS_AGE,
    EVENTS_LOST,
    REPLAY_DUPLICATES,
    OUT_OF_ORDER,
    STREAM_BYTES,
    STREAM_MESSAGES,
    STREAM_MAX_BYTES,
    STREAM_TRIMMED_BYTES,
    STREAM_TRIMMED_MESSAGES,
    TRIM_PASSED_CONSUMER,
];

/// Installs the Prometheus recorder and registers [`METRICS`], so `/metrics` shows HELP lines
/// from the start.
pub fn describe() {
    chute_common::telemetry::describe(METRICS);
}

pub fn inserted(rows: usize, elapsed: Duration) {
    histogram!(INSERT_DURATION.name).record(elapsed.as_secs_f64());
    histogram!(BATCH_ROWS.name).record(rows as f64);
    counter!(EVENTS_INSERTED.name).increment(rows as u64);
}

pub fn insert_failed(attempt: u32, token: &str, error: &dyn std::fmt::Display, retry_in: Duration) {
    tracing::warn!(attempt, token, error = %error, ?retry_in, "clickhouse insert failed; retrying");
    counter!(INSERT_ERRORS.name).increment(1);
    counter!(INSERT_RETRIES.name).increment(1);
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
    counter!(INSERT_ERRORS.name).increment(1);
    counter!(INSERTS_REFUSED.name).increment(1);
    if messages > 1 {
        counter!(BATCH_SPLITS.name).increment(1);
    }
}

pub fn dead_letter_failed(attempt: u32, token: &str, error: &dyn std::fmt::Display, retry_in: Duration) {
    tracing::warn!(attempt, token, error = %error, ?retry_in, "dead-letter publish failed; retrying");
    counter!(DLQ_PUBLISH_ERRORS.name).increment(1);
}

/// The stream is above half its cap: committed history is trimmed regardless of the window.
pub fn trim_passed_consumer(partition: u32) {
    counter!(TRIM_PASSED_CONSUMER.name).increment(1);
    tracing::warn!(
        partition,
        "EVENTS under pressure: purged past a durable consumer's ack floor (a router or other reader misses those messages)"
    );
}

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
    counter!(REPLAY_DUPLICATES.name).increment(1);
}

/// Messages that left the stream before they were inserted.
pub fn gap(lost_messages: u64, first_sequence: u64) {
    tracing::error!(
        lost_messages,
        first_sequence,
        "GAP: stream messages were removed before they were inserted (aged out, capped or purged); their events are lost"
    );
    counter!(EVENTS_LOST.name).increment(lost_messages);
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
    counter!(EVENTS_LOST.name).increment(u64::from(expected).saturating_sub(found as u64));
}

/// Per-partition progress: seconds since it last committed while having work, and whether
/// that exceeds the stall threshold.
pub fn partition_progress(partition: u32, age: Duration, stalled: bool) {
    let label = partition.to_string();
    gauge!(PARTITION_PROGRESS_AGE.name, "partition" => label.clone()).set(age.as_secs_f64());
    gauge!(PARTITION_STALLED.name, "partition" => label).set(if stalled { 1.0 } else { 0.0 });
}

pub fn batch_committed(token: &str, rows: usize, bytes: usize, partitions: usize, received_ms: &[i64]) {
    histogram!(BATCH_BYTES.name).record(bytes as f64);
    counter!(BATCHES_COMMITTED.name).increment(1);
    let now_ms = chute_common::validate::unix_millis_now();
    for received in received_ms {
        histogram!(INGEST_TO_INSERT.name).record((now_ms - received).max(0) as f64 / 1000.0);
    }
    tracing::debug!(token, rows, bytes, partitions, "batch committed");
}

pub fn dead_lettered(partition: u32, sequence: u64, error: &str) {
    // Once per message: the ledger records that a batch's poison was dead-lettered.
    tracing::warn!(partition, sequence, error, "poison message sent to EVENTS_DLQ");
    counter!(DLQ_MESSAGES.name).increment(1);
}

pub fn dlq_size(messages: u64) {
    gauge!(DLQ_SIZE.name).set(messages as f64);
}

pub fn partition_pending(partition: u32, pending: u64) {
    gauge!(PARTITION_PENDING.name, "partition" => partition.to_string()).set(pending as f64);
}

pub fn ownership(owned: usize, acquired: &[u32], released: &[u32], takeovers: usize) {
    gauge!(OWNED_PARTITIONS.name).set(owned as f64);
    if !acquired.is_empty() || !released.is_empty() {
        tracing::info!(owned, ?acquired, ?released, takeovers, "partition ownership changed");
    }
    counter!(LEASE_TAKEOVERS.name).increment(takeovers as u64);
    for partition in released {
        partition_pending(*partition, 0);
    }
}

pub fn replayed(token: &str) {
    tracing::info!(token, "replaying a recorded batch of a previous owner");
    counter!(BATCHES_REPLAYED.name).increment(1);
}

/// A partition's consumer went quiet while the stream held messages for it; it is reopened.
pub fn reader_stuck(partition: u32) {
    tracing::warn!(
        partition,
        "partition consumer stuck: the stream holds messages it does not deliver; reopening"
    );
    counter!(READERS_STUCK.name).increment(1);
}

/// A ledger write timed out; [`crate::ledger::Ledger`] sent `sent` catch-up messages, and the
/// bucket's leader answered one of them (`answered`) or none.
pub fn ledger_catch_up(sent: usize, answered: bool) {
    if answered && sent > CATCH_UP_QUIET {
        tracing::warn!(
            sent,
            "ledger writes went unanswered: the bucket's leader was behind; caught up"
        );
    } else if !answered {
        tracing::warn!(sent, "ledger write timed out and no catch-up message was answered");
    }
    counter!(LEDGER_CATCH_UPS.name, "answered" => if answered { "true" } else { "false" }).increment(1);
}

/// Catch-ups answered within their first round are a slow write, not a stale leader.
const CATCH_UP_QUIET: usize = 32;

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
    counter!(PARTITIONS_LOST.name).increment(partitions.len() as u64);
    for partition in partitions {
        partition_pending(*partition, 0);
    }
}

// Trimming the EVENTS stream (`trim.rs`).

pub const STREAM_BYTES: MetricDescription = MetricDescription {
    name: "chute_aggregator_stream_bytes",
    kind: MetricKind::Gauge,
    unit: Some(Unit::Bytes),
    help: "bytes stored in the EVENTS stream",
    zero_at_start: false,
};

pub const STREAM_MESSAGES: MetricDescription = MetricDescription {
    name: "chute_aggregator_stream_messages",
    kind: MetricKind::Gauge,
    unit: None,
    help: "messages stored in the EVENTS stream",
    zero_at_start: false,
};

pub const STREAM_MAX_BYTES: MetricDescription = MetricDescription {
    name: "chute_aggregator_stream_max_bytes",
    kind: MetricKind::Gauge,
    unit: Some(Unit::Bytes),
    help: "size cap of the EVENTS stream (publishes are refused beyond it)",
    zero_at_start: false,
};

pub const STREAM_TRIMMED_BYTES: MetricDescription = MetricDescription {
    name: "chute_aggregator_stream_trimmed_bytes_total",
    kind: MetricKind::Counter,
    unit: Some(Unit::Bytes),
    help: "bytes of committed messages purged from EVENTS by this aggregator (estimated at the mean message size)",
    zero_at_start: true,
};

pub const TRIM_PASSED_CONSUMER: MetricDescription = MetricDescription {
    name: "chute_aggregator_trim_passed_consumer_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "purges of a partition past a durable consumer's ack floor (only under pressure; that reader misses them)",
    zero_at_start: true,
};

pub const STREAM_TRIMMED_MESSAGES: MetricDescription = MetricDescription {
    name: "chute_aggregator_stream_trimmed_messages_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "committed messages purged from EVENTS by this aggregator",
    zero_at_start: true,
};

pub fn stream_size(bytes: u64, messages: u64, max_bytes: i64) {
    gauge!(STREAM_BYTES.name).set(bytes as f64);
    gauge!(STREAM_MESSAGES.name).set(messages as f64);
    gauge!(STREAM_MAX_BYTES.name).set(max_bytes as f64);
}

/// A purge that JetStream confirmed: of one partition, or (`None`) of the whole stream.
pub fn stream_trimmed(partition: Option<u32>, through: u64, messages: u64, bytes: u64) {
    tracing::debug!(
        partition,
        through,
        messages,
        bytes,
        "committed messages trimmed from EVENTS"
    );
    counter!(STREAM_TRIMMED_MESSAGES.name).increment(messages);
    counter!(STREAM_TRIMMED_BYTES.name).increment(bytes);
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

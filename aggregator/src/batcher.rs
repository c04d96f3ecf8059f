//! Batch forming as data plus a clock: which messages go into the next insert and when to flush.
//!
//! One batch spans every partition this aggregator owns (one insert per flush, not one per
//! partition), so the insert rate is bounded by `min_insert_interval` whatever the partition
//! count. A batch flushes when it reaches `max_rows` or `max_bytes`, or when `linger` has passed
//! since its first message, or early when the input has been idle for `idle_flush` — and never
//! sooner than `min_insert_interval` after the previous insert (the insert budget).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::consumer::PartitionMessage;
use crate::ledger::SeqRange;

/// Flush policy.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    pub idle_flush: Duration,
    pub min_insert_interval: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_rows: 200_000,
            max_bytes: 64 << 20,
            linger: Duration::from_millis(200),
            idle_flush: Duration::from_millis(20),
            min_insert_interval: Duration::from_millis(200),
        }
    }
}

/// Messages gathered for the next insert, in per-partition stream order.
#[derive(Debug, Default)]
pub struct Batcher {
    messages: BTreeMap<u32, Vec<PartitionMessage>>,
    rows: usize,
    bytes: usize,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    last_insert: Option<Instant>,
}

impl Batcher {
    /// Adds a message (read at `message.read_at`, handed over `now`).
    pub fn push(&mut self, message: PartitionMessage, now: Instant) {
        debug_assert!(
            self.messages
                .get(&message.partition)
                .and_then(|m| m.last())
                .is_none_or(|last| last.sequence < message.sequence),
            "messages of a partition arrive in stream order"
        );
        self.rows += message.events();
        self.bytes += message.payload.len();
        let arrived = message.read_at.min(now);
        self.first_at = Some(self.first_at.map_or(arrived, |first| first.min(arrived)));
        self.last_at = Some(now);
        self.messages.entry(message.partition).or_default().push(message);
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// True when the batch is full: stop pulling until it is flushed.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.rows >= limits.max_rows || self.bytes >= limits.max_bytes
    }

    /// When the batch should flush (None while empty). May be in the past: flush now.
    pub fn flush_at(&self, limits: &BatchLimits) -> Option<Instant> {
        let first = self.first_at?;
        let last = self.last_at.unwrap_or(first);
        let wanted = if self.is_full(limits) {
            last
        } else {
            (first + limits.linger).min(last + limits.idle_flush)
        };
        let budget = self.last_insert.map(|at| at + limits.min_insert_interval);
        Some(budget.map_or(wanted, |budget| wanted.max(budget)))
    }

    /// Drops the messages of partitions this aggregator no longer reads.
    pub fn retain_partitions(&mut self, keep: impl Fn(u32) -> bool) {
        self.messages.retain(|partition, _| keep(*partition));
        let kept = || self.messages.values().flatten();
        self.rows = kept().map(PartitionMessage::events).sum();
        self.bytes = kept().map(|m| m.payload.len()).sum();
        self.first_at = kept().map(|m| m.read_at).min();
        if self.messages.is_empty() {
            self.last_at = None;
        }
    }

    /// Takes the batch: its ranges (sorted by partition) and messages.
    pub fn take(&mut self, now: Instant) -> (Vec<SeqRange>, Vec<PartitionMessage>) {
        let ranges = self
            .messages
            .iter()
            .filter_map(|(partition, messages)| {
                Some(SeqRange {
                    partition: *partition,
                    first: messages.first()?.sequence,
                    last: messages.last()?.sequence,
                })
            })
            .collect();
        let messages = std::mem::take(&mut self.messages).into_values().flatten().collect();
        (self.rows, self.bytes, self.first_at, self.last_at) = (0, 0, None, None);
        self.last_insert = Some(now);
        (ranges, messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(partition: u32, sequence: u64) -> PartitionMessage {
        PartitionMessage::new(partition, 1, sequence, 0, Bytes::from_static(b"0123456789"))
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_after_idle_or_linger_and_respects_the_insert_budget() {
        let limits = BatchLimits {
            max_rows: 1000,
            linger: Duration::from_millis(200),
            idle_flush: Duration::from_millis(20),
            ..Default::default()
        };
        let mut batcher = Batcher::default();
        let start = Instant::now();
        assert_eq!(batcher.flush_at(&limits), None);
        batcher.push(message(0, 1), start);
        assert_eq!(
            batcher.flush_at(&limits),
            Some(start + Duration::from_millis(20)),
            "idle flush"
        );
        // Continuous input: the linger caps the wait.
        for i in 1..30 {
            batcher.push(message(0, 1 + i), start + Duration::from_millis(10 * i));
        }
        assert_eq!(batcher.flush_at(&limits), Some(start + Duration::from_millis(200)));
        let (ranges, messages) = batcher.take(start + Duration::from_millis(200));
        assert_eq!(
            (ranges, messages.len()),
            (
                vec![SeqRange {
                    partition: 0,
                    first: 1,
                    last: 30
                }],
                30
            )
        );
        // The next batch waits for the insert budget even when idle.
        batcher.push(message(0, 31), start + Duration::from_millis(210));
        assert_eq!(batcher.flush_at(&limits), Some(start + Duration::from_millis(400)));
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_flush_at_once_and_span_partitions() {
        let limits = BatchLimits {
            max_rows: 3,
            ..Default::default()
        };
        let mut batcher = Batcher::default();
        let now = Instant::now();
        batcher.push(message(3, 7), now);
        batcher.push(message(1, 5), now);
        assert!(!batcher.is_full(&limits));
        batcher.push(message(3, 9), now);
        assert!(batcher.is_full(&limits));
        assert_eq!(batcher.flush_at(&limits), Some(now));
        let (ranges, _) = batcher.take(now);
        assert_eq!(
            ranges,
            vec![
                SeqRange {
                    partition: 1,
                    first: 5,
                    last: 5
                },
                SeqRange {
                    partition: 3,
                    first: 7,
                    last: 9
                }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lost_partitions_are_dropped() {
        let mut batcher = Batcher::default();
        let now = Instant::now();
        batcher.push(message(0, 1), now);
        batcher.push(message(1, 2), now);
        batcher.retain_partitions(|p| p == 1);
        assert_eq!(batcher.rows(), 1);
        let (ranges, _) = batcher.take(now);
        assert_eq!(ranges.len(), 1);
    }
}

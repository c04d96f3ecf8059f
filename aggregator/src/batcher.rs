//! Batch forming as data plus a clock: which messages go into the next insert and when to flush.
//!
//! One batch spans every partition this aggregator owns (one insert per flush, not one per
//! partition), so the insert rate is bounded by `min_insert_interval` whatever the partition
//! count. A batch flushes when it reaches `max_rows` or `max_bytes`, or when `linger` has passed
//! since its first message, or early when the input has been idle for `idle_flush` — and never
//! sooner than `min_insert_interval` after the previous insert (the insert budget).
//!
//! Memory is bounded by bytes: `max_bytes` covers the batch in flight (recorded, being inserted)
//! and the one being gathered together, so the batcher stops accepting once their payload bytes
//! reach it (RowBinary is about as large as the protobuf it comes from, see `BENCHMARKS.md`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::consumer::PartitionMessage;
use crate::ledger::SeqRange;
use crate::telemetry;

/// Flush policy.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLimits {
    /// Rows (events) of one batch.
    pub max_rows: usize,
    /// Payload bytes of the batch in flight plus the one being gathered.
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
    /// Per partition, the last message accepted, whether still held or already handed out by
    /// `take`: a later message must come after it, so ranges never overlap or invert.
    last_accepted: BTreeMap<u32, Accepted>,
    rows: usize,
    bytes: usize,
    /// Payload bytes of the batch in flight (0 when none): they count against `max_bytes` too.
    in_flight_bytes: usize,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    last_insert: Option<Instant>,
}

/// Where a partition's reader stood at its last accepted message.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Accepted {
    generation: u64,
    sequence: u64,
}

/// A message refused because it does not come after what the batcher already accepted from its
/// partition: a repeat or a reordering upstream. It is not batched (its sequence is already in
/// this batch or an earlier one), so no range can overlap another or run backwards.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "partition {partition}: message {sequence} of reader {generation} does not come after \
     {last_sequence} of reader {last_generation}"
)]
pub struct OutOfOrder {
    pub partition: u32,
    pub generation: u64,
    pub sequence: u64,
    pub last_generation: u64,
    pub last_sequence: u64,
}

impl OutOfOrder {
    /// Telemetry: log the refusal and count it (`chute_aggregator_out_of_order_total`). Any
    /// count is a bug upstream worth an alert, not load.
    pub fn report(&self) {
        tracing::warn!(
            partition = self.partition,
            generation = self.generation,
            sequence = self.sequence,
            last_generation = self.last_generation,
            last_sequence = self.last_sequence,
            "message out of order; not batched"
        );
        metrics::counter!(telemetry::OUT_OF_ORDER.name).increment(1);
    }
}

impl Batcher {
    /// Adds a message (read at `message.read_at`, handed over `now`), unless it does not come
    /// after the last one accepted from its partition.
    ///
    /// Within one reader generation sequences must rise, across `take` too. A newer generation
    /// is a new reader that the pipeline started from the ledger's committed position, so it
    /// starts over: messages still held from the older reader are dropped (they were never
    /// recorded, and the new reader reads them again). Messages of an older generation than the
    /// last accepted one are refused.
    pub fn push(&mut self, message: PartitionMessage, now: Instant) -> Result<(), OutOfOrder> {
        let partition = message.partition;
        if let Some(last) = self.last_accepted.get(&partition).copied() {
            if message.generation > last.generation {
                self.drop_held(|p| p != partition);
            } else if message.generation < last.generation || message.sequence <= last.sequence {
                return Err(OutOfOrder {
                    partition,
                    generation: message.generation,
                    sequence: message.sequence,
                    last_generation: last.generation,
                    last_sequence: last.sequence,
                });
            }
        }
        self.last_accepted.insert(
            partition,
            Accepted {
                generation: message.generation,
                sequence: message.sequence,
            },
        );
        self.rows += message.events();
        self.bytes += message.payload.len();
        let arrived = message.read_at.min(now);
        self.first_at = Some(self.first_at.map_or(arrived, |first| first.min(arrived)));
        self.last_at = Some(now);
        self.messages.entry(partition).or_default().push(message);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Payload bytes gathered (not counting the batch in flight).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The batch taken last is in flight with `bytes` payload bytes (for a replay read back from
    /// the stream, whose size is not known before it is read, the caller passes `max_bytes`):
    /// until [`Batcher::in_flight_done`], gathering stops at `max_bytes - bytes`.
    pub fn in_flight(&mut self, bytes: usize) {
        self.in_flight_bytes = bytes;
    }

    /// The batch in flight is resolved: its bytes are free again.
    pub fn in_flight_done(&mut self) {
        self.in_flight_bytes = 0;
    }

    /// True when the batch is full: its rows reached `max_rows`, or its bytes and those of the
    /// batch in flight reached `max_bytes`. Stop pulling until it is flushed (or the batch in
    /// flight is done); one message may overshoot, since it is accepted before it is measured.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.rows >= limits.max_rows || self.bytes + self.in_flight_bytes >= limits.max_bytes
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

    /// Drops the messages of partitions this aggregator no longer reads, and what it remembers
    /// of them: a later reader of such a partition starts from the ledger again.
    pub fn retain_partitions(&mut self, keep: impl Fn(u32) -> bool) {
        self.last_accepted.retain(|partition, _| keep(*partition));
        self.drop_held(keep);
    }

    /// Drops the held messages of the partitions not kept and recounts the batch.
    fn drop_held(&mut self, keep: impl Fn(u32) -> bool) {
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
        from_reader(1, partition, sequence)
    }

    fn from_reader(generation: u64, partition: u32, sequence: u64) -> PartitionMessage {
        PartitionMessage::new(partition, generation, sequence, 0, Bytes::from_static(b"0123456789"))
    }

    fn range(partition: u32, first: u64, last: u64) -> SeqRange {
        SeqRange { partition, first, last }
    }

    fn sized(partition: u32, sequence: u64, bytes: usize) -> PartitionMessage {
        PartitionMessage::new(partition, 1, sequence, 0, Bytes::from(vec![0xff; bytes]))
    }

    fn sequences(messages: &[PartitionMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.sequence).collect()
    }

    /// `max_rows` or `max_bytes` when the test bounds only the other.
    const NO_BOUND: usize = usize::MAX;

    /// The policy the tests' times are worked out from (idle flush 20 ms, linger and insert
    /// budget 200 ms, pinned here rather than taken from `Default`), with the given size bounds.
    fn policy(max_rows: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_rows,
            max_bytes,
            linger: Duration::from_millis(200),
            idle_flush: Duration::from_millis(20),
            min_insert_interval: Duration::from_millis(200),
        }
    }

    /// An empty batcher, and the paused clock's now.
    fn empty_batcher() -> (Batcher, Instant) {
        (Batcher::default(), Instant::now())
    }

    /// Pushes `messages` in order at `now`, each one accepted.
    fn push_all(batcher: &mut Batcher, messages: impl IntoIterator<Item = PartitionMessage>, now: Instant) {
        for message in messages {
            batcher.push(message, now).unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_after_idle_or_linger_and_respects_the_insert_budget() {
        let limits = policy(1000, NO_BOUND);
        let (mut batcher, start) = empty_batcher();
        assert_eq!(batcher.flush_at(&limits), None);
        batcher.push(message(0, 1), start).unwrap();
        assert_eq!(
            batcher.flush_at(&limits),
            Some(start + Duration::from_millis(20)),
            "idle flush"
        );
        // Continuous input: the linger caps the wait.
        for i in 1..30 {
            batcher
                .push(message(0, 1 + i), start + Duration::from_millis(10 * i))
                .unwrap();
        }
        assert_eq!(batcher.flush_at(&limits), Some(start + Duration::from_millis(200)));
        let (ranges, messages) = batcher.take(start + Duration::from_millis(200));
        assert_eq!((ranges, messages.len()), (vec![range(0, 1, 30)], 30));
        // The next batch waits for the insert budget even when idle.
        batcher
            .push(message(0, 31), start + Duration::from_millis(210))
            .unwrap();
        assert_eq!(batcher.flush_at(&limits), Some(start + Duration::from_millis(400)));
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_flush_at_once_and_span_partitions() {
        let limits = policy(3, NO_BOUND);
        let (mut batcher, now) = empty_batcher();
        batcher.push(message(3, 7), now).unwrap();
        batcher.push(message(1, 5), now).unwrap();
        assert!(!batcher.is_full(&limits));
        batcher.push(message(3, 9), now).unwrap();
        assert!(batcher.is_full(&limits));
        assert_eq!(batcher.flush_at(&limits), Some(now));
        assert_eq!(batcher.take(now).0, vec![range(1, 5, 5), range(3, 7, 9)]);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_partitions_are_dropped() {
        let (mut batcher, now) = empty_batcher();
        batcher.push(message(0, 1), now).unwrap();
        batcher.push(message(1, 2), now).unwrap();
        batcher.retain_partitions(|p| p == 1);
        assert_eq!(batcher.rows(), 1);
        let (ranges, _) = batcher.take(now);
        assert_eq!(ranges.len(), 1);
    }

    /// The issue-10 shape: a reader that restarted from its start sequence re-feeds 1..30 after
    /// 21..25. Without the check the batch would be recorded as 21-30 holding 21..25 twice.
    #[tokio::test(start_paused = true)]
    async fn a_re_fed_message_is_refused_and_the_range_stays_exact() {
        let (mut batcher, now) = empty_batcher();
        push_all(&mut batcher, (21..=25).map(|sequence| message(0, sequence)), now);
        let mut refused = Vec::new();
        for sequence in 1..=30 {
            if let Err(rejected) = batcher.push(message(0, sequence), now) {
                refused.push(rejected.sequence);
            }
        }
        assert_eq!(refused, (1..=25).collect::<Vec<_>>());
        assert_eq!(batcher.rows(), 10);
        let (ranges, messages) = batcher.take(now);
        assert_eq!(ranges, vec![range(0, 21, 30)]);
        assert_eq!(sequences(&messages), (21..=30).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sequence_at_or_below_one_already_taken_is_refused() {
        let (mut batcher, now) = empty_batcher();
        push_all(&mut batcher, (1..=30).map(|sequence| message(0, sequence)), now);
        batcher.push(message(1, 40), now).unwrap();
        batcher.take(now);
        // The taken batch is recorded and in flight: a repeat of its messages must not start a
        // range that overlaps it (or one that runs backwards, like 30-21).
        assert_eq!(
            batcher.push(message(0, 30), now),
            Err(OutOfOrder {
                partition: 0,
                generation: 1,
                sequence: 30,
                last_generation: 1,
                last_sequence: 30
            })
        );
        assert!(batcher.push(message(0, 21), now).is_err());
        assert!(batcher.push(message(1, 39), now).is_err());
        assert!(batcher.is_empty());
        batcher.push(message(0, 31), now).unwrap();
        batcher.push(message(1, 41), now).unwrap();
        assert_eq!(batcher.take(now).0, vec![range(0, 31, 31), range(1, 41, 41)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_partition_is_forgotten() {
        let (mut batcher, now) = empty_batcher();
        push_all(&mut batcher, (1..=10).map(|sequence| message(0, sequence)), now);
        batcher.take(now);
        // Lost and later owned again: its reader restarts from the committed position.
        batcher.retain_partitions(|_| false);
        batcher.push(message(0, 5), now).unwrap();
        assert_eq!(batcher.take(now).0, vec![range(0, 5, 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_reader_starts_over_and_an_old_one_is_refused() {
        let (mut batcher, now) = empty_batcher();
        push_all(&mut batcher, (1..=10).map(|sequence| from_reader(1, 0, sequence)), now);
        batcher.push(from_reader(1, 1, 3), now).unwrap();
        // Reader 2 of partition 0 restarts from the committed position: reader 1's unrecorded
        // messages are dropped (reader 2 reads them again), partition 1 is untouched.
        batcher.push(from_reader(2, 0, 4), now).unwrap();
        assert_eq!(batcher.rows(), 2);
        assert!(batcher.push(from_reader(1, 0, 11), now).is_err(), "stale reader");
        batcher.push(from_reader(2, 0, 5), now).unwrap();
        let (ranges, messages) = batcher.take(now);
        assert_eq!(ranges, vec![range(0, 4, 5), range(1, 3, 3)]);
        assert_eq!(sequences(&messages), vec![4, 5, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_bound_the_gathered_batch() {
        let limits = policy(NO_BOUND, 1000);
        let (mut batcher, start) = empty_batcher();
        for sequence in 1..=3 {
            batcher.push(sized(0, sequence, 300), start).unwrap();
            assert!(!batcher.is_full(&limits));
        }
        batcher.push(sized(1, 1, 300), start).unwrap();
        assert!(batcher.is_full(&limits), "1200 bytes: one message over, then stop");
        assert_eq!(batcher.flush_at(&limits), Some(start), "full: flush at once");
        let (_, messages) = batcher.take(start);
        assert_eq!((messages.len(), batcher.bytes()), (4, 0));
    }

    /// The batch in flight and the one gathered share `max_bytes`: while a 700-byte batch is
    /// inserted, gathering stops at 300 bytes, and the budget comes back when it is done.
    #[tokio::test(start_paused = true)]
    async fn the_batch_in_flight_counts_against_the_byte_bound() {
        let limits = policy(NO_BOUND, 1000);
        let (mut batcher, start) = empty_batcher();
        push_all(&mut batcher, (1..=7).map(|sequence| sized(0, sequence, 100)), start);
        let (_, in_flight) = batcher.take(start);
        let in_flight_bytes = in_flight.iter().map(|m| m.payload.len()).sum();
        assert_eq!(in_flight_bytes, 700);
        batcher.in_flight(in_flight_bytes);
        assert!(!batcher.is_full(&limits));
        batcher.push(sized(0, 8, 100), start).unwrap();
        batcher.push(sized(0, 9, 100), start).unwrap();
        assert!(!batcher.is_full(&limits), "900 bytes held in all");
        batcher.push(sized(0, 10, 100), start).unwrap();
        assert!(batcher.is_full(&limits), "1000 bytes: stop accepting");
        batcher.in_flight_done();
        assert!(!batcher.is_full(&limits), "300 bytes gathered, nothing in flight");
        // Not full any more: the usual policy (idle flush, insert budget) decides when.
        assert_eq!(batcher.flush_at(&limits), Some(start + Duration::from_millis(200)));
        // A replay of unknown size in flight: the whole budget is taken.
        batcher.in_flight(limits.max_bytes);
        assert!(batcher.is_full(&limits));
    }
}

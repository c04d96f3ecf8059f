//! The aggregator loop: ownership rounds, reading, batching, and the record -> insert -> commit
//! protocol of `EXACTLY_ONCE.md`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use chute_common::validate::Limits;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batcher::{BatchLimits, Batcher};
use crate::consumer::{self, PartitionMessage, Reader};
use crate::error::Result;
use crate::ledger::{BatchRecord, Ledger};
use crate::writer::{insert_batch, Backoff};
use crate::{dlq, row, telemetry};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Everything the loop needs.
pub struct Pipeline {
    pub me: String,
    pub partitions: u32,
    pub lease: Duration,
    pub batch_limits: BatchLimits,
    pub limits: Limits,
    pub ledger: Ledger,
    pub jetstream: jetstream::Context,
    pub stream: Stream,
    pub clickhouse: clickhouse::Client,
    pub read_buffer: usize,
    pub drain_timeout: Duration,
    pub backoff: Backoff,
}

/// Why a batch was not committed by us.
enum Outcome {
    Committed,
    /// Someone else committed it (a takeover replayed it): nothing left to do.
    ResolvedElsewhere,
    /// Shutdown while ClickHouse kept failing: the batch stays recorded for the next owner.
    Abandoned,
}

struct State {
    readers: BTreeMap<u32, Reader>,
    next_generation: u64,
    batcher: Batcher,
    sender: mpsc::Sender<PartitionMessage>,
}

impl Pipeline {
    /// Runs until `shutdown`, then flushes, commits and releases its partitions.
    pub async fn run(self, shutdown: CancellationToken, on_ready: impl FnOnce()) -> Result<()> {
        let (sender, mut receiver) = mpsc::channel(self.read_buffer.max(1));
        let mut state = State {
            readers: BTreeMap::new(),
            next_generation: 1,
            batcher: Batcher::default(),
            sender,
        };
        let round_every = self.lease / 3;
        self.ownership_round(&mut state, false, &shutdown).await?;
        on_ready();
        let mut next_round = Instant::now() + round_every;
        loop {
            let flush_at = state.batcher.flush_at(&self.batch_limits);
            let accepting = !state.batcher.is_full(&self.batch_limits);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_round) => {
                    self.ownership_round(&mut state, false, &shutdown).await?;
                    next_round = Instant::now() + round_every;
                }
                _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                    self.flush(&mut state, &shutdown).await?;
                }
                message = receiver.recv(), if accepting => {
                    let Some(message) = message else { break };
                    if state.readers.get(&message.partition).is_some_and(|reader| reader.generation == message.generation) {
                        telemetry::partition_pending(message.partition, message.pending);
                        let rows = row::event_count(&message.payload);
                        state.batcher.push(message, rows, Instant::now());
                    }
                }
            }
        }
        // Drain: stop reading, insert and commit what was read, release the partitions.
        state.readers.clear();
        let drain = CancellationToken::new();
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        let flushed = tokio::select! {
            result = self.flush(&mut state, &drain) => result.map(|()| true),
            _ = &mut deadline => Ok(false),
        };
        if !flushed? {
            tracing::warn!("drain timeout: the last batch stays recorded; the next owner replays it");
        }
        self.ownership_round(&mut state, true, &drain).await?;
        tracing::info!(me = %self.me, "partitions released");
        Ok(())
    }

    /// Heartbeat, renew, rebalance; replay orphaned batches; start/stop readers to match.
    async fn ownership_round(&self, state: &mut State, draining: bool, shutdown: &CancellationToken) -> Result<()> {
        let now = now_ms();
        let (partitions, lease_ms) = (self.partitions, self.lease.as_millis() as u64);
        let outcome = self
            .ledger
            .update(|ledger| Ok::<_, ()>(ledger.rebalance(&self.me, partitions, now, lease_ms, draining)))
            .await?;
        let outcome = outcome.expect("rebalance never aborts");
        for orphan in &outcome.orphans {
            telemetry::replayed(&orphan.token());
            let mut messages = Vec::new();
            for range in &orphan.ranges {
                messages.extend(consumer::read_range(&self.stream, range.partition, range.first, range.last).await?);
            }
            self.process_batch(orphan, &messages, shutdown).await?;
        }
        let (ledger, _) = self.ledger.read().await?;
        let owned = if draining {
            Vec::new()
        } else {
            ledger.owned_by(&self.me, now_ms())
        };
        let lost: Vec<u32> = state
            .readers
            .keys()
            .filter(|p| !owned.contains(p) && !outcome.released.contains(p) && !draining)
            .copied()
            .collect();
        telemetry::partitions_lost(&lost);
        state.readers.retain(|partition, _| owned.contains(partition));
        state.batcher.retain_partitions(|partition| owned.contains(&partition));
        state.batcher.recount(|message| row::event_count(&message.payload));
        for partition in &owned {
            if state.readers.contains_key(partition) || ledger.pending_for(*partition).is_some() {
                continue;
            }
            let start = ledger.partitions.get(partition).map_or(0, |p| p.committed) + 1;
            let generation = state.next_generation;
            state.next_generation += 1;
            let reader =
                consumer::start_reader(self.stream.clone(), *partition, start, generation, state.sender.clone());
            state.readers.insert(*partition, reader);
        }
        let takeovers = outcome
            .acquired
            .iter()
            .filter(|p| ledger.partitions.get(p).is_some_and(|s| s.committed > 0))
            .count();
        telemetry::ownership(owned.len(), &outcome.acquired, &outcome.released, takeovers);
        Ok(())
    }

    /// Record the batch (CAS on the ledger), then insert and commit it.
    async fn flush(&self, state: &mut State, shutdown: &CancellationToken) -> Result<()> {
        if state.batcher.is_empty() {
            return Ok(());
        }
        let (ranges, messages) = state.batcher.take(Instant::now());
        let mut record = BatchRecord {
            owner: self.me.clone(),
            ranges,
        };
        let mut messages = messages;
        loop {
            let now = now_ms();
            let result = self
                .ledger
                .update(|ledger| ledger.record(&record, &self.me, now))
                .await?;
            match result {
                Ok(()) => break,
                Err(lost) => {
                    // Fenced: we no longer own these partitions (a takeover, or our lease lapsed).
                    telemetry::partitions_lost(&lost);
                    for partition in &lost {
                        state.readers.remove(partition);
                    }
                    record.ranges.retain(|range| !lost.contains(&range.partition));
                    messages.retain(|message| !lost.contains(&message.partition));
                    if record.ranges.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
        match self.process_batch(&record, &messages, shutdown).await? {
            Outcome::Committed | Outcome::ResolvedElsewhere => Ok(()),
            Outcome::Abandoned => Ok(()),
        }
    }

    /// Dead-letter poison, insert the rows with the batch token, commit. Used for fresh batches
    /// and for replays of a dead owner's recorded batch alike.
    async fn process_batch(
        &self,
        record: &BatchRecord,
        messages: &[PartitionMessage],
        shutdown: &CancellationToken,
    ) -> Result<Outcome> {
        let token = record.token();
        let encoded = row::encode(messages, &self.limits);
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        let mut attempt = 0u32;
        loop {
            let result = async {
                for poison in &encoded.poison {
                    dlq::publish(&self.jetstream, poison).await?;
                }
                if !encoded.rows.is_empty() {
                    insert_batch(&self.clickhouse, &encoded.rows, &token).await?;
                }
                Ok::<_, crate::error::Error>(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(err) => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    telemetry::insert_failed(attempt, &token, &err, delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(Outcome::Abandoned),
                    }
                    // Keep our leases alive while ClickHouse is down, and stop if someone else
                    // already resolved this batch.
                    let now = now_ms();
                    let lease_ms = self.lease.as_millis() as u64;
                    let still_pending = self
                        .ledger
                        .update(|ledger| {
                            if !ledger.pending.contains_key(&token) {
                                return Err(());
                            }
                            for state in ledger.partitions.values_mut() {
                                if state.owner.as_deref() == Some(self.me.as_str()) {
                                    state.lease_until_ms = now + lease_ms;
                                }
                            }
                            Ok(())
                        })
                        .await?;
                    if still_pending.is_err() {
                        return Ok(Outcome::ResolvedElsewhere);
                    }
                }
            }
        }
        let committed = self
            .ledger
            .update(|ledger| Ok::<_, ()>(ledger.commit(record)))
            .await?
            .expect("commit never aborts");
        if !committed {
            return Ok(Outcome::ResolvedElsewhere);
        }
        let received: Vec<i64> = messages
            .iter()
            .filter_map(|m| {
                chute_common::payload::decode(&m.payload)
                    .ok()
                    .map(|b| b.received_unix_nanos / 1_000_000)
            })
            .collect();
        telemetry::batch_committed(encoded.rows.len(), bytes, record.ranges.len(), &received);
        Ok(Outcome::Committed)
    }
}

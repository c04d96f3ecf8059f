//! The aggregator loop: ownership rounds, reading, batching, and the record -> insert -> commit
//! protocol of `EXACTLY_ONCE.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use chute_common::validate::Limits;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batcher::{BatchLimits, Batcher};
use crate::consumer::{self, PartitionMessage, Reader};
use crate::error::{Error, Result};
use crate::ledger::{BatchRecord, Ledger};
use crate::writer::{insert_batch, Backoff};
use crate::{dlq, row, telemetry};

/// The wall clock in unix milliseconds (lease expiries in the ledger).
pub fn now_ms() -> u64 {
    (chute_common::validate::unix_nanos_now() / 1_000_000) as u64
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

struct State {
    readers: BTreeMap<u32, Reader>,
    next_generation: u64,
    batcher: Batcher,
    sender: mpsc::Sender<PartitionMessage>,
    /// The recorded batch being inserted and committed while the next one is gathered (at most
    /// one: the next batch is recorded only after this one is done).
    inflight: Option<InFlight>,
}

struct InFlight {
    token: String,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl State {
    /// Forget everything read but not recorded; readers restart from the ledger's positions at
    /// the next ownership round. Safe at any time: nothing unrecorded was written.
    fn reset_reading(&mut self) {
        self.readers.clear();
        self.batcher.retain_partitions(|_| false);
    }
}

impl Pipeline {
    /// Runs until `shutdown`, then flushes, commits and releases its partitions.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, on_ready: impl FnOnce()) -> Result<()> {
        let (sender, mut receiver) = mpsc::channel(self.read_buffer.max(1));
        let mut state = State {
            readers: BTreeMap::new(),
            next_generation: 1,
            batcher: Batcher::default(),
            sender,
            inflight: None,
        };
        let round_every = self.lease / 3;
        self.ownership_round(&mut state, false, &shutdown).await?;
        on_ready();
        let mut next_round = Instant::now() + round_every;
        loop {
            let flush_at = state
                .batcher
                .flush_at(&self.batch_limits)
                .filter(|_| state.inflight.is_none());
            let accepting = !state.batcher.is_full(&self.batch_limits);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                finished = async { (&mut state.inflight.as_mut().expect("guarded").task).await }, if state.inflight.is_some() => {
                    state.inflight = None;
                    match finished {
                        Ok(Ok(())) => {}
                        // Inserted or not, the batch is recorded: the next ownership round resolves it.
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "batch failed; re-reading from the committed positions");
                            state.reset_reading();
                        }
                        Err(panic) => return Err(Error::Replay(format!("batch task failed: {panic}"))),
                    }
                }
                _ = tokio::time::sleep_until(next_round) => {
                    if let Err(err) = self.ownership_round(&mut state, false, &shutdown).await {
                        // NATS trouble: keep what we have; leases are retried next round.
                        tracing::warn!(error = %err, "ownership round failed; retrying next round");
                    }
                    next_round = Instant::now() + round_every;
                }
                _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                    match self.record(&mut state).await {
                        Ok(Some((record, messages))) => {
                            let this = Arc::clone(&self);
                            let shutdown = shutdown.clone();
                            let token = record.token();
                            let task = tokio::spawn(async move { this.process_batch(&record, messages, &shutdown).await });
                            state.inflight = Some(InFlight { token, task });
                        }
                        Ok(None) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, "recording a batch failed; re-reading from the committed positions");
                            state.reset_reading();
                        }
                    }
                }
                message = receiver.recv(), if accepting => {
                    let Some(message) = message else { break };
                    if state.readers.get(&message.partition).is_some_and(|reader| reader.generation == message.generation) {
                        telemetry::partition_pending(message.partition, message.pending);
                        state.batcher.push(message, Instant::now());
                    }
                }
            }
        }
        // Drain: stop reading, finish the batch in flight, insert and commit what was read,
        // release the partitions.
        state.readers.clear();
        let drain = CancellationToken::new();
        let drained = tokio::time::timeout(self.drain_timeout, async {
            if let Some(inflight) = state.inflight.take() {
                inflight
                    .task
                    .await
                    .map_err(|panic| Error::Replay(panic.to_string()))??;
            }
            if let Some((record, messages)) = self.record(&mut state).await? {
                self.process_batch(&record, messages, &drain).await?;
            }
            Ok::<_, Error>(())
        })
        .await;
        if !matches!(drained, Ok(Ok(()))) {
            tracing::warn!("drain did not finish; the last batch stays recorded and the next owner replays it");
        }
        self.ownership_round(&mut state, true, &drain).await?;
        tracing::info!(me = %self.me, "partitions released");
        Ok(())
    }

    /// Heartbeat, renew, rebalance; resolve pending batches on our partitions; start/stop
    /// readers to match what we own.
    async fn ownership_round(&self, state: &mut State, draining: bool, shutdown: &CancellationToken) -> Result<()> {
        let now = now_ms();
        let (partitions, lease_ms) = (self.partitions, self.lease.as_millis() as u64);
        // The closure's state is what the CAS wrote: no second read to learn it.
        let (outcome, mut ledger) = self
            .ledger
            .update(|ledger| {
                let outcome = ledger.rebalance(&self.me, partitions, now, lease_ms, draining);
                Ok::<_, ()>((outcome, ledger.clone()))
            })
            .await?
            .expect("rebalance never aborts");
        let inflight = state.inflight.as_ref().map(|inflight| inflight.token.as_str());
        let orphans: Vec<BatchRecord> = ledger
            .orphans_for(&self.me, now)
            .into_iter()
            .filter(|orphan| inflight != Some(orphan.token().as_str())) // ours, being inserted now
            .collect();
        for orphan in &orphans {
            telemetry::replayed(&orphan.token());
            let mut messages = Vec::new();
            for range in &orphan.ranges {
                messages.extend(consumer::read_range(&self.stream, range.partition, range.first, range.last).await?);
            }
            self.process_batch(orphan, messages, shutdown).await?;
        }
        if !orphans.is_empty() {
            ledger = self.ledger.read().await?.0; // positions moved while resolving
        }
        let leased = if draining {
            Vec::new()
        } else {
            ledger.owned_by(&self.me, now_ms())
        };
        // Above our fair share, stop reading the partitions the ledger will let us shed (the
        // highest ones) so no new batch touches them; once the batch in flight is committed, the
        // next round releases them to the newcomer.
        let mut owned = leased.clone();
        owned.truncate(ledger.fair_share(self.partitions));
        let lost: Vec<u32> = state
            .readers
            .keys()
            .filter(|p| !leased.contains(p) && !outcome.released.contains(p) && !draining)
            .copied()
            .collect();
        telemetry::partitions_lost(&lost);
        state.readers.retain(|partition, _| owned.contains(partition));
        state.batcher.retain_partitions(|partition| owned.contains(&partition));
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
        telemetry::ownership(leased.len(), &outcome.acquired, &outcome.released, takeovers);
        Ok(())
    }

    /// Takes the gathered batch and records it (CAS on the ledger). Partitions we no longer own
    /// are dropped (fencing). Returns what to insert, or `None` when nothing is left.
    async fn record(&self, state: &mut State) -> Result<Option<(BatchRecord, Vec<PartitionMessage>)>> {
        if state.batcher.is_empty() {
            return Ok(None);
        }
        let (ranges, mut messages) = state.batcher.take(Instant::now());
        let mut record = BatchRecord {
            owner: self.me.clone(),
            ranges,
        };
        loop {
            let now = now_ms();
            match self
                .ledger
                .update(|ledger| ledger.record(&record, &self.me, now))
                .await?
            {
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
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some((record, messages)))
    }

    /// Dead-letter poison, insert the rows with the batch token, commit. Used for fresh batches
    /// and for replays of recorded batches alike.
    async fn process_batch(
        &self,
        record: &BatchRecord,
        messages: Vec<PartitionMessage>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let token = record.token();
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        let encoded = row::encode(messages, &self.limits);
        let mut attempt = 0u32;
        loop {
            let result = async {
                for poison in &encoded.poison {
                    dlq::publish(&self.jetstream, poison).await?;
                }
                if !encoded.rows.is_empty() {
                    insert_batch(&self.clickhouse, &encoded.rows, &token).await?;
                }
                Ok::<_, Error>(())
            }
            .await;
            let Err(err) = result else { break };
            attempt += 1;
            let delay = self.backoff.delay(attempt);
            telemetry::insert_failed(attempt, &token, &err, delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {
                    tracing::warn!(token, "shutdown while inserts fail: the batch stays recorded for the next owner");
                    return Ok(());
                }
            }
            if !self.renew_while_pending(&token).await? {
                tracing::info!(token, "batch already resolved by another owner");
                return Ok(());
            }
        }
        let committed = self
            .ledger
            .update(|ledger| Ok::<_, ()>(ledger.commit(record)))
            .await?
            .expect("never aborts");
        if committed {
            telemetry::batch_committed(encoded.rows.len(), bytes, record.ranges.len(), &encoded.received_ms);
        } // else another owner committed the same batch (same rows, same token)
        Ok(())
    }

    /// Between insert retries: keeps our leases alive while ClickHouse is down, and tells whether
    /// the batch is still pending (false: someone else already resolved it).
    async fn renew_while_pending(&self, token: &str) -> Result<bool> {
        let until = now_ms() + self.lease.as_millis() as u64;
        let pending = self
            .ledger
            .update(|ledger| {
                if !ledger.pending.contains_key(token) {
                    return Err(());
                }
                for state in ledger.partitions.values_mut() {
                    if state.owner.as_deref() == Some(self.me.as_str()) {
                        state.lease_until_ms = until;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(pending.is_ok())
    }
}

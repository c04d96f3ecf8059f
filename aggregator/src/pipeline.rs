//! The aggregator loop: ownership rounds, reading, batching, and handing recorded batches to the
//! commit protocol ([`crate::commit`]) of `EXACTLY_ONCE.md`, one at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use chute_common::admin::Readiness;
use chute_common::error::NatsFailure;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batcher::{BatchLimits, Batcher};
use crate::commit::{Committer, Resolution};
use crate::consumer::{self, PartitionMessage, ReadBufferLimits, ReadBufferSender, Reader};
use crate::error::{Error, Result};
use crate::ledger::{now_ms, BatchRecord, Ledger};
use crate::progress::Progress;
use crate::telemetry;

/// Everything the loop needs.
pub struct Pipeline {
    /// This aggregator's name in the ledger (`--instance-id`, or a random one per start).
    pub instance_id: String,
    pub partitions: u32,
    pub lease: Duration,
    pub batch_limits: BatchLimits,
    pub ledger: Ledger,
    pub stream: Stream,
    /// The stream incarnation the ledger is bound to (see `LedgerState::stream_epoch`).
    pub epoch: i64,
    pub read_buffer: ReadBufferLimits,
    /// Bytes one pull request of a partition reader may bring ([`consumer::pull_max_bytes`]).
    pub pull_max_bytes: usize,
    pub drain_timeout: Duration,
    /// A partition with work whose position has not moved for this long is stalled: metric,
    /// alert, and `/readyz` answers 503.
    pub stall_after: Duration,
    pub readiness: Readiness,
    pub committer: Arc<Committer>,
}

struct State {
    /// The partitions whose lease the last ownership round found ours, read or not. Kept apart
    /// from `readers`, which a failed batch clears, so a lease lost meanwhile is still counted.
    held: Vec<u32>,
    readers: BTreeMap<u32, Reader>,
    next_generation: u64,
    batcher: Batcher,
    sender: ReadBufferSender,
    /// The recorded batch being resolved while the next one is gathered (at most one: the next
    /// batch is recorded only after this one is done). A fresh batch or an orphan replay.
    inflight: Option<InFlight>,
    /// Per partition: messages still in the stream after the last one read (consumer lag).
    lag: BTreeMap<u32, u64>,
    progress: Progress,
    /// Stops the batch in flight's retries. Not the shutdown signal: on SIGTERM the batch in
    /// flight is finished and committed (within `drain_timeout`), so its partitions can be
    /// released at once instead of waiting out their leases.
    inflight_stop: CancellationToken,
}

struct InFlight {
    token: String,
    partitions: Vec<u32>,
    task: tokio::task::JoinHandle<Result<Resolution>>,
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
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let (sender, mut receiver) = consumer::read_buffer(self.read_buffer);
        let mut state = State {
            held: Vec::new(),
            readers: BTreeMap::new(),
            next_generation: 1,
            batcher: Batcher::default(),
            sender,
            inflight: None,
            lag: BTreeMap::new(),
            progress: Progress::default(),
            inflight_stop: CancellationToken::new(),
        };
        let round_every = self.lease / 3;
        self.ownership_round(&mut state, false).await?;
        self.readiness.set(true);
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
                    let inflight = state.inflight.take().expect("guarded");
                    state.batcher.in_flight_done();
                    match finished? {
                        Ok(_) => state.progress.moved(&inflight.partitions, Instant::now()),
                        // Inserted or not, the batch is recorded: the next ownership round resolves it.
                        Err(err) => {
                            tracing::warn!(error = %err, token = inflight.token, "batch failed; re-reading from the committed positions");
                            state.reset_reading();
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_round) => {
                    if let Err(err) = self.ownership_round(&mut state, false).await {
                        // NATS trouble: keep what we have; leases are retried next round.
                        tracing::warn!(error = %err, "ownership round failed; retrying next round");
                    }
                    next_round = Instant::now() + round_every;
                }
                _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                    match self.record(&mut state).await {
                        Ok(Some((record, messages))) => self.start(&mut state, record, Some(messages)),
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
                        state.lag.insert(message.partition, message.pending);
                        if let Err(out_of_order) = state.batcher.push(message, Instant::now()) {
                            out_of_order.report();
                        }
                    }
                }
            }
        }
        // Drain: stop reading, finish the batch in flight, insert and commit what was read,
        // release the partitions.
        self.readiness.set(false);
        state.readers.clear();
        let drain = CancellationToken::new();
        let drained = tokio::time::timeout(self.drain_timeout, async {
            if let Some(inflight) = state.inflight.take() {
                inflight.task.await??;
            }
            if let Some((record, messages)) = self.record(&mut state).await? {
                self.committer.resolve(record, messages, &drain).await?;
            }
            Ok::<_, Error>(())
        })
        .await;
        if !matches!(drained, Ok(Ok(()))) {
            tracing::warn!("drain did not finish; the last batch stays recorded and the next owner replays it");
        }
        state.inflight_stop.cancel();
        self.ownership_round(&mut state, true).await?;
        tracing::info!(instance = %self.instance_id, "partitions released");
        Ok(())
    }

    /// Starts resolving a recorded batch in its own task: a fresh one with its `messages`, or a
    /// replay (`None`: the task reads the recorded ranges back from the stream).
    fn start(self: &Arc<Self>, state: &mut State, record: BatchRecord, messages: Option<Vec<PartitionMessage>>) {
        debug_assert!(state.inflight.is_none(), "one batch in flight");
        let this = Arc::clone(self);
        let shutdown = state.inflight_stop.clone();
        let token = record.token();
        let partitions = record.ranges.iter().map(|range| range.partition).collect();
        // Its bytes count against `batch_max_bytes` until it is done; a replay's are not known
        // before it is read back, so it takes the whole budget (what was gathered before a
        // replay started stays: after a takeover or a failed commit, up to one batch more).
        let bytes = messages.as_ref().map_or(self.batch_limits.max_bytes, |messages| {
            messages.iter().map(|message| message.payload.len()).sum()
        });
        state.batcher.in_flight(bytes);
        let task = tokio::spawn(async move {
            let messages = match messages {
                Some(messages) => messages,
                None => this.read_recorded(&record).await?,
            };
            this.committer.resolve(record, messages, &shutdown).await
        });
        state.inflight = Some(InFlight {
            token,
            partitions,
            task,
        });
    }

    /// Reads a recorded batch's messages back from the stream. Messages that left the stream
    /// before they were inserted (a gap: aged out or purged by hand) are counted and logged; the
    /// rest is inserted under the recorded token, so a crash-loop on a lost range cannot happen.
    async fn read_recorded(&self, record: &BatchRecord) -> Result<Vec<PartitionMessage>> {
        telemetry::replayed(&record.token());
        let first_available = self.first_sequence().await?;
        let mut messages = Vec::new();
        for (index, range) in record.ranges.iter().enumerate() {
            let first = range.first.max(first_available);
            let read = if first > range.last {
                Vec::new()
            } else {
                consumer::read_range(&self.stream, range.partition, first, range.last, self.pull_max_bytes).await?
            };
            let expected = record.counts.get(index).copied().unwrap_or(0);
            if read.len() < expected as usize || (expected == 0 && first > range.first) {
                telemetry::replay_gap(&record.token(), range.partition, expected.max(1), read.len());
            }
            messages.extend(read);
        }
        Ok(messages)
    }

    /// The stream's first stored sequence.
    async fn first_sequence(&self) -> Result<u64> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(|err| Error::nats("EVENTS info", err))?;
        Ok(info.state.first_sequence)
    }

    /// Heartbeat, renew, rebalance; check for gaps; start resolving a pending batch on our
    /// partitions; start/stop readers to match what we own; report stalls.
    async fn ownership_round(self: &Arc<Self>, state: &mut State, draining: bool) -> Result<()> {
        let first_sequence = self.first_sequence().await?;
        let now = now_ms();
        let (partitions, lease_ms) = (self.partitions, self.lease.as_millis() as u64);
        // The closure's state is what the CAS wrote: no second read to learn it.
        let (outcome, lost, ledger) = self
            .ledger
            .update(|ledger| {
                let outcome = ledger.rebalance(&self.instance_id, partitions, now, lease_ms, draining);
                let lost = ledger.check_gap(first_sequence);
                (outcome, lost, ledger.clone())
            })
            .await?;
        if lost > 0 {
            telemetry::gap(lost, first_sequence);
        }
        let leased = if draining {
            Vec::new()
        } else {
            ledger.owned_by(&self.instance_id, now_ms())
        };
        // A pending batch on a partition we own and that is not ours in flight: a dead or stalled
        // owner's, or our own whose commit failed. Resolve it (in the batch task) before reading
        // its partitions; readers are not started for partitions with a pending batch.
        if !draining && state.inflight.is_none() {
            if let Some(orphan) = ledger.orphans_for(&self.instance_id, now).into_iter().next() {
                self.start(state, orphan, None);
            }
        }
        // Above our fair share, stop reading the partitions the ledger will let us shed (the
        // highest ones) so no new batch touches them; once the batch in flight is committed, the
        // next round releases them to the newcomer.
        let mut owned = leased.clone();
        owned.truncate(ledger.fair_share(&self.instance_id, self.partitions));
        if !draining {
            telemetry::partitions_lost(&outcome.lost_since(&state.held, &leased));
        }
        state.readers.retain(|partition, _| owned.contains(partition));
        state.batcher.retain_partitions(|partition| owned.contains(&partition));
        for partition in &owned {
            if state.readers.contains_key(partition) || ledger.pending_for(*partition).is_some() {
                continue;
            }
            let start = ledger.partitions.get(partition).map_or(0, |p| p.committed) + 1;
            let generation = state.next_generation;
            state.next_generation += 1;
            let reader = consumer::start_reader(
                self.stream.clone(),
                *partition,
                start,
                generation,
                self.pull_max_bytes,
                state.sender.clone(),
            );
            state.readers.insert(*partition, reader);
            state.lag.remove(partition);
        }
        let takeovers = outcome
            .acquired
            .iter()
            .filter(|p| ledger.partitions.get(p).is_some_and(|s| s.committed > 0))
            .count();
        telemetry::ownership(leased.len(), &outcome.acquired, &outcome.released, takeovers);
        state.held.clone_from(&leased);
        if !draining {
            self.report_progress(state, &leased, &ledger);
        }
        Ok(())
    }

    /// Stall detection: a partition has work (lag, messages gathered, a pending batch) and its
    /// position has not moved for `stall_after`. `/readyz` fails while any partition is stalled.
    fn report_progress(&self, state: &mut State, leased: &[u32], ledger: &crate::ledger::LedgerState) {
        let now = Instant::now();
        let mut any_stalled = false;
        for partition in leased {
            let busy = state.lag.get(partition).is_some_and(|lag| *lag > 0)
                || state
                    .inflight
                    .as_ref()
                    .is_some_and(|inflight| inflight.partitions.contains(partition))
                || ledger.pending_for(*partition).is_some();
            let age = state.progress.age(*partition, busy, now);
            let stalled = age >= self.stall_after;
            any_stalled |= stalled;
            telemetry::partition_progress(*partition, age, stalled);
        }
        state.progress.forget(|partition| leased.contains(&partition));
        self.readiness.set(!any_stalled);
    }

    /// Takes the gathered batch and records it (CAS on the ledger). Partitions we no longer own
    /// are dropped (fencing). Returns what to insert, or `None` when nothing is left.
    async fn record(&self, state: &mut State) -> Result<Option<(BatchRecord, Vec<PartitionMessage>)>> {
        if state.batcher.is_empty() {
            return Ok(None);
        }
        let (ranges, mut messages) = state.batcher.take(Instant::now());
        let counts = ranges
            .iter()
            .map(|range| messages.iter().filter(|m| m.partition == range.partition).count() as u32)
            .collect();
        let mut record = BatchRecord::new(&self.instance_id, self.epoch, ranges, counts);
        loop {
            let now = now_ms();
            match self
                .ledger
                .try_update(|ledger| ledger.record(&record, &self.instance_id, now))
                .await?
            {
                Ok(()) => break,
                Err(lost) => {
                    // Fenced: we no longer own these partitions (a takeover, or our lease lapsed).
                    telemetry::partitions_lost(&lost);
                    for partition in &lost {
                        state.readers.remove(partition);
                    }
                    state.held.retain(|partition| !lost.contains(partition));
                    (record.ranges, record.counts) = record
                        .ranges
                        .iter()
                        .zip(&record.counts)
                        .filter(|(range, _)| !lost.contains(&range.partition))
                        .unzip();
                    messages.retain(|message| !lost.contains(&message.partition));
                    if record.ranges.is_empty() {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some((record, messages)))
    }
}

//! The ledger: partition ownership (leases), committed positions and pending batch records, all
//! in ONE JetStream KV entry updated only by compare-and-set on its revision.
//!
//! Keeping everything in one entry makes multi-partition batches atomic: recording a batch,
//! checking that its writer still holds every lease, and committing it are each a single CAS.
//! A writer whose lease was taken over ("zombie") fails the CAS, re-reads, sees it no longer owns
//! the partition and drops it. See `EXACTLY_ONCE.md` for the full argument.
//!
//! Everything here except [`Ledger`] is pure and unit-tested.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::telemetry;

/// How long ledger updates retry NATS errors before giving up.
pub const LEDGER_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// The KV key that holds the ledger.
pub const LEDGER_KEY: &str = "ledger";

/// The header a KV delete or purge marker carries.
const KV_OPERATION: &str = "KV-Operation";

/// The wall clock in unix milliseconds (lease expiries in the ledger).
pub fn now_ms() -> u64 {
    chute_common::validate::unix_millis_now() as u64
}

/// A half-open position: the last stream sequence of a partition that is in ClickHouse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// The aggregator instance holding the lease, if any.
    pub owner: Option<String>,
    /// Lease expiry, unix milliseconds.
    pub lease_until_ms: u64,
    /// Every message of this partition with a stream sequence <= this is in ClickHouse (or in
    /// the dead-letter stream).
    pub committed: u64,
    /// When `committed` last moved, unix milliseconds (stall detection).
    #[serde(default)]
    pub committed_at_ms: u64,
}

/// The stream sequences `first..=last` of subject `events.<partition>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqRange {
    pub partition: u32,
    pub first: u64,
    pub last: u64,
}

/// Where one part of a split batch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartState {
    Pending,
    Inserted,
    /// A single message ClickHouse refused for good; it is in the dead-letter stream.
    DeadLettered,
}

/// A sub-batch of a batch ClickHouse refused for good: the valid messages of the batch that lie
/// in `ranges`. Its token is the batch token plus its ranges, so a replay makes the same inserts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub ranges: Vec<SeqRange>,
    pub state: PartState,
}

/// A batch recorded before its insert and removed when committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub owner: String,
    /// The stream incarnation the ranges refer to (see [`LedgerState::stream_epoch`]).
    #[serde(default)]
    pub epoch: i64,
    /// Sorted by partition; at most one range per partition.
    pub ranges: Vec<SeqRange>,
    /// Messages in each range when recorded (a replay that finds fewer has hit a gap).
    #[serde(default)]
    pub counts: Vec<u32>,
    /// The messages that fail validation are in the dead-letter stream (done once per batch).
    #[serde(default)]
    pub dead_lettered: bool,
    /// Which messages were dead-lettered: runs of consecutive messages of one partition, as
    /// `first..=last` stream sequences. A replay keeps these verdicts whatever the validation
    /// rules say by then (a message dead-lettered under `--event-max-past 7d` stays out when the
    /// replaying aggregator runs with `30d`: `dlq replay` brings it back, once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poison: Vec<SeqRange>,
    /// Empty until ClickHouse refuses the batch for good; then the parts it was split into, in
    /// order. Splits are recorded before they are inserted, so a replay repeats them exactly.
    #[serde(default)]
    pub parts: Vec<Part>,
}

impl BatchRecord {
    /// A fresh record of `ranges` (with `counts[i]` messages in `ranges[i]`).
    pub fn new(owner: &str, epoch: i64, ranges: Vec<SeqRange>, counts: Vec<u32>) -> Self {
        debug_assert_eq!(ranges.len(), counts.len());
        Self {
            owner: owner.to_owned(),
            epoch,
            ranges,
            counts,
            dead_lettered: false,
            poison: Vec::new(),
            parts: Vec::new(),
        }
    }

    /// Whether the message at `sequence` of `partition` was dead-lettered by this batch.
    pub fn was_dead_lettered(&self, partition: u32, sequence: u64) -> bool {
        self.poison
            .iter()
            .any(|run| run.partition == partition && run.first <= sequence && sequence <= run.last)
    }

    /// The batch id and ClickHouse `insert_deduplication_token`: derived only from the stream
    /// epoch and the ranges, so a batch rebuilt after a crash dedupes against the original.
    pub fn token(&self) -> String {
        batch_token(self.epoch, &self.ranges)
    }

    /// The token of one part: the batch token, `/`, the part's ranges.
    pub fn part_token(&self, part: &[SeqRange]) -> String {
        let mut token = self.token();
        token.push('/');
        push_ranges(&mut token, part);
        token
    }

    /// The first part still to insert, if the batch was split.
    pub fn next_pending_part(&self) -> Option<&Part> {
        self.parts.iter().find(|part| part.state == PartState::Pending)
    }
}

/// `EVENTS@<epoch>:<p>:<first>-<last>,<p>:<first>-<last>...`.
pub fn batch_token(epoch: i64, ranges: &[SeqRange]) -> String {
    let mut token = format!("{}@{epoch}:", chute_common::stream::EVENTS_STREAM);
    push_ranges(&mut token, ranges);
    token
}

fn push_ranges(token: &mut String, ranges: &[SeqRange]) {
    use std::fmt::Write;
    for (i, range) in ranges.iter().enumerate() {
        if i > 0 {
            token.push(',');
        }
        let _ = write!(token, "{}:{}-{}", range.partition, range.first, range.last);
    }
}

/// The whole ledger document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// Identity of the `EVENTS` stream the positions describe: its epoch (unix ns,
    /// `chute_common::stream::stream_epoch`).
    /// 0 until the first aggregator binds the ledger to the stream.
    #[serde(default)]
    pub stream_epoch: i64,
    /// Stream sequences at or below this were checked for gaps (lost messages counted once).
    #[serde(default)]
    pub gap_checked: u64,
    pub partitions: BTreeMap<u32, PartitionState>,
    /// Aggregator instances and their heartbeat expiry (unix ms): the fair-share denominator.
    pub members: BTreeMap<String, u64>,
    /// Recorded, not yet committed batches, by token.
    pub pending: BTreeMap<String, BatchRecord>,
}

/// What one ownership round decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebalance {
    pub acquired: Vec<u32>,
    pub released: Vec<u32>,
}

impl Rebalance {
    /// Of the partitions `held` at the previous round, those lost to another owner since: no
    /// longer `leased` now and not released by this round, or leased again only because this
    /// round took them back (another owner held them in between, which this instance did not
    /// see: its reads failed meanwhile). Its own lapsed lease that nobody took is renewed, not
    /// acquired, so it is not a loss.
    pub fn lost_since(&self, held: &[u32], leased: &[u32]) -> Vec<u32> {
        held.iter()
            .filter(|p| (!leased.contains(p) && !self.released.contains(p)) || self.acquired.contains(p))
            .copied()
            .collect()
    }
}

impl LedgerState {
    pub fn owned_by(&self, me: &str, now_ms: u64) -> Vec<u32> {
        self.partitions
            .iter()
            .filter(|(_, state)| state.owner.as_deref() == Some(me) && state.lease_until_ms > now_ms)
            .map(|(partition, _)| *partition)
            .collect()
    }

    /// The pending batch covering `partition`, if any.
    pub fn pending_for(&self, partition: u32) -> Option<&BatchRecord> {
        self.pending
            .values()
            .find(|batch| batch.ranges.iter().any(|range| range.partition == partition))
    }

    /// One ownership round for `me`: heartbeat, renew my leases, give up partitions above my fair
    /// share (only those without a pending batch), and take free or expired ones up to it.
    /// `draining` releases everything that can be released.
    pub fn rebalance(&mut self, me: &str, partitions: u32, now_ms: u64, lease_ms: u64, draining: bool) -> Rebalance {
        let until = now_ms + lease_ms;
        self.members.retain(|_, expiry| *expiry > now_ms);
        if draining {
            self.members.remove(me);
        } else {
            self.members.insert(me.to_owned(), until);
        }
        for partition in 0..partitions {
            self.partitions.entry(partition).or_default();
        }
        let fair_share = if draining { 0 } else { self.fair_share(me, partitions) };

        let mut result = Rebalance::default();
        let mut owned: Vec<u32> = Vec::new();
        for (partition, state) in self.partitions.iter_mut() {
            if state.owner.as_deref() == Some(me) {
                state.lease_until_ms = until;
                owned.push(*partition);
            }
        }
        // Shed extras, highest partitions first, never one with a batch in flight.
        while owned.len() > fair_share {
            let Some(position) = owned.iter().rposition(|p| self.pending_for(*p).is_none()) else {
                break;
            };
            let partition = owned.remove(position);
            let state = self.partitions.get_mut(&partition).expect("owned partitions exist");
            state.owner = None;
            state.lease_until_ms = 0;
            result.released.push(partition);
        }
        if draining {
            return result;
        }
        let free: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(_, state)| state.owner.is_none() || state.lease_until_ms <= now_ms)
            .map(|(partition, _)| *partition)
            .filter(|partition| !owned.contains(partition))
            .collect();
        for partition in free {
            if owned.len() >= fair_share {
                break;
            }
            let state = self.partitions.get_mut(&partition).expect("listed above");
            let previous = state.owner.replace(me.to_owned());
            state.lease_until_ms = until;
            owned.push(partition);
            result.acquired.push(partition);
            if previous.is_some_and(|owner| owner != me) {
                tracing::debug!(partition, "lease taken over");
            }
        }
        result
    }

    /// How many partitions `me` should own: `partitions / members`, and one more for the first
    /// `partitions % members` members in name order, so the spread is within one of even (16 over
    /// 3 is 6, 5, 5; not 6, 6, 4). Every member computes the same split from the same ledger.
    pub fn fair_share(&self, me: &str, partitions: u32) -> usize {
        let members = self.members.len().max(1);
        let (base, extra) = (partitions as usize / members, partitions as usize % members);
        let rank = self.members.keys().position(|member| member == me).unwrap_or(members);
        base + usize::from(rank < extra)
    }

    /// Pending batches touching a partition `me` owns. Called between batches (when `me` has
    /// none in flight), every one of them is a batch to resolve: a dead or stalled owner's batch
    /// on a partition taken over, or our own whose commit failed.
    pub fn orphans_for(&self, me: &str, now_ms: u64) -> Vec<BatchRecord> {
        let owned = self.owned_by(me, now_ms);
        self.pending
            .values()
            .filter(|batch| batch.ranges.iter().any(|range| owned.contains(&range.partition)))
            .cloned()
            .collect()
    }

    /// Records `batch` if `me` holds a live lease on every partition in it, none of them has a
    /// batch pending, and each range starts right after the committed position.
    pub fn record(&mut self, batch: &BatchRecord, me: &str, now_ms: u64) -> Result<(), Vec<u32>> {
        let lost: Vec<u32> = batch
            .ranges
            .iter()
            .filter(|range| {
                let state = self.partitions.get(&range.partition);
                !state.is_some_and(|s| {
                    s.owner.as_deref() == Some(me) && s.lease_until_ms > now_ms && range.first > s.committed
                }) || self.pending_for(range.partition).is_some()
            })
            .map(|range| range.partition)
            .collect();
        if !lost.is_empty() {
            return Err(lost);
        }
        if batch.epoch != self.stream_epoch {
            return Err(batch.ranges.iter().map(|range| range.partition).collect());
        }
        self.pending.insert(batch.token(), batch.clone());
        Ok(())
    }

    /// Marks `batch` committed (if it is still pending): positions advance, the record goes.
    /// Returns false when someone else already committed it.
    pub fn commit(&mut self, batch: &BatchRecord, now_ms: u64) -> bool {
        if self.pending.remove(&batch.token()).is_none() {
            return false;
        }
        for range in &batch.ranges {
            let state = self.partitions.entry(range.partition).or_default();
            state.committed = state.committed.max(range.last);
            state.committed_at_ms = now_ms;
        }
        true
    }

    /// Notes that the batch's invalid messages are in the dead-letter stream. False when the
    /// batch is no longer pending.
    pub fn mark_dead_lettered(&mut self, token: &str, poison: &[SeqRange]) -> bool {
        let Some(batch) = self.pending.get_mut(token) else {
            return false;
        };
        batch.dead_lettered = true;
        for run in poison {
            if !batch.poison.contains(run) {
                batch.poison.push(*run);
            }
        }
        true
    }

    /// Replaces the part covering exactly `part` (the whole batch when it was not split yet) by
    /// `halves`, in place, so parts stay in stream order. False when the batch is no longer
    /// pending or that part was already split (by a previous attempt or another owner).
    pub fn split(&mut self, token: &str, part: &[SeqRange], halves: [Vec<SeqRange>; 2]) -> bool {
        let Some(batch) = self.pending.get_mut(token) else {
            return false;
        };
        let halves = halves.map(|ranges| Part {
            ranges,
            state: PartState::Pending,
        });
        if batch.parts.is_empty() {
            if part != batch.ranges.as_slice() {
                return false;
            }
            batch.parts = halves.to_vec();
            return true;
        }
        let Some(index) = batch
            .parts
            .iter()
            .position(|p| p.ranges == part && p.state == PartState::Pending)
        else {
            return false;
        };
        batch.parts.splice(index..=index, halves);
        true
    }

    /// Sets the state of the part covering exactly `part` (of the whole batch, made its only
    /// part, when it was not split). False when there is no such part.
    pub fn mark_part(&mut self, token: &str, part: &[SeqRange], state: PartState) -> bool {
        let Some(batch) = self.pending.get_mut(token) else {
            return false;
        };
        if batch.parts.is_empty() && part == batch.ranges.as_slice() {
            batch.parts.push(Part {
                ranges: part.to_vec(),
                state,
            });
            return true;
        }
        let Some(found) = batch.parts.iter_mut().find(|p| p.ranges == part) else {
            return false;
        };
        found.state = state;
        true
    }

    /// Binds the ledger to the stream incarnation `epoch` (`chute_common::stream::stream_epoch`).
    /// A ledger that never saw a stream (or was written before epochs existed) adopts it; a ledger bound to
    /// another incarnation is an error the operator resolves.
    pub fn bind_epoch(&mut self, epoch: i64) -> Result<bool, i64> {
        match self.stream_epoch {
            0 => {
                self.stream_epoch = epoch;
                for batch in self.pending.values_mut() {
                    if batch.epoch == 0 {
                        batch.epoch = epoch;
                    }
                }
                // Pending records are keyed by token, which now includes the epoch.
                self.pending = std::mem::take(&mut self.pending)
                    .into_values()
                    .map(|batch| (batch.token(), batch))
                    .collect();
                Ok(true)
            }
            bound if bound == epoch => Ok(false),
            bound => Err(bound),
        }
    }

    /// The gap rule. Nothing Chute does removes a message above its partition's committed
    /// position (trimming stops at `committed`), so when the stream's first sequence is beyond
    /// every committed position, the sequences in between were lost before they were inserted
    /// (aged out, capped, purged by hand). Returns how many messages were lost since the last
    /// check (each stream sequence is one stored message) and remembers the check.
    ///
    /// Messages of a recorded batch are not counted here when the gap holds its whole range:
    /// whoever replays the batch counts them (its recorded per-range counts say how many are
    /// gone), and a batch still in flight has them in memory and inserts them. A range the gap
    /// cuts through is counted by both (the stream aged out in the middle of a recorded batch).
    pub fn check_gap(&mut self, first_sequence: u64) -> u64 {
        let floor = self
            .partitions
            .values()
            .map(|state| state.committed)
            .max()
            .unwrap_or(0)
            .max(self.gap_checked);
        if first_sequence <= floor + 1 {
            return 0;
        }
        self.gap_checked = first_sequence - 1;
        let recorded: u64 = self
            .pending
            .values()
            .flat_map(|batch| batch.ranges.iter().zip(&batch.counts))
            .filter(|(range, _)| range.first > floor && range.last < first_sequence)
            .map(|(_, count)| u64::from(*count))
            .sum();
        (first_sequence - 1 - floor).saturating_sub(recorded)
    }
}

/// The ledger entry in a JetStream KV bucket.
///
/// Reads go to the bucket stream's leader and writes carry both the key's expected revision and
/// the stream's expected last sequence: see `Ledger::write` for why a plain KV update is not a
/// compare-and-set on a replicated bucket with nats-server 2.9.
#[derive(Clone)]
pub struct Ledger {
    jetstream: jetstream::Context,
    /// The bucket's stream (`KV_<bucket>`), read through its leader.
    stream: jetstream::stream::Stream,
    /// `$KV.<bucket>.ledger`.
    subject: String,
    /// `$KV.<bucket>._catch_up`: where [`Ledger::catch_up_leader`] sends what it must.
    catch_up_subject: String,
    /// Fillers the next catch-up may send (doubles while writes keep timing out).
    catch_up_budget: Arc<AtomicUsize>,
    /// One catch-up at a time: writes that timed out together wait for the one running.
    catching_up: Arc<tokio::sync::Mutex<()>>,
}

/// The ledger key's last message: its state and the revision a write must expect.
struct Current {
    state: LedgerState,
    /// Stream sequence of the key's last message (a delete marker included); 0: none.
    revision: u64,
    /// The last message is a value, not a delete marker.
    present: bool,
}

/// Messages of one catch-up round ([`Ledger::catch_up_leader`]); the rounds of one catch-up
/// stop at the first answer.
const CATCH_UP_ROUND: usize = 32;
/// The first catch-up's budget; each one that gets no answer doubles it, up to
/// [`CATCH_UP_MAX`]; a write answered resets it.
const CATCH_UP_FIRST: usize = 256;
const CATCH_UP_MAX: usize = 16_384;
/// How long a catch-up round waits for its first answer.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Consecutive compare-and-set conflicts after which [`Ledger::try_update`] checks that the
/// bucket holds the ledger key alone (see [`Ledger::write`]).
const CONFLICTS_BEFORE_CHECK: u32 = 64;

impl Ledger {
    /// Opens (creating if missing) the ledger in KV bucket `bucket` with `replicas` replicas. An
    /// existing bucket with fewer replicas is scaled up to `replicas` (a bucket made at R1 before
    /// the ledger could be replicated); a failed scale-up is logged and the bucket used as is.
    pub async fn open(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<Self> {
        let stream = chute_common::stream::open_kv_stream(
            js,
            bucket,
            "Chute aggregator ledger: partition leases, positions, pending batches",
            replicas,
            std::time::Duration::ZERO,
        )
        .await
        .map_err(|err| Error::ledger(format!("open bucket {bucket}"), err))?;
        Ok(Self {
            jetstream: js.clone(),
            stream,
            subject: format!("$KV.{bucket}.{LEDGER_KEY}"),
            catch_up_subject: format!("$KV.{bucket}._catch_up"),
            catch_up_budget: Arc::new(AtomicUsize::new(CATCH_UP_FIRST)),
            catching_up: Arc::default(),
        })
    }

    /// The current state and its revision (0 when the entry does not exist yet).
    pub async fn read(&self) -> Result<(LedgerState, u64)> {
        let current = self.current().await?;
        Ok((current.state, if current.present { current.revision } else { 0 }))
    }

    /// The key's last message, from the stream leader: a direct get may be answered by a
    /// replica that has not applied the latest write yet, and every write from a stale read
    /// would be a conflict.
    async fn current(&self) -> Result<Current> {
        let message = match self.stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(message) => message,
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Current {
                    state: LedgerState::default(),
                    revision: 0,
                    present: false,
                })
            }
            Err(err) => return Err(Error::ledger("read", err)),
        };
        let deleted = message
            .headers
            .get(KV_OPERATION)
            .is_some_and(|operation| matches!(operation.as_str(), "DEL" | "PURGE"));
        let state = if deleted {
            LedgerState::default()
        } else {
            serde_json::from_slice(&message.payload).map_err(Error::CorruptLedger)?
        };
        Ok(Current {
            state,
            revision: message.sequence,
            present: !deleted,
        })
    }

    /// Writes `state` if the key's last message is still at `revision` (0: the key has no
    /// message). `Ok(None)` on a conflict.
    ///
    /// A KV update sends `Nats-Expected-Last-Subject-Sequence`. On a replicated stream
    /// nats-server 2.9.x (Debian's 2.9.10 included) checks that header only on the leader
    /// before proposing the write, not when the write is applied, so concurrent writers that
    /// read the same revision can all be accepted and all but one update is lost
    /// (nats-io/nats-server#4320; `tests/it/ledger_cas.rs` loses about 45 % of 480 concurrent
    /// updates that way). `Nats-Expected-Last-Sequence`, the stream's last sequence, is checked
    /// by every replica as it applies the write, in log order. The bucket holds this one key,
    /// so the stream's last sequence is the key's revision and the two headers say the same
    /// thing; the stream-wide one is what makes the write a compare-and-set at R3. A key with
    /// no message yet expects subject sequence 0, which 2.9 checks when applying.
    async fn write(&self, state: &LedgerState, revision: u64) -> Result<Option<u64>> {
        let value = Bytes::from(serde_json::to_vec(state).expect("ledger serializes"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string().as_str());
        if revision > 0 {
            headers.insert(NATS_EXPECTED_LAST_SEQUENCE, revision.to_string().as_str());
        }
        let acked = async {
            self.jetstream
                .publish_with_headers(self.subject.clone(), headers, value)
                .await?
                .await
        };
        match acked.await {
            Ok(ack) => {
                self.catch_up_budget.store(CATCH_UP_FIRST, Ordering::Relaxed);
                Ok(Some(ack.sequence))
            }
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                self.catch_up_budget.store(CATCH_UP_FIRST, Ordering::Relaxed);
                Ok(None)
            }
            Err(err) => {
                if err.kind() == PublishErrorKind::TimedOut {
                    self.catch_up_leader().await;
                }
                Err(Error::ledger("update", err))
            }
        }
    }

    /// After a write went unanswered: moves a replicated bucket's leader past a stale proposal
    /// sequence, if that is why.
    ///
    /// nats-server before 2.9.21 (Debian's 2.9.10 included) numbers a clustered stream's
    /// proposals from a counter that a leader keeps across losing and regaining leadership, and
    /// re-derives only when it is below the stream's last sequence. A write refused by an
    /// expected-sequence check when applied (a compare-and-set conflict) consumes a number on
    /// every replica without storing anything. A node that regains leadership after such
    /// refusals numbers its proposals too low, and the replicas drop them without an answer,
    /// one number at a time, until its counter has caught up (fixed upstream by 081140ee6,
    /// "When taking over make sure to sync and reset clfs"). Writes time out meanwhile, so
    /// each timeout here sends small messages that can never be stored (they expect a last
    /// sequence no stream has) in rounds of [`CATCH_UP_ROUND`], stopping at the first answer:
    /// an answer means the leader numbers correctly again. A healthy or unreachable server
    /// answers the first round or none; either way the cost is one round.
    async fn catch_up_leader(&self) {
        let Ok(_running) = self.catching_up.try_lock() else {
            // Another write's catch-up is under way: its outcome is this write's too.
            let _done = self.catching_up.lock().await;
            return;
        };
        let budget = self.catch_up_budget.load(Ordering::Relaxed);
        let mut sent = 0;
        let mut answered = false;
        while sent < budget && !answered {
            let mut acks = futures::stream::FuturesUnordered::new();
            for _ in 0..CATCH_UP_ROUND {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(NATS_EXPECTED_LAST_SEQUENCE, u64::MAX.to_string().as_str());
                match self
                    .jetstream
                    .publish_with_headers(self.catch_up_subject.clone(), headers, Bytes::new())
                    .await
                {
                    Ok(ack) => acks.push(std::future::IntoFuture::into_future(ack)),
                    Err(_) => return, // not connected: nothing to catch up with
                }
            }
            sent += CATCH_UP_ROUND;
            // A leader that numbers correctly answers in milliseconds; a dropped proposal never.
            let first_answer = async {
                while let Some(outcome) = futures::StreamExt::next(&mut acks).await {
                    if !matches!(&outcome, Err(err) if err.kind() == PublishErrorKind::TimedOut) {
                        return true;
                    }
                }
                false
            };
            answered = tokio::time::timeout(CATCH_UP_WAIT, first_answer).await.unwrap_or(false);
        }
        telemetry::ledger_catch_up(sent, answered);
        if !answered {
            self.catch_up_budget
                .store((budget * 2).min(CATCH_UP_MAX), Ordering::Relaxed);
        }
    }

    /// After many conflicts in a row: are they writers racing, or a bucket whose stream
    /// sequence no longer follows the ledger key (a message on another subject), which would
    /// make every write conflict for ever?
    async fn check_bucket_holds_only_the_ledger(&self) -> Result<()> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(|err| Error::ledger("bucket info", err))?;
        if info.state.subjects_count > 1 {
            return Err(Error::ledger(
                "update",
                format!(
                    "bucket stream {} holds {} keys; it must hold only `{LEDGER_KEY}` (compare-and-set \
                     expects the stream's last sequence); use a bucket of its own (--ledger-bucket)",
                    info.config.name, info.state.subjects_count
                ),
            ));
        }
        Ok(())
    }

    /// Applies `change` to the current state with CAS, retrying on conflicts; returns what the
    /// successful application returned.
    pub async fn update<T>(&self, mut change: impl FnMut(&mut LedgerState) -> T) -> Result<T> {
        let outcome = self
            .try_update(|state| Ok::<_, std::convert::Infallible>(change(state)))
            .await?;
        match outcome {
            Ok(value) => Ok(value),
            Err(never) => match never {},
        }
    }

    /// Like [`Ledger::update`], but `change` may return `Err` to abort without writing.
    /// NATS errors (timeouts, a restarting server) are retried with backoff for up to
    /// [`LEDGER_RETRY_FOR`] before the error is returned.
    pub async fn try_update<T, E>(
        &self,
        mut change: impl FnMut(&mut LedgerState) -> Result<T, E>,
    ) -> Result<Result<T, E>> {
        let deadline = tokio::time::Instant::now() + LEDGER_RETRY_FOR;
        let mut delay = std::time::Duration::from_millis(50);
        let mut conflicts = 0u32;
        loop {
            let attempt = async {
                let Current {
                    mut state, revision, ..
                } = self.current().await?;
                let outcome = match change(&mut state) {
                    Ok(outcome) => outcome,
                    Err(err) => return Ok(Some(Err(err))),
                };
                Ok::<_, Error>(self.write(&state, revision).await?.map(|_| Ok(outcome)))
            };
            match attempt.await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => {
                    // CAS conflict: re-read and retry.
                    conflicts += 1;
                    if conflicts.is_multiple_of(CONFLICTS_BEFORE_CHECK) {
                        self.check_bucket_holds_only_the_ledger().await?;
                    }
                    tokio::task::yield_now().await;
                }
                Err(err) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(error = %err, ?delay, "ledger update failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 10_000;

    fn range(partition: u32, first: u64, last: u64) -> SeqRange {
        SeqRange { partition, first, last }
    }

    fn batch(owner: &str, ranges: Vec<SeqRange>) -> BatchRecord {
        let counts = vec![1; ranges.len()];
        BatchRecord::new(owner, 0, ranges, counts)
    }

    #[test]
    fn token_depends_only_on_ranges() {
        let a = batch("a", vec![range(0, 1, 5), range(3, 2, 9)]);
        let b = BatchRecord {
            owner: "b".into(),
            ..a.clone()
        };
        assert_eq!(a.token(), "EVENTS@0:0:1-5,3:2-9");
        assert_eq!(a.token(), b.token());
    }

    #[test]
    fn a_lease_taken_over_and_taken_back_unseen_is_a_loss_a_lapsed_one_is_not() {
        let mut state = LedgerState::default();
        let held = state.owned_by("a", 0);
        assert!(held.is_empty());
        state.rebalance("a", 2, 0, LEASE, false);
        let held = state.owned_by("a", 0);
        assert_eq!(held, [0, 1]);
        // a's reads fail for longer than its lease: b takes both over, then b's lease lapses too.
        state.rebalance("b", 2, LEASE + 1, LEASE, false);
        let back = state.rebalance("a", 2, 3 * LEASE, LEASE, false);
        assert_eq!(back.lost_since(&held, &state.owned_by("a", 3 * LEASE)), [0, 1]);
        // Taken over and still held by the other: gone from `leased`.
        let mut state = LedgerState::default();
        state.rebalance("a", 2, 0, LEASE, false);
        state.rebalance("b", 2, LEASE + 1, LEASE, false);
        let round = state.rebalance("a", 2, LEASE + 2, LEASE, false);
        assert_eq!(round.lost_since(&held, &state.owned_by("a", LEASE + 2)), [0, 1]);
        // a's own lease lapsed and nobody took it: renewed, not lost; shed partitions not lost.
        let mut state = LedgerState::default();
        state.rebalance("a", 2, 0, LEASE, false);
        let round = state.rebalance("a", 2, 5 * LEASE, LEASE, false);
        assert!(round.acquired.is_empty());
        assert!(round.lost_since(&held, &state.owned_by("a", 5 * LEASE)).is_empty());
        state.rebalance("b", 2, 5 * LEASE + 1, LEASE, false);
        let shed = state.rebalance("a", 2, 5 * LEASE + 2, LEASE, false);
        assert_eq!(shed.released, [1]);
        assert!(shed.lost_since(&held, &state.owned_by("a", 5 * LEASE + 2)).is_empty());
    }

    #[test]
    fn a_lone_member_takes_everything_and_a_second_gets_half() {
        let mut state = LedgerState::default();
        let first = state.rebalance("a", 16, 1_000, LEASE, false);
        assert_eq!(first.acquired.len(), 16);
        let second = state.rebalance("b", 16, 1_100, LEASE, false);
        assert_eq!(second.acquired.len(), 0, "nothing free until a sheds");
        let shed = state.rebalance("a", 16, 1_200, LEASE, false);
        assert_eq!(shed.released.len(), 8);
        let second = state.rebalance("b", 16, 1_300, LEASE, false);
        assert_eq!(second.acquired.len(), 8);
        assert_eq!(state.owned_by("a", 1_400).len() + state.owned_by("b", 1_400).len(), 16);
    }

    #[test]
    fn expired_leases_are_taken_over_with_their_orphan_batches() {
        let mut state = LedgerState::default();
        state.rebalance("a", 4, 0, LEASE, false);
        let batch = batch("a", vec![range(1, 1, 10), range(2, 3, 7)]);
        state.record(&batch, "a", 1).unwrap();
        // a dies; b arrives after the lease expired and a's membership lapsed.
        let taken = state.rebalance("b", 4, LEASE + 1, LEASE, false);
        assert_eq!(taken.acquired, vec![0, 1, 2, 3]);
        assert_eq!(state.orphans_for("b", LEASE + 2), vec![batch.clone()]);
        assert!(state.orphans_for("a", LEASE + 2).is_empty(), "a owns nothing any more");
        assert!(state.commit(&batch, 5));
        assert_eq!(
            (state.partitions[&1].committed, state.partitions[&2].committed),
            (10, 7)
        );
        assert!(!state.commit(&batch, 5), "a second commit of the same batch is a no-op");
    }

    #[test]
    fn a_zombie_cannot_record_after_a_takeover() {
        let mut state = LedgerState::default();
        state.rebalance("a", 2, 0, LEASE, false);
        state.rebalance("b", 2, LEASE + 1, LEASE, false);
        let stale = batch("a", vec![range(0, 1, 3)]);
        assert_eq!(state.record(&stale, "a", LEASE + 2), Err(vec![0]));
        // And an owner whose lease lapsed cannot record either, even if nobody took it yet.
        let mut lapsed = LedgerState::default();
        lapsed.rebalance("a", 1, 0, LEASE, false);
        assert_eq!(lapsed.record(&stale, "a", LEASE + 1), Err(vec![0]));
    }

    #[test]
    fn one_pending_batch_per_partition_and_ranges_follow_the_committed_position() {
        let mut state = LedgerState::default();
        state.rebalance("a", 2, 0, LEASE, false);
        let first = batch("a", vec![range(0, 1, 3)]);
        state.record(&first, "a", 1).unwrap();
        let overlapping = batch("a", vec![range(0, 4, 6)]);
        assert_eq!(state.record(&overlapping, "a", 1), Err(vec![0]));
        state.commit(&first, 5);
        state.record(&overlapping, "a", 1).unwrap();
        let replayed = batch("a", vec![range(1, 0, 0)]);
        assert_eq!(
            state.record(&replayed, "a", 1),
            Err(vec![1]),
            "first must be > committed (0)"
        );
    }

    #[test]
    fn partitions_with_pending_batches_are_not_shed_and_draining_releases_the_rest() {
        let mut state = LedgerState::default();
        state.rebalance("a", 4, 0, LEASE, false);
        state.record(&batch("a", vec![range(3, 1, 2)]), "a", 1).unwrap();
        let drained = state.rebalance("a", 4, 2, LEASE, true);
        assert_eq!(drained.released, vec![2, 1, 0]);
        assert_eq!(state.owned_by("a", 3), vec![3]);
        assert!(!state.members.contains_key("a"));
    }

    #[test]
    fn splits_are_recorded_in_place_and_tokens_follow_the_parts() {
        let mut state = LedgerState {
            stream_epoch: 7,
            ..Default::default()
        };
        state.rebalance("a", 2, 0, LEASE, false);
        let whole = vec![range(0, 1, 8), range(1, 2, 9)];
        let record = BatchRecord::new("a", 7, whole.clone(), vec![4, 4]);
        let token = record.token();
        assert_eq!(token, "EVENTS@7:0:1-8,1:2-9");
        state.record(&record, "a", 1).unwrap();
        let (left, right) = (vec![range(0, 1, 8)], vec![range(1, 2, 9)]);
        assert!(
            !state.split(&token, &left, [left.clone(), right.clone()]),
            "not a part yet"
        );
        assert!(state.split(&token, &whole, [left.clone(), right.clone()]));
        assert!(
            !state.split(&token, &whole, [left.clone(), right.clone()]),
            "split once"
        );
        let (a, b) = (vec![range(0, 1, 4)], vec![range(0, 5, 8)]);
        assert!(state.split(&token, &left, [a.clone(), b.clone()]));
        let parts: Vec<Vec<SeqRange>> = state.pending[&token].parts.iter().map(|p| p.ranges.clone()).collect();
        assert_eq!(parts, vec![a.clone(), b.clone(), right.clone()], "stream order kept");
        assert!(state.mark_part(&token, &a, PartState::Inserted));
        assert!(state.mark_part(&token, &b, PartState::DeadLettered));
        assert_eq!(state.pending[&token].next_pending_part().unwrap().ranges, right);
        assert_eq!(state.pending[&token].part_token(&a), "EVENTS@7:0:1-8,1:2-9/0:1-4");
        assert!(state.mark_dead_lettered(&token, &[]));
        assert!(state.commit(&record, 9));
        assert!(!state.split(&token, &right, [a, b]), "gone once committed");
        assert_eq!(
            (state.partitions[&0].committed, state.partitions[&0].committed_at_ms),
            (8, 9)
        );
    }

    #[test]
    fn the_ledger_binds_to_one_stream_incarnation() {
        let mut state = LedgerState::default();
        state.rebalance("a", 1, 0, LEASE, false);
        state.record(&batch("a", vec![range(0, 1, 2)]), "a", 1).unwrap();
        assert_eq!(state.bind_epoch(42), Ok(true));
        assert!(
            state.pending.contains_key("EVENTS@42:0:1-2"),
            "legacy records adopt the epoch"
        );
        assert_eq!(state.bind_epoch(42), Ok(false));
        assert_eq!(state.bind_epoch(43), Err(42));
        state.commit(&BatchRecord::new("a", 42, vec![range(0, 1, 2)], vec![1]), 2);
        let of_another_incarnation = BatchRecord::new("a", 41, vec![range(0, 3, 4)], vec![1]);
        let refused = state.record(&of_another_incarnation, "a", 2);
        assert_eq!(refused, Err(vec![0]));
    }

    #[test]
    fn a_gap_is_counted_once_and_only_above_every_committed_position() {
        let mut state = LedgerState::default();
        state.partitions.entry(0).or_default().committed = 100;
        state.partitions.entry(1).or_default().committed = 40;
        assert_eq!(state.check_gap(1), 0, "nothing trimmed");
        assert_eq!(state.check_gap(101), 0, "trimmed up to committed: no loss");
        assert_eq!(state.check_gap(151), 50, "101..=150 were never inserted");
        assert_eq!(state.check_gap(151), 0, "counted once");
        assert_eq!(state.check_gap(161), 10);
    }

    #[test]
    fn a_gap_leaves_the_messages_of_a_recorded_batch_to_its_replay() {
        let mut state = LedgerState::default();
        state.partitions.entry(0).or_default().committed = 100;
        state.partitions.entry(1).or_default().committed = 90;
        // Gone entirely: counted by the replay (or inserted from memory while in flight).
        let gone = BatchRecord::new("a", 7, vec![range(0, 101, 120), range(1, 105, 118)], vec![12, 6]);
        // Below every committed position (another partition ran ahead): the rule does not see
        // it, the replay counts it.
        let below = BatchRecord::new("b", 7, vec![range(2, 60, 70)], vec![4]);
        // Cut through by the gap: counted by both (documented).
        let cut = BatchRecord::new("c", 7, vec![range(3, 140, 160)], vec![5]);
        for batch in [gone, below, cut] {
            state.pending.insert(batch.token(), batch);
        }
        assert_eq!(
            state.check_gap(151),
            50 - 18,
            "101..=150 minus the 18 recorded in the gone batch"
        );
        assert_eq!(state.check_gap(151), 0, "counted once");
    }

    /// Rounds in a random order until nothing moves; returns each member's count.
    fn settle(
        state: &mut LedgerState,
        members: &[String],
        partitions: u32,
        order: &[usize],
        start_ms: u64,
    ) -> Vec<usize> {
        let mut now = start_ms;
        for _ in 0..50 {
            let mut moved = false;
            for &i in order {
                now += 10;
                let outcome = state.rebalance(&members[i % members.len()], partitions, now, LEASE, false);
                moved |= !outcome.acquired.is_empty() || !outcome.released.is_empty();
            }
            if !moved {
                break;
            }
        }
        members.iter().map(|m| state.owned_by(m, now).len()).collect()
    }

    proptest::proptest! {
        /// Whatever the member count and the order of their rounds, ownership settles with every
        /// partition owned and each member within one of an even share; after a member drains,
        /// the rest settle the same way.
        #[test]
        fn ownership_settles_within_one_of_even(
            members in 1usize..8,
            partitions in 1u32..64,
            order in proptest::collection::vec(0usize..8, 1..24),
        ) {
            let names: Vec<String> = (0..members).map(|i| format!("agg-{i:02}")).collect();
            let mut order = order;
            order.extend(0..members); // everyone gets at least one round per pass
            let mut state = LedgerState::default();
            let counts = settle(&mut state, &names, partitions, &order, 1_000);
            proptest::prop_assert_eq!(counts.iter().sum::<usize>(), partitions as usize, "{:?}", counts);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            proptest::prop_assert!(max - min <= 1, "{:?}", counts);

            if members > 1 {
                let now = 1_000_000;
                let released = state.rebalance(&names[0], partitions, now, LEASE, true).released.len();
                proptest::prop_assert_eq!(released, counts[0], "draining releases everything at once");
                let rest = &names[1..];
                let counts = settle(&mut state, rest, partitions, &order, now);
                proptest::prop_assert_eq!(counts.iter().sum::<usize>(), partitions as usize, "{:?}", counts);
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                proptest::prop_assert!(max - min <= 1, "{:?}", counts);
            }
        }
    }

    #[test]
    fn sixteen_partitions_over_three_members_are_six_five_five() {
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut state = LedgerState::default();
        let mut counts = settle(&mut state, &names, 16, &[0, 1, 2], 0);
        counts.sort_unstable();
        assert_eq!(counts, vec![5, 5, 6]);
    }
}

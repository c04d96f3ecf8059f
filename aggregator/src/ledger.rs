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

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How long ledger updates retry NATS errors before giving up.
pub const LEDGER_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// The KV key that holds the ledger.
pub const LEDGER_KEY: &str = "ledger";

/// A half-open position: the last stream sequence of a partition that is in ClickHouse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// The aggregator instance holding the lease, if any.
    pub owner: Option<String>,
    /// Lease expiry, unix milliseconds.
    pub lease_until_ms: u64,
    /// Every message of this partition with a stream sequence <= this is in ClickHouse.
    pub committed: u64,
}

/// The stream sequences `first..=last` of subject `events.<partition>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqRange {
    pub partition: u32,
    pub first: u64,
    pub last: u64,
}

/// A batch recorded before its insert and removed when committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub owner: String,
    /// Sorted by partition; at most one range per partition.
    pub ranges: Vec<SeqRange>,
}

impl BatchRecord {
    /// The batch id and ClickHouse `insert_deduplication_token`: derived only from the ranges, so
    /// a batch rebuilt after a crash (whatever its bytes) dedupes against the original.
    pub fn token(&self) -> String {
        batch_token(&self.ranges)
    }
}

/// `EVENTS:<p>:<first>-<last>,<p>:<first>-<last>...`.
pub fn batch_token(ranges: &[SeqRange]) -> String {
    let mut token = String::from(chute_common::stream::EVENTS_STREAM);
    for (i, range) in ranges.iter().enumerate() {
        token.push(if i == 0 { ':' } else { ',' });
        token.push_str(&format!("{}:{}-{}", range.partition, range.first, range.last));
    }
    token
}

/// The whole ledger document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
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
        let fair_share = if draining { 0 } else { self.fair_share(partitions) };

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

    /// How many partitions each live member should own.
    pub fn fair_share(&self, partitions: u32) -> usize {
        (partitions as usize).div_ceil(self.members.len().max(1))
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
        self.pending.insert(batch.token(), batch.clone());
        Ok(())
    }

    /// Marks `batch` committed (if it is still pending): positions advance, the record goes.
    /// Returns false when someone else already committed it.
    pub fn commit(&mut self, batch: &BatchRecord) -> bool {
        if self.pending.remove(&batch.token()).is_none() {
            return false;
        }
        for range in &batch.ranges {
            let state = self.partitions.entry(range.partition).or_default();
            state.committed = state.committed.max(range.last);
        }
        true
    }
}

/// The ledger entry in a JetStream KV bucket.
#[derive(Clone)]
pub struct Ledger {
    kv: kv::Store,
}

impl Ledger {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    /// The current state and its revision (0 when the entry does not exist yet).
    pub async fn read(&self) -> Result<(LedgerState, u64)> {
        let entry = self
            .kv
            .entry(LEDGER_KEY)
            .await
            .map_err(|err| Error::Ledger(err.to_string()))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let state = serde_json::from_slice(&entry.value)
                    .map_err(|err| Error::Ledger(format!("corrupt ledger: {err}")))?;
                Ok((state, entry.revision))
            }
            _ => Ok((LedgerState::default(), 0)),
        }
    }

    /// Writes `state` if the entry is still at `revision`. `Ok(None)` on a conflict.
    pub async fn write(&self, state: &LedgerState, revision: u64) -> Result<Option<u64>> {
        let value = Bytes::from(serde_json::to_vec(state).expect("ledger serializes"));
        let result = if revision == 0 {
            self.kv
                .create(LEDGER_KEY, value)
                .await
                .map_err(|err| (err.kind() == kv::CreateErrorKind::AlreadyExists, err.to_string()))
        } else {
            self.kv
                .update(LEDGER_KEY, value, revision)
                .await
                .map_err(|err| (err.kind() == kv::UpdateErrorKind::WrongLastRevision, err.to_string()))
        };
        match result {
            Ok(revision) => Ok(Some(revision)),
            Err((true, _)) => Ok(None),
            Err((false, reason)) => Err(Error::Ledger(reason)),
        }
    }

    /// Applies `change` to the current state with CAS, retrying on conflicts. `change` returns
    /// `Err` to abort without writing.
    /// NATS errors (timeouts, a restarting server) are retried with backoff for up to
    /// [`LEDGER_RETRY_FOR`] before the error is returned.
    pub async fn update<T, E>(&self, mut change: impl FnMut(&mut LedgerState) -> Result<T, E>) -> Result<Result<T, E>> {
        let deadline = tokio::time::Instant::now() + LEDGER_RETRY_FOR;
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            let attempt = async {
                let (mut state, revision) = self.read().await?;
                let outcome = match change(&mut state) {
                    Ok(outcome) => outcome,
                    Err(err) => return Ok(Some(Err(err))),
                };
                Ok::<_, Error>(self.write(&state, revision).await?.map(|_| Ok(outcome)))
            };
            match attempt.await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => tokio::task::yield_now().await, // CAS conflict: re-read and retry
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

    #[test]
    fn token_depends_only_on_ranges() {
        let a = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(0, 1, 5), range(3, 2, 9)],
        };
        let b = BatchRecord {
            owner: "b".into(),
            ..a.clone()
        };
        assert_eq!(a.token(), "EVENTS:0:1-5,3:2-9");
        assert_eq!(a.token(), b.token());
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
        let batch = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(1, 1, 10), range(2, 3, 7)],
        };
        state.record(&batch, "a", 1).unwrap();
        // a dies; b arrives after the lease expired and a's membership lapsed.
        let taken = state.rebalance("b", 4, LEASE + 1, LEASE, false);
        assert_eq!(taken.acquired, vec![0, 1, 2, 3]);
        assert_eq!(state.orphans_for("b", LEASE + 2), vec![batch.clone()]);
        assert!(state.orphans_for("a", LEASE + 2).is_empty(), "a owns nothing any more");
        assert!(state.commit(&batch));
        assert_eq!(
            (state.partitions[&1].committed, state.partitions[&2].committed),
            (10, 7)
        );
        assert!(!state.commit(&batch), "a second commit of the same batch is a no-op");
    }

    #[test]
    fn a_zombie_cannot_record_after_a_takeover() {
        let mut state = LedgerState::default();
        state.rebalance("a", 2, 0, LEASE, false);
        state.rebalance("b", 2, LEASE + 1, LEASE, false);
        let stale = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(0, 1, 3)],
        };
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
        let first = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(0, 1, 3)],
        };
        state.record(&first, "a", 1).unwrap();
        let overlapping = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(0, 4, 6)],
        };
        assert_eq!(state.record(&overlapping, "a", 1), Err(vec![0]));
        state.commit(&first);
        state.record(&overlapping, "a", 1).unwrap();
        let replayed = BatchRecord {
            owner: "a".into(),
            ranges: vec![range(1, 0, 0)],
        };
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
        state
            .record(
                &BatchRecord {
                    owner: "a".into(),
                    ranges: vec![range(3, 1, 2)],
                },
                "a",
                1,
            )
            .unwrap();
        let drained = state.rebalance("a", 4, 2, LEASE, true);
        assert_eq!(drained.released, vec![2, 1, 0]);
        assert_eq!(state.owned_by("a", 3), vec![3]);
        assert!(!state.members.contains_key("a"));
    }
}

//! The commit protocol for one recorded batch (`EXACTLY_ONCE.md`): dead-letter the invalid
//! messages once, insert with classified retries, isolate what ClickHouse refuses for good by
//! splitting the batch (each split recorded before it is inserted), commit.
//!
//! Fresh batches and replays of recorded batches (a dead owner's, or our own after a failure)
//! take this same path: everything it decides is either derived from the messages or read back
//! from the ledger, so a replay makes the same inserts with the same tokens.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chute_common::error::NatsFailure;
use chute_common::validate::Limits;
use tokio_util::sync::CancellationToken;

use crate::classify::{classify, Verdict};
use crate::consumer::PartitionMessage;
use crate::error::{Error, Result};
use crate::ledger::{now_ms, BatchRecord, Ledger, LedgerState, PartState, SeqRange};
use crate::row::{self, EncodedMessage, Poison};
use crate::writer::{insert_batch, Backoff};
use crate::{dlq, telemetry};

/// What [`Committer::resolve`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Inserted (or dead-lettered) and committed by us.
    Committed,
    /// Someone else (a new owner) resolved the batch first; it is committed.
    ResolvedElsewhere,
    /// Shutdown came while ClickHouse or NATS failed; the batch stays recorded for the next owner.
    Abandoned,
}

/// Everything the protocol needs; shared by the batch task and ownership rounds.
pub struct Committer {
    /// This aggregator's name in the ledger (`--instance-id`, or a random one per start).
    pub instance_id: String,
    pub lease: Duration,
    pub limits: Limits,
    pub ledger: Ledger,
    pub jetstream: jetstream::Context,
    pub clickhouse: clickhouse::Client,
    pub backoff: Backoff,
    /// Replay ids claimed by the batch (token) that inserts them (see `Committer::claim_replays`).
    pub replay_claims: kv::Store,
}

/// One insert of the protocol: the whole batch, or one part of a split.
struct Unit {
    token: String,
    /// The ranges the unit covers; the whole batch's when it was not split.
    ranges: Vec<SeqRange>,
    /// Indices into `Encoded::valid`: the valid messages inside `ranges`, in order.
    messages: std::ops::Range<usize>,
}

impl Committer {
    /// Resolves `record` with its `messages` (exactly the messages of its ranges).
    pub async fn resolve(
        &self,
        mut record: BatchRecord,
        mut messages: Vec<PartitionMessage>,
        shutdown: &CancellationToken,
    ) -> Result<Resolution> {
        let token = record.token();
        // Stream order per partition, partitions ascending: the order ranges and parts use.
        messages.sort_by_key(|message| (message.partition, message.sequence));
        let messages = self.claim_replays(&token, messages).await?;
        // A replay keeps the verdicts recorded by an earlier attempt: what it dead-lettered stays
        // out even if the validation rules changed since (`dlq replay` brings it back, once).
        let messages: Vec<PartitionMessage> = messages
            .into_iter()
            .filter(|m| !record.was_dead_lettered(m.partition, m.sequence))
            .collect();
        let order: Vec<(u32, u64)> = messages.iter().map(|m| (m.partition, m.sequence)).collect();
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        let encoded = row::encode(messages, &self.limits);

        // 1. Dead-letter the invalid messages (not dead-lettered yet), then record which they
        //    were; publishing again after a crash is deduplicated by their DLQ message ids.
        if !encoded.poison.is_empty() {
            let mut attempt = 0;
            loop {
                match self.dead_letter(record.epoch, &encoded.poison).await {
                    Ok(()) => break,
                    Err(err) => {
                        attempt += 1;
                        let delay = self.backoff.delay(attempt);
                        telemetry::dead_letter_failed(attempt, &token, &err, delay);
                        if !self.wait_and_renew(&token, delay, shutdown).await? {
                            return Ok(self.gone_or_abandoned(shutdown));
                        }
                    }
                }
            }
            let runs = poison_runs(&order, &encoded.poison);
            match self
                .change(&token, |state| state.mark_dead_lettered(&token, &runs))
                .await?
            {
                Some(updated) => record = updated,
                None => return Ok(Resolution::ResolvedElsewhere),
            }
        }

        // 2. Insert: the whole batch, or each pending part of a split, with classified retries.
        let mut attempt = 0;
        while let Some(unit) = next_unit(&record, &encoded.valid) {
            let (rows, row_count) = rows_of(&encoded, &unit.messages);
            let inserted = insert_batch(&self.clickhouse, rows, row_count, &unit.token).await;
            let verdict = match inserted {
                Ok(()) => None,
                Err(err) => Some((classify(&err), err)),
            };
            let updated = match verdict {
                None if record.parts.is_empty() => break,
                None => {
                    attempt = 0;
                    self.change(&token, |state| {
                        state.mark_part(&token, &unit.ranges, PartState::Inserted)
                    })
                    .await?
                }
                Some((Verdict::Transient, err)) => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    telemetry::insert_failed(attempt, &unit.token, &err, delay);
                    if !self.wait_and_renew(&token, delay, shutdown).await? {
                        return Ok(self.gone_or_abandoned(shutdown));
                    }
                    continue;
                }
                Some((Verdict::Permanent { code, reason }, _)) => {
                    attempt = 0;
                    let valid = &encoded.valid[unit.messages.clone()];
                    telemetry::insert_refused(&unit.token, code, &reason, valid.len());
                    if let [message] = valid {
                        // The smallest unit: this message is what ClickHouse refuses.
                        let poison = Poison {
                            partition: message.partition,
                            sequence: message.sequence,
                            payload: message.payload.clone(),
                            error: format!("clickhouse refused the insert: {reason}"),
                        };
                        if !self
                            .dead_letter_with_retry(record.epoch, &poison, &token, shutdown)
                            .await?
                        {
                            return Ok(self.gone_or_abandoned(shutdown));
                        }
                        self.change(&token, |state| {
                            state.mark_part(&token, &unit.ranges, PartState::DeadLettered)
                        })
                        .await?
                    } else {
                        let halves = split_in_two(valid);
                        self.change(&token, |state| state.split(&token, &unit.ranges, halves.clone()))
                            .await?
                    }
                }
            };
            match updated {
                Some(updated) => record = updated,
                None => return Ok(Resolution::ResolvedElsewhere),
            }
        }

        // 3. Commit: positions advance, the record goes.
        let committed = self.ledger.update(|state| state.commit(&record, now_ms())).await?;
        if !committed {
            return Ok(Resolution::ResolvedElsewhere); // same rows, same tokens
        }
        let received: Vec<i64> = encoded.valid.iter().map(|m| m.received_ms).collect();
        telemetry::batch_committed(&token, encoded.row_count, bytes, record.ranges.len(), &received);
        Ok(Resolution::Committed)
    }

    /// Keeps one copy per replay id: a message `dlq replay` re-published is inserted by the
    /// batch that first claims its id (a KV `create`, value = the batch token, written before the
    /// insert). A replay of that same batch finds its own claim and keeps the message; any other
    /// copy, however late (a replay re-run after JetStream's duplicate window), is dropped. The
    /// decision is durable, so every replay of a batch makes the same one.
    async fn claim_replays(&self, token: &str, messages: Vec<PartitionMessage>) -> Result<Vec<PartitionMessage>> {
        let mut kept = Vec::with_capacity(messages.len());
        let mut seen = std::collections::HashSet::new();
        for message in messages {
            let Some(replay_id) = message.replay_id.clone() else {
                kept.push(message);
                continue;
            };
            if seen.insert(replay_id.clone()) && self.claim(&replay_id, token).await? {
                kept.push(message);
            } else {
                telemetry::replay_duplicate(&replay_id, message.partition, message.sequence);
            }
        }
        Ok(kept)
    }

    async fn claim(&self, replay_id: &str, token: &str) -> Result<bool> {
        let key = format!("replay.{replay_id}");
        match self.replay_claims.create(&key, token.to_owned().into()).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = self
                    .replay_claims
                    .get(&key)
                    .await
                    .map_err(|err| Error::nats("read replay claim", err))?;
                Ok(holder.as_deref() == Some(token.as_bytes()))
            }
            Err(err) => Err(Error::nats("claim replay", err)),
        }
    }

    async fn dead_letter(&self, epoch: i64, poison: &[Poison]) -> Result<()> {
        for message in poison {
            dlq::publish(&self.jetstream, epoch, message).await?;
        }
        Ok(())
    }

    async fn dead_letter_with_retry(
        &self,
        epoch: i64,
        poison: &Poison,
        token: &str,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let mut attempt = 0;
        loop {
            let Err(err) = dlq::publish(&self.jetstream, epoch, poison).await else {
                return Ok(true);
            };
            attempt += 1;
            let delay = self.backoff.delay(attempt);
            telemetry::dead_letter_failed(attempt, token, &err, delay);
            if !self.wait_and_renew(token, delay, shutdown).await? {
                return Ok(false);
            }
        }
    }

    /// Applies `change` to the pending record `token` and returns the record as written, or
    /// `None` when the batch is no longer pending (another owner committed it). A change that
    /// finds its part already split or marked (a previous attempt did it) writes nothing and
    /// returns the record as it is.
    async fn change(
        &self,
        token: &str,
        mut change: impl FnMut(&mut LedgerState) -> bool,
    ) -> Result<Option<BatchRecord>> {
        let outcome = self
            .ledger
            .try_update(|state| {
                if !state.pending.contains_key(token) {
                    return Err(None);
                }
                if !change(state) {
                    return Err(state.pending.get(token).cloned().map(Box::new));
                }
                Ok(state.pending.get(token).cloned())
            })
            .await?;
        Ok(outcome.unwrap_or_else(|unchanged| unchanged.map(|record| *record)))
    }

    /// Sleeps `delay` (or until shutdown), then renews our leases while the batch is pending.
    /// False when the loop should stop: shutdown, or the batch was resolved by someone else.
    async fn wait_and_renew(&self, token: &str, delay: Duration, shutdown: &CancellationToken) -> Result<bool> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
        let until = now_ms() + self.lease.as_millis() as u64;
        let pending = self
            .ledger
            .try_update(|state| {
                if !state.pending.contains_key(token) {
                    return Err(());
                }
                for partition in state.partitions.values_mut() {
                    if partition.owner.as_deref() == Some(self.instance_id.as_str()) {
                        partition.lease_until_ms = until;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(pending.is_ok())
    }

    fn gone_or_abandoned(&self, shutdown: &CancellationToken) -> Resolution {
        if shutdown.is_cancelled() {
            tracing::warn!("shutdown while the batch fails: it stays recorded for the next owner");
            Resolution::Abandoned
        } else {
            tracing::info!("batch already resolved by another owner");
            Resolution::ResolvedElsewhere
        }
    }
}

/// The next insert: the whole batch while it is not split, else its first pending part.
fn next_unit(record: &BatchRecord, valid: &[EncodedMessage]) -> Option<Unit> {
    if record.parts.is_empty() {
        if valid.is_empty() {
            return None; // every message was invalid and is dead-lettered
        }
        return Some(Unit {
            token: record.token(),
            ranges: record.ranges.clone(),
            messages: 0..valid.len(),
        });
    }
    let part = record.next_pending_part()?;
    Some(Unit {
        token: record.part_token(&part.ranges),
        ranges: part.ranges.clone(),
        messages: messages_in(valid, &part.ranges),
    })
}

/// The valid messages inside `ranges`: a contiguous run, since both are in (partition,
/// sequence) order and parts are made by cutting that order.
fn messages_in(valid: &[EncodedMessage], ranges: &[SeqRange]) -> std::ops::Range<usize> {
    let inside = |m: &EncodedMessage| {
        ranges
            .iter()
            .any(|r| r.partition == m.partition && (r.first..=r.last).contains(&m.sequence))
    };
    let start = valid.iter().position(inside).unwrap_or(valid.len());
    let end = start + valid[start..].iter().take_while(|m| inside(m)).count();
    debug_assert!(valid[end..].iter().all(|m| !inside(m)), "a part is contiguous");
    start..end
}

/// The RowBinary rows of a run of valid messages (one slice, no copy) and how many there are.
fn rows_of(encoded: &row::Encoded, messages: &std::ops::Range<usize>) -> (bytes::Bytes, usize) {
    if messages.is_empty() {
        return (bytes::Bytes::new(), 0);
    }
    let run = &encoded.valid[messages.clone()];
    let (first, last) = (&run[0], &run[run.len() - 1]);
    debug_assert!(run.windows(2).all(|pair| pair[0].rows.end == pair[1].rows.start));
    let count = run.iter().map(|message| message.events).sum();
    (encoded.rows.slice(first.rows.start..last.rows.end), count)
}

/// Cuts a run of at least two messages into two halves by message count, as ranges.
fn split_in_two(messages: &[EncodedMessage]) -> [Vec<SeqRange>; 2] {
    debug_assert!(messages.len() >= 2);
    let (left, right) = messages.split_at(messages.len() / 2);
    [ranges_of(left), ranges_of(right)]
}

/// The ranges (one per partition, first..=last) spanned by a run of messages.
fn ranges_of(messages: &[EncodedMessage]) -> Vec<SeqRange> {
    let mut ranges: Vec<SeqRange> = Vec::new();
    for message in messages {
        match ranges.last_mut() {
            Some(range) if range.partition == message.partition => range.last = message.sequence,
            _ => ranges.push(SeqRange {
                partition: message.partition,
                first: message.sequence,
                last: message.sequence,
            }),
        }
    }
    ranges
}

/// The poison messages as runs of consecutive messages of one partition (`order`: every message
/// of the batch, sorted by partition then sequence): a whole partition of poison is one run.
fn poison_runs(order: &[(u32, u64)], poison: &[row::Poison]) -> Vec<SeqRange> {
    let poisoned: std::collections::HashSet<(u32, u64)> = poison.iter().map(|p| (p.partition, p.sequence)).collect();
    let mut runs: Vec<SeqRange> = Vec::new();
    let mut open = false;
    for &(partition, sequence) in order {
        if !poisoned.contains(&(partition, sequence)) {
            open = false;
            continue;
        }
        match runs.last_mut() {
            Some(run) if open && run.partition == partition => run.last = sequence,
            _ => runs.push(SeqRange {
                partition,
                first: sequence,
                last: sequence,
            }),
        }
        open = true;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: u32, sequence: u64, rows: std::ops::Range<usize>) -> EncodedMessage {
        EncodedMessage {
            partition,
            sequence,
            events: rows.len(),
            rows,
            received_ms: 0,
            payload: bytes::Bytes::new(),
        }
    }

    fn poison(partition: u32, sequence: u64) -> Poison {
        Poison {
            partition,
            sequence,
            payload: bytes::Bytes::new(),
            error: String::new(),
        }
    }

    /// Runs cover consecutive poison messages of one partition and stop at a valid message or
    /// a partition boundary; a replay finds exactly the recorded messages in them.
    #[test]
    fn poison_runs_are_consecutive_messages_of_one_partition() {
        let order = [(0, 3), (0, 5), (0, 8), (0, 9), (1, 4), (1, 6), (2, 7)];
        let bad = [
            poison(0, 3),
            poison(0, 5),
            poison(0, 9),
            poison(1, 4),
            poison(1, 6),
            poison(2, 7),
        ];
        let runs = poison_runs(&order, &bad);
        assert_eq!(
            runs,
            vec![range(0, 3, 5), range(0, 9, 9), range(1, 4, 6), range(2, 7, 7)]
        );
        let mut record = BatchRecord::new(
            "a",
            1,
            vec![range(0, 3, 9), range(1, 4, 6), range(2, 7, 7)],
            vec![4, 2, 1],
        );
        record.poison = runs;
        let recorded: Vec<(u32, u64)> = order
            .iter()
            .copied()
            .filter(|&(p, s)| record.was_dead_lettered(p, s))
            .collect();
        let expected: Vec<(u32, u64)> = bad.iter().map(|p| (p.partition, p.sequence)).collect();
        assert_eq!(recorded, expected, "valid (0, 8) is not covered");
        assert!(poison_runs(&order, &[]).is_empty());
    }

    fn range(partition: u32, first: u64, last: u64) -> SeqRange {
        SeqRange { partition, first, last }
    }

    #[test]
    fn halves_cut_the_stream_order_and_find_their_messages_again() {
        // Partition 0: 3, 5, 9 (4 was invalid); partition 2: 4, 6.
        let valid = vec![
            message(0, 3, 0..2),
            message(0, 5, 2..3),
            message(0, 9, 3..5),
            message(2, 4, 5..6),
            message(2, 6, 6..9),
        ];
        let [left, right] = split_in_two(&valid);
        assert_eq!(left, vec![range(0, 3, 5)]);
        assert_eq!(right, vec![range(0, 9, 9), range(2, 4, 6)]);
        assert_eq!(messages_in(&valid, &left), 0..2);
        assert_eq!(messages_in(&valid, &right), 2..5);
        let [a, b] = split_in_two(&valid[2..5]);
        assert_eq!((a, b), (vec![range(0, 9, 9)], vec![range(2, 4, 6)]));
    }

    #[test]
    fn units_follow_the_recorded_parts() {
        let valid = vec![message(0, 1, 0..1), message(0, 2, 1..2), message(1, 3, 2..4)];
        let mut record = BatchRecord::new("a", 5, vec![range(0, 1, 2), range(1, 3, 3)], vec![2, 1]);
        let whole = next_unit(&record, &valid).unwrap();
        assert_eq!((whole.token.as_str(), whole.messages), ("EVENTS@5:0:1-2,1:3-3", 0..3));
        let mut state = LedgerState {
            stream_epoch: 5,
            ..Default::default()
        };
        state.pending.insert(record.token(), record.clone());
        let halves = split_in_two(&valid);
        assert!(state.split(&record.token(), &record.ranges.clone(), halves));
        record = state.pending[&record.token()].clone();
        let first = next_unit(&record, &valid).unwrap();
        assert_eq!(
            (first.token.as_str(), first.messages),
            ("EVENTS@5:0:1-2,1:3-3/0:1-1", 0..1)
        );
        state.mark_part(&record.token(), &first.ranges, PartState::Inserted);
        record = state.pending[&record.token()].clone();
        let second = next_unit(&record, &valid).unwrap();
        assert_eq!(second.messages, 1..3);
        state.mark_part(&record.token(), &second.ranges, PartState::DeadLettered);
        assert!(next_unit(&state.pending[&record.token()], &valid).is_none());
    }

    #[test]
    fn a_batch_of_only_invalid_messages_inserts_nothing() {
        let record = BatchRecord::new("a", 1, vec![range(0, 1, 1)], vec![1]);
        assert!(next_unit(&record, &[]).is_none());
    }
}

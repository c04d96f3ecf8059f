//! `aggregator ledger reset --from-clickhouse`: rebuilds the committed positions from what the
//! raw table holds, for when the ledger and the stream disagree (a lost ledger, a recreated
//! stream) and the aggregator refuses to start.
//!
//! Commits advance a partition in stream order, so among the valid messages still stored on
//! `events.<p>`, those whose events are in ClickHouse form a prefix. A binary search over the
//! partition's sequences finds the first valid message whose first event is not in `events`;
//! everything before it is in ClickHouse (or was dead-lettered), so `committed` is that sequence
//! minus one. Messages that fail validation say nothing (they were never inserted) and are
//! skipped. The new ledger is bound to the stream as it is now, with no owners and no pending
//! batch; tokens then carry the new epoch, so nothing can dedup against the old incarnation by
//! accident.

use std::collections::BTreeMap;
use std::future::Future;

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use chute_common::error::NatsFailure;
use chute_common::stream::events_subject;
use chute_common::validate::Limits;

use crate::error::{Error, Result};
use crate::ledger::{now_ms, Ledger, LedgerState, PartitionState};

/// A view of one partition's stored messages: the first valid one in `from..before`, with
/// whether its events are in ClickHouse.
pub trait Probe {
    fn first_valid(&mut self, from: u64, before: u64) -> impl Future<Output = Result<Option<(u64, bool)>>>;
}

/// The first sequence in `first..end` whose valid message is not in ClickHouse (`end` when every
/// valid message is), assuming those in ClickHouse form a prefix. About log2(end - first) probes.
pub async fn boundary(probe: &mut impl Probe, first: u64, end: u64) -> Result<u64> {
    // Invariant: every valid message below `low` is in ClickHouse; none at or after `high` is
    // known to be.
    let (mut low, mut high) = (first, end);
    while low < high {
        let middle = low + (high - low) / 2;
        match probe.first_valid(middle, high).await? {
            None => high = middle, // nothing valid in middle..high: the boundary is at or before it
            Some((sequence, true)) => low = sequence + 1,
            Some((sequence, false)) => high = sequence,
        }
    }
    Ok(low)
}

/// What the reset found for one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Position {
    pub partition: u32,
    /// The first and last sequences stored on its subject (none when empty).
    pub stored: Option<(u64, u64)>,
    pub committed: u64,
}

/// Probes `events.<partition>` in the stream and `events` in ClickHouse.
struct StreamProbe<'a> {
    stream: &'a Stream,
    clickhouse: &'a clickhouse::Client,
    partition: u32,
    limits: Limits,
}

impl Probe for StreamProbe<'_> {
    async fn first_valid(&mut self, mut from: u64, before: u64) -> Result<Option<(u64, bool)>> {
        let subject = events_subject(self.partition);
        while from < before {
            let message = match self.stream.get_first_raw_message_by_subject(&subject, from).await {
                Ok(message) => message,
                Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(err) => return Err(Error::nats(format!("read {subject} from {from}"), err)),
            };
            if message.sequence >= before {
                return Ok(None);
            }
            let batch = match chute_common::payload::decode(&message.payload) {
                Ok(batch) => batch,
                Err(_) => {
                    from = message.sequence + 1;
                    continue;
                }
            };
            let valid = batch
                .events
                .iter()
                .all(|event| chute_common::validate::check(event, batch.received_unix_nanos, &self.limits).is_ok());
            let Some(event) = batch.events.first().filter(|_| valid) else {
                from = message.sequence + 1;
                continue;
            };
            let found: u64 = self
                .clickhouse
                .query("SELECT count() FROM ? WHERE tenant = ? AND name = ? AND event_id = toUUID(?)")
                .bind(clickhouse::sql::Identifier(chute_schema::row::EVENTS_TABLE))
                .bind(&event.tenant)
                .bind(&event.name)
                .bind(&event.event_id)
                .fetch_one()
                .await?;
            return Ok(Some((message.sequence, found > 0)));
        }
        Ok(None)
    }
}

/// The positions ClickHouse and the stream imply, per partition.
pub async fn positions(
    stream: &Stream,
    clickhouse: &clickhouse::Client,
    partitions: u32,
    limits: &Limits,
) -> Result<Vec<Position>> {
    let mut stream = stream.clone();
    let last_sequence = stream
        .info()
        .await
        .map_err(|err| Error::nats("EVENTS info", err))?
        .state
        .last_sequence;
    let mut found = Vec::new();
    for partition in 0..partitions {
        let subject = events_subject(partition);
        let first = match stream.get_first_raw_message_by_subject(&subject, 1).await {
            Ok(message) => Some(message.sequence),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(err) => return Err(Error::nats(format!("first message of {subject}"), err)),
        };
        let Some(first) = first else {
            // Nothing stored: whatever the partition had is inserted or gone.
            found.push(Position {
                partition,
                stored: None,
                committed: last_sequence,
            });
            continue;
        };
        let last = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .map_err(|err| Error::nats(format!("last message of {subject}"), err))?
            .sequence;
        let mut probe = StreamProbe {
            stream: &stream,
            clickhouse,
            partition,
            limits: limits.clone(),
        };
        let boundary = boundary(&mut probe, first, last + 1).await?;
        found.push(Position {
            partition,
            stored: Some((first, last)),
            committed: if boundary > last { last_sequence } else { boundary - 1 },
        });
    }
    Ok(found)
}

/// Writes a fresh ledger with `positions`, bound to the stream as it is now. Refuses while an
/// aggregator is alive (its heartbeat has not expired) unless `force`.
pub async fn reset(ledger: &Ledger, stream: &Stream, positions: &[Position], force: bool) -> Result<LedgerState> {
    let epoch = chute_common::stream::stream_epoch(stream.cached_info());
    let now = now_ms();
    let outcome = ledger
        .try_update(|state| {
            let alive: Vec<String> = state
                .members
                .iter()
                .filter(|(_, expiry)| **expiry > now)
                .map(|(member, _)| member.clone())
                .collect();
            if !alive.is_empty() && !force {
                return Err(alive);
            }
            *state = LedgerState {
                stream_epoch: epoch,
                partitions: positions
                    .iter()
                    .map(|position| {
                        let partition = PartitionState {
                            committed: position.committed,
                            committed_at_ms: now,
                            ..Default::default()
                        };
                        (position.partition, partition)
                    })
                    .collect::<BTreeMap<_, _>>(),
                ..Default::default()
            };
            Ok(state.clone())
        })
        .await?;
    outcome.map_err(|alive| {
        Error::ledger(
            "reset",
            format!("aggregators {alive:?} are alive; stop them first (or pass --force)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages as (sequence, valid, in ClickHouse).
    struct Fake {
        messages: Vec<(u64, bool, bool)>,
        probes: usize,
    }

    impl Probe for Fake {
        async fn first_valid(&mut self, from: u64, before: u64) -> Result<Option<(u64, bool)>> {
            self.probes += 1;
            Ok(self
                .messages
                .iter()
                .find(|(sequence, valid, _)| *valid && (from..before).contains(sequence))
                .map(|(sequence, _, in_clickhouse)| (*sequence, *in_clickhouse)))
        }
    }

    /// Runs the search and checks its contract: every valid message below the boundary is in
    /// ClickHouse and the first valid one at or after it is not. Returns it and the probe count.
    async fn search(messages: Vec<(u64, bool, bool)>) -> (u64, usize) {
        let end = messages.last().map_or(1, |m| m.0 + 1);
        let first = messages.first().map_or(1, |m| m.0);
        let mut fake = Fake {
            messages: messages.clone(),
            probes: 0,
        };
        let found = boundary(&mut fake, first, end).await.unwrap();
        let valid = || messages.iter().filter(|m| m.1);
        assert!(
            valid().filter(|m| m.0 < found).all(|m| m.2),
            "below {found}: all inserted"
        );
        assert!(
            valid().find(|m| m.0 >= found).is_none_or(|m| !m.2),
            "at {found}: not inserted"
        );
        (found, fake.probes)
    }

    #[tokio::test]
    async fn finds_the_first_message_not_in_clickhouse() {
        // The partition's messages are every third sequence (others are other partitions').
        let messages: Vec<_> = (0..1000u64).map(|i| (3 * i + 1, true, i < 700)).collect();
        let (found, probes) = search(messages).await;
        assert!(
            (3 * 699 + 2..=3 * 700 + 1).contains(&found),
            "{found}: after 2098, at most 2101"
        );
        assert!(probes <= 14, "{probes} probes");
    }

    #[tokio::test]
    async fn invalid_messages_are_skipped_and_the_ends_are_handled() {
        let mixed = vec![(5, true, true), (6, false, false), (9, false, false), (12, true, false)];
        assert!((6..=12).contains(&search(mixed).await.0));
        let all_in = vec![(5, true, true), (6, true, true)];
        assert_eq!(search(all_in).await.0, 7, "everything stored is in ClickHouse");
        let none_in = vec![(5, true, false), (6, true, false)];
        assert_eq!(search(none_in).await.0, 5, "committed = 4: before everything stored");
        let only_invalid = vec![(5, false, false), (8, false, false)];
        assert_eq!(search(only_invalid).await.0, 5, "invalid ones are dead-lettered again");
    }
}

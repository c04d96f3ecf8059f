//! Encoding: JetStream messages -> `events` rows, and the verdict on poison messages.
//!
//! Pure and deterministic: the same messages always give the same rows and the same poison
//! verdicts (validation is anchored at the batch's receive time, not at "now"), which is what
//! lets a replayed batch carry the same dedup token meaningfully.

use std::ops::Range;

use bytes::Bytes;
use chute_common::validate::{check, timestamp_to_nanos, Limits};
use chute_proto::v1::Event;
use chute_schema::row::EventInsertRow;
use uuid::Uuid;

use crate::consumer::PartitionMessage;

/// A message that cannot be inserted, with the reason.
#[derive(Debug, Clone)]
pub struct Poison {
    pub partition: u32,
    pub sequence: u64,
    pub payload: Bytes,
    pub error: String,
}

/// A valid message and where its rows are in [`Encoded::rows`].
#[derive(Debug, Clone)]
pub struct EncodedMessage {
    pub partition: u32,
    pub sequence: u64,
    pub rows: Range<usize>,
    /// When the ingestor accepted it (unix ms), for the accepted->inserted latency.
    pub received_ms: i64,
    /// Kept so that a message ClickHouse refuses can still be dead-lettered.
    pub payload: Bytes,
}

/// Rows of one batch and the messages to dead-letter.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rows: Vec<EventInsertRow>,
    /// The valid messages in input order; their rows are contiguous and in the same order.
    pub valid: Vec<EncodedMessage>,
    pub poison: Vec<Poison>,
}

/// Validates every (already decoded) message and turns its events into rows; a message with any
/// invalid event is poison as a whole (so a replay from the dead-letter stream can never insert
/// part of it twice).
pub fn encode(messages: Vec<PartitionMessage>, limits: &Limits) -> Encoded {
    let mut encoded = Encoded {
        rows: Vec::with_capacity(messages.iter().map(PartitionMessage::events).sum()),
        ..Default::default()
    };
    for message in messages {
        let PartitionMessage {
            partition,
            sequence,
            payload,
            batch,
            ..
        } = message;
        let verdict = batch.and_then(|batch| {
            let received = batch.received_unix_nanos;
            for (index, event) in batch.events.iter().enumerate() {
                check(event, received, limits).map_err(|rejection| format!("event {index}: {rejection}"))?;
            }
            Ok(batch)
        });
        match verdict {
            Ok(batch) => {
                let ingested_at = batch.received_unix_nanos.div_euclid(1_000_000);
                let start = encoded.rows.len();
                encoded
                    .rows
                    .extend(batch.events.into_iter().map(|event| to_row(event, ingested_at)));
                encoded.valid.push(EncodedMessage {
                    partition,
                    sequence,
                    rows: start..encoded.rows.len(),
                    received_ms: ingested_at,
                    payload,
                });
            }
            Err(error) => encoded.poison.push(Poison {
                partition,
                sequence,
                payload,
                error,
            }),
        }
    }
    encoded
}

fn to_row(event: Event, ingested_at: i64) -> EventInsertRow {
    let time_nanos = event.time.as_ref().and_then(timestamp_to_nanos).expect("checked");
    EventInsertRow {
        tenant: event.tenant,
        name: event.name,
        time: time_nanos.div_euclid(1_000_000),
        event_id: Uuid::try_parse(&event.event_id).expect("checked"),
        session_id: event.session_id,
        user_id: event.user_id,
        attributes: event.attributes.into_iter().collect(),
        metrics: event.metrics.into_iter().collect(),
        body: event.body,
        ingested_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::validate::timestamp_from_nanos;
    use chute_proto::v1::EventBatch;
    use prost::Message;

    const NOW: i64 = 1_780_000_000_123_456_789;

    fn message(sequence: u64, batch: EventBatch) -> PartitionMessage {
        PartitionMessage::new(2, 1, sequence, 0, Bytes::from(batch.encode_to_vec()))
    }

    fn event(name: &str) -> Event {
        Event {
            event_id: Uuid::new_v4().to_string(),
            tenant: "acme".into(),
            name: name.into(),
            time: Some(timestamp_from_nanos(NOW - 5_000_000_000)),
            metrics: [("cost".to_string(), 1.5)].into(),
            ..Default::default()
        }
    }

    fn batch(events: Vec<Event>) -> EventBatch {
        EventBatch {
            version: chute_proto::BATCH_VERSION,
            received_unix_nanos: NOW,
            events,
            ..Default::default()
        }
    }

    #[test]
    fn events_become_rows_with_millisecond_times() {
        let encoded = encode(
            vec![message(1, batch(vec![event("a"), event("b")]))],
            &Limits::default(),
        );
        assert!(encoded.poison.is_empty());
        assert_eq!(encoded.rows.len(), 2);
        assert_eq!(encoded.rows[0].time, (NOW - 5_000_000_000) / 1_000_000);
        assert_eq!(encoded.rows[0].ingested_at, NOW / 1_000_000);
        assert_eq!(encoded.rows[1].metrics, vec![("cost".to_string(), 1.5)]);
        assert_eq!(encoded.valid.len(), 1);
        assert_eq!(
            (encoded.valid[0].rows.clone(), encoded.valid[0].received_ms),
            (0..2, NOW / 1_000_000)
        );
    }

    #[test]
    fn undecodable_unknown_version_and_invalid_messages_are_poison_as_a_whole() {
        let garbage = PartitionMessage::new(2, 1, 1, 0, Bytes::from_static(b"\xff\xff"));
        let future = message(
            2,
            EventBatch {
                version: 9,
                ..batch(vec![event("a")])
            },
        );
        let half_bad = message(
            3,
            batch(vec![
                event("ok"),
                Event {
                    name: "bad name".into(),
                    ..event("x")
                },
            ]),
        );
        let good = message(4, batch(vec![event("fine")]));
        let encoded = encode(vec![garbage, future, half_bad, good], &Limits::default());
        let poisoned: Vec<u64> = encoded.poison.iter().map(|p| p.sequence).collect();
        assert_eq!(poisoned, vec![1, 2, 3]);
        assert!(encoded.poison[1].error.contains("unknown payload version 9"));
        assert!(encoded.poison[2].error.contains("event 1: name"));
        assert_eq!(encoded.rows.len(), 1);
        assert_eq!((encoded.valid[0].sequence, encoded.valid[0].rows.clone()), (4, 0..1));
    }

    #[test]
    fn the_verdict_does_not_depend_on_when_it_is_made() {
        // An event 6 days older than its receive time stays valid however late it is replayed.
        let old = Event {
            time: Some(timestamp_from_nanos(NOW - 6 * 86_400 * 1_000_000_000)),
            ..event("a")
        };
        assert!(encode(vec![message(1, batch(vec![old]))], &Limits::default())
            .poison
            .is_empty());
    }
}

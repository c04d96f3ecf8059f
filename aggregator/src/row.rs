//! Encoding: JetStream messages -> the RowBinary body of the `events` insert, and the verdict on
//! poison messages.
//!
//! Pure and deterministic: the same messages always give the same rows and the same poison
//! verdicts (validation is anchored at the batch's receive time, not at "now"), which is what
//! lets a replayed batch carry the same dedup token meaningfully.

use std::ops::Range;

use bytes::Bytes;
use chute_common::validate::Limits;

use crate::consumer::PartitionMessage;
use crate::transcode::Transcoder;

/// A message that cannot be inserted, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Poison {
    pub partition: u32,
    pub sequence: u64,
    pub payload: Bytes,
    pub error: String,
}

/// A valid message and where its rows are in [`Encoded::rows`].
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedMessage {
    pub partition: u32,
    pub sequence: u64,
    /// Byte range of its rows in [`Encoded::rows`]: the rows of a run of messages are one slice.
    pub rows: Range<usize>,
    /// Number of rows (events) in `rows`.
    pub events: usize,
    /// When the ingestor accepted it (unix ms), for the accepted->inserted latency.
    pub received_ms: i64,
    /// Kept so that a message ClickHouse refuses can still be dead-lettered.
    pub payload: Bytes,
}

/// Rows of one batch, as the RowBinary body of the `events` insert, and the messages to
/// dead-letter.
#[derive(Debug, Default, PartialEq)]
pub struct Encoded {
    /// RowBinary rows in the column order of `EventsRow` (see [`crate::writer`]).
    pub rows: Bytes,
    pub row_count: usize,
    /// The valid messages in input order; their rows are contiguous and in the same order.
    pub valid: Vec<EncodedMessage>,
    pub poison: Vec<Poison>,
}

/// Validates every message and turns its events into RowBinary rows; a message with any invalid
/// event is poison as a whole (so a replay from the dead-letter stream can never insert part of
/// it twice). The one-pass [`Transcoder`] handles what it accepts; every other message goes to
/// [`reference`](mod@reference), which gives the verdict and the error text.
pub fn encode(messages: Vec<PartitionMessage>, limits: &Limits) -> Encoded {
    let mut transcoder = Transcoder::default();
    encode_with(messages, |payload, out| {
        match transcoder.transcode(payload, limits, out) {
            Some(transcoded) => Ok((transcoded.events, transcoded.received_unix_nanos)),
            None => reference::encode_message(payload, limits, out),
        }
    })
}

/// [`encode`] with the reference path only (the proptest and the benchmark compare the two).
pub fn encode_reference(messages: Vec<PartitionMessage>, limits: &Limits) -> Encoded {
    encode_with(messages, |payload, out| reference::encode_message(payload, limits, out))
}

/// `encode_message` appends the rows of one payload and returns (events, receive time in ns),
/// or the poison reason with nothing appended.
fn encode_with(
    messages: Vec<PartitionMessage>,
    mut encode_message: impl FnMut(&[u8], &mut Vec<u8>) -> Result<(usize, i64), String>,
) -> Encoded {
    // RowBinary is about as large as the protobuf it comes from.
    let mut rows = Vec::with_capacity(messages.iter().map(|m| m.payload.len()).sum());
    let (mut valid, mut poison, mut row_count) = (Vec::new(), Vec::new(), 0);
    for message in messages {
        let PartitionMessage {
            partition,
            sequence,
            payload,
            ..
        } = message;
        let start = rows.len();
        match encode_message(&payload, &mut rows) {
            Ok((events, received_nanos)) => {
                row_count += events;
                valid.push(EncodedMessage {
                    partition,
                    sequence,
                    rows: start..rows.len(),
                    events,
                    received_ms: received_nanos.div_euclid(1_000_000),
                    payload,
                });
            }
            Err(error) => {
                debug_assert_eq!(rows.len(), start);
                poison.push(Poison {
                    partition,
                    sequence,
                    payload,
                    error,
                });
            }
        }
    }
    Encoded {
        rows: Bytes::from(rows),
        row_count,
        valid,
        poison,
    }
}

/// The reference path: prost decode, `validate::check` per event, an
/// [`EventsRow`](chute_schema::row::EventsRow) per event, written as RowBinary. Slow but plainly
/// right; the transcoder must agree with it.
///
/// Maps: prost decodes them into `HashMap`s (a duplicated key keeps its last value) that have no
/// order, so the rows write them sorted by key: the same message always gives the same bytes.
pub mod reference {
    use chute_common::validate::{check, timestamp_to_nanos, Limits};
    use chute_proto::v1::Event;
    use chute_schema::row::EventsRow;
    use uuid::Uuid;

    use crate::transcode::{put_string, put_uuid, put_varint};

    /// Appends the rows of `payload` to `out`: (events, receive time in ns), or the poison
    /// reason with nothing appended.
    pub fn encode_message(payload: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Result<(usize, i64), String> {
        let (rows, received) = rows(payload, limits)?;
        for row in &rows {
            write_row(row, out);
        }
        Ok((rows.len(), received))
    }

    /// The rows of one message and its receive time (ns), or why it is poison.
    pub fn rows(payload: &[u8], limits: &Limits) -> Result<(Vec<EventsRow>, i64), String> {
        let batch = chute_common::payload::decode(payload).map_err(|err| err.to_string())?;
        let received = batch.received_unix_nanos;
        for (index, event) in batch.events.iter().enumerate() {
            check(event, received, limits).map_err(|rejection| format!("event {index}: {rejection}"))?;
        }
        let ingested_at = received.div_euclid(1_000_000);
        let rows = batch
            .events
            .into_iter()
            .map(|event| to_row(event, ingested_at))
            .collect();
        Ok((rows, received))
    }

    fn to_row(event: Event, ingested_at: i64) -> EventsRow {
        let time_nanos = event.time.as_ref().and_then(timestamp_to_nanos).expect("checked");
        let mut attributes: Vec<(String, String)> = event.attributes.into_iter().collect();
        attributes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut metrics: Vec<(String, f64)> = event.metrics.into_iter().collect();
        metrics.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        EventsRow {
            tenant: event.tenant,
            name: event.name,
            time: time_nanos.div_euclid(1_000_000),
            event_id: Uuid::try_parse(&event.event_id).expect("checked"),
            session_id: event.session_id,
            user_id: event.user_id,
            attributes,
            metrics,
            body: event.body,
            ingested_at,
        }
    }

    /// One row as RowBinary, fields in declaration order (what the `clickhouse` crate sends for
    /// `EventsRow`).
    pub fn write_row(row: &EventsRow, out: &mut Vec<u8>) {
        put_string(out, row.tenant.as_bytes());
        put_string(out, row.name.as_bytes());
        out.extend_from_slice(&row.time.to_le_bytes());
        put_uuid(out, row.event_id);
        put_string(out, row.session_id.as_bytes());
        put_string(out, row.user_id.as_bytes());
        put_varint(out, row.attributes.len() as u64);
        for (key, value) in &row.attributes {
            put_string(out, key.as_bytes());
            put_string(out, value.as_bytes());
        }
        put_varint(out, row.metrics.len() as u64);
        for (key, value) in &row.metrics {
            put_string(out, key.as_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
        put_string(out, row.body.as_bytes());
        out.extend_from_slice(&row.ingested_at.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::validate::timestamp_from_nanos;
    use chute_proto::v1::{Event, EventBatch};
    use prost::Message;
    use uuid::Uuid;

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
        assert_eq!(encoded.row_count, 2);
        let (rows, _) = reference::rows(&encoded.valid[0].payload, &Limits::default()).unwrap();
        assert_eq!(rows[0].time, (NOW - 5_000_000_000) / 1_000_000);
        assert_eq!(rows[0].ingested_at, NOW / 1_000_000);
        assert_eq!(rows[1].metrics, vec![("cost".to_string(), 1.5)]);
        let mut expected = Vec::new();
        rows.iter().for_each(|row| reference::write_row(row, &mut expected));
        assert_eq!(encoded.rows, expected);
        assert_eq!(encoded.valid.len(), 1);
        assert_eq!(
            (
                encoded.valid[0].rows.clone(),
                encoded.valid[0].events,
                encoded.valid[0].received_ms
            ),
            (0..expected.len(), 2, NOW / 1_000_000)
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
        assert_eq!(encoded.row_count, 1);
        assert_eq!(
            (encoded.valid[0].sequence, encoded.valid[0].rows.clone()),
            (4, 0..encoded.rows.len())
        );
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

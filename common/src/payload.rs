//! The `EventBatch` codec: how one accepted request travels through JetStream.
//!
//! A request becomes one message, or several chunks when its encoding would exceed the message
//! size limit. Chunking is deterministic (it depends only on the events and the limit), so a
//! retried request produces the same chunks and the same `Nats-Msg-Id`s.

use bytes::Bytes;
use chute_proto::v1::{Event, EventBatch};
use chute_proto::BATCH_VERSION;
use prost::Message;

use crate::{Error, Result};

/// Bytes reserved in every message for the batch header fields.
const HEADER_RESERVE: usize = 512;

/// One encoded chunk of a request, ready to publish.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub chunk_index: u32,
    pub chunk_count: u32,
    pub events: usize,
    pub payload: Bytes,
}

/// Splits `events` into chunks whose encoding stays under `max_message_bytes` (an event larger
/// than that travels alone) and encodes each as an `EventBatch`.
pub fn encode_chunks(
    events: Vec<Event>,
    received_unix_nanos: i64,
    idempotency_key: &str,
    max_message_bytes: usize,
) -> Vec<EncodedChunk> {
    let boundaries = chunk_boundaries(&events, max_message_bytes);
    let chunk_count = boundaries.len() as u32;
    let mut remaining = events.into_iter();
    boundaries
        .into_iter()
        .enumerate()
        .map(|(chunk_index, len)| {
            let batch = EventBatch {
                version: BATCH_VERSION,
                received_unix_nanos,
                idempotency_key: idempotency_key.to_owned(),
                chunk_index: chunk_index as u32,
                chunk_count,
                events: remaining.by_ref().take(len).collect(),
            };
            EncodedChunk {
                chunk_index: chunk_index as u32,
                chunk_count,
                events: len,
                payload: Bytes::from(batch.encode_to_vec()),
            }
        })
        .collect()
}

/// Number of events in each chunk, in order. Always at least one chunk (possibly empty).
pub fn chunk_boundaries(events: &[Event], max_message_bytes: usize) -> Vec<usize> {
    let budget = max_message_bytes.saturating_sub(HEADER_RESERVE).max(1);
    let mut chunks = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    for event in events {
        let len = event.encoded_len();
        let framed = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if count > 0 && bytes + framed > budget {
            chunks.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += framed;
    }
    if count > 0 || chunks.is_empty() {
        chunks.push(count);
    }
    chunks
}

/// Decodes a message payload, refusing versions this build does not know.
pub fn decode(payload: &[u8]) -> Result<EventBatch> {
    let batch = EventBatch::decode(payload).map_err(|err| Error::Payload(format!("undecodable event batch: {err}")))?;
    if batch.version != BATCH_VERSION {
        return Err(Error::Payload(format!(
            "unknown payload version {} (this build reads {BATCH_VERSION})",
            batch.version
        )));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize, body_len: usize) -> Event {
        Event {
            event_id: format!("id-{i}"),
            tenant: "acme".into(),
            name: "n".into(),
            body: "x".repeat(body_len),
            ..Default::default()
        }
    }

    #[test]
    fn small_request_is_one_message_that_round_trips() {
        let events: Vec<Event> = (0..10).map(|i| event(i, 10)).collect();
        let chunks = encode_chunks(events.clone(), 42, "key", 512 * 1024);
        assert_eq!(chunks.len(), 1);
        let batch = decode(&chunks[0].payload).unwrap();
        assert_eq!(
            (batch.version, batch.received_unix_nanos, batch.chunk_count),
            (BATCH_VERSION, 42, 1)
        );
        assert_eq!(batch.events, events);
    }

    #[test]
    fn large_request_is_split_under_the_limit_and_keeps_order() {
        let events: Vec<Event> = (0..100).map(|i| event(i, 1000)).collect();
        let chunks = encode_chunks(events.clone(), 1, "", 16 * 1024);
        assert!(chunks.len() >= 7, "got {} chunks", chunks.len());
        let mut decoded = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(
                chunk.payload.len() <= 16 * 1024,
                "chunk {i} is {} bytes",
                chunk.payload.len()
            );
            let batch = decode(&chunk.payload).unwrap();
            assert_eq!(
                (batch.chunk_index as usize, batch.chunk_count as usize),
                (i, chunks.len())
            );
            decoded.extend(batch.events);
        }
        assert_eq!(decoded, events);
    }

    #[test]
    fn an_oversized_event_travels_alone() {
        let events = vec![event(0, 10), event(1, 50_000), event(2, 10)];
        assert_eq!(chunk_boundaries(&events, 16 * 1024), vec![1, 1, 1]);
        assert_eq!(chunk_boundaries(&[], 1024), vec![0]);
    }

    #[test]
    fn garbage_and_unknown_versions_are_refused() {
        assert!(decode(b"\xff\xff\xff").unwrap_err().to_string().contains("undecodable"));
        let future = EventBatch {
            version: 99,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode(&future)
            .unwrap_err()
            .to_string()
            .contains("unknown payload version 99"));
    }
}

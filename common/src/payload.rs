//! The `EventBatch` codec: how one accepted request travels through JetStream.
//!
//! A request becomes one message, or several chunks when its encoding would exceed the message
//! size limit. Where it is cut is decided by a [`ChunkPlan`] made from the request *as the client
//! sent it*, before normalisation fills in receive times and event ids. Chunk `i` of a request
//! therefore carries the same event indices on every attempt, so when JetStream drops a retried
//! chunk as a duplicate (same `Nats-Msg-Id`), the copy it already holds has the same events.

use std::ops::Range;

use bytes::Bytes;
use chute_proto::v1::{Event, EventBatch};
use chute_proto::BATCH_VERSION;
use prost::encoding::encoded_len_varint;
use prost::Message;

use crate::{Error, Result};

/// Bytes reserved in every message for the batch header. Version, receive time, chunk position
/// and an idempotency key of up to 256 bytes (the ingestor's limit) take at most 284.
const HEADER_RESERVE: usize = 512;
/// Field number of `EventBatch.events`.
const EVENTS_FIELD: u32 = 6;

// The most normalisation (`validate::normalize`) can make an event's fields weigh. It sets three
// fields and leaves every other one as sent; keep these in step with it.
/// `event_id` afterwards is always a hyphenated UUID: 36 bytes, whatever form was sent.
const NORMALIZED_EVENT_ID_FIELD: usize = 1 + 1 + 36;
/// An empty `tenant` becomes the API key's tenant, which is valid, so at most 64 bytes.
const FILLED_TENANT_FIELD: usize = 1 + 1 + 64;
/// An unset `time` becomes the receive time: a `Timestamp` whose `seconds` is any i64 (a varint
/// of at most 10 bytes) and whose `nanos` is below 10^9 (at most 5 bytes).
const FILLED_TIME_FIELD: usize = 1 + 1 + (1 + 10) + (1 + 5);

/// One encoded chunk of a request, ready to publish.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub chunk_index: u32,
    pub chunk_count: u32,
    /// Indices, in the request as sent, that this chunk covers (rejected ones are left out).
    pub sent_events: Range<usize>,
    /// Events in the payload.
    pub events: usize,
    pub payload: Bytes,
}

/// Where a request is cut into chunks, decided from its events as the client sent them.
///
/// Each event counts at an upper bound of its size after normalisation, so the plan is the same
/// on every attempt of a request (it never sees the receive time) and a chunk filled with the
/// normalised events still fits `max_message_bytes`. An event whose bound alone exceeds the
/// budget travels alone (and its message may exceed the limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlan {
    chunks: Vec<PlannedChunk>,
    sent_event_count: usize,
    sent_events_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PlannedChunk {
    events: Range<usize>,
    /// Upper bound of the encoded `events` field of the chunk.
    max_events_bytes: usize,
}

impl ChunkPlan {
    /// Plans the chunks of `sent_events`. Measures each event once; see
    /// [`ChunkPlan::sent_events_len`] to reuse the sizes for the request limit.
    pub fn new(sent_events: &[Event], max_message_bytes: usize) -> Self {
        let budget = max_message_bytes.saturating_sub(HEADER_RESERVE).max(1);
        let mut chunks = Vec::new();
        let mut sent_events_len = 0;
        let (mut start, mut bytes) = (0, 0);
        for (index, event) in sent_events.iter().enumerate() {
            let sent_len = event.encoded_len();
            sent_events_len += framed_len(sent_len);
            let bound = framed_len(normalized_len_bound(event, sent_len));
            if index > start && bytes + bound > budget {
                chunks.push(PlannedChunk {
                    events: start..index,
                    max_events_bytes: bytes,
                });
                (start, bytes) = (index, 0);
            }
            bytes += bound;
        }
        if start < sent_events.len() {
            chunks.push(PlannedChunk {
                events: start..sent_events.len(),
                max_events_bytes: bytes,
            });
        }
        Self {
            chunks,
            sent_event_count: sent_events.len(),
            sent_events_len,
        }
    }

    /// Number of planned chunks (the `chunk_count` of every message of the request).
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The sent-event indices of each chunk, in order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.chunks.iter().map(|chunk| chunk.events.clone())
    }

    /// Encoded length of the sent events as the `events` field of a `PublishRequest`.
    pub fn sent_events_len(&self) -> usize {
        self.sent_events_len
    }

    /// Encodes the normalised events into the planned chunks, straight from `events` (no copy
    /// per chunk). `events[i]` is the sent event `i` after normalisation, and `accepted[i]` says
    /// whether it passed; rejected ones are skipped. A chunk whose events were all rejected is
    /// left out; the others keep their planned index and count, so every index names the same
    /// sent events on every attempt.
    pub fn encode(
        &self,
        events: &[Event],
        accepted: &[bool],
        received_unix_nanos: i64,
        idempotency_key: &str,
    ) -> Vec<EncodedChunk> {
        assert!(
            events.len() == self.sent_event_count && accepted.len() == self.sent_event_count,
            "the plan was made for another request"
        );
        let chunk_count = self.chunks.len() as u32;
        let mut encoded = Vec::with_capacity(self.chunks.len());
        for (chunk_index, planned) in self.chunks.iter().enumerate() {
            let range = planned.events.clone();
            let event_count = accepted[range.clone()].iter().filter(|&&passed| passed).count();
            if event_count == 0 {
                continue;
            }
            let header = BatchHeader {
                received_unix_nanos,
                idempotency_key,
                chunk_index: chunk_index as u32,
                chunk_count,
            };
            let header_len = header.encoded_len();
            debug_assert!(
                header_len <= HEADER_RESERVE,
                "idempotency key too long for the header reserve"
            );
            // The header and the events are written one after the other: the same bytes prost
            // writes for the whole batch (events is the last field), into a buffer sized from
            // the plan's bound.
            let mut payload = Vec::with_capacity(header_len + planned.max_events_bytes);
            header.encode(&mut payload);
            for (event, _) in events[range.clone()]
                .iter()
                .zip(&accepted[range])
                .filter(|(_, &passed)| passed)
            {
                encode_event_field(event, &mut payload);
            }
            debug_assert!(
                payload.len() <= header_len + planned.max_events_bytes,
                "normalisation grew an event past its bound"
            );
            encoded.push(EncodedChunk {
                chunk_index: chunk_index as u32,
                chunk_count,
                sent_events: planned.events.clone(),
                events: event_count,
                payload: Bytes::from(payload),
            });
        }
        encoded
    }
}

/// Width of the length prefix an event is written after: lengths 128..=16383, most events.
const GUESSED_PREFIX_LEN: usize = 2;

/// Appends `event` as an `events` field, the bytes `prost::encoding::message::encode` writes,
/// without measuring the event first (`encoded_len` walks every field and map entry): its body
/// is written after room for a length prefix of the usual width, then the prefix is filled in.
/// The body moves only when its length needs a prefix of another width.
fn encode_event_field(event: &Event, payload: &mut Vec<u8>) {
    use prost::encoding::{encode_key, encode_varint, WireType};
    encode_key(EVENTS_FIELD, WireType::LengthDelimited, payload);
    let prefix_start = payload.len();
    let guessed_body_start = prefix_start + GUESSED_PREFIX_LEN;
    payload.resize(guessed_body_start, 0);
    event.encode_raw(payload);
    let body_len = payload.len() - guessed_body_start;
    let prefix_len = encoded_len_varint(body_len as u64);
    let body_start = prefix_start + prefix_len;
    if prefix_len > GUESSED_PREFIX_LEN {
        payload.resize(body_start + body_len, 0);
    }
    if prefix_len != GUESSED_PREFIX_LEN {
        payload.copy_within(guessed_body_start..guessed_body_start + body_len, body_start);
        payload.truncate(body_start + body_len);
    }
    encode_varint(body_len as u64, &mut &mut payload[prefix_start..body_start]);
}

/// The fields of an `EventBatch` before `events`, written as prost writes them (in field order,
/// proto3 defaults omitted) without building an `EventBatch` and its owned key for every chunk.
struct BatchHeader<'a> {
    received_unix_nanos: i64,
    idempotency_key: &'a str,
    chunk_index: u32,
    chunk_count: u32,
}

impl BatchHeader<'_> {
    fn encoded_len(&self) -> usize {
        use prost::encoding::{int64, uint32};
        // BATCH_VERSION is never 0, so prost always writes it.
        let mut len = uint32::encoded_len(1, &BATCH_VERSION);
        if self.received_unix_nanos != 0 {
            len += int64::encoded_len(2, &self.received_unix_nanos);
        }
        if !self.idempotency_key.is_empty() {
            len += framed_len(self.idempotency_key.len());
        }
        if self.chunk_index != 0 {
            len += uint32::encoded_len(4, &self.chunk_index);
        }
        if self.chunk_count != 0 {
            len += uint32::encoded_len(5, &self.chunk_count);
        }
        len
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint, int64, uint32, WireType};
        uint32::encode(1, &BATCH_VERSION, buf);
        if self.received_unix_nanos != 0 {
            int64::encode(2, &self.received_unix_nanos, buf);
        }
        if !self.idempotency_key.is_empty() {
            encode_key(3, WireType::LengthDelimited, buf);
            encode_varint(self.idempotency_key.len() as u64, buf);
            buf.extend_from_slice(self.idempotency_key.as_bytes());
        }
        if self.chunk_index != 0 {
            uint32::encode(4, &self.chunk_index, buf);
        }
        if self.chunk_count != 0 {
            uint32::encode(5, &self.chunk_count, buf);
        }
    }
}

/// Plans and encodes events that are already normalised (tools and benchmarks). The ingestor
/// plans from the request as sent instead, before normalising: see [`ChunkPlan`].
pub fn encode_chunks(
    events: Vec<Event>,
    received_unix_nanos: i64,
    idempotency_key: &str,
    max_message_bytes: usize,
) -> Vec<EncodedChunk> {
    let plan = ChunkPlan::new(&events, max_message_bytes);
    plan.encode(&events, &vec![true; events.len()], received_unix_nanos, idempotency_key)
}

/// An upper bound of `sent`'s encoded length once normalised, from the event as sent and its
/// encoded length. Independent of the receive time by construction.
fn normalized_len_bound(sent: &Event, sent_len: usize) -> usize {
    let mut bound = sent_len - string_field_len(&sent.event_id) + NORMALIZED_EVENT_ID_FIELD;
    if sent.tenant.is_empty() {
        bound += FILLED_TENANT_FIELD;
    }
    if sent.time.is_none() {
        bound += FILLED_TIME_FIELD;
    }
    bound
}

/// Encoded length of a proto3 string field numbered 1..=15 (absent when empty).
fn string_field_len(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        framed_len(value.len())
    }
}

/// Encoded length of a length-delimited field numbered 1..=15 whose content is `len` bytes.
fn framed_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
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
    fn the_payload_is_what_prost_writes_for_the_whole_batch() {
        let events: Vec<Event> = (0..5).map(|i| event(i, 100)).collect();
        let chunks = encode_chunks(events.clone(), 7, "key", 512 * 1024);
        let whole = EventBatch {
            version: BATCH_VERSION,
            received_unix_nanos: 7,
            idempotency_key: "key".into(),
            chunk_index: 0,
            chunk_count: 1,
            events,
        };
        assert_eq!(chunks[0].payload, whole.encode_to_vec());
    }

    #[test]
    fn every_chunk_is_what_prost_writes_for_its_batch() {
        // Events whose length prefix takes 1, 2 and 3 bytes.
        let body_len = |i: usize| [10, 300 + i * 37, 20_000][i % 3];
        let events: Vec<Event> = (0..40).map(|i| event(i, body_len(i))).collect();
        let accepted: Vec<bool> = (0..events.len()).map(|i| i % 4 != 1).collect();
        let plan = ChunkPlan::new(&events, 4 * 1024);
        let ranges: Vec<Range<usize>> = plan.ranges().collect();
        assert!(ranges.len() > 3);
        // Zero and negative receive times, empty and 256-byte keys: the header's default-valued
        // fields are omitted, the others written in field order.
        for received in [0, -1, i64::MAX] {
            for key in ["", "k", &"k".repeat(256)] {
                let chunks = plan.encode(&events, &accepted, received, key);
                assert!(chunks.len() > 3);
                for chunk in &chunks {
                    let range = ranges[chunk.chunk_index as usize].clone();
                    let batch = EventBatch {
                        version: BATCH_VERSION,
                        received_unix_nanos: received,
                        idempotency_key: key.to_owned(),
                        chunk_index: chunk.chunk_index,
                        chunk_count: chunk.chunk_count,
                        events: range.filter(|&i| accepted[i]).map(|i| events[i].clone()).collect(),
                    };
                    assert_eq!(chunk.events, batch.events.len());
                    assert_eq!(chunk.payload, batch.encode_to_vec());
                }
            }
        }
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
        let ranges: Vec<_> = ChunkPlan::new(&events, 16 * 1024).ranges().collect();
        assert_eq!(ranges, vec![0..1, 1..2, 2..3]);
        assert!(ChunkPlan::new(&[], 1024).is_empty());
    }

    #[test]
    fn rejected_events_keep_their_place_and_an_all_rejected_chunk_is_left_out() {
        let events: Vec<Event> = (0..30).map(|i| event(i, 1000)).collect();
        let plan = ChunkPlan::new(&events, 8 * 1024);
        let ranges: Vec<_> = plan.ranges().collect();
        assert!(ranges.len() >= 3, "{ranges:?}");
        let second = ranges[1].clone();
        let accepted: Vec<bool> = (0..events.len()).map(|i| !second.contains(&i) && i != 0).collect();
        let chunks = plan.encode(&events, &accepted, 1, "key");
        let indices: Vec<u32> = chunks.iter().map(|chunk| chunk.chunk_index).collect();
        let expected: Vec<u32> = (0..ranges.len() as u32).filter(|&i| i != 1).collect();
        assert_eq!(indices, expected, "chunk 1 had only rejected events");
        assert_eq!(chunks[0].events, ranges[0].len() - 1);
        assert!(chunks.iter().all(|chunk| chunk.chunk_count as usize == ranges.len()));
    }

    #[test]
    fn the_filled_field_bounds_are_the_largest_encodings() {
        let uuid = uuid::Uuid::from_u128(u128::MAX).hyphenated().to_string();
        let id_only = Event {
            event_id: uuid,
            ..Default::default()
        };
        assert_eq!(id_only.encoded_len(), NORMALIZED_EVENT_ID_FIELD);
        let tenant_only = Event {
            tenant: "t".repeat(64),
            ..Default::default()
        };
        assert_eq!(tenant_only.encoded_len(), FILLED_TENANT_FIELD);
        let time_only = Event {
            time: Some(prost_types::Timestamp {
                seconds: i64::MIN,
                nanos: 999_999_999,
            }),
            ..Default::default()
        };
        assert_eq!(time_only.encoded_len(), FILLED_TIME_FIELD);
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

    /// Property: however the receive time changes between two attempts of a request, each chunk
    /// index covers the same sent events, holds exactly the accepted ones among them, and fits
    /// the message limit.
    mod retries {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;
        use crate::validate::{normalize, timestamp_from_nanos, Limits, RequestContext};

        /// 2026-05-28T20:26:40Z; receive times are drawn around it.
        const EPOCH_SECONDS: i64 = 1_780_000_000;
        /// The largest sent event is ~8 KiB, so every event fits this budget alone.
        const MIN_MESSAGE_BYTES: usize = 9 * 1024;

        #[derive(Debug, Clone)]
        struct SentEvent {
            id_form: Option<u8>,
            tenant_set: bool,
            /// Offset of `time` from the first receive time, in ms, when set.
            time_offset_ms: Option<i64>,
            invalid: bool,
            body_len: usize,
            /// (key number, value length).
            attributes: Vec<(u8, usize)>,
            metrics: Vec<(u8, f64)>,
        }

        fn sent_event() -> impl Strategy<Value = SentEvent> {
            (
                prop::option::of(0..4u8),
                any::<bool>(),
                prop::option::of(-60_000..60_000i64),
                prop::bool::weighted(0.05),
                prop_oneof![0..64usize, 0..4096usize],
                prop::collection::vec((any::<u8>(), 0..300usize), 0..6),
                prop::collection::vec((any::<u8>(), -1e9..1e9f64), 0..6),
            )
                .prop_map(
                    |(id_form, tenant_set, time_offset_ms, invalid, body_len, attributes, metrics)| SentEvent {
                        id_form,
                        tenant_set,
                        time_offset_ms,
                        invalid,
                        body_len,
                        attributes,
                        metrics,
                    },
                )
        }

        /// Nanos of the second with varints of every length, zero (omitted) included.
        fn nanos_of_second() -> impl Strategy<Value = i64> {
            prop_oneof![
                Just(0),
                Just(1),
                Just(127),
                Just(16_384),
                Just(999_999_999),
                0..1_000_000_000i64
            ]
        }

        fn to_event(index: usize, sent: &SentEvent, key_tenant: &str, first_received: i64) -> Event {
            let id = uuid::Uuid::from_u128(0x5eed_0000_0000_0000 + index as u128);
            let event_id = match sent.id_form {
                None => String::new(),
                Some(0) => id.hyphenated().to_string(),
                Some(1) => id.simple().to_string(),
                Some(2) => id.braced().to_string().to_uppercase(),
                Some(_) => id.urn().to_string(),
            };
            Event {
                event_id,
                tenant: if sent.tenant_set {
                    key_tenant.to_owned()
                } else {
                    String::new()
                },
                name: if sent.invalid {
                    "not valid".into()
                } else {
                    "llm.request".into()
                },
                time: sent
                    .time_offset_ms
                    .map(|offset| timestamp_from_nanos(first_received + offset * 1_000_000)),
                session_id: format!("conv-{}", index % 7),
                attributes: sent
                    .attributes
                    .iter()
                    .map(|&(key, len)| (format!("attribute_{key}"), "v".repeat(len)))
                    .collect(),
                metrics: sent
                    .metrics
                    .iter()
                    .map(|&(key, value)| (format!("metric_{key}"), value))
                    .collect(),
                body: "b".repeat(sent.body_len),
                ..Default::default()
            }
        }

        /// What the ingestor does with a request received at `received`: plan from the sent
        /// events, normalise, encode. Returns the chunks and, for each accepted event, its id.
        fn attempt(
            sent: &[Event],
            received: i64,
            key: &str,
            key_tenant: &str,
            max_message_bytes: usize,
        ) -> (Vec<EncodedChunk>, Vec<Option<String>>) {
            let plan = ChunkPlan::new(sent, max_message_bytes);
            let ctx = RequestContext {
                received_unix_nanos: received,
                key_tenant: Some(key_tenant),
                idempotency_key: key,
            };
            let mut normalized = sent.to_vec();
            let accepted: Vec<bool> = normalized
                .iter_mut()
                .enumerate()
                .map(|(index, event)| normalize(event, index, &ctx, &Limits::default()).is_ok())
                .collect();
            let ids = normalized
                .iter()
                .zip(&accepted)
                .map(|(event, &passed)| passed.then(|| event.event_id.clone()))
                .collect();
            (plan.encode(&normalized, &accepted, received, key), ids)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_retry_cuts_the_request_at_the_same_events(
                events in prop::collection::vec(sent_event(), 0..120),
                first_second in 0..86_400i64,
                later_by_seconds in 0..30i64,
                nanos in (nanos_of_second(), nanos_of_second()),
                keyed in any::<bool>(),
                // Long tenants add the most bytes where normalisation fills one in.
                key_tenant_len in prop_oneof![Just(64usize), 1..64usize],
                max_message_bytes in MIN_MESSAGE_BYTES..64 * 1024,
            ) {
                let first = (EPOCH_SECONDS + first_second) * 1_000_000_000 + nanos.0;
                let second = (EPOCH_SECONDS + first_second + later_by_seconds) * 1_000_000_000 + nanos.1;
                let key = if keyed { "retry-key" } else { "" };
                let key_tenant = "t".repeat(key_tenant_len);
                let sent: Vec<Event> = events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| to_event(i, e, &key_tenant, first))
                    .collect();

                let mut maps = Vec::new();
                for received in [first, second] {
                    let (chunks, ids) = attempt(&sent, received, key, &key_tenant, max_message_bytes);
                    let index_by_id: HashMap<&str, usize> = ids
                        .iter()
                        .enumerate()
                        .filter_map(|(index, id)| Some((id.as_deref()?, index)))
                        .collect();
                    let mut seen = Vec::new();
                    for chunk in &chunks {
                        prop_assert!(
                            chunk.payload.len() <= max_message_bytes,
                            "chunk {} is {} bytes, limit {}", chunk.chunk_index, chunk.payload.len(), max_message_bytes
                        );
                        let batch = decode(&chunk.payload).unwrap();
                        prop_assert_eq!(
                            (batch.chunk_index, batch.chunk_count, batch.received_unix_nanos),
                            (chunk.chunk_index, chunk.chunk_count, received)
                        );
                        for event in &batch.events {
                            let index = index_by_id[event.event_id.as_str()];
                            prop_assert!(chunk.sent_events.contains(&index));
                            seen.push(index);
                        }
                    }
                    let accepted: Vec<usize> = (0..sent.len()).filter(|&i| ids[i].is_some()).collect();
                    prop_assert_eq!(seen, accepted, "every accepted event once, in order");
                    let map: Vec<(u32, Range<usize>)> = chunks
                        .iter()
                        .map(|chunk| (chunk.chunk_index, chunk.sent_events.clone()))
                        .collect();
                    maps.push(map);
                }
                prop_assert_eq!(&maps[0], &maps[1]);
            }
        }
    }
}

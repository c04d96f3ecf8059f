//! A chunked request whose first attempt stored every chunk but one, retried with the same key
//! at another receive time: JetStream drops the chunks it already holds as duplicates, so the
//! retry must cut the request at the same events for nothing to be lost or stored twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use chute_common::validate::{derive_event_id, timestamp_from_nanos, unix_nanos_now};
use chute_ingestor::hooks::Hooks;
use chute_proto::v1::{Event, PublishRequest};
use uuid::Uuid;

use crate::support::{event, TestIngestor};

const KEY: &str = "lost-chunk";
const LOST_CHUNK: u32 = 1;

/// Event `i` of the request: small, nine in ten without a `time` (filled with the receive time),
/// every tenth with a client id in a non-canonical form. With ~80 events a chunk, the 4 bytes each
/// untimed event gains on the retry add up to more than one event: cut after normalisation, the
/// retry's chunks would start at other events.
fn sent_event(i: usize) -> Event {
    Event {
        event_id: if i % 10 == 3 {
            client_id(i).simple().to_string()
        } else {
            String::new()
        },
        time: if i % 10 == 1 { event("acme", i).time } else { None },
        body: "x".repeat(i * 37 % 60),
        ..event("acme", i)
    }
}

fn client_id(i: usize) -> Uuid {
    Uuid::from_u128(0xc11e_0000_0000_0000 + i as u128)
}

fn stored_id(i: usize) -> String {
    if i % 10 == 3 {
        client_id(i).hyphenated().to_string()
    } else {
        derive_event_id("acme", KEY, i).to_string()
    }
}

#[tokio::test]
async fn a_retry_after_a_lost_chunk_stores_every_event_exactly_once() {
    // Receive times whose nanos encode as a 1-byte and a 5-byte varint: on the retry every event
    // without a `time` is 4 bytes larger once normalised. Cut after normalisation, the retry's
    // chunk 1 would hold other events than the chunks the first attempt stored around it.
    let second = unix_nanos_now() / 1_000_000_000 * 1_000_000_000;
    let (first_received, retry_received) = (second + 1, second + 1_999_999_999);
    let first_call = AtomicBool::new(true);
    let hooks = Hooks::default()
        .with_receive_clock(move || {
            if first_call.swap(false, Ordering::SeqCst) {
                first_received
            } else {
                retry_received
            }
        })
        .lose_next_publish(LOST_CHUNK);
    let ingestor = TestIngestor::start_with_hooks(|config| config.max_message_bytes = 16 * 1024, hooks).await;
    let sent: Vec<Event> = (0..400).map(sent_event).collect();
    let request = PublishRequest {
        events: sent.clone(),
        idempotency_key: KEY.into(),
    };
    let mut client = ingestor.client().await;

    let status = client.publish(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let stored_by_first = ingestor.stored_messages().await;
    assert!(
        stored_by_first.iter().all(|m| m.batch.chunk_index != LOST_CHUNK),
        "the lost chunk was not stored"
    );
    let response = client.publish(request).await.unwrap().into_inner();
    assert_eq!((response.accepted, response.rejected), (400, 0));

    let stored = ingestor.stored_messages().await;
    let chunk_count = stored[0].batch.chunk_count;
    assert!(chunk_count >= 4, "expected several chunks, got {chunk_count}");
    assert_eq!(
        stored.len(),
        stored_by_first.len() + 1,
        "the retry stored only the lost chunk"
    );
    let mut indices: Vec<u32> = stored.iter().map(|m| m.batch.chunk_index).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..chunk_count).collect::<Vec<_>>(), "every chunk once");
    for message in &stored {
        let expected = if message.batch.chunk_index == LOST_CHUNK {
            retry_received
        } else {
            first_received
        };
        assert_eq!(message.batch.received_unix_nanos, expected);
        assert_eq!(message.batch.chunk_count, chunk_count);
    }

    let mut copies: HashMap<String, Vec<(Event, i64)>> = HashMap::new();
    for message in stored {
        for event in message.batch.events {
            copies
                .entry(event.event_id.clone())
                .or_default()
                .push((event, message.batch.received_unix_nanos));
        }
    }
    for (i, sent) in sent.iter().enumerate() {
        let id = stored_id(i);
        let found = copies.remove(&id).unwrap_or_default();
        assert_eq!(found.len(), 1, "event {i} ({id}) stored {} times", found.len());
        let (got, received) = &found[0];
        let expected = Event {
            event_id: id,
            time: Some(sent.time.unwrap_or_else(|| timestamp_from_nanos(*received))),
            ..sent.clone()
        };
        assert_eq!(got, &expected, "event {i}");
    }
    assert!(copies.is_empty(), "events nobody sent: {:?}", copies.keys());
}

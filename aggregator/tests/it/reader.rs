//! Partition readers against a real nats-server: what a reader pulls ahead is bounded in bytes,
//! not only in messages, and a message as large as NATS allows still arrives.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use chute_aggregator::consumer::{self, PartitionMessage};
use chute_common::stream::events_subject;
use chute_common::testing::nats::NatsServer;

const PARTITION: u32 = 3;

/// A stream over `events.*` holding `count` messages of `bytes` each on [`PARTITION`], and a
/// handle to it on a connection of its own, so that connection's statistics count what the
/// reader received and nothing else.
async fn filled_stream(
    nats: &NatsServer,
    name: &str,
    count: usize,
    bytes: usize,
) -> (async_nats::Client, stream::Stream) {
    let publisher = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    publisher
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec!["events.*".to_owned()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    for index in 0..count {
        let payload = vec![index as u8; bytes];
        publisher
            .publish(events_subject(PARTITION), payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let client = async_nats::connect(nats.url()).await.expect("connect the reader");
    let stream = jetstream::new(client.clone())
        .get_stream(name)
        .await
        .expect("get stream");
    (client, stream)
}

/// A read buffer of `messages` messages, not bounded in bytes.
fn buffer(messages: usize) -> (consumer::ReadBufferSender, consumer::ReadBufferReceiver) {
    consumer::read_buffer(consumer::ReadBufferLimits {
        messages,
        bytes: usize::MAX,
    })
}

async fn next(receiver: &mut consumer::ReadBufferReceiver) -> PartitionMessage {
    tokio::time::timeout(Duration::from_secs(20), receiver.recv())
        .await
        .expect("a message within 20 s")
        .expect("the reader keeps running")
}

/// Issue 13 item 2: readers pulled 16 messages per partition whatever their size (async-nats's
/// ordered consumer sends its pulls without a byte limit), so 370 KB messages kept 143 MiB in
/// the connection for 16 partitions. A reader whose pipeline stops taking messages now holds
/// at most 1.5 pulls of `pull_max_bytes`, plus the two messages it already handed on.
#[tokio::test]
async fn a_stalled_reader_pulls_ahead_a_bounded_number_of_bytes() {
    const MESSAGE_BYTES: usize = 500_000;
    const MESSAGES: usize = 40;
    let nats = NatsServer::start();
    let (client, stream) = filled_stream(&nats, "pull_bytes", MESSAGES, MESSAGE_BYTES).await;
    let pull_max_bytes = consumer::pull_max_bytes(client.server_info().max_payload);
    let (sender, mut receiver) = buffer(1);
    let _reader = consumer::start_reader(stream, PARTITION, 1, 1, pull_max_bytes, sender);

    // The reader fills the channel and waits in `send` with the next message; whatever else it
    // asked for arrives meanwhile.
    let first = next(&mut receiver).await;
    assert_eq!(first.sequence, 1);
    let mut received = client.statistics().in_bytes.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = client.statistics().in_bytes.load(Ordering::Relaxed);
        if now == received {
            break;
        }
        received = now;
    }
    let bound = pull_max_bytes * 3 / 2 + 3 * MESSAGE_BYTES;
    assert!(
        received as usize <= bound,
        "the reader received {received} bytes while stalled, more than {bound} (16 messages would be {})",
        16 * MESSAGE_BYTES
    );

    // Bounded pulls keep coming: every message arrives, in order, each once.
    let mut sequences = vec![first.sequence];
    while sequences.len() < MESSAGES {
        sequences.push(next(&mut receiver).await.sequence);
    }
    assert_eq!(sequences, (1..=MESSAGES as u64).collect::<Vec<_>>());
}

/// A server that allows messages above the default pull size: a pull smaller than the next
/// message would be refused at every renewal and the partition would never move.
#[tokio::test]
async fn a_message_larger_than_the_default_pull_arrives() {
    const MESSAGE_BYTES: usize = 3 << 20;
    let nats = NatsServer::with_config("max_payload: 4MB\n", &[]);
    let (client, stream) = filled_stream(&nats, "pull_large", 2, MESSAGE_BYTES).await;
    let pull_max_bytes = consumer::pull_max_bytes(client.server_info().max_payload);
    let (sender, mut receiver) = buffer(4);
    let _reader = consumer::start_reader(stream.clone(), PARTITION, 1, 1, pull_max_bytes, sender);
    for sequence in 1..=2 {
        let message = next(&mut receiver).await;
        assert_eq!((message.sequence, message.payload.len()), (sequence, MESSAGE_BYTES));
    }
    let replayed = consumer::read_range(&stream, PARTITION, 1, 2, pull_max_bytes)
        .await
        .expect("read the range back");
    assert_eq!(replayed.len(), 2);
}

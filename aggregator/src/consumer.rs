//! Reading partitions: one ordered JetStream consumer per owned partition, starting right after
//! the partition's committed position, feeding one bounded channel (back-pressure: when the
//! pipeline stops pulling, readers stop reading).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream::Stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use chute_common::stream::events_subject;
use chute_proto::v1::EventBatch;

use crate::error::{Error, Result};

/// Messages one pull request may bring per partition. Bounds the client-side buffer (partitions
/// x this x message size) so a fast stream cannot overrun the connection (NATS "slow consumer").
const PULL_BATCH: i64 = 16;

/// One message of a partition, in stream order, decoded by its reader (off the batching loop).
#[derive(Debug, Clone)]
pub struct PartitionMessage {
    pub partition: u32,
    /// Which reader incarnation produced it (messages of a stopped reader are ignored).
    pub generation: u64,
    pub sequence: u64,
    /// Messages of this partition still in the stream after this one (consumer lag).
    pub pending: u64,
    pub payload: Bytes,
    /// The decoded payload, or why it does not decode (then the message is poison).
    pub batch: Result<EventBatch, String>,
    /// When the reader received it: the batch linger counts from here, so messages that waited
    /// in the read buffer during an insert do not wait a whole linger again.
    pub read_at: tokio::time::Instant,
}

impl PartitionMessage {
    pub fn new(partition: u32, generation: u64, sequence: u64, pending: u64, payload: Bytes) -> Self {
        let batch = chute_common::payload::decode(&payload).map_err(|err| err.to_string());
        Self {
            partition,
            generation,
            sequence,
            pending,
            payload,
            batch,
            read_at: tokio::time::Instant::now(),
        }
    }

    /// Events in the message (1 for an undecodable one): batch sizing.
    pub fn events(&self) -> usize {
        self.batch.as_ref().map_or(1, |batch| batch.events.len())
    }
}

/// A running partition reader.
pub struct Reader {
    pub generation: u64,
    task: JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts reading `events.<partition>` from stream sequence `start` (inclusive).
pub fn start_reader(
    stream: Stream,
    partition: u32,
    start: u64,
    generation: u64,
    out: mpsc::Sender<PartitionMessage>,
) -> Reader {
    let task = tokio::spawn(async move {
        loop {
            match read_partition(&stream, partition, start, generation, &out).await {
                Ok(()) => return, // the pipeline went away
                Err(err) => {
                    tracing::warn!(partition, error = %err, "partition reader failed; restarting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Reader { generation, task }
}

async fn read_partition(
    stream: &Stream,
    partition: u32,
    start: u64,
    generation: u64,
    out: &mpsc::Sender<PartitionMessage>,
) -> Result<()> {
    let mut messages = ordered_messages(stream, partition, start).await?;
    let mut next_expected = start;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|err| Error::Nats(err.to_string()))?;
        let info = message.info().map_err(|err| Error::Nats(err.to_string()))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence < next_expected {
            continue; // the ordered consumer was recreated and repeated a message
        }
        next_expected = sequence + 1;
        let item = PartitionMessage::new(partition, generation, sequence, pending, message.payload.clone());
        if out.send(item).await.is_err() {
            return Ok(());
        }
    }
    Err(Error::Nats(format!("message stream of partition {partition} ended")))
}

async fn ordered_messages(stream: &Stream, partition: u32, start: u64) -> Result<consumer::pull::Ordered> {
    let config = consumer::pull::OrderedConfig {
        filter_subject: events_subject(partition),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        },
        max_batch: PULL_BATCH,
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|err| Error::Nats(err.to_string()))?;
    consumer.messages().await.map_err(|err| Error::Nats(err.to_string()))
}

/// Reads exactly the messages of `events.<partition>` with `first <= sequence <= last` (a
/// recorded batch being replayed). Fails if the stream no longer holds them.
pub async fn read_range(stream: &Stream, partition: u32, first: u64, last: u64) -> Result<Vec<PartitionMessage>> {
    let mut messages = ordered_messages(stream, partition, first).await?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let message = match next {
            Ok(Some(message)) => message.map_err(|err| Error::Nats(err.to_string()))?,
            Ok(None) | Err(_) => {
                return Err(Error::Replay(format!(
                    "partition {partition}: range {first}-{last} ended early"
                )))
            }
        };
        let info = message.info().map_err(|err| Error::Nats(err.to_string()))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > last {
            break;
        }
        out.push(PartitionMessage::new(
            partition,
            0,
            sequence,
            pending,
            message.payload.clone(),
        ));
        if sequence == last {
            break;
        }
        if pending == 0 {
            return Err(Error::Replay(format!(
                "partition {partition}: messages up to {last} are gone from the stream"
            )));
        }
    }
    Ok(out)
}

/// The `EVENTS` stream handle.
pub async fn events_stream(js: &jetstream::Context) -> Result<Stream> {
    js.get_stream(chute_common::stream::EVENTS_STREAM)
        .await
        .map_err(|err| Error::Nats(format!("EVENTS stream: {err}")))
}

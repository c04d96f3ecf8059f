//! Reading partitions: one JetStream pull consumer per owned partition, starting right after
//! the partition's committed position, feeding one bounded channel (back-pressure: when the
//! pipeline stops pulling, readers stop reading). Every pull is bounded in messages and bytes.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use chute_common::error::NatsFailure;
use chute_common::stream::events_subject;

use crate::error::{Error, Result};
use crate::telemetry;

/// Messages one pull request may bring per partition. Bounds the client-side buffer so a fast
/// stream cannot overrun the connection (NATS "slow consumer").
const PULL_BATCH: usize = 16;

/// Bytes one pull request may bring per partition (raised to one message when NATS allows larger
/// ones, see [`pull_max_bytes`]). The reader asks for more once it has taken half of what it asked
/// for, so at most 1.5 x this is on its way to or waiting in the client per partition: 48 MiB for
/// 16 partitions, whatever the message sizes. The bound must travel in every pull request: a
/// consumer's own `max_bytes` only caps what a request may ask for, and async-nats's ordered
/// consumer (used before) asks without a byte limit: 16-24 messages per partition whatever their
/// size, 143 MiB for 16 partitions of 370 KB messages (heaptrack, closed loop).
const PULL_MAX_BYTES: usize = 2 << 20;

/// What the server counts for a message beyond its payload and headers (which NATS's
/// `max_payload` bounds): its subject.
const PULL_MESSAGE_OVERHEAD: usize = 64 << 10;

/// How long one pull request waits on an idle partition before the reader renews it, and how
/// often the server says it is alive meanwhile (a reader that hears nothing for two of these
/// reopens its partition).
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);

/// The server deletes a reader's consumer this long after the reader stopped pulling.
const CONSUMER_INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);

/// Bytes one pull request asks for: `PULL_MAX_BYTES`, or one message of the largest size NATS
/// accepts (`max_payload`, from the server) when that is more. A request smaller than the next
/// message would never bring it: the server refuses such a request every time it is renewed.
pub fn pull_max_bytes(max_payload: usize) -> usize {
    PULL_MAX_BYTES.max(max_payload.saturating_add(PULL_MESSAGE_OVERHEAD))
}

/// One message of a partition, in stream order. Nothing is decoded here: the commit path
/// transcodes the payload once, straight to RowBinary (`transcode.rs`).
#[derive(Debug, Clone)]
pub struct PartitionMessage {
    pub partition: u32,
    /// Which reader incarnation produced it (messages of a stopped reader are ignored).
    pub generation: u64,
    pub sequence: u64,
    /// Messages of this partition still in the stream after this one (consumer lag).
    pub pending: u64,
    pub payload: Bytes,
    /// Events in the payload (1 when it is not well-formed: it will be dead-lettered).
    pub events: usize,
    /// When the reader received it: the batch linger counts from here, so messages that waited
    /// in the read buffer during an insert do not wait a whole linger again.
    pub read_at: tokio::time::Instant,
    /// Set on a message `aggregator dlq replay` re-published (header [`REPLAY_ID_HEADER`]): the
    /// commit path inserts one copy per id, however often the replay ran.
    pub replay_id: Option<String>,
}

/// Header `dlq replay` puts on a re-published message: which dead-lettered entry it is.
pub const REPLAY_ID_HEADER: &str = "Chute-Replay-Id";

impl PartitionMessage {
    pub fn new(partition: u32, generation: u64, sequence: u64, pending: u64, payload: Bytes) -> Self {
        let events = crate::transcode::count_events(&payload).unwrap_or(1);
        Self {
            partition,
            generation,
            sequence,
            pending,
            payload,
            events,
            read_at: tokio::time::Instant::now(),
            replay_id: None,
        }
    }

    pub fn with_replay_id(mut self, replay_id: Option<String>) -> Self {
        self.replay_id = replay_id;
        self
    }

    /// Events in the message (1 for an undecodable one): batch sizing.
    pub fn events(&self) -> usize {
        self.events
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

/// How long a failed reader waits before it reopens its partition.
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// Starts reading `events.<partition>` from stream sequence `start` (inclusive), pulling at most
/// `pull_max_bytes` per request ([`pull_max_bytes`]).
pub fn start_reader(
    stream: Stream,
    partition: u32,
    start: u64,
    generation: u64,
    pull_max_bytes: usize,
    out: ReadBufferSender,
) -> Reader {
    let source = PartitionSource {
        open: {
            let stream = stream.clone();
            move |from: u64| {
                let stream = stream.clone();
                async move {
                    let opening = partition_messages(&stream, partition, from, pull_max_bytes);
                    let opened = tokio::time::timeout(OPEN_TIMEOUT, opening)
                        .await
                        .map_err(|_| Error::nats(format!("consumer on partition {partition}"), "timed out"))??;
                    Ok(delivered(opened, partition))
                }
            }
        },
        newest: move || {
            let stream = stream.clone();
            async move { newest_sequence(&stream, partition).await }
        },
        idle_check: IDLE_CHECK,
    };
    let task = tokio::spawn(read_partition(source, partition, start, generation, out));
    Reader { generation, task }
}

/// How long opening a partition's consumer may take before the reader tries again.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a reader waits for its next message before it asks the stream whether there is one.
/// When there was one then and still nothing arrived one period later, the consumer is stuck and
/// the reader reopens it. The pull's heartbeat notices a dead consumer only after two missed 15 s
/// heartbeats; after a JetStream cluster lost its quorum and got it back, some partitions'
/// (ordered) consumers never delivered again (issue 15).
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Where a reader gets a partition's messages: `open(from)` yields them from stream sequence
/// `from` on (a JetStream pull consumer in production); `newest()` is the sequence of the
/// partition's newest message in the stream (0: none), the check on a consumer gone quiet.
struct PartitionSource<Open, Newest> {
    open: Open,
    newest: Newest,
    idle_check: Duration,
}

/// How much the buffer between the partition readers and the batcher holds
/// (`--read-buffer-messages`, `--read-buffer-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBufferLimits {
    pub messages: usize,
    /// Payload bytes. A message larger than this still passes, alone.
    pub bytes: usize,
}

/// The buffer between the partition readers and the batcher, bounded in messages and in payload
/// bytes: each message holds its bytes' worth of a semaphore until the pipeline takes it out.
pub fn read_buffer(limits: ReadBufferLimits) -> (ReadBufferSender, ReadBufferReceiver) {
    let (sender, receiver) = mpsc::channel(limits.messages.max(1));
    // Semaphore permits are counted in u32 per acquisition and usize in all.
    let bytes = limits.bytes.clamp(1, u32::MAX as usize);
    let sender = ReadBufferSender {
        sender,
        bytes: Arc::new(Semaphore::new(bytes)),
        capacity: bytes,
    };
    (sender, ReadBufferReceiver { receiver })
}

/// A message in the read buffer with the bytes it holds.
struct Buffered {
    message: PartitionMessage,
    _bytes: OwnedSemaphorePermit,
}

/// The readers' end of [`read_buffer`].
#[derive(Clone)]
pub struct ReadBufferSender {
    sender: mpsc::Sender<Buffered>,
    bytes: Arc<Semaphore>,
    capacity: usize,
}

impl ReadBufferSender {
    /// Waits until the buffer has room for `message`'s payload, then queues it. `Err` when the
    /// pipeline went away.
    pub async fn send(&self, message: PartitionMessage) -> std::result::Result<(), PartitionMessage> {
        let wanted = message.payload.len().clamp(1, self.capacity) as u32;
        let Ok(bytes) = Arc::clone(&self.bytes).acquire_many_owned(wanted).await else {
            return Err(message);
        };
        self.sender
            .send(Buffered { message, _bytes: bytes })
            .await
            .map_err(|returned| returned.0.message)
    }
}

/// The pipeline's end of [`read_buffer`].
pub struct ReadBufferReceiver {
    receiver: mpsc::Receiver<Buffered>,
}

impl ReadBufferReceiver {
    /// The next message; its bytes leave the buffer's budget. `None` when every reader is gone.
    pub async fn recv(&mut self) -> Option<PartitionMessage> {
        self.receiver.recv().await.map(|buffered| buffered.message)
    }
}

/// One message as a partition's source delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub sequence: u64,
    /// Messages of the partition still in the stream after this one.
    pub pending: u64,
    pub payload: Bytes,
    pub replay_id: Option<String>,
}

impl Delivered {
    fn into_message(self, partition: u32, generation: u64) -> PartitionMessage {
        PartitionMessage::new(partition, generation, self.sequence, self.pending, self.payload)
            .with_replay_id(self.replay_id)
    }
}

/// The reader loop. When the messages fail or go quiet while the stream holds more, the loop
/// reopens them right after the last message it delivered, never from `start` again: the
/// messages before are already in the batcher, in a recorded batch or committed, and the batcher
/// would otherwise see them twice. Returns when the pipeline stops receiving.
async fn read_partition<Open, Opening, Messages, Newest, Asking>(
    mut source: PartitionSource<Open, Newest>,
    partition: u32,
    start: u64,
    generation: u64,
    out: ReadBufferSender,
) where
    Open: FnMut(u64) -> Opening,
    Opening: Future<Output = Result<Messages>>,
    Messages: futures::Stream<Item = Result<Delivered>>,
    Newest: FnMut() -> Asking,
    Asking: Future<Output = Result<u64>>,
{
    let mut next_expected = start;
    loop {
        let failure = match (source.open)(next_expected).await {
            Ok(messages) => {
                let reading = Reading {
                    partition,
                    generation,
                    idle_check: source.idle_check,
                };
                match reading
                    .forward(messages, &mut source.newest, &mut next_expected, &out)
                    .await
                {
                    Ok(()) => return, // the pipeline went away
                    Err(err) => err,
                }
            }
            Err(err) => err,
        };
        tracing::warn!(partition, next_expected, error = %failure, "partition reader failed; resuming");
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

/// One opened source of a partition's messages being forwarded.
struct Reading {
    partition: u32,
    generation: u64,
    idle_check: Duration,
}

impl Reading {
    /// Sends every message at or after `next_expected` on, advancing it past each one sent. Ends
    /// with `Ok` when the pipeline stops receiving; with an error when the messages fail or end,
    /// or when they stay quiet for a whole `idle_check` after `newest` said one was there.
    async fn forward<Newest, Asking>(
        &self,
        messages: impl futures::Stream<Item = Result<Delivered>>,
        newest: &mut Newest,
        next_expected: &mut u64,
        out: &ReadBufferSender,
    ) -> Result<()>
    where
        Newest: FnMut() -> Asking,
        Asking: Future<Output = Result<u64>>,
    {
        let partition = self.partition;
        let mut messages = std::pin::pin!(messages);
        // A message at or after `next_expected` the stream held one idle period ago.
        let mut overdue: Option<u64> = None;
        loop {
            let message = match tokio::time::timeout(self.idle_check, messages.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_quiet) => {
                    if let Some(sequence) = overdue {
                        telemetry::reader_stuck(partition);
                        return Err(Error::nats(
                            format!("reading partition {partition}"),
                            format!(
                                "the consumer delivered nothing for {:?} while the stream holds message {sequence}",
                                self.idle_check
                            ),
                        ));
                    }
                    match newest().await {
                        Ok(sequence) if sequence >= *next_expected => overdue = Some(sequence),
                        Ok(_) => {}
                        // The cluster cannot say (no quorum, say): keep waiting on the consumer.
                        Err(err) => tracing::debug!(partition, error = %err, "newest message unknown"),
                    }
                    continue;
                }
            };
            overdue = None;
            let delivered = message?;
            if delivered.sequence < *next_expected {
                continue; // a reopened source repeated a message
            }
            let sequence = delivered.sequence;
            let item = delivered.into_message(partition, self.generation);
            if out.send(item).await.is_err() {
                return Ok(());
            }
            *next_expected = sequence + 1;
        }
        Err(Error::nats(
            format!("reading partition {partition}"),
            "message stream ended",
        ))
    }
}

/// A partition consumer's messages as [`Delivered`] items, failing at the first message lost in
/// transit.
fn delivered(messages: consumer::pull::Stream, partition: u32) -> impl futures::Stream<Item = Result<Delivered>> {
    let mut last_delivery = 0;
    messages.map(move |message| {
        let message = message.map_err(|err| Error::nats(format!("reading partition {partition}"), err))?;
        let info = message.info().map_err(|err| Error::nats("message info", err))?;
        check_delivery(partition, last_delivery, info.consumer_sequence)?;
        last_delivery = info.consumer_sequence;
        let replay_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(REPLAY_ID_HEADER))
            .map(|value| value.as_str().to_owned());
        Ok(Delivered {
            sequence: info.stream_sequence,
            pending: info.pending,
            // An owned copy: `message.payload` is a view into the connection's read buffer, and
            // a view kept until its batch commits keeps that whole buffer chunk alive, with every
            // other message read into it. See `detached_payload`.
            payload: detached_payload(&message.payload),
            replay_id,
        })
    })
}

/// A consumer numbers its deliveries 1, 2, 3, ...; a number skipped is a message the server sent
/// and the client dropped (a slow consumer), which the batcher must never step over: its range
/// would be recorded without it. The reader fails and reopens after the last message it
/// delivered (what an ordered consumer does by recreating itself).
fn check_delivery(partition: u32, last_delivery: u64, delivery: u64) -> Result<()> {
    if delivery == last_delivery + 1 {
        return Ok(());
    }
    Err(Error::nats(
        format!("reading partition {partition}"),
        format!("delivery {delivery} after {last_delivery}: a message was lost on the way"),
    ))
}

/// `payload` in an allocation of its own. async-nats reads the socket into one growing buffer
/// and hands out each message as a view into it, so one retained message pins its whole chunk:
/// under a closed-loop load (100 KB messages) those chunks were 290 MiB of a 322 MiB heap peak
/// (heaptrack) while the batches held at most 64 MiB. Copying costs one memcpy per message
/// (about 0.01 us per event) and makes the batch bound the memory bound.
fn detached_payload(payload: &Bytes) -> Bytes {
    Bytes::copy_from_slice(payload)
}

/// A pull consumer of `events.<partition>` from stream sequence `start` on, and its messages,
/// pulled [`PULL_BATCH`] messages and `pull_max_bytes` at a time. Ephemeral, unacknowledged, in
/// memory: the ledger, not the consumer, holds the partition's position.
async fn partition_messages(
    stream: &Stream,
    partition: u32,
    start: u64,
    pull_max_bytes: usize,
) -> Result<consumer::pull::Stream> {
    let config = consumer::pull::Config {
        filter_subject: events_subject(partition),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        },
        ack_policy: consumer::AckPolicy::None,
        max_deliver: 1,
        inactive_threshold: CONSUMER_INACTIVE_THRESHOLD,
        num_replicas: 1,
        memory_storage: true,
        max_batch: PULL_BATCH as i64,
        max_bytes: pull_max_bytes as i64,
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|err| Error::nats(format!("consumer on partition {partition}"), err))?;
    consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .max_bytes_per_batch(pull_max_bytes)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|err| Error::nats(format!("messages of partition {partition}"), err))
}

/// Reads exactly the messages of `events.<partition>` with `first <= sequence <= last` (a
/// recorded batch being replayed), each once. Messages of the range that left the stream (a
/// purge by hand, `max_age`) are left out; the caller compares with the recorded counts. Fails
/// only when reading fails.
pub async fn read_range(
    stream: &Stream,
    partition: u32,
    first: u64,
    last: u64,
    pull_max_bytes: usize,
) -> Result<Vec<PartitionMessage>> {
    // With nothing left on the subject at or after `first`, the consumer would wait for messages
    // that will never come, and the batch would fail at every attempt: a wedged partition.
    if newest_sequence(stream, partition).await? < first {
        return Ok(Vec::new());
    }
    let messages = delivered(
        partition_messages(stream, partition, first, pull_max_bytes).await?,
        partition,
    );
    let mut messages = std::pin::pin!(messages);
    let mut out = Vec::new();
    let mut next_expected = first;
    while next_expected <= last {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let Ok(Some(message)) = next else {
            return Err(Error::Replay {
                partition,
                reason: format!("range {first}-{last} ended early"),
            });
        };
        let delivered = message?;
        let (sequence, pending) = (delivered.sequence, delivered.pending);
        if sequence < next_expected {
            continue;
        }
        if sequence > last {
            break;
        }
        out.push(delivered.into_message(partition, 0));
        next_expected = sequence + 1;
        // The consumer says nothing follows on the subject; the stream confirms it (the rest of
        // the range is gone) or the read fails and is retried, never cut short on a wrong count.
        if sequence < last && pending == 0 {
            if newest_sequence(stream, partition).await? <= sequence {
                break;
            }
            return Err(Error::Replay {
                partition,
                reason: format!("no message after {sequence} pending, but the stream holds more"),
            });
        }
    }
    Ok(out)
}

/// The sequence of the newest message on `events.<partition>` (0: none).
async fn newest_sequence(stream: &Stream, partition: u32) -> Result<u64> {
    match stream.get_last_raw_message_by_subject(&events_subject(partition)).await {
        Ok(newest) => Ok(newest.sequence),
        Err(err) if matches!(err.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(0),
        Err(err) => Err(Error::nats(format!("newest message of partition {partition}"), err)),
    }
}

/// The `EVENTS` stream handle.
pub async fn events_stream(js: &jetstream::Context) -> Result<Stream> {
    js.get_stream(chute_common::stream::EVENTS_STREAM)
        .await
        .map_err(|err| Error::nats("EVENTS stream", err))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::stream;

    use super::*;

    #[test]
    fn a_kept_payload_does_not_share_the_connection_buffer() {
        let read_buffer = Bytes::from(vec![7u8; 4096]);
        let view = read_buffer.slice(100..200);
        let kept = detached_payload(&view);
        assert_eq!(kept, view);
        let (start, end) = (read_buffer.as_ptr() as usize, read_buffer.as_ptr() as usize + 4096);
        assert!(!(start..end).contains(&(kept.as_ptr() as usize)), "a copy, not a view");
    }

    fn sized(sequence: u64, bytes: usize) -> PartitionMessage {
        PartitionMessage::new(0, 1, sequence, 0, Bytes::from(vec![0u8; bytes]))
    }

    /// The read buffer holds at most its bytes (a larger message passes alone) and its messages.
    #[tokio::test(start_paused = true)]
    async fn the_read_buffer_is_bounded_in_bytes_and_messages() {
        let (sender, mut receiver) = read_buffer(ReadBufferLimits {
            messages: 8,
            bytes: 1000,
        });
        let accepted_within = |message| {
            let sender = sender.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(1), sender.send(message))
                    .await
                    .is_ok()
            }
        };
        assert!(accepted_within(sized(1, 600)).await);
        assert!(!accepted_within(sized(2, 600)).await, "1,200 bytes would be buffered");
        assert!(accepted_within(sized(2, 400)).await);
        assert_eq!(receiver.recv().await.map(|m| m.sequence), Some(1));
        assert!(!accepted_within(sized(3, 5000)).await, "waits for the whole budget");
        assert_eq!(receiver.recv().await.map(|m| m.sequence), Some(2));
        assert!(
            accepted_within(sized(3, 5000)).await,
            "too large for the budget: passes, alone"
        );
        assert!(
            !accepted_within(sized(4, 1)).await,
            "the large one holds the whole budget"
        );
        assert_eq!(receiver.recv().await.map(|m| m.sequence), Some(3));
        for sequence in 4..12 {
            assert!(accepted_within(sized(sequence, 1)).await);
        }
        assert!(!accepted_within(sized(12, 1)).await, "8 messages at most");
        drop(receiver);
        assert!(sender.send(sized(13, 1)).await.is_err(), "the pipeline went away");
    }

    #[test]
    fn a_pull_brings_at_least_one_message_of_the_largest_size() {
        assert_eq!(
            pull_max_bytes(1 << 20),
            PULL_MAX_BYTES,
            "NATS's default max_payload fits the default"
        );
        let max_payload = 8 << 20;
        assert!(pull_max_bytes(max_payload) >= max_payload + PULL_MESSAGE_OVERHEAD);
    }

    #[test]
    fn a_skipped_delivery_fails_the_reader() {
        assert!(check_delivery(7, 0, 1).is_ok());
        assert!(check_delivery(7, 41, 42).is_ok());
        assert!(check_delivery(7, 41, 43).is_err(), "delivery 42 was lost");
        assert!(check_delivery(7, 0, 2).is_err(), "the first delivery was lost");
    }

    fn delivered_message(sequence: u64) -> Result<Delivered> {
        Ok(Delivered {
            sequence,
            pending: 0,
            payload: Bytes::from(sequence.to_string()),
            replay_id: None,
        })
    }

    fn broken() -> Result<Delivered> {
        Err(Error::nats("test", "connection lost"))
    }

    /// Runs the reader over a scripted source (`script(open number, from)` gives what that open
    /// delivers, after which the source waits like an idle stream; the stream's newest message
    /// is `newest`), collects `count` messages and returns their sequences and the `from` of
    /// every open.
    async fn read_scripted(
        count: usize,
        newest: Result<u64>,
        script: impl Fn(usize, u64) -> Result<Vec<Result<Delivered>>> + Send + 'static,
    ) -> (Vec<u64>, Vec<u64>) {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let open = {
            let opens = Arc::clone(&opens);
            move |from: u64| {
                let attempt = {
                    let mut opens = opens.lock().unwrap();
                    opens.push(from);
                    opens.len()
                };
                let scripted = script(attempt, from).map(|messages| stream::iter(messages).chain(stream::pending()));
                async move { scripted }
            }
        };
        let newest = move || {
            let newest = match &newest {
                Ok(sequence) => Ok(*sequence),
                Err(_) => Err(Error::nats("test", "no quorum")),
            };
            async move { newest }
        };
        let source = PartitionSource {
            open,
            newest,
            idle_check: Duration::from_secs(5),
        };
        let (sender, mut receiver) = read_buffer(ReadBufferLimits {
            messages: 4,
            bytes: 1 << 20,
        });
        let reader = tokio::spawn(read_partition(source, 7, 1, 3, sender));
        let mut sequences = Vec::new();
        while sequences.len() < count {
            let message = tokio::time::timeout(Duration::from_secs(3600), receiver.recv())
                .await
                .expect("the reader delivers within an hour")
                .expect("the reader keeps running");
            assert_eq!((message.partition, message.generation), (7, 3));
            sequences.push(message.sequence);
        }
        // Idle an hour more: a source with nothing left is not reopened.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        reader.abort();
        let opens = opens.lock().unwrap().clone();
        (sequences, opens)
    }

    /// Issue 15: after a JetStream cluster lost and regained its quorum, an ordered consumer
    /// could stay quiet for good while its partition had messages. The reader asks the stream
    /// after a quiet period, and reopens after the last message it delivered when the consumer
    /// still delivers nothing one period later.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_consumer_with_messages_in_the_stream_is_reopened() {
        let (sequences, opens) = read_scripted(12, Ok(12), |attempt, from| {
            let partition = (from..=12).map(delivered_message);
            Ok(if attempt == 1 {
                partition.take(4).collect() // then silence, though the stream holds 5..=12
            } else {
                partition.collect()
            })
        })
        .await;
        assert_eq!(sequences, (1..=12).collect::<Vec<_>>());
        assert_eq!(opens, vec![1, 5]);
    }

    /// A quiet consumer is left alone when the stream holds nothing newer (an idle partition),
    /// and when the stream cannot say (no quorum): only a proven stall reopens it.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_consumer_is_kept_when_nothing_is_waiting_or_nobody_can_tell() {
        for newest in [Ok(6), Ok(0), Err(Error::nats("test", "no quorum"))] {
            let (sequences, opens) =
                read_scripted(6, newest, |_, from| Ok((from..=6).map(delivered_message).collect())).await;
            assert_eq!(sequences, (1..=6).collect::<Vec<_>>());
            assert_eq!(opens, vec![1]);
        }
    }

    /// Issue 10: a reader whose stream fails after k messages used to reopen at its original
    /// start and deliver 1..k again; it resumes at k+1.
    #[tokio::test(start_paused = true)]
    async fn a_failed_reader_resumes_after_the_last_message_it_delivered() {
        const K: usize = 5;
        let (sequences, opens) = read_scripted(12, Ok(12), |attempt, from| {
            let partition = (from..=12).map(delivered_message);
            Ok(if attempt == 1 {
                partition.take(K).chain([broken()]).collect()
            } else {
                partition.collect()
            })
        })
        .await;
        assert_eq!(sequences, (1..=12).collect::<Vec<_>>());
        assert_eq!(opens, vec![1, K as u64 + 1]);
    }

    /// Failed opens retry from the same place, and repeats inside one stream (an ordered
    /// consumer recreated by the client) are skipped.
    #[tokio::test(start_paused = true)]
    async fn repeats_and_failed_opens_deliver_nothing_twice() {
        let (sequences, opens) = read_scripted(8, Ok(9), |attempt, from| match attempt {
            1 => Err(Error::nats("test", "no responders")),
            2 => Ok([1, 2, 3, 2, 3, 4, 6]
                .into_iter()
                .map(delivered_message)
                .chain([broken()])
                .collect()),
            _ => Ok((from..=9).map(delivered_message).collect()),
        })
        .await;
        assert_eq!(sequences, vec![1, 2, 3, 4, 6, 7, 8, 9]);
        assert_eq!(opens, vec![1, 1, 7]);
    }
}

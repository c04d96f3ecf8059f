//! The dead-letter stream `EVENTS_DLQ`: poison messages with headers saying why, where from,
//! and tools to list and replay them.

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;

use chute_common::stream::{
    dead_letters, ensure_dead_letter_stream, read_all, StoredMessage, DLQ_STREAM, DLQ_SUBJECT_PREFIX,
};

use crate::error::{Error, Result};
use crate::row::Poison;

const DLQ_DESCRIPTION: &str = "Chute poison messages (see `aggregator dlq list`)";

pub const HEADER_ERROR: &str = "Chute-Error";
pub const HEADER_SUBJECT: &str = "Chute-Original-Subject";
pub const HEADER_SEQUENCE: &str = "Chute-Original-Sequence";

/// Creates the dead-letter stream if missing (limits retention, 30 days).
pub async fn ensure_stream(js: &jetstream::Context, replicas: usize) -> Result<()> {
    ensure_dead_letter_stream(js, DLQ_STREAM, DLQ_DESCRIPTION, DLQ_SUBJECT_PREFIX, replicas)
        .await
        .map_err(|err| Error::dlq("stream", err))?;
    Ok(())
}

/// Publishes one poison message and waits for its PubAck. Idempotent inside the stream's
/// duplicate window: the message id is the stream incarnation and the original sequence. The
/// commit path calls it once per message anyway (the ledger records that it was done).
pub async fn publish(js: &jetstream::Context, epoch: i64, poison: &Poison) -> Result<()> {
    let original = chute_common::stream::events_subject(poison.partition);
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_ERROR, poison.error.replace(['\r', '\n'], " ").as_str());
    headers.insert(HEADER_SUBJECT, original.as_str());
    headers.insert(HEADER_SEQUENCE, poison.sequence.to_string().as_str());
    headers.insert("Nats-Msg-Id", format!("dlq-{epoch}-{}", poison.sequence).as_str());
    let subject = format!("{DLQ_SUBJECT_PREFIX}.{}", poison.partition);
    js.publish_with_headers(subject, headers, poison.payload.clone())
        .await
        .map_err(|err| Error::dlq("publish", err))?
        .await
        .map_err(|err| Error::dlq("publish ack", err))?;
    crate::telemetry::dead_lettered(poison.partition, poison.sequence, &poison.error);
    Ok(())
}

/// One dead-lettered message, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DlqEntry {
    pub dlq_sequence: u64,
    pub original_subject: String,
    pub original_sequence: u64,
    pub error: String,
    pub bytes: usize,
}

/// Every message in the dead-letter stream, oldest first.
pub async fn list(js: &jetstream::Context) -> Result<Vec<(DlqEntry, Bytes)>> {
    let messages = read_all(js, DLQ_STREAM)
        .await
        .map_err(|err| Error::dlq("stream", err))?;
    Ok(messages.into_iter().map(entry).collect())
}

fn entry(message: StoredMessage) -> (DlqEntry, Bytes) {
    let entry = DlqEntry {
        dlq_sequence: message.sequence,
        original_subject: message.header(HEADER_SUBJECT),
        original_sequence: message.header(HEADER_SEQUENCE).parse().unwrap_or(0),
        error: message.header(HEADER_ERROR),
        bytes: message.payload.len(),
    };
    (entry, message.payload)
}

/// Re-publishes dead-lettered messages to their original subjects (after a fix), then removes
/// them from the dead-letter stream. Each copy carries a replay id naming the dead-letter entry
/// (`<EVENTS_DLQ creation time>-<its sequence>`): as `Nats-Msg-Id`, so JetStream stores one copy
/// inside its duplicate window, and as `Chute-Replay-Id`, which the aggregator claims before it
/// inserts (`commit.rs`), so a replay that crashed between publish and delete and ran again
/// much later is still inserted once. Returns how many were replayed.
pub async fn replay(js: &jetstream::Context, only: Option<u64>) -> Result<usize> {
    let (dead, messages) = dead_letters(js, DLQ_STREAM, only)
        .await
        .map_err(|err| Error::dlq("stream", err))?;
    let replayed = messages.len();
    for (entry, payload) in messages.into_iter().map(entry) {
        if chute_common::stream::partition_of_subject(&entry.original_subject).is_none() {
            return Err(Error::dlq(
                "replay",
                format!("message {} has no valid original subject", entry.dlq_sequence),
            ));
        }
        let replay_id = format!("{}-{}", dead.epoch, entry.dlq_sequence);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("replay-{replay_id}").as_str());
        headers.insert(crate::consumer::REPLAY_ID_HEADER, replay_id.as_str());
        dead.requeue(
            js,
            "dead-letter stream",
            entry.dlq_sequence,
            entry.original_subject,
            headers,
            payload,
        )
        .await?;
    }
    Ok(replayed)
}

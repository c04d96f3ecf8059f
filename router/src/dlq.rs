//! `ROUTES_DLQ`: webhook deliveries that a destination rejected, that ran out of attempts, or
//! whose destination is no longer defined. Each entry is the queued [`Delivery`] JSON unchanged,
//! with headers saying why; `router dlq list` shows them and `router dlq replay`
//! ([`replay_dead_letters`]) queues them again (same idempotency key) once the destination is
//! fixed.
//!
//! [`Delivery`]: crate::webhook::Delivery
//! [`replay_dead_letters`]: crate::webhook::replay_dead_letters

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chute_common::error::NatsFailure;
use chute_common::stream::{ensure_dead_letter_stream, is_subject_token, read_all, StoredMessage};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::headers::dead_letter;

pub const ROUTES_DLQ_STREAM: &str = "ROUTES_DLQ";
pub const ROUTES_DLQ_SUBJECT_PREFIX: &str = "routes_dlq";
const DESCRIPTION: &str = "Chute router: undeliverable webhooks (see `router dlq list`)";

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Every attempt failed with a retryable error (connect, timeout, 5xx, 408, 429).
    Exhausted,
    /// The destination answered with a status that retrying cannot change (e.g. 400, 401, 404).
    Rejected,
    /// The rules no longer define the destination.
    UndefinedDestination,
    /// The queued entry is not a delivery (written by something else than the router).
    Undecodable,
}

impl DeadLetterReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Rejected => "rejected",
            Self::UndefinedDestination => "undefined_destination",
            Self::Undecodable => "undecodable",
        }
    }

    fn parse(label: &str) -> Option<Self> {
        [
            Self::Exhausted,
            Self::Rejected,
            Self::UndefinedDestination,
            Self::Undecodable,
        ]
        .into_iter()
        .find(|reason| reason.label() == label)
    }
}

/// What the dispatcher records with a dead-lettered delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub destination: String,
    pub idempotency_key: String,
    pub reason: DeadLetterReason,
    /// The last attempt's error.
    pub error: String,
    /// Attempts made (0 when none could be made).
    pub attempts: u32,
}

/// Creates `ROUTES_DLQ` if missing (limits retention, 30 days).
pub async fn ensure_stream(js: &jetstream::Context, replicas: usize) -> Result<()> {
    ensure_dead_letter_stream(js, ROUTES_DLQ_STREAM, DESCRIPTION, ROUTES_DLQ_SUBJECT_PREFIX, replicas)
        .await
        .map_err(|err| Error::nats("stream ROUTES_DLQ", err))?;
    Ok(())
}

/// Stores one dead letter and waits for the PubAck. `message_id` names the queued delivery (its
/// `WEBHOOKS` incarnation and sequence), so a dispatcher that crashed before acking the original
/// stores it once when it comes round again.
pub(crate) async fn publish(
    js: &jetstream::Context,
    dead: &DeadLetter,
    webhooks_sequence: u64,
    message_id: &str,
    payload: Bytes,
) -> Result<()> {
    let destination = if is_subject_token(&dead.destination) {
        dead.destination.as_str()
    } else {
        "_invalid"
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", message_id);
    headers.insert(dead_letter::ERROR, dead.error.replace(['\r', '\n'], " ").as_str());
    headers.insert(dead_letter::REASON, dead.reason.label());
    headers.insert(dead_letter::ATTEMPTS, dead.attempts.to_string().as_str());
    headers.insert(dead_letter::DESTINATION, dead.destination.as_str());
    headers.insert(dead_letter::IDEMPOTENCY_KEY, dead.idempotency_key.as_str());
    headers.insert(dead_letter::SEQUENCE, webhooks_sequence.to_string().as_str());
    js.publish_with_headers(format!("{ROUTES_DLQ_SUBJECT_PREFIX}.{destination}"), headers, payload)
        .await
        .map_err(|err| Error::nats("dlq publish", err))?
        .await
        .map_err(|err| Error::nats("dlq publish ack", err))?;
    Ok(())
}

/// One dead-lettered delivery, as `router dlq list` prints it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DlqEntry {
    pub dlq_sequence: u64,
    pub destination: String,
    pub idempotency_key: String,
    /// `exhausted`, `rejected`, `undefined_destination` or `undecodable` (empty if unknown).
    pub reason: String,
    pub error: String,
    pub attempts: u32,
    /// The delivery's sequence in `WEBHOOKS`.
    pub original_sequence: u64,
    /// When it was dead-lettered (Unix seconds).
    pub dead_lettered_at: i64,
    /// The queued delivery (`null` if it is not JSON).
    pub delivery: serde_json::Value,
}

impl DlqEntry {
    pub fn reason(&self) -> Option<DeadLetterReason> {
        DeadLetterReason::parse(&self.reason)
    }
}

/// Messages in `ROUTES_DLQ` now.
pub async fn size(js: &jetstream::Context) -> Result<u64> {
    let mut stream = js
        .get_stream(ROUTES_DLQ_STREAM)
        .await
        .map_err(|err| Error::nats("stream ROUTES_DLQ", err))?;
    let info = stream
        .info()
        .await
        .map_err(|err| Error::nats("stream ROUTES_DLQ", err))?;
    Ok(info.state.messages)
}

/// Every dead-lettered delivery, oldest first.
pub async fn list(js: &jetstream::Context) -> Result<Vec<DlqEntry>> {
    let messages = read_all(js, ROUTES_DLQ_STREAM).await?;
    Ok(messages.into_iter().map(|message| entry(message).0).collect())
}

/// The entry as `list` shows it, and the queued delivery it holds.
pub(crate) fn entry(message: StoredMessage) -> (DlqEntry, Bytes) {
    let entry = DlqEntry {
        dlq_sequence: message.sequence,
        destination: message.header(dead_letter::DESTINATION),
        idempotency_key: message.header(dead_letter::IDEMPOTENCY_KEY),
        reason: message.header(dead_letter::REASON),
        error: message.header(dead_letter::ERROR),
        attempts: message.header(dead_letter::ATTEMPTS).parse().unwrap_or(0),
        original_sequence: message.header(dead_letter::SEQUENCE).parse().unwrap_or(0),
        dead_lettered_at: message.published.unix_timestamp(),
        delivery: serde_json::from_slice(&message.payload).unwrap_or(serde_json::Value::Null),
    };
    (entry, message.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_labels() {
        for reason in [
            DeadLetterReason::Exhausted,
            DeadLetterReason::Rejected,
            DeadLetterReason::UndefinedDestination,
            DeadLetterReason::Undecodable,
        ] {
            assert_eq!(DeadLetterReason::parse(reason.label()), Some(reason));
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::String(reason.label().to_owned())
            );
        }
        assert_eq!(DeadLetterReason::parse("nope"), None);
    }
}

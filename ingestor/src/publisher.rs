//! Publishing request chunks to JetStream and waiting for every PubAck, then a best-effort live
//! copy of each stored chunk on `live.<tenant>` (core NATS) for the query API's live stream.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::Subject;
use bytes::Bytes;
use chute_common::payload::EncodedChunk;
use chute_common::stream::events_subject;
use futures::future::try_join_all;
use futures::FutureExt;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::telemetry;

/// Namespace of the UUIDv5 `Nats-Msg-Id`s derived from (tenant, idempotency key, chunk).
const MSG_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3b9a_51c6_2f4e_4d8b_a0c7_7e21_94f6_d35a);

/// Where the live copies of a request's chunks go once JetStream has stored them.
#[derive(Debug, Clone)]
pub enum LiveCopies {
    /// Every accepted event is of one tenant (always so with API keys): each stored chunk itself
    /// goes to this `live.<tenant>` subject.
    Tenant(Subject),
    /// Events of several tenants (possible only without API keys): `(chunk index, live.<tenant>,
    /// payload holding only that tenant's events of the chunk)`, so that a tenant's subject never
    /// carries another tenant's events.
    Split(Vec<(u32, Subject, Bytes)>),
}

/// Sends chunks to `events.<partition>` with bounded in-flight publishes.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    inflight: Arc<Semaphore>,
    timeout: Duration,
    hooks: Hooks,
}

impl Publisher {
    pub fn new(client: async_nats::Client, max_inflight: usize, timeout: Duration) -> Self {
        Self::with_hooks(client, max_inflight, timeout, Hooks::default())
    }

    /// A publisher with test seams (lost publishes); see [`Hooks`].
    pub fn with_hooks(client: async_nats::Client, max_inflight: usize, timeout: Duration, hooks: Hooks) -> Self {
        let jetstream = jetstream::context::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        Self {
            client,
            jetstream,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            timeout,
            hooks,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Publishes every chunk and returns once JetStream acknowledged all of them. With an
    /// idempotency key each chunk carries a deterministic `Nats-Msg-Id`, so a retried request
    /// inside the duplicate window is not stored twice. Any failure fails the whole call: the
    /// caller retries, and the message ids make the retry safe.
    ///
    /// Each chunk JetStream stored (not one it reported as a duplicate of a retried request) is
    /// then copied to its `live` subjects, best effort: see `Publisher::publish_live`.
    pub async fn publish(
        &self,
        partition: u32,
        tenant: &str,
        idempotency_key: &str,
        chunks: Vec<EncodedChunk>,
        live: &LiveCopies,
    ) -> Result<()> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to nats".to_owned()));
        }
        // One subject for every chunk (a `Subject` clone shares its bytes) and one buffer for
        // every message id's name.
        let subject = Subject::from(events_subject(partition));
        let mut message_ids = (!idempotency_key.is_empty()).then(|| MessageIds::new(tenant, idempotency_key));
        let publishes = chunks.into_iter().map(|chunk| {
            let message_id = message_ids.as_mut().map(|ids| ids.for_chunk(chunk.chunk_index));
            self.publish_one(subject.clone(), message_id, chunk, live)
        });
        try_join_all(publishes).await.map(drop)
    }

    async fn publish_one(
        &self,
        subject: Subject,
        message_id: Option<String>,
        chunk: EncodedChunk,
        live: &LiveCopies,
    ) -> Result<()> {
        let started = Instant::now();
        let permit = tokio::time::timeout(self.timeout, self.inflight.acquire())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no publish slot free within {:?} (too many in flight)",
                    self.timeout
                ))
            })?
            .expect("semaphore is never closed");
        let _inflight = telemetry::InflightGuard::enter();
        // Test seam (feature `test-util`): a publish that never reaches JetStream. Without the
        // feature `lose_publish` is a constant `false` and this compiles away.
        if self.hooks.lose_publish(chunk.chunk_index) {
            tokio::time::sleep(self.timeout).await;
            return Err(publish_error(PublishErrorKind::TimedOut.into()));
        }
        // A clone of `Bytes` shares the buffer: the live copy costs no copy of the payload.
        let stored_payload = chunk.payload.clone();
        let mut message = jetstream::message::PublishMessage::build().payload(chunk.payload);
        if let Some(id) = message_id {
            // By value: the header keeps this `String` (`message_id` would copy a `&str`).
            message = message.header(NATS_MESSAGE_ID, id);
        }
        let ack_future = self
            .jetstream
            .send_publish(subject, message)
            .await
            .map_err(publish_error)?;
        let ack = ack_future.await.map_err(publish_error)?;
        drop(permit);
        telemetry::published(chunk.events, ack.duplicate, started.elapsed());
        if !ack.duplicate {
            match live {
                LiveCopies::Tenant(subject) => self.publish_live(subject.clone(), stored_payload),
                LiveCopies::Split(copies) => {
                    for (_, subject, payload) in copies.iter().filter(|(index, ..)| *index == chunk.chunk_index) {
                        self.publish_live(subject.clone(), payload.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues a live copy on the client's outgoing buffer without waiting: when the buffer is
    /// full (NATS slow or away) the copy is dropped and counted, never waited for, so the live
    /// stream can neither slow nor fail a Publish call. Core NATS, at most once: the live
    /// stream is a view, JetStream stays the record.
    fn publish_live(&self, subject: Subject, payload: Bytes) {
        // `unconstrained`: a task out of its cooperative budget would see `Pending` although
        // the buffer has room, and drop copies for nothing.
        let queued = tokio::task::unconstrained(self.client.publish(subject, payload)).now_or_never();
        match queued {
            Some(Ok(())) => telemetry::live_copy_queued(),
            Some(Err(err)) => telemetry::live_copy_dropped("error", Some(&err)),
            None => telemetry::live_copy_dropped("buffer_full", None),
        }
    }
}

/// `Nats-Msg-Id` of one chunk of a request with an idempotency key.
pub fn message_id(tenant: &str, idempotency_key: &str, chunk_index: u32) -> String {
    MessageIds::new(tenant, idempotency_key).for_chunk(chunk_index)
}

/// The message ids of one request's chunks: UUIDv5 of `"{tenant}\0{key}\0{chunk_index}"`, the
/// name built in one buffer whose `tenant\0key\0` prefix is written once per request.
struct MessageIds {
    name: Vec<u8>,
    prefix_len: usize,
}

impl MessageIds {
    fn new(tenant: &str, idempotency_key: &str) -> Self {
        // Room for the longest chunk index (u32::MAX has 10 digits).
        let mut name = Vec::with_capacity(tenant.len() + idempotency_key.len() + 2 + 10);
        name.extend_from_slice(tenant.as_bytes());
        name.push(0);
        name.extend_from_slice(idempotency_key.as_bytes());
        name.push(0);
        let prefix_len = name.len();
        Self { name, prefix_len }
    }

    fn for_chunk(&mut self, chunk_index: u32) -> String {
        self.name.truncate(self.prefix_len);
        write!(self.name, "{chunk_index}").expect("a Vec grows as needed");
        let mut hyphenated = [0; uuid::fmt::Hyphenated::LENGTH];
        Uuid::new_v5(&MSG_ID_NAMESPACE, &self.name)
            .hyphenated()
            .encode_lower(&mut hyphenated)
            .to_owned()
    }
}

fn publish_error(err: jetstream::context::PublishError) -> Error {
    telemetry::publish_failed(&err);
    let reason = match err.kind() {
        PublishErrorKind::TimedOut => "timed out waiting for the PubAck".to_owned(),
        PublishErrorKind::StreamNotFound => "the EVENTS stream does not exist".to_owned(),
        _ => err.to_string(),
    };
    Error::Unavailable(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_per_tenant_key_and_chunk() {
        assert_eq!(message_id("acme", "k", 0), message_id("acme", "k", 0));
        assert_ne!(message_id("acme", "k", 0), message_id("acme", "k", 1));
        assert_ne!(message_id("acme", "k", 0), message_id("globex", "k", 0));
    }

    #[test]
    fn message_ids_are_the_uuid_v5_of_tenant_key_and_chunk() {
        // The ids published before the name buffer was reused: a retry across an upgrade must
        // land on the same ids.
        let mut ids = MessageIds::new("acme", "req-1");
        for chunk_index in [0, 1, 9, 10, 12_345, u32::MAX] {
            let name = format!("acme\u{0}req-1\u{0}{chunk_index}");
            let expected = Uuid::new_v5(&MSG_ID_NAMESPACE, name.as_bytes()).to_string();
            assert_eq!(ids.for_chunk(chunk_index), expected);
        }
        assert_eq!(
            message_id("acme", "req-1", 0),
            Uuid::new_v5(&MSG_ID_NAMESPACE, b"acme\x00req-1\x000").to_string()
        );
    }
}

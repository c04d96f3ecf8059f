//! Webhook deliveries: queued durably in the `WEBHOOKS` work-queue stream, POSTed signed, retried
//! with capped exponential backoff and full jitter, dead-lettered to `ROUTES_DLQ` ([`crate::dlq`])
//! when the destination rejects them or the attempts run out.
//!
//! Delivery is at least once. The engine [`enqueue`]s a [`Delivery`] and waits for the PubAck
//! (`Nats-Msg-Id` = destination + idempotency key, so a re-evaluated event is queued once inside
//! the duplicate window). The dispatcher ([`run_dispatcher`]) acks a queued delivery only after a
//! 2xx answer or after the dead-letter copy is stored, so a crash redelivers it; every attempt of
//! one delivery carries the same `Idempotency-Key`, which receivers use to drop repeats.
//!
//! The pure parts (request body, signature, retry classification, backoff) are plain functions
//! with unit tests; [`HttpSender`] and the dispatcher are the I/O around them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chute_common::error::NatsFailure;
use chute_common::stream::{dead_letters, file_stream, is_subject_token};
use chute_common::telemetry::{MetricDescription, MetricKind};
use chute_schema::client::{https_connector, pool, rustls_config};
use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use metrics::{counter, gauge, histogram, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::dlq::{self, DeadLetter, DeadLetterReason};
use crate::error::{Error, Result};
use crate::headers;
use crate::spec::{RuleSet, WebhookSpec};

/// The work queue of pending deliveries, subjects `webhooks.<destination>`.
pub const WEBHOOKS_STREAM: &str = "WEBHOOKS";
pub const WEBHOOKS_SUBJECT_PREFIX: &str = "webhooks";
/// The durable pull consumer every router replica shares (a work queue allows one).
pub const DISPATCHER_CONSUMER: &str = "router-webhooks";

/// A queued delivery is redelivered when not acked (or marked in progress) for this long.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How often a delivery that is still being attempted or waiting to retry says "in progress".
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Deliveries this process works on at once (all destinations).
const MAX_IN_PROGRESS: usize = 512;
/// Deliveries of one destination in progress at once: twice its concurrency, at least 64 and at
/// most half of [`MAX_IN_PROGRESS`]. Beyond it a delivery waits for its turn while the
/// destination answers, and is handed back for [`BUSY_DELAY`] while its last attempt failed, so
/// a destination that is down (its deliveries waiting to retry) cannot take every slot and hold
/// up the others.
const MIN_IN_PROGRESS_PER_DESTINATION: usize = 64;
const BUSY_DELAY: Duration = Duration::from_secs(30);
/// The consumer's cap on unacked deliveries over every replica.
const MAX_ACK_PENDING: i64 = 8192;
/// How long a pull waits for messages before checking for shutdown again.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Duplicate window of `WEBHOOKS`: an event the engine evaluates again after a restart is
/// queued once if it comes back within this time.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
/// Undelivered entries older than this leave `WEBHOOKS` (the dispatcher was down for a week).
const MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// Bytes of a response body read (the start of it names the error in the DLQ entry).
const RESPONSE_BODY_LIMIT: usize = 64 * 1024;
const ERROR_SNIPPET_CHARS: usize = 200;
/// Longest idempotency key accepted (it is a header and part of a NATS message id).
const MAX_KEY_BYTES: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const DLQ_SIZE_EVERY: Duration = Duration::from_secs(15);

/// What a webhook is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryKind {
    Route,
    Alert,
    Anomaly,
}

/// One webhook notification, as queued in `WEBHOOKS` (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// A key of [`RuleSet::webhooks`]; also the subject token `webhooks.<destination>`.
    pub destination: String,
    /// Stable for the notification (e.g. `<rule>:<event_id>` or `<rule>:<alert id>:<state>`):
    /// sent as `Idempotency-Key` and as the body's `id` on every attempt and redelivery.
    pub idempotency_key: String,
    pub kind: DeliveryKind,
    pub tenant: String,
    pub rule: String,
    /// Fields of the POSTed JSON besides `id`, `kind`, `tenant` and `rule` (an object's keys are
    /// merged in; any other value is sent as `payload`).
    pub payload: serde_json::Value,
}

impl Delivery {
    /// The destination must be a NATS subject token and the key a header value.
    pub fn validate(&self) -> Result<()> {
        if !is_subject_token(&self.destination) {
            return Err(Error::Webhook(format!(
                "destination {:?} is not a subject token ([A-Za-z0-9_-]+)",
                self.destination
            )));
        }
        let key = &self.idempotency_key;
        if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Webhook(format!(
                "idempotency key {key:?} must be 1..={MAX_KEY_BYTES} visible ASCII characters"
            )));
        }
        Ok(())
    }

    /// The JetStream message id: a repeat of the same notification to the same destination is
    /// stored once inside the duplicate window.
    fn message_id(&self) -> String {
        format!("{}:{}", self.destination, self.idempotency_key)
    }
}

pub fn webhooks_subject(destination: &str) -> String {
    format!("{WEBHOOKS_SUBJECT_PREFIX}.{destination}")
}

// ---------------------------------------------------------------- streams and enqueue

/// Creates `WEBHOOKS` (work queue) and `ROUTES_DLQ` if missing.
pub async fn ensure_streams(js: &jetstream::Context, replicas: usize) -> Result<()> {
    chute_common::stream::get_or_create(
        js,
        stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: replicas,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            ..file_stream(
                WEBHOOKS_STREAM,
                "Chute router: webhook deliveries waiting to be sent",
                WEBHOOKS_SUBJECT_PREFIX,
            )
        },
    )
    .await
    .map_err(|err| Error::nats("stream WEBHOOKS", err))?;
    dlq::ensure_stream(js, replicas).await
}

/// What [`enqueue`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub sequence: u64,
    /// The same destination and key were queued before, inside the duplicate window: nothing new
    /// was stored.
    pub duplicate: bool,
}

/// Queues one delivery and waits for JetStream's PubAck.
pub async fn enqueue(js: &jetstream::Context, delivery: &Delivery) -> Result<Enqueued> {
    delivery.validate()?;
    let payload = serde_json::to_vec(delivery).map_err(|err| Error::Webhook(err.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", delivery.message_id().as_str());
    let ack = js
        .publish_with_headers(webhooks_subject(&delivery.destination), headers, payload.into())
        .await
        .map_err(|err| Error::nats("enqueue", err))?
        .await
        .map_err(|err| Error::nats("enqueue ack", err))?;
    Ok(Enqueued {
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// `router dlq replay`: queues dead-lettered deliveries ([`crate::dlq`]) again (all, or only the
/// entry with sequence `only`), then removes them from `ROUTES_DLQ`. The copy keeps the delivery
/// unchanged, so the receiver sees the same idempotency key; its `Nats-Msg-Id` names the DLQ entry
/// (`replay-<ROUTES_DLQ creation time>-<sequence>`), not the key, so `WEBHOOKS`' duplicate window
/// does not swallow it as a repeat of the first enqueue, while a replay re-run after a crash
/// between publish and delete is still stored once. Returns how many were queued.
pub async fn replay_dead_letters(js: &jetstream::Context, only: Option<u64>) -> Result<usize> {
    let (dead, messages) = dead_letters(js, dlq::ROUTES_DLQ_STREAM, only).await?;
    let replayed = messages.len();
    for (entry, payload) in messages.into_iter().map(dlq::entry) {
        if !is_subject_token(&entry.destination) {
            return Err(Error::Webhook(format!(
                "ROUTES_DLQ entry {} has no valid destination ({:?})",
                entry.dlq_sequence, entry.destination
            )));
        }
        let mut message_headers = HeaderMap::new();
        message_headers.insert(
            "Nats-Msg-Id",
            format!("replay-{}-{}", dead.epoch, entry.dlq_sequence).as_str(),
        );
        message_headers.insert(headers::dead_letter::REPLAY_OF, entry.dlq_sequence.to_string().as_str());
        let subject = webhooks_subject(&entry.destination);
        dead.requeue(js, "nats", entry.dlq_sequence, subject, message_headers, payload)
            .await?;
        tracing::info!(
            dlq_sequence = entry.dlq_sequence,
            destination = %entry.destination,
            key = %entry.idempotency_key,
            "webhook delivery replayed from ROUTES_DLQ"
        );
    }
    Ok(replayed)
}

// ---------------------------------------------------------------- pure policy

/// The POSTed JSON: the payload's fields plus `id` (the idempotency key), `kind`, `tenant` and
/// `rule`, which win over payload fields of the same name.
pub fn request_body(delivery: &Delivery) -> Vec<u8> {
    let mut object = match &delivery.payload {
        serde_json::Value::Object(fields) => fields.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        other => serde_json::Map::from_iter([("payload".to_owned(), other.clone())]),
    };
    object.insert("id".into(), delivery.idempotency_key.clone().into());
    object.insert(
        "kind".into(),
        serde_json::to_value(delivery.kind).expect("a unit enum serializes"),
    );
    object.insert("tenant".into(), delivery.tenant.clone().into());
    object.insert("rule".into(), delivery.rule.clone().into());
    serde_json::to_vec(&object).expect("a JSON map serializes")
}

/// The `Chute-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, unix_seconds: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(unix_seconds.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let mut hex = String::with_capacity(64);
    for byte in tag.as_ref() {
        hex.push(char::from_digit(u32::from(byte >> 4), 16).expect("a nibble"));
        hex.push(char::from_digit(u32::from(byte & 0xf), 16).expect("a nibble"));
    }
    format!("t={unix_seconds},v1={hex}")
}

/// Why an attempt did not deliver; the `reason` label of the failures metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    Connect,
    Timeout,
    /// The connection broke after it was made (reset, closed mid-response).
    Transport,
    Status5xx,
    Status429,
    Status408,
    /// Any other non-2xx answer (4xx, or a 1xx/3xx: redirects are not followed).
    StatusOther,
    /// The request could not be built (a URL or header the HTTP library refuses).
    InvalidRequest,
}

impl FailureReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::Status5xx => "http_5xx",
            Self::Status429 => "http_429",
            Self::Status408 => "http_408",
            Self::StatusOther => "http_other",
            Self::InvalidRequest => "invalid_request",
        }
    }

    /// Worth another attempt: the destination may answer differently later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Timeout | Self::Transport | Self::Status5xx | Self::Status429 | Self::Status408
        )
    }
}

/// The verdict on an HTTP status: `None` is delivered (2xx).
pub fn classify_status(status: StatusCode) -> Option<FailureReason> {
    if status.is_success() {
        return None;
    }
    Some(match status.as_u16() {
        500..=599 => FailureReason::Status5xx,
        429 => FailureReason::Status429,
        408 => FailureReason::Status408,
        _ => FailureReason::StatusOther,
    })
}

/// `Retry-After` as delta-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait after failed attempt number `attempt` (1-based): full jitter (`unit` in 0..1 times)
/// over `backoff_initial * 2^(attempt-1)` capped at `backoff_max`; a `Retry-After` the
/// destination asked for is honoured up to `backoff_max`.
pub fn backoff_delay(spec: &WebhookSpec, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    let ceiling = spec
        .backoff_initial
        .saturating_mul(1u32 << doublings)
        .min(spec.backoff_max);
    let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => jittered.max(asked.min(spec.backoff_max)),
        None => jittered,
    }
}

// ---------------------------------------------------------------- HTTP

/// The result of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status: u16,
    },
    Failed {
        reason: FailureReason,
        error: String,
        retry_after: Option<Duration>,
    },
}

/// The HTTP(S) client of every destination: one connection pool, rustls (ring) verifying servers
/// against the system's trusted roots.
#[derive(Clone)]
pub struct HttpSender {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpSender {
    pub fn new() -> Result<Self> {
        Self::with_roots(system_roots())
    }

    /// A client that trusts the certificate authorities in `roots` only.
    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Self> {
        let tls = rustls_config(roots).map_err(|err| Error::Webhook(err.to_string()))?;
        // Destinations may be http:// as well as https:// URLs.
        let https = https_connector(tls, true);
        Ok(Self {
            client: pool(POOL_IDLE_TIMEOUT).build(https),
        })
    }

    /// One signed POST of `body`, bounded by the destination's timeout.
    pub async fn post(&self, spec: &WebhookSpec, key: &str, attempt: u32, body: Bytes) -> Attempt {
        let unix_seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let request = Request::post(spec.url.as_str())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, concat!("chute-router/", env!("CARGO_PKG_VERSION")))
            .header(headers::webhook::IDEMPOTENCY_KEY, key)
            .header(headers::webhook::ATTEMPT, attempt)
            .header(
                headers::webhook::SIGNATURE,
                signature(&spec.secret, unix_seconds, &body),
            )
            .body(Full::new(body));
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                return Attempt::Failed {
                    reason: FailureReason::InvalidRequest,
                    error: format!("invalid request: {err}"),
                    retry_after: None,
                }
            }
        };
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
            // Read the body (bounded) so the connection can be reused, and to quote an error.
            let body = Limited::new(response.into_body(), RESPONSE_BODY_LIMIT)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, body))
        };
        match tokio::time::timeout(spec.timeout, exchange).await {
            Err(_) => Attempt::Failed {
                reason: FailureReason::Timeout,
                error: format!("no answer within {:?}", spec.timeout),
                retry_after: None,
            },
            Ok(Err(err)) => Attempt::Failed {
                reason: if err.is_connect() {
                    FailureReason::Connect
                } else {
                    FailureReason::Transport
                },
                error: error_chain(&err),
                retry_after: None,
            },
            Ok(Ok((status, retry_after, body))) => match classify_status(status) {
                None => Attempt::Delivered {
                    status: status.as_u16(),
                },
                Some(reason) => {
                    let snippet: String = String::from_utf8_lossy(&body)
                        .chars()
                        .take(ERROR_SNIPPET_CHARS)
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    Attempt::Failed {
                        reason,
                        error: format!("HTTP {status}: {}", snippet.trim()),
                        retry_after,
                    }
                }
            },
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The system's trusted roots. Without any, https destinations fail (and are retried, then
/// dead-lettered) while http ones still work.
fn system_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        tracing::warn!(errors = ?found.errors, "no trusted root certificates on this system: https webhooks will fail");
    }
    roots
}

// ---------------------------------------------------------------- dispatcher

/// Consumes `WEBHOOKS` through the durable consumer [`DISPATCHER_CONSUMER`] until `shutdown`,
/// delivering each entry to its destination as defined in the current rules. Call
/// [`ensure_streams`] first, and start it once `rules` holds the loaded rules (a destination
/// missing from them is dead-lettered). On shutdown, deliveries waiting to retry are handed back
/// (nak) for another replica; an attempt in flight finishes first (bounded by its timeout).
pub async fn run_dispatcher(
    js: jetstream::Context,
    rules: watch::Receiver<Arc<RuleSet>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let stream = js
        .get_stream(WEBHOOKS_STREAM)
        .await
        .map_err(|err| Error::nats("stream WEBHOOKS", err))?;
    let consumer = stream
        .get_or_create_consumer(
            DISPATCHER_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(DISPATCHER_CONSUMER.to_owned()),
                description: Some("Chute router: webhook dispatcher".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            },
        )
        .await
        .map_err(|err| Error::nats("consumer router-webhooks", err))?;
    let dispatcher = Arc::new(Dispatcher {
        dlq_epoch: stream.cached_info().created.unix_timestamp_nanos(),
        js: js.clone(),
        sender: HttpSender::new()?,
        limits: Mutex::new(HashMap::new()),
        lanes: Mutex::new(HashMap::new()),
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_PROGRESS));
    let mut tasks = JoinSet::new();
    let mut next_dlq_size = Instant::now();
    while !shutdown.is_cancelled() {
        while let Some(finished) = tasks.try_join_next() {
            if let Err(err) = finished {
                tracing::error!(error = %err, "webhook delivery task failed");
            }
        }
        if Instant::now() >= next_dlq_size {
            next_dlq_size = Instant::now() + DLQ_SIZE_EVERY;
            if let Ok(Ok(size)) = tokio::time::timeout(Duration::from_secs(2), dlq::size(&js)).await {
                gauge!(DLQ_SIZE.name).set(size as f64);
            }
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => drop(permit),
            }
            continue;
        }
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            batch = consumer.batch().max_messages(free).expires(PULL_EXPIRES).messages() => batch,
        };
        let mut messages = match batch {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "cannot pull webhook deliveries; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(error = %err, "webhook pull interrupted");
                    break;
                }
            };
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slot semaphore is never closed");
            tasks.spawn(
                dispatcher
                    .clone()
                    .handle(message, rules.clone(), shutdown.clone(), permit),
            );
        }
    }
    while let Some(finished) = tasks.join_next().await {
        if let Err(err) = finished {
            tracing::error!(error = %err, "webhook delivery task failed");
        }
    }
    Ok(())
}

struct Dispatcher {
    js: jetstream::Context,
    /// `WEBHOOKS`' creation time: with a stream sequence, the dead-letter copy's message id.
    dlq_epoch: i128,
    sender: HttpSender,
    /// Per destination: its concurrency limit and the semaphore enforcing it.
    limits: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    /// Per destination (subject token): its deliveries in progress here and its health.
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
}

/// One destination's share of the in-progress slots.
#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
    /// A place was freed or the destination started failing.
    changed: Notify,
}

#[derive(Default)]
struct LaneState {
    in_progress: usize,
    /// The last attempt failed with a retryable error.
    failing: bool,
}

enum Claim {
    Claimed(InProgress),
    /// At its cap while failing: hand the delivery back.
    Busy,
    Interrupted,
}

impl Lane {
    /// A place among the destination's `cap` in-progress deliveries: at once if one is free;
    /// waiting for one while the destination answers; `Busy` while it fails.
    async fn claim(self: &Arc<Self>, destination: &str, cap: usize, shutdown: &CancellationToken) -> Claim {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().expect("lane lock");
                if state.in_progress < cap {
                    state.in_progress += 1;
                    gauge!(IN_FLIGHT.name, "destination" => destination.to_owned()).increment(1.0);
                    return Claim::Claimed(InProgress {
                        lane: self.clone(),
                        destination: destination.to_owned(),
                    });
                }
                if state.failing {
                    return Claim::Busy;
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = shutdown.cancelled() => return Claim::Interrupted,
            }
        }
    }

    fn attempted(&self, retryable_failure: bool) {
        let mut state = self.state.lock().expect("lane lock");
        let started_failing = retryable_failure && !state.failing;
        state.failing = retryable_failure;
        drop(state);
        if started_failing {
            // Deliveries waiting for a place go back to the stream instead.
            self.changed.notify_waiters();
        }
    }
}

/// A delivery's place in its destination's lane; released on drop.
struct InProgress {
    lane: Arc<Lane>,
    destination: String,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.lane.state.lock().expect("lane lock").in_progress -= 1;
        // One place is free: wake one waiter (all of them would race for it).
        self.lane.changed.notify_one();
        gauge!(IN_FLIGHT.name, "destination" => self.destination.clone()).decrement(1.0);
    }
}

/// How many deliveries of a destination may be in progress at once (see
/// [`MIN_IN_PROGRESS_PER_DESTINATION`]).
fn destination_cap(concurrency: Option<usize>) -> usize {
    concurrency
        .unwrap_or(0)
        .saturating_mul(2)
        .clamp(MIN_IN_PROGRESS_PER_DESTINATION, MAX_IN_PROGRESS / 2)
}

/// How the work on one queued delivery ended.
enum Verdict {
    Delivered,
    DeadLetter(DeadLetter),
    /// Shutdown while waiting: hand the delivery back.
    Interrupted,
    /// The destination is failing and holds its share of slots: hand it back for a while.
    Busy,
}

impl Dispatcher {
    async fn handle(
        self: Arc<Self>,
        message: jetstream::Message,
        rules: watch::Receiver<Arc<RuleSet>>,
        shutdown: CancellationToken,
        _slot: OwnedSemaphorePermit,
    ) {
        let (sequence, published_nanos) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published.unix_timestamp_nanos()),
            Err(err) => {
                tracing::error!(error = %err, subject = %message.subject, "webhook delivery without JetStream info");
                return;
            }
        };
        let label = message
            .subject
            .strip_prefix(WEBHOOKS_SUBJECT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_default()
            .to_owned();
        let concurrency = rules.borrow().webhooks.get(&label).map(|spec| spec.concurrency);
        let cap = destination_cap(concurrency);
        let lane = self.lane(&label);
        let verdict = {
            let work = async {
                let _in_progress = match lane.claim(&label, cap, &shutdown).await {
                    Claim::Claimed(in_progress) => in_progress,
                    Claim::Busy => return Verdict::Busy,
                    Claim::Interrupted => return Verdict::Interrupted,
                };
                self.deliver(&message, &label, &lane, &rules, &shutdown).await
            };
            tokio::pin!(work);
            let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            loop {
                tokio::select! {
                    verdict = &mut work => break verdict,
                    _ = progress.tick() => {
                        if let Err(err) = message.ack_with(AckKind::Progress).await {
                            tracing::warn!(error = %err, sequence, "cannot mark a webhook delivery in progress");
                        }
                    }
                }
            }
        };
        match verdict {
            Verdict::Delivered => {
                let now_nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as i128;
                let latency = (now_nanos - published_nanos).max(0) as f64 / 1e9;
                histogram!(DELIVERY_SECONDS.name, "destination" => label.clone()).record(latency);
                if let Err(err) = message.double_ack().await {
                    // Redelivered later: a duplicate with the same idempotency key.
                    tracing::warn!(error = %err, sequence, "cannot ack a delivered webhook");
                }
            }
            Verdict::DeadLetter(dead) => {
                let message_id = format!("dlq-{}-{sequence}", self.dlq_epoch);
                match dlq::publish(&self.js, &dead, sequence, &message_id, message.payload.clone()).await {
                    Ok(()) => {
                        dead_lettered(&dead);
                        if let Err(err) = message.double_ack().await {
                            tracing::warn!(error = %err, sequence, "cannot ack a dead-lettered webhook");
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, sequence, "cannot dead-letter a webhook delivery; it is retried later");
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                    }
                }
            }
            Verdict::Interrupted => {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
            Verdict::Busy => {
                let _ = message.ack_with(AckKind::Nak(Some(BUSY_DELAY))).await;
            }
        }
    }

    fn lane(&self, destination: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        lanes.entry(destination.to_owned()).or_default().clone()
    }

    async fn deliver(
        &self,
        message: &jetstream::Message,
        subject_destination: &str,
        lane: &Lane,
        rules: &watch::Receiver<Arc<RuleSet>>,
        shutdown: &CancellationToken,
    ) -> Verdict {
        let delivery: Delivery = match serde_json::from_slice(&message.payload) {
            Ok(delivery) => delivery,
            Err(err) => {
                return Verdict::DeadLetter(DeadLetter {
                    destination: subject_destination.to_owned(),
                    idempotency_key: String::new(),
                    reason: DeadLetterReason::Undecodable,
                    error: format!("undecodable delivery: {err}"),
                    attempts: 0,
                })
            }
        };
        let body = Bytes::from(request_body(&delivery));
        let dead_letter = |reason, error, attempts| {
            Verdict::DeadLetter(DeadLetter {
                destination: delivery.destination.clone(),
                idempotency_key: delivery.idempotency_key.clone(),
                reason,
                error,
                attempts,
            })
        };
        let mut attempt = 0u32;
        loop {
            // The current rules at every attempt: a changed timeout or budget applies at once.
            let spec = rules.borrow().webhooks.get(&delivery.destination).cloned();
            let Some(spec) = spec else {
                return dead_letter(
                    DeadLetterReason::UndefinedDestination,
                    format!(
                        "webhook destination {:?} is not defined in the rules",
                        delivery.destination
                    ),
                    attempt,
                );
            };
            attempt += 1;
            let limit = self.limit(&spec);
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return Verdict::Interrupted,
                permit = limit.acquire_owned() => permit.expect("destination semaphores are never closed"),
            };
            let outcome = self
                .sender
                .post(&spec, &delivery.idempotency_key, attempt, body.clone())
                .await;
            drop(permit);
            lane.attempted(matches!(&outcome, Attempt::Failed { reason, .. } if reason.is_retryable()));
            let (reason, error, retry_after) = match outcome {
                Attempt::Delivered { status } => {
                    attempted(&delivery, "delivered");
                    tracing::debug!(destination = %delivery.destination, key = %delivery.idempotency_key, attempt, status, "webhook delivered");
                    return Verdict::Delivered;
                }
                Attempt::Failed {
                    reason,
                    error,
                    retry_after,
                } => (reason, error, retry_after),
            };
            attempt_failed(&delivery, attempt, reason, &error);
            if !reason.is_retryable() {
                return dead_letter(DeadLetterReason::Rejected, error, attempt);
            }
            if attempt >= spec.max_attempts {
                return dead_letter(DeadLetterReason::Exhausted, error, attempt);
            }
            let wait = backoff_delay(&spec, attempt, retry_after, rand::random::<f64>());
            tokio::select! {
                _ = shutdown.cancelled() => return Verdict::Interrupted,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The destination's semaphore, replaced when its concurrency changed in the rules.
    fn limit(&self, spec: &WebhookSpec) -> Arc<Semaphore> {
        let concurrency = spec.concurrency.max(1);
        let mut limits = self.limits.lock().expect("limits lock");
        let entry = limits
            .entry(spec.name.clone())
            .or_insert_with(|| (concurrency, Arc::new(Semaphore::new(concurrency))));
        if entry.0 != concurrency {
            *entry = (concurrency, Arc::new(Semaphore::new(concurrency)));
        }
        entry.1.clone()
    }
}

// ---------------------------------------------------------------- telemetry

pub const ATTEMPTS: MetricDescription = MetricDescription {
    name: "chute_router_webhook_attempts_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "webhook POST attempts by destination and outcome (delivered, retryable, rejected)",
    zero_at_start: false,
};

pub const FAILURES: MetricDescription = MetricDescription {
    name: "chute_router_webhook_failures_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "failed webhook attempts by destination and reason (connect, timeout, transport, http_5xx, http_429, http_408, http_other, invalid_request)",
    zero_at_start: false,
};

pub const DEAD_LETTERED: MetricDescription = MetricDescription {
    name: "chute_router_webhook_dead_lettered_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "webhook deliveries published to ROUTES_DLQ by destination and reason (exhausted, rejected, undefined_destination, undecodable)",
    zero_at_start: false,
};

pub const DELIVERY_SECONDS: MetricDescription = MetricDescription {
    name: "chute_router_webhook_delivery_seconds",
    kind: MetricKind::Histogram,
    unit: Some(Unit::Seconds),
    help: "time from queueing a webhook delivery to its 2xx answer, retries included",
    zero_at_start: false,
};

pub const IN_FLIGHT: MetricDescription = MetricDescription {
    name: "chute_router_webhook_in_flight",
    kind: MetricKind::Gauge,
    unit: None,
    help: "webhook deliveries this router is working on (attempting or waiting to retry), by destination",
    zero_at_start: false,
};

pub const DLQ_SIZE: MetricDescription = MetricDescription {
    name: "chute_router_webhook_dlq_size",
    kind: MetricKind::Gauge,
    unit: None,
    help: "messages in ROUTES_DLQ (polled every 15 s)",
    zero_at_start: true,
};

/// The webhook metrics, for the router's `describe` table.
pub const METRICS: &[MetricDescription] = &[ATTEMPTS, FAILURES, DEAD_LETTERED, DELIVERY_SECONDS, IN_FLIGHT, DLQ_SIZE];

fn attempted(delivery: &Delivery, outcome: &'static str) {
    counter!(ATTEMPTS.name, "destination" => delivery.destination.clone(), "outcome" => outcome).increment(1);
}

fn attempt_failed(delivery: &Delivery, attempt: u32, reason: FailureReason, error: &str) {
    let outcome = if reason.is_retryable() { "retryable" } else { "rejected" };
    attempted(delivery, outcome);
    counter!(FAILURES.name, "destination" => delivery.destination.clone(), "reason" => reason.label()).increment(1);
    tracing::warn!(
        destination = %delivery.destination,
        key = %delivery.idempotency_key,
        attempt,
        reason = reason.label(),
        error,
        "webhook attempt failed"
    );
}

fn dead_lettered(dead: &DeadLetter) {
    counter!(DEAD_LETTERED.name, "destination" => dead.destination.clone(), "reason" => dead.reason.label())
        .increment(1);
    tracing::error!(
        destination = %dead.destination,
        key = %dead.idempotency_key,
        attempts = dead.attempts,
        reason = dead.reason.label(),
        error = %dead.error,
        "webhook delivery dead-lettered to ROUTES_DLQ"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(initial_ms: u64, max_ms: u64) -> WebhookSpec {
        WebhookSpec {
            name: "ops".into(),
            url: "http://127.0.0.1:1/hook".into(),
            secret: "whsec_test".into(),
            timeout: Duration::from_secs(5),
            concurrency: 4,
            max_attempts: 8,
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
        }
    }

    fn delivery(payload: serde_json::Value) -> Delivery {
        Delivery {
            destination: "ops".into(),
            idempotency_key: "slow_p99:alert-1:firing".into(),
            kind: DeliveryKind::Alert,
            tenant: "acme".into(),
            rule: "slow_p99".into(),
            payload,
        }
    }

    #[test]
    fn the_signature_matches_python_hmac() {
        // python3: hmac.new(b"whsec_test", b'1700000000.{"id":"k1"}', hashlib.sha256).hexdigest()
        assert_eq!(
            signature("whsec_test", 1_700_000_000, br#"{"id":"k1"}"#),
            "t=1700000000,v1=c083f4e63287ffec9f1f3fb5c4518faeee81ee9946d15f81eeda436dcec203f4"
        );
        assert_ne!(
            signature("other", 1_700_000_000, br#"{"id":"k1"}"#),
            signature("whsec_test", 1_700_000_000, br#"{"id":"k1"}"#)
        );
    }

    #[test]
    fn the_body_merges_the_payload_under_the_envelope() {
        let body: serde_json::Value = serde_json::from_slice(&request_body(&delivery(serde_json::json!({
            "value": 2350.0, "id": "payload cannot override the id", "state": "firing"
        }))))
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "slow_p99:alert-1:firing", "kind": "alert", "tenant": "acme", "rule": "slow_p99",
                "value": 2350.0, "state": "firing"
            })
        );
        let scalar: serde_json::Value = serde_json::from_slice(&request_body(&delivery(serde_json::json!(7)))).unwrap();
        assert_eq!(scalar["payload"], 7);
        assert_eq!(scalar["kind"], "alert");
    }

    #[test]
    fn a_delivery_round_trips_and_is_validated() {
        let original = delivery(serde_json::json!({"a": 1}));
        let text = serde_json::to_string(&original).unwrap();
        assert!(text.contains(r#""kind":"alert""#), "{text}");
        assert_eq!(serde_json::from_str::<Delivery>(&text).unwrap(), original);
        original.validate().unwrap();
        let bad_destination = Delivery {
            destination: "a.b".into(),
            ..original.clone()
        };
        assert!(bad_destination.validate().is_err());
        let bad_key = Delivery {
            idempotency_key: "has space".into(),
            ..original.clone()
        };
        assert!(bad_key.validate().is_err());
        let empty_key = Delivery {
            idempotency_key: String::new(),
            ..original
        };
        assert!(empty_key.validate().is_err());
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status(StatusCode::OK), None);
        assert_eq!(classify_status(StatusCode::NO_CONTENT), None);
        for (status, reason, retry) in [
            (StatusCode::INTERNAL_SERVER_ERROR, FailureReason::Status5xx, true),
            (StatusCode::BAD_GATEWAY, FailureReason::Status5xx, true),
            (StatusCode::TOO_MANY_REQUESTS, FailureReason::Status429, true),
            (StatusCode::REQUEST_TIMEOUT, FailureReason::Status408, true),
            (StatusCode::BAD_REQUEST, FailureReason::StatusOther, false),
            (StatusCode::UNAUTHORIZED, FailureReason::StatusOther, false),
            (StatusCode::NOT_FOUND, FailureReason::StatusOther, false),
            (StatusCode::MOVED_PERMANENTLY, FailureReason::StatusOther, false),
        ] {
            assert_eq!(classify_status(status), Some(reason), "{status}");
            assert_eq!(reason.is_retryable(), retry, "{status}");
        }
        assert!(FailureReason::Connect.is_retryable());
        assert!(FailureReason::Timeout.is_retryable());
        assert!(!FailureReason::InvalidRequest.is_retryable());
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let spec = spec(100, 1_000);
        // unit = 1.0 shows the ceiling: 100, 200, 400, 800, then capped at 1000.
        let ceilings: Vec<u128> = (1..=6)
            .map(|a| backoff_delay(&spec, a, None, 1.0).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(backoff_delay(&spec, 3, None, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(&spec, 3, None, 0.5), Duration::from_millis(200));
        // A huge attempt number neither overflows nor exceeds the cap.
        assert_eq!(backoff_delay(&spec, u32::MAX, None, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn one_destination_holds_at_most_its_share_of_slots() {
        assert_eq!(destination_cap(None), 64);
        assert_eq!(destination_cap(Some(4)), 64);
        assert_eq!(destination_cap(Some(100)), 200);
        assert_eq!(destination_cap(Some(1024)), MAX_IN_PROGRESS / 2);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let spec = spec(100, 1_000);
        assert_eq!(
            backoff_delay(&spec, 1, Some(Duration::from_millis(700)), 0.0),
            Duration::from_millis(700)
        );
        assert_eq!(
            backoff_delay(&spec, 1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(1)
        );
        // A shorter Retry-After does not shorten the backoff.
        assert_eq!(
            backoff_delay(&spec, 4, Some(Duration::from_millis(10)), 1.0),
            Duration::from_millis(800)
        );
    }
}

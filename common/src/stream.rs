//! JetStream names, stream settings and the connection helper shared by the services.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::{self, stream};

use crate::{Error, Result};

/// The stream that holds accepted events.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Subject prefix of [`EVENTS_STREAM`]: messages go to `events.<partition>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "events";
/// The dead-letter stream for poison messages.
pub const DLQ_STREAM: &str = "EVENTS_DLQ";
/// Subject prefix of [`DLQ_STREAM`]: `dlq.events.<partition>`.
pub const DLQ_SUBJECT_PREFIX: &str = "dlq.events";

/// Subject prefix of the live copies: the ingestor publishes each stored message again, with
/// core NATS, on `live.<tenant>`; the query API subscribes per tenant.
pub const LIVE_SUBJECT_PREFIX: &str = "live";

/// `live.<tenant>` (a valid tenant, `[a-z0-9_-]`, is a valid subject token).
pub fn live_subject(tenant: &str) -> String {
    format!("{LIVE_SUBJECT_PREFIX}.{tenant}")
}

/// `events.<partition>`.
pub fn events_subject(partition: u32) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.{partition}")
}

/// The partition of an `events.<partition>` subject.
pub fn partition_of_subject(subject: &str) -> Option<u32> {
    subject
        .strip_prefix(EVENTS_SUBJECT_PREFIX)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

/// One subject token as the services allow it in the subjects they build from names
/// (`[A-Za-z0-9_-]+`: no `.`, wildcard or whitespace).
pub fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Settings of the `EVENTS` stream (created or updated by the ingestor at start).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSettings {
    pub replicas: usize,
    /// Messages older than this are removed. The aggregator must never lag this much.
    pub max_age: Duration,
    /// Total size cap; when reached, publishes are refused (discard-new), never silently dropped.
    pub max_bytes: i64,
    /// JetStream drops a message whose `Nats-Msg-Id` it saw within this window.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 16 * 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

impl StreamSettings {
    /// The JetStream configuration of the `EVENTS` stream whose identity is `epoch` (see
    /// [`stream_epoch`]).
    pub fn events_config(&self, epoch: i64) -> stream::Config {
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            duplicate_window: self.duplicate_window,
            ..file_stream(EVENTS_STREAM, &events_description(epoch), EVENTS_SUBJECT_PREFIX)
        }
    }
}

/// How the `EVENTS` description carries the stream's epoch: `... (chute-epoch=<unix ns>)`.
const EPOCH_TAG: &str = "chute-epoch=";

fn events_description(epoch: i64) -> String {
    format!("Chute accepted events, one message per request chunk ({EPOCH_TAG}{epoch})")
}

/// The epoch written in a stream description, if any.
fn epoch_in_description(description: &str) -> Option<i64> {
    let digits = description.split(EPOCH_TAG).nth(1)?;
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The identity of the `EVENTS` stream, its **epoch**: the unix time in nanoseconds at which an
/// ingestor created it, kept in its description (`chute-epoch=<ns>`) and carried over by every
/// later update. The aggregator's ledger and dedup tokens are bound to it, so a stream deleted
/// and created again (sequences restarting at 1) is told apart from the one the ledger knows.
///
/// Not the server's `created` time: nats-server 2.9 rewrites that to the time of the last
/// configuration update when it restarts (reproduced with 2.9.10: create, update with the same
/// settings, restart, and `created` is the update's time), and every ingestor start updates the
/// stream. A stream from before the tag (no `chute-epoch` in its description) is identified by
/// its `created` time, and the next ingestor start writes that same value as its tag.
pub fn stream_epoch(info: &stream::Info) -> i64 {
    info.config
        .description
        .as_deref()
        .and_then(epoch_in_description)
        .unwrap_or_else(|| info.created.unix_timestamp_nanos() as i64)
}

/// What every Chute stream shares: its name, description, subjects `<subject_prefix>.>` and file
/// storage. The caller sets retention, limits and replicas on top (`..file_stream(...)`).
pub fn file_stream(name: &str, description: &str, subject_prefix: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        subjects: vec![format!("{subject_prefix}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates a dead-letter stream if missing (the aggregator's `EVENTS_DLQ`, the router's
/// `ROUTES_DLQ`): limits retention, entries kept 30 days, and a one-hour duplicate window, so a
/// dead letter published again (a crash before the original was acked) is stored once.
pub async fn ensure_dead_letter_stream(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    subject_prefix: &str,
    replicas: usize,
) -> Result<stream::Stream> {
    get_or_create(js, dead_letter_stream(name, description, subject_prefix, replicas)).await
}

fn dead_letter_stream(name: &str, description: &str, subject_prefix: &str, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        max_age: Duration::from_secs(30 * 86_400),
        duplicate_window: Duration::from_secs(3600),
        ..file_stream(name, description, subject_prefix)
    }
}

/// Creates the `EVENTS` stream with a new epoch, or updates the mutable settings of an existing
/// one, keeping its epoch ([`stream_epoch`]).
///
/// When another ingestor creates the stream between the lookup and the create, the create fails
/// (another epoch, so another configuration) although the stream now exists. Another attempt
/// then updates it.
pub async fn ensure_events_stream(js: &jetstream::Context, settings: &StreamSettings) -> Result<stream::Info> {
    let mut attempt = 1;
    let deadline = Instant::now() + STREAM_SETUP_WAIT;
    loop {
        match put_events_stream(js, settings).await {
            Ok(info) => return Ok(info),
            Err(err) if is_storage_exceeded(&err) => {
                return Err(Error::Stream {
                    stream: EVENTS_STREAM.to_owned(),
                    reason: storage_exceeded_reason(settings.max_bytes, &err),
                })
            }
            Err(err) if attempt < 3 => {
                tracing::debug!(error = %err, attempt, "EVENTS create raced another creator; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            // A cluster that is still electing its leaders (just started, a node lost) answers
            // late or "unavailable": wait for it, bounded.
            Err(err) if is_not_ready_yet(&err) && Instant::now() < deadline => {
                tracing::warn!(error = %err, "JetStream not ready to create EVENTS yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => {
                return Err(Error::Stream {
                    stream: EVENTS_STREAM.to_owned(),
                    reason: err.to_string(),
                })
            }
        }
    }
}

/// One attempt of [`ensure_events_stream`]: look the stream up, then update or create it.
async fn put_events_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> std::result::Result<stream::Info, CreateStreamError> {
    match js.get_stream(EVENTS_STREAM).await {
        Ok(existing) => {
            js.update_stream(settings.events_config(stream_epoch(existing.cached_info())))
                .await
        }
        Err(err) if is_stream_not_found(&err) => {
            let created = js
                .create_stream(settings.events_config(crate::validate::unix_nanos_now()))
                .await?;
            Ok(created.cached_info().clone())
        }
        Err(err) => {
            let kind = match err.kind() {
                GetStreamErrorKind::JetStream(inner) => CreateStreamErrorKind::JetStream(inner),
                // No answer (no responders, timeout): a server or cluster still starting.
                GetStreamErrorKind::Request => CreateStreamErrorKind::TimedOut,
                _ => CreateStreamErrorKind::Response,
            };
            Err(CreateStreamError::with_source(kind, err))
        }
    }
}

fn is_stream_not_found(err: &GetStreamError) -> bool {
    matches!(
        err.kind(),
        GetStreamErrorKind::JetStream(inner)
            if inner.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// How long stream setup waits for a JetStream cluster that has no leader yet.
const STREAM_SETUP_WAIT: Duration = Duration::from_secs(60);

/// A timeout or "JetStream unavailable / no leader" answer: the cluster may still be electing.
fn is_not_ready_yet(err: &CreateStreamError) -> bool {
    match err.kind() {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
        CreateStreamErrorKind::JetStream(inner) => matches!(
            inner.error_code(),
            async_nats::jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
                | async_nats::jetstream::ErrorCode::CLUSTER_NOT_LEADER
                | async_nats::jetstream::ErrorCode::STREAM_OFFLINE
        ),
        _ => false,
    }
}

/// JetStream refused to reserve the stream's `max_bytes` (10047).
fn is_storage_exceeded(err: &CreateStreamError) -> bool {
    matches!(
        err.kind(),
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == async_nats::jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
    )
}

/// What to do when JetStream cannot reserve `max_bytes`: the server's `max_file_store`
/// (by default 75% of the disk space free when it started) is smaller than the stream.
fn storage_exceeded_reason(max_bytes: i64, err: &impl std::fmt::Display) -> String {
    format!(
        "{err}: JetStream reserves the stream's whole max_bytes ({:.1} GiB) when it is created, \
         and this server cannot store that much (its jetstream max_file_store, 75% of the free \
         disk at start by default, is smaller). Lower --stream-max-bytes (CHUTE_STREAM_MAX_BYTES) \
         or give the server more disk and an explicit max_file_store",
        max_bytes as f64 / (1u64 << 30) as f64
    )
}

/// How a service authenticates to NATS (at most one way; see `NatsArgs::security`).
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An NKey seed (`SU...`): the client signs the server's nonce with it.
    NKey(String),
    /// The content of a creds file: a user JWT and its NKey seed.
    Creds(String),
}

impl std::fmt::Debug for NatsAuth {
    /// Names the method and the user, never a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user:?})"),
            Self::Token(_) => f.write_str("Token"),
            Self::NKey(_) => f.write_str("NKey"),
            Self::Creds(_) => f.write_str("Creds"),
        }
    }
}

/// TLS, authentication and the inbox prefix of a NATS connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSecurity {
    pub auth: Option<NatsAuth>,
    /// CA the server's certificate must chain to; TLS is required when set.
    pub tls_ca: Option<PathBuf>,
    /// `(certificate, key)` for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    pub inbox_prefix: String,
}

impl Default for NatsSecurity {
    fn default() -> Self {
        Self {
            auth: None,
            tls_ca: None,
            client_certificate: None,
            inbox_prefix: "_INBOX".to_owned(),
        }
    }
}

impl NatsSecurity {
    fn apply(&self, mut options: async_nats::ConnectOptions) -> std::io::Result<async_nats::ConnectOptions> {
        options = match &self.auth {
            None => options,
            Some(NatsAuth::UserPassword { user, password }) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Some(NatsAuth::Token(token)) => options.token(token.clone()),
            Some(NatsAuth::NKey(seed)) => options.nkey(seed.clone()),
            Some(NatsAuth::Creds(creds)) => options.credentials(creds)?,
        };
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options.custom_inbox_prefix(&self.inbox_prefix))
    }
}

/// How often clients ping their NATS server (see [`connect`]).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connects to NATS, retrying until `wait` has passed; afterwards the client reconnects by itself
/// forever. Fails with a message naming the URL when the server never answered, and at once
/// when the server refused the credentials or the TLS setup is wrong (retrying cannot help).
pub async fn connect(
    url: &str,
    client_name: &str,
    wait: Duration,
    security: &NatsSecurity,
) -> Result<async_nats::Client> {
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    let fail = |reason: String| Error::NatsConnect {
        url: url.to_owned(),
        reason,
    };
    loop {
        let options = async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(Duration::from_secs(2))
            // A node that stops answering without closing the connection (stalled, partitioned
            // away) is noticed after two unanswered pings, then the client moves to another
            // node of the cluster; the default (60 s) would hold publishes for minutes.
            .ping_interval(PING_INTERVAL)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| Duration::from_millis((100 * attempt as u64).min(2_000)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    // Permission violations arrive here (`-ERR 'Permissions Violation ...'`).
                    async_nats::Event::ServerError(err) => tracing::warn!(error = %err, "nats server error"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        let options = security
            .apply(options)
            .map_err(|err| fail(format!("invalid NATS credentials: {err}")))?;
        match options.connect(server_list(url)).await {
            Ok(client) => return Ok(client),
            Err(err) if is_permanent(&err) => {
                return Err(fail(format!("{err} (as {:?})", security.auth)));
            }
            Err(err) if Instant::now() + delay < deadline => {
                tracing::warn!(url, error = %err, "nats not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(err) => return Err(fail(format!("{err} (gave up after {wait:?})"))),
        }
    }
}

/// `nats://a:4222,nats://b:4222` as the list of servers async-nats takes: a client of a cluster
/// is given every node and reconnects to a surviving one by itself.
pub fn server_list(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// Refused credentials, a key that cannot sign, or a TLS setup that cannot work: a certificate
/// the other side refuses (async-nats reports these as I/O errors carrying the rustls error).
fn is_permanent(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind;
    if matches!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication | ConnectErrorKind::Tls
    ) {
        return true;
    }
    let mut cause = std::error::Error::source(err);
    while let Some(error) = cause {
        let tls = error.downcast_ref::<async_nats::rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        });
        if tls.is_some_and(is_certificate_refusal) {
            return true;
        }
        cause = error.source();
    }
    false
}

fn is_certificate_refusal(error: &async_nats::rustls::Error) -> bool {
    use async_nats::rustls::{AlertDescription, Error};
    match error {
        Error::InvalidCertificate(_) | Error::NoCertificatesPresented => true,
        Error::AlertReceived(alert) => matches!(
            alert,
            AlertDescription::BadCertificate
                | AlertDescription::CertificateRequired
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
        ),
        _ => false,
    }
}

/// `get_or_create_stream` that tolerates a concurrent creator: when two processes start at once,
/// the loser's create fails ("already in use" / "subjects overlap") although the stream now
/// exists, so a failed create is followed by a lookup.
///
/// A cluster that cannot place or create it yet (no leader, too few peers up for its replicas,
/// a timeout) is waited for, up to `STREAM_SETUP_WAIT`, as [`ensure_events_stream`] does.
pub async fn get_or_create(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream> {
    let name = config.name.clone();
    let deadline = Instant::now() + STREAM_SETUP_WAIT;
    let mut attempt = 0u32;
    loop {
        let waitable = match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(err) => {
                let waitable = is_not_ready_yet(&err) || is_no_peers(&err);
                if attempt >= 4 && !(waitable && Instant::now() < deadline) {
                    return Err(Error::Stream {
                        stream: name,
                        reason: err.to_string(),
                    });
                }
                if waitable {
                    tracing::warn!(stream = %name, error = %err, "JetStream cannot create the stream yet; retrying");
                }
                waitable
            }
        };
        if let Ok(stream) = js.get_stream(&name).await {
            return Ok(stream);
        }
        let delay = if waitable {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(50 << attempt)
        };
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Opens a KV bucket (history 1), creating it if missing. The backing stream is created
/// directly: async-nats' `create_key_value` first parses the account info, which fails against
/// NATS 2.9 (Debian's).
pub async fn open_kv_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<jetstream::kv::Store> {
    open_kv_stream(js, name, description, replicas, max_age).await?;
    js.get_key_value(name).await.map_err(|err| Error::Stream {
        stream: format!("KV_{name}"),
        reason: format!("open bucket: {err}"),
    })
}

/// The stream behind KV bucket `name` (`KV_<name>`), created if missing as [`open_kv_bucket`]
/// describes. An existing one with fewer than `replicas` replicas is scaled up (JetStream copies
/// it to the new peers): a bucket made at R1 follows when the setting is raised. If the cluster
/// cannot place the new replicas the failure is logged and the bucket is used as it is.
pub async fn open_kv_stream(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<stream::Stream> {
    let stream = get_or_create(
        js,
        stream::Config {
            max_messages_per_subject: 1,
            max_age,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..file_stream(&format!("KV_{name}"), description, &format!("$KV.{name}"))
        },
    )
    .await?;
    let existing = stream.cached_info().config.clone();
    if existing.num_replicas < replicas {
        let from = existing.num_replicas;
        match js
            .update_stream(stream::Config {
                num_replicas: replicas,
                ..existing
            })
            .await
        {
            Ok(_) => tracing::info!(stream = %format!("KV_{name}"), from, to = replicas, "bucket scaled up"),
            Err(err) => {
                tracing::warn!(stream = %format!("KV_{name}"), from, to = replicas, error = %err,
                    "could not scale the bucket up; using it as it is");
            }
        }
    }
    Ok(stream)
}

/// One message of a stream as [`read_all`] returns it.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub sequence: u64,
    /// When JetStream stored it.
    pub published: time::OffsetDateTime,
    pub headers: Option<async_nats::HeaderMap>,
    pub payload: bytes::Bytes,
}

impl StoredMessage {
    /// The value of header `name`, or "" when it is absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default()
    }
}

/// Every message `stream_name` holds when called, oldest first, read with an ordered consumer
/// (for operator tools such as `dlq list`; a stream that stops delivering for 5 s ends the read).
pub async fn read_all(js: &jetstream::Context, stream_name: &str) -> Result<Vec<StoredMessage>> {
    use futures::StreamExt;
    let failed = |err: &dyn std::fmt::Display| Error::Stream {
        stream: stream_name.to_owned(),
        reason: format!("read: {err}"),
    };
    let mut stream = js.get_stream(stream_name).await.map_err(|err| failed(&err))?;
    let stored = stream.info().await.map_err(|err| failed(&err))?.state.messages;
    let mut messages = Vec::new();
    if stored == 0 {
        return Ok(messages);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|err| failed(&err))?;
    let mut delivered = consumer.messages().await.map_err(|err| failed(&err))?;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), delivered.next()).await {
        let message = message.map_err(|err| failed(&err))?;
        let info = message.info().map_err(|err| failed(&err))?;
        let (sequence, pending, published) = (info.stream_sequence, info.pending, info.published);
        messages.push(StoredMessage {
            sequence,
            published,
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(messages)
}

/// A dead-letter stream being replayed: the stream (each replayed entry is deleted from it) and
/// its creation time in unix ns (a replay id names an entry of this incarnation of the stream).
pub struct DeadLetters {
    pub stream: stream::Stream,
    pub epoch: i128,
}

impl DeadLetters {
    /// Replays entry `sequence`: publishes its copy to `subject`, waits for the PubAck, then
    /// deletes the entry. A crash in between leaves the entry for the next replay, whose copy
    /// carries the same message id (the caller's `headers`) and is stored once. A failure names
    /// its step under `area`.
    pub async fn requeue(
        &self,
        js: &jetstream::Context,
        area: &'static str,
        sequence: u64,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<()> {
        js.publish_with_headers(subject, headers, payload)
            .await
            .map_err(|err| Error::operation(area, "replay publish", err))?
            .await
            .map_err(|err| Error::operation(area, "replay publish ack", err))?;
        self.stream
            .delete_message(sequence)
            .await
            .map_err(|err| Error::operation(area, "replay delete", err))?;
        Ok(())
    }
}

/// Dead-letter stream `stream_name` and its entries to replay, oldest first: every one, or only
/// the one with sequence `only`.
pub async fn dead_letters(
    js: &jetstream::Context,
    stream_name: &str,
    only: Option<u64>,
) -> Result<(DeadLetters, Vec<StoredMessage>)> {
    let stream = js.get_stream(stream_name).await.map_err(|err| Error::Stream {
        stream: stream_name.to_owned(),
        reason: err.to_string(),
    })?;
    let epoch = stream.cached_info().created.unix_timestamp_nanos();
    let mut messages = read_all(js, stream_name).await?;
    messages.retain(|message| only.is_none_or(|sequence| sequence == message.sequence));
    Ok((DeadLetters { stream, epoch }, messages))
}

/// Too few servers up to place the stream's replicas (10005).
fn is_no_peers(err: &CreateStreamError) -> bool {
    matches!(
        err.kind(),
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == async_nats::jetstream::ErrorCode::CLUSTER_NO_PEERS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_plain_names() {
        for token in ["acme", "pager-duty_2", "A"] {
            assert!(is_subject_token(token), "{token:?}");
        }
        for token in ["", "a.b", "*", ">", "a b", "tab\t", "ünï"] {
            assert!(!is_subject_token(token), "{token:?}");
        }
    }

    #[test]
    fn subjects_round_trip() {
        assert_eq!(events_subject(7), "events.7");
        assert_eq!(live_subject("acme"), "live.acme");
        assert_eq!(partition_of_subject("events.7"), Some(7));
        assert_eq!(partition_of_subject("events."), None);
        assert_eq!(partition_of_subject("eventsx.7"), None);
        assert_eq!(partition_of_subject("dlq.events.7"), None);
    }

    #[test]
    fn stream_configs_are_file_streams_with_their_own_limits() {
        let settings = StreamSettings::default();
        let events = settings.events_config(42);
        assert_eq!(
            (events.name.as_str(), events.subjects.as_slice()),
            ("EVENTS", &["events.>".to_owned()][..])
        );
        assert_eq!(events.storage, stream::StorageType::File);
        assert_eq!(events.retention, stream::RetentionPolicy::Limits);
        assert_eq!(events.discard, stream::DiscardPolicy::New);
        assert_eq!(events.num_replicas, settings.replicas);
        assert_eq!(events.max_age, settings.max_age);
        assert_eq!(events.max_bytes, settings.max_bytes);
        assert_eq!(events.duplicate_window, settings.duplicate_window);
        assert_eq!(
            dead_letter_stream("ROUTES_DLQ", "undeliverable", "routes_dlq", 3),
            stream::Config {
                name: "ROUTES_DLQ".to_owned(),
                description: Some("undeliverable".to_owned()),
                subjects: vec!["routes_dlq.>".to_owned()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                num_replicas: 3,
                max_age: Duration::from_secs(30 * 86_400),
                duplicate_window: Duration::from_secs(3600),
                ..Default::default()
            }
        );
    }

    #[test]
    fn the_epoch_lives_in_the_description_and_survives_an_update() {
        let settings = StreamSettings::default();
        let description = settings.events_config(1_796_066_108_844_541_853).description.unwrap();
        assert_eq!(epoch_in_description(&description), Some(1_796_066_108_844_541_853));
        assert_eq!(epoch_in_description("Chute accepted events"), None);
        assert_eq!(epoch_in_description("x (chute-epoch=)"), None);
        assert_eq!(epoch_in_description("x (chute-epoch=12)y"), Some(12));

        let created = time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let legacy_config = stream::Config {
            description: Some("Chute accepted events".to_owned()),
            ..settings.events_config(0)
        };
        let mut info: stream::Info = serde_json::from_value(serde_json::json!({
            "config": legacy_config,
            "created": "2023-11-14T22:13:20.123456789Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "0001-01-01T00:00:00Z",
                      "last_seq": 0, "last_ts": "0001-01-01T00:00:00Z", "consumer_count": 0},
        }))
        .unwrap();
        assert_eq!(info.created, created);
        // A stream from before the tag: its creation time, which the next update writes as its tag.
        let legacy = stream_epoch(&info);
        assert_eq!(legacy, 1_700_000_000_123_456_789);
        info.config = settings.events_config(legacy);
        // nats-server 2.9 reports another `created` after an update and a restart; the tag stands.
        info.created = created + time::Duration::hours(5);
        assert_eq!(stream_epoch(&info), legacy);
    }

    #[test]
    fn stream_refuses_rather_than_drops_when_full() {
        let config = StreamSettings::default().events_config(42);
        assert_eq!(config.discard, stream::DiscardPolicy::New);
        assert_eq!(config.subjects, vec!["events.>".to_string()]);
        assert_eq!(config.storage, stream::StorageType::File);
    }
}

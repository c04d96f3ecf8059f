//! Admission of gRPC calls, decided before a request body is read (a tower layer around every
//! service of the gRPC server):
//!
//! 1. **Who**: the API key in `authorization` or, with mutual TLS, the client certificate's
//!    names (`chute_common::auth`). A refused call is answered `UNAUTHENTICATED` at once; its
//!    body is never read, so a flood of large unauthenticated requests costs no memory beyond
//!    HTTP/2's flow-control windows.
//! 2. **How many**: at most `--max-concurrent-calls` calls at once across connections (a stream
//!    holds its slot until it ends); beyond that `RESOURCE_EXHAUSTED`. HTTP/2's
//!    `max_concurrent_streams` bounds each connection on top (set on the server).
//! 3. **How much**: request bytes in flight are bounded by a semaphore of
//!    `--max-inflight-bytes` permits. The body is metered message by message: a gRPC message's
//!    5-byte prefix gives its length, and the message's bytes reach the decoder only once that
//!    many permits are held. Each message's permits go to [`MessagePermits`] in arrival order;
//!    the service takes them as it receives the messages and keeps them until it has answered,
//!    so decoded requests, their encoded chunks and the publishes count until done. A message
//!    that waits longer than `--inflight-bytes-wait` fails with `RESOURCE_EXHAUSTED`; while it
//!    waits its connection's flow-control window stays closed, which pushes back on the client.
//!
//! Health checks and reflection pass without any of this.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chute_common::auth::ApiKeys;
use chute_common::telemetry::{MetricDescription, MetricKind};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::Status;

use crate::listener::ConnectionInfo;

/// Paths that are open to every caller and not metered.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The admission metrics (described by `server::run`).
pub const METRICS: &[MetricDescription] = &[
    MetricDescription {
        name: "chute_ingest_admission_refused_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "gRPC calls refused before their body was read, by reason: unauthenticated, calls (the concurrent-call cap), bytes (the in-flight bytes budget stayed full).",
        zero_at_start: true,
    },
    MetricDescription {
        name: "chute_ingest_inflight_bytes",
        kind: MetricKind::Gauge,
        unit: None,
        help: "Request bytes admitted and not yet answered (bounded by --max-inflight-bytes).",
        zero_at_start: true,
    },
];

/// The limits, from the configuration.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    pub max_concurrent_calls: usize,
    pub max_inflight_bytes: u64,
    pub inflight_bytes_wait: Duration,
}

/// The tenant admission authenticated (`None`: API keys are off), in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: Option<String>,
}

/// The bytes-budget permits of a call's messages, oldest first.
#[derive(Debug, Clone, Default)]
pub struct MessagePermits(Arc<Mutex<VecDeque<BytesPermit>>>);

impl MessagePermits {
    /// The permit of the next message the service receives; keep it until the message is done.
    pub fn take_next(&self) -> Option<BytesPermit> {
        self.0.lock().expect("permit queue").pop_front()
    }

    fn push(&self, permit: BytesPermit) {
        self.0.lock().expect("permit queue").push_back(permit);
    }
}

/// Budget held by one request message; released (and the gauge updated) on drop.
#[derive(Debug)]
pub struct BytesPermit {
    permit: OwnedSemaphorePermit,
    budget: Arc<Budget>,
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        let held = self.permit.num_permits() as u64;
        let used = self.budget.used.fetch_sub(held, std::sync::atomic::Ordering::Relaxed) - held;
        metrics::gauge!("chute_ingest_inflight_bytes").set(used as f64);
    }
}

#[derive(Debug)]
struct Budget {
    semaphore: Arc<Semaphore>,
    /// Largest single acquisition: a message larger than the whole budget takes all of it.
    capacity: u32,
    wait: Duration,
    used: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Shared {
    keys: Option<ApiKeys>,
    calls: Arc<Semaphore>,
    max_calls: usize,
    budget: Arc<Budget>,
}

/// The tower layer (`Server::builder().layer(...)`).
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

impl AdmissionLayer {
    pub fn new(keys: Option<ApiKeys>, settings: &AdmissionSettings) -> Self {
        chute_common::telemetry::describe(METRICS);
        let capacity = u32::try_from(settings.max_inflight_bytes.clamp(1, u64::from(u32::MAX))).unwrap_or(u32::MAX);
        Self {
            shared: Arc::new(Shared {
                keys,
                calls: Arc::new(Semaphore::new(settings.max_concurrent_calls.max(1))),
                max_calls: settings.max_concurrent_calls.max(1),
                budget: Arc::new(Budget {
                    semaphore: Arc::new(Semaphore::new(capacity as usize)),
                    capacity,
                    wait: settings.inflight_bytes_wait,
                    used: std::sync::atomic::AtomicU64::new(0),
                }),
            }),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn refuse<E>(reason: &'static str, status: Status) -> BoxFuture<Result<http::Response<Body>, E>>
where
    E: Send + 'static,
{
    metrics::counter!("chute_ingest_admission_refused_total", "reason" => reason).increment(1);
    tracing::debug!(
        reason,
        message = status.message(),
        "call refused before its body was read"
    );
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// The names of the caller's verified client certificate (none without mutual TLS).
fn client_names(extensions: &http::Extensions) -> &[String] {
    extensions
        .get::<ConnectionInfo>()
        .map_or(&[], |connection| connection.client.names())
}

impl<S> tower::Service<http::Request<Body>> for Admission<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if OPEN_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
            return Box::pin(self.inner.call(request));
        }
        let shared = &self.shared;
        let tenant = match &shared.keys {
            None => None,
            Some(keys) => {
                let authorization = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|value| value.to_str().ok());
                match keys.authenticate_caller(authorization, client_names(request.extensions())) {
                    Ok(tenant) => Some(tenant.to_owned()),
                    Err(err) => return refuse("unauthenticated", Status::unauthenticated(err.to_string())),
                }
            }
        };
        let Ok(call) = shared.calls.clone().try_acquire_owned() else {
            let message = format!(
                "the ingestor is serving its maximum of {} concurrent calls: retry with backoff",
                shared.max_calls
            );
            return refuse("calls", Status::resource_exhausted(message));
        };
        let permits = MessagePermits::default();
        request.extensions_mut().insert(Caller { tenant });
        request.extensions_mut().insert(permits.clone());
        let budget = shared.budget.clone();
        let request = request.map(|body| Body::new(MeteredBody::new(body, budget, permits)));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The call's slot is held until the response body (a stream's answers) is done.
            Ok(response.map(|body| Body::new(HoldPermit { body, _call: call })))
        })
    }
}

/// A response body that keeps the call's concurrency slot until it is dropped.
struct HoldPermit {
    body: Body,
    _call: OwnedSemaphorePermit,
}

impl http_body::Body for HoldPermit {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where the gRPC framing of a request body stands (see [`MeteredBody`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Framing {
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// The permits of the message whose header is being completed are held.
    admitted: bool,
}

/// What [`Framing::scan`] found in a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Everything may go to the decoder.
    Pass,
    /// The bytes before `at` may go; the byte at `at` completes the header of a message of
    /// `message_len` bytes, which needs its permits first.
    Admit { at: usize, message_len: u32 },
}

impl Framing {
    /// Walks `data`, the next bytes of the body. Stops before the last byte of each message
    /// header until [`Framing::admitted`] is called.
    pub fn scan(&mut self, data: &[u8]) -> Scan {
        let mut at = 0;
        while at < data.len() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() - at);
                self.remaining -= take;
                at += take;
                continue;
            }
            if self.header_len == 4 && !self.admitted {
                let [_, a, b, c, _] = self.header;
                return Scan::Admit {
                    at,
                    message_len: u32::from_be_bytes([a, b, c, data[at]]),
                };
            }
            self.header[self.header_len] = data[at];
            self.header_len += 1;
            at += 1;
            if self.header_len == 5 {
                let [_, a, b, c, d] = self.header;
                self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                self.header_len = 0;
                self.admitted = false;
            }
        }
        Scan::Pass
    }

    /// The permits of the message [`Scan::Admit`] named are held.
    pub fn admitted(&mut self) {
        self.admitted = true;
    }
}

/// A request body whose messages pass to the decoder only with their bytes-budget permits.
pub struct MeteredBody {
    inner: Body,
    budget: Arc<Budget>,
    permits: MessagePermits,
    framing: Framing,
    /// Bytes read from `inner` and not yet passed on.
    pending: Option<Bytes>,
    acquiring: Option<BoxFuture<Result<BytesPermit, Status>>>,
}

impl MeteredBody {
    fn new(inner: Body, budget: Arc<Budget>, permits: MessagePermits) -> Self {
        Self {
            inner,
            budget,
            permits,
            framing: Framing::default(),
            pending: None,
            acquiring: None,
        }
    }

    fn acquire(&self, message_len: u32) -> BoxFuture<Result<BytesPermit, Status>> {
        let budget = self.budget.clone();
        Box::pin(async move {
            let wanted = message_len.clamp(1, budget.capacity);
            let acquired = tokio::time::timeout(budget.wait, budget.semaphore.clone().acquire_many_owned(wanted)).await;
            match acquired {
                Ok(Ok(permit)) => {
                    let used = budget
                        .used
                        .fetch_add(u64::from(wanted), std::sync::atomic::Ordering::Relaxed)
                        + u64::from(wanted);
                    metrics::gauge!("chute_ingest_inflight_bytes").set(used as f64);
                    Ok(BytesPermit { permit, budget })
                }
                Ok(Err(_closed)) => Err(Status::unavailable("the ingestor is shutting down")),
                Err(_elapsed) => {
                    metrics::counter!("chute_ingest_admission_refused_total", "reason" => "bytes").increment(1);
                    Err(Status::resource_exhausted(format!(
                        "the ingestor's request memory budget ({} bytes) stayed full for {:?}: retry with backoff",
                        budget.capacity, budget.wait
                    )))
                }
            }
        })
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(acquiring) = this.acquiring.as_mut() {
                let acquired = ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                match acquired {
                    Ok(permit) => {
                        this.permits.push(permit);
                        this.framing.admitted();
                    }
                    Err(status) => return Poll::Ready(Some(Err(status))),
                }
            }
            if let Some(mut data) = this.pending.take() {
                match this.framing.scan(&data) {
                    Scan::Pass => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Scan::Admit { at, message_len } => {
                        let ready_part = data.split_to(at);
                        this.pending = Some(data);
                        this.acquiring = Some(this.acquire(message_len));
                        if !ready_part.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(ready_part))));
                        }
                        continue;
                    }
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = Some(data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.acquiring.is_none() && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    /// Feeds `chunks` through a framing, admitting every message; returns the lengths asked for.
    fn admitted_lengths(chunks: &[&[u8]]) -> Vec<u32> {
        let mut framing = Framing::default();
        let mut asked = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            loop {
                match framing.scan(rest) {
                    Scan::Pass => break,
                    Scan::Admit { at, message_len } => {
                        asked.push(message_len);
                        framing.admitted();
                        rest = &rest[at..];
                    }
                }
            }
        }
        asked
    }

    #[test]
    fn every_message_is_admitted_once_whatever_the_chunking() {
        let mut body = message(3);
        body.extend(message(0));
        body.extend(message(300));
        body.extend(message(70_000));
        for chunk_size in [1, 2, 4, 5, 6, 7, 64, 1024, body.len()] {
            let chunks: Vec<&[u8]> = body.chunks(chunk_size).collect();
            assert_eq!(admitted_lengths(&chunks), [3, 0, 300, 70_000], "chunks of {chunk_size}");
        }
    }

    #[test]
    fn nothing_past_a_header_passes_before_admission() {
        let body = message(10);
        let mut framing = Framing::default();
        assert_eq!(framing.scan(&body[..4]), Scan::Pass);
        // The fifth byte completes the header: it waits, and so does the rest.
        assert_eq!(framing.scan(&body[4..]), Scan::Admit { at: 0, message_len: 10 });
        assert_eq!(framing.scan(&body[4..]), Scan::Admit { at: 0, message_len: 10 });
        framing.admitted();
        assert_eq!(framing.scan(&body[4..]), Scan::Pass);
        // The next message waits again, at its own fifth byte.
        assert_eq!(framing.scan(&message(2)), Scan::Admit { at: 4, message_len: 2 });
    }

    #[tokio::test]
    async fn a_metered_body_holds_the_budget_until_its_permits_are_dropped() {
        use http_body_util::BodyExt;
        let layer = AdmissionLayer::new(
            None,
            &AdmissionSettings {
                max_concurrent_calls: 4,
                max_inflight_bytes: 100,
                inflight_bytes_wait: Duration::from_millis(200),
            },
        );
        let budget = layer.shared.budget.clone();
        let body = |lengths: &[u32]| {
            let bytes: Vec<u8> = lengths.iter().flat_map(|len| message(*len)).collect();
            Body::new(http_body_util::Full::new(Bytes::from(bytes)))
        };
        let first = MessagePermits::default();
        let collected = MeteredBody::new(body(&[60, 30]), budget.clone(), first.clone())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(collected.len(), 60 + 30 + 10);
        assert_eq!(budget.semaphore.available_permits(), 10);

        // 60 + 30 held: a 40-byte message waits, then fails with RESOURCE_EXHAUSTED.
        let refused = MeteredBody::new(body(&[40]), budget.clone(), MessagePermits::default())
            .collect()
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

        // The service answers the first message: its 60 bytes come back, and 40 fit.
        drop(first.take_next());
        let admitted = MeteredBody::new(body(&[40]), budget.clone(), MessagePermits::default())
            .collect()
            .await;
        assert!(admitted.is_ok());
        assert_eq!(
            budget.semaphore.available_permits(),
            70,
            "30 still held by the first call"
        );
        drop(first);
        assert_eq!(budget.semaphore.available_permits(), 100);
    }
}

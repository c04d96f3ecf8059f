//! gRPC I/O: `Publish` and `PublishStream` with pre-encoded requests, retries with the same
//! idempotency key.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use chute_proto::v1::PublishResponse;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::stats::{Outcome, Recorder};

const PUBLISH_PATH: &str = "/chute.v1.IngestService/Publish";
const PUBLISH_STREAM_PATH: &str = "/chute.v1.IngestService/PublishStream";

/// A `PublishRequest` on the wire: a template's encoded events and the key field.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub events: Bytes,
    pub key_field: Bytes,
    pub event_count: u64,
}

/// One request to send: its sequence number and when it was meant to leave.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: RawRequest,
    pub intended: Instant,
    pub attempts: u32,
}

/// Sends [`RawRequest`] bytes as they are and decodes `PublishResponse`s.
#[derive(Debug, Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = RawRequest;
    type Decode = PublishResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = RawRequest;
    type Error = Status;

    fn encode(&mut self, item: RawRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.events);
        dst.put_slice(&item.key_field);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = PublishResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PublishResponse>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        PublishResponse::decode(bytes)
            .map(Some)
            .map_err(|err| Status::internal(format!("undecodable PublishResponse: {err}")))
    }
}

fn connect_error(url: &str, reason: String) -> Error {
    Error::Connect {
        url: url.to_owned(),
        reason,
    }
}

/// Connection settings shared by every call.
#[derive(Clone)]
pub struct Client {
    channels: Arc<Vec<Channel>>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
    max_attempts: u32,
    /// `--protocol otlp-*`: requests go out as OTLP exports through this client instead.
    otlp: Option<Arc<crate::otlp::OtlpClient>>,
}

impl Client {
    /// Opens `connections` HTTP/2 connections to `urls` (`http://host:port`, or several
    /// comma-separated: the connections go round-robin over them, at least one each).
    pub async fn connect(
        urls: &str,
        connections: usize,
        api_key: Option<&str>,
        timeout: Duration,
        max_retries: u32,
    ) -> Result<Self> {
        let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
        if urls.is_empty() {
            return Err(Error::Config("no ingestor address given".into()));
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in &urls {
            let endpoint = Endpoint::from_shared((*url).to_owned())
                .map_err(|err| connect_error(url, err.to_string()))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .http2_adaptive_window(true)
                .timeout(timeout);
            endpoints.push(endpoint);
        }
        let count = connections.max(urls.len());
        let mut channels = Vec::with_capacity(count);
        for i in 0..count {
            let endpoint = &endpoints[i % endpoints.len()];
            channels.push(
                endpoint
                    .connect()
                    .await
                    .map_err(|err| connect_error(urls[i % urls.len()], format!("{err:?}")))?,
            );
        }
        let authorization = api_key
            .map(|key| format!("Bearer {key}").parse())
            .transpose()
            .map_err(|_| Error::Config("the API key is not a valid header value".into()))?;
        Ok(Self {
            channels: Arc::new(channels),
            authorization,
            timeout,
            max_attempts: max_retries + 1,
            otlp: None,
        })
    }

    /// Sends every unary request as an OTLP export through `otlp` (see [`crate::otlp`]).
    pub fn with_otlp(mut self, otlp: crate::otlp::OtlpClient) -> Self {
        self.otlp = Some(Arc::new(otlp));
        self
    }

    fn channel(&self, index: usize) -> Channel {
        self.channels[index % self.channels.len()].clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }

    /// Publishes one request with unary `Publish`, retrying retryable failures with the same
    /// key, and records the outcome measured from `job.intended`.
    pub async fn publish(&self, connection: usize, mut job: Job, recorder: &Recorder) {
        if let Some(otlp) = &self.otlp {
            return otlp.publish(connection, job, recorder).await;
        }
        let mut grpc = tonic::client::Grpc::new(self.channel(connection));
        recorder.inflight.fetch_add(1, Ordering::Relaxed);
        let outcome = loop {
            job.attempts += 1;
            recorder.requests_sent.fetch_add(1, Ordering::Relaxed);
            let result = match grpc.ready().await {
                Ok(()) => {
                    let call = grpc.unary(
                        self.request(job.request.clone()),
                        PathAndQuery::from_static(PUBLISH_PATH),
                        RawCodec,
                    );
                    match tokio::time::timeout(self.timeout, call).await {
                        Ok(result) => result.map(tonic::Response::into_inner),
                        Err(_) => Err(Status::deadline_exceeded("client timeout")),
                    }
                }
                Err(err) => Err(Status::unavailable(err.to_string())),
            };
            match result {
                Ok(response) => {
                    break Outcome::Acked {
                        accepted: u64::from(response.accepted),
                        rejected: u64::from(response.rejected),
                    }
                }
                Err(status) => {
                    recorder.error(status.code());
                    if !retryable(status.code()) || job.attempts >= self.max_attempts {
                        break Outcome::Failed {
                            events: job.request.event_count,
                            maybe_stored: maybe_stored(status.code()),
                        };
                    }
                    recorder.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff(job.attempts)).await;
                }
            }
        };
        recorder.inflight.fetch_sub(1, Ordering::Relaxed);
        recorder.finish(outcome, job.intended.elapsed());
    }

    /// Runs one `PublishStream` until `jobs` closes and every sent request is answered. At most
    /// `window` requests are in flight; on a stream failure the unanswered requests are resent
    /// on a new stream (same keys), up to the retry limit each. With `restamp` (closed loop) a
    /// request's latency starts when the stream takes it, not when it was queued.
    pub async fn stream_worker(
        &self,
        connection: usize,
        mut jobs: mpsc::Receiver<Job>,
        window: usize,
        restamp: bool,
        recorder: Arc<Recorder>,
    ) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        let mut jobs_open = true;
        while jobs_open || !pending.is_empty() {
            let (sender, receiver) = mpsc::channel::<RawRequest>(window.max(1));
            let mut grpc = tonic::client::Grpc::new(self.channel(connection));
            let opened = match grpc.ready().await {
                Ok(()) => grpc
                    .streaming(
                        self.request(tokio_stream::wrappers::ReceiverStream::new(receiver)),
                        PathAndQuery::from_static(PUBLISH_STREAM_PATH),
                        RawCodec,
                    )
                    .await
                    .map(tonic::Response::into_inner),
                Err(err) => Err(Status::unavailable(err.to_string())),
            };
            let failure = match opened {
                Ok(mut responses) => {
                    // Resend what the previous stream left unanswered, in order.
                    for job in &pending {
                        recorder.requests_sent.fetch_add(1, Ordering::Relaxed);
                        let _ = sender.send(job.request.clone()).await;
                    }
                    self.drive_stream(
                        &mut jobs,
                        &mut jobs_open,
                        &mut pending,
                        &sender,
                        &mut responses,
                        window,
                        restamp,
                        &recorder,
                    )
                    .await
                }
                Err(status) => Some(status),
            };
            let Some(status) = failure else { continue };
            recorder.error(status.code());
            let mut kept = VecDeque::with_capacity(pending.len());
            for mut job in pending.drain(..) {
                job.attempts += 1;
                if !retryable(status.code()) || job.attempts >= self.max_attempts {
                    recorder.inflight.fetch_sub(1, Ordering::Relaxed);
                    let outcome = Outcome::Failed {
                        events: job.request.event_count,
                        maybe_stored: maybe_stored(status.code()),
                    };
                    recorder.finish(outcome, job.intended.elapsed());
                } else {
                    recorder.retries.fetch_add(1, Ordering::Relaxed);
                    kept.push_back(job);
                }
            }
            pending = kept;
            tokio::time::sleep(backoff(1)).await;
        }
    }

    /// Feeds and reads one open stream; returns the status that broke it, or `None` when all
    /// jobs are done.
    #[allow(clippy::too_many_arguments)]
    async fn drive_stream(
        &self,
        jobs: &mut mpsc::Receiver<Job>,
        jobs_open: &mut bool,
        pending: &mut VecDeque<Job>,
        sender: &mpsc::Sender<RawRequest>,
        responses: &mut tonic::Streaming<PublishResponse>,
        window: usize,
        restamp: bool,
        recorder: &Recorder,
    ) -> Option<Status> {
        loop {
            if !*jobs_open && pending.is_empty() {
                return None;
            }
            let room = *jobs_open && pending.len() < window;
            tokio::select! {
                job = jobs.recv(), if room => match job {
                    Some(mut job) => {
                        if restamp {
                            job.intended = Instant::now();
                        }
                        recorder.inflight.fetch_add(1, Ordering::Relaxed);
                        recorder.requests_sent.fetch_add(1, Ordering::Relaxed);
                        let request = job.request.clone();
                        pending.push_back(job);
                        if sender.send(request).await.is_err() {
                            return Some(Status::unavailable("request stream closed"));
                        }
                    }
                    None => *jobs_open = false,
                },
                response = tokio::time::timeout(self.timeout, responses.next()), if !pending.is_empty() => {
                    match response {
                        Ok(Some(Ok(response))) => {
                            let job = pending.pop_front().expect("a response answers a pending request");
                            recorder.inflight.fetch_sub(1, Ordering::Relaxed);
                            let outcome = Outcome::Acked {
                                accepted: u64::from(response.accepted),
                                rejected: u64::from(response.rejected),
                            };
                            recorder.finish(outcome, job.intended.elapsed());
                        }
                        Ok(Some(Err(status))) => return Some(status),
                        Ok(None) => return Some(Status::unavailable("response stream ended early")),
                        Err(_) => return Some(Status::deadline_exceeded("no response within the request timeout")),
                    }
                }
            }
        }
    }
}

/// Failures worth retrying with the same key.
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

/// Failures after which the events may have been stored anyway.
pub fn maybe_stored(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied | Code::OutOfRange | Code::Unimplemented
    )
}

/// Delay before retry `attempt` (1-based): 50 ms doubling, capped at 1 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_by_code() {
        assert!(retryable(Code::Unavailable) && maybe_stored(Code::Unavailable));
        assert!(retryable(Code::DeadlineExceeded) && maybe_stored(Code::DeadlineExceeded));
        assert!(!retryable(Code::InvalidArgument) && !maybe_stored(Code::InvalidArgument));
        assert!(!retryable(Code::Unauthenticated));
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(1));
    }
}

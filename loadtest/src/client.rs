//! gRPC I/O: `Publish` and `PublishStream` with pre-encoded requests, retries with the same
//! idempotency key.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chute_proto::v1::PublishResponse;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Status;

use crate::call::{
    backoff, bearer, connect_channels, maybe_stored, publish_with_retries, retryable, Answer, Job, PreEncodedCodec,
    RawRequest, RetryPolicy,
};
use crate::error::Result;
use crate::otlp::{OtlpClient, Protocol};
use crate::stats::{Outcome, Recorder};

const PUBLISH_PATH: &str = "/chute.v1.IngestService/Publish";
const PUBLISH_STREAM_PATH: &str = "/chute.v1.IngestService/PublishStream";

/// Sends [`RawRequest`] bytes as they are and decodes `PublishResponse`s.
type RawCodec = PreEncodedCodec<RawRequest, PublishResponse>;

/// Connection settings shared by every call.
#[derive(Clone)]
pub struct Client {
    channels: Arc<Vec<Channel>>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    policy: RetryPolicy,
    /// `--protocol otlp-*`: requests go out as OTLP exports through this client instead.
    otlp: Option<Arc<OtlpClient>>,
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
        Ok(Self {
            channels: Arc::new(connect_channels(urls, connections, timeout).await?),
            authorization: bearer(api_key)?,
            policy: RetryPolicy::new(timeout, max_retries),
            otlp: None,
        })
    }
    /// Sends every unary request as an OTLP export instead (see [`crate::otlp`]): over this
    /// client's channels for `otlp-grpc`, to `otlp_http_url` for `otlp-http`; same API key and
    /// retry policy.
    pub fn with_otlp(mut self, protocol: Protocol, otlp_http_url: &str) -> Result<Self> {
        let otlp = OtlpClient::new(
            protocol,
            self.channels.to_vec(),
            otlp_http_url,
            self.channels.len(),
            self.authorization.clone(),
            self.policy,
        )?;
        self.otlp = Some(Arc::new(otlp));
        Ok(self)
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
    pub async fn publish(&self, connection: usize, job: Job, recorder: &Recorder) {
        if let Some(otlp) = &self.otlp {
            return otlp.publish(connection, job, recorder).await;
        }
        publish_with_retries(job, self.policy, recorder, |request| {
            let mut grpc = tonic::client::Grpc::new(self.channel(connection));
            let call = self.request(request.clone());
            async move {
                grpc.ready().await.map_err(|err| Status::unavailable(err.to_string()))?;
                let response = grpc
                    .unary(call, PathAndQuery::from_static(PUBLISH_PATH), RawCodec::default())
                    .await?
                    .into_inner();
                Ok(Answer {
                    accepted: u64::from(response.accepted),
                    rejected: u64::from(response.rejected),
                })
            }
        })
        .await;
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
                        RawCodec::default(),
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
                if !retryable(status.code()) || job.attempts >= self.policy.max_attempts {
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
                response = tokio::time::timeout(self.policy.timeout, responses.next()), if !pending.is_empty() => {
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

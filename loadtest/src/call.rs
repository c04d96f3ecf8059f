//! One call, whichever protocol carries it: the job, the retry policy (which failures to retry
//! with the same bytes, the backoff, what a failure may have stored), the unary retry loop, and
//! the gRPC plumbing both senders use (channels, a codec for pre-encoded requests).
//! [`crate::client`] (`chute.v1`) and [`crate::otlp`] (OTLP exports) only say how one attempt
//! goes out and what its answer counts.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use chute_proto::codec::{PairCodec, ProstDecoder};
use tonic::codec::{EncodeBuf, Encoder};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::stats::{Outcome, Recorder};

/// A `PublishRequest` on the wire: a template's encoded events and the key field. The OTLP
/// sender puts a whole encoded export in `events` and leaves `key_field` empty.
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

/// An answered attempt: the events the server took and the ones it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub accepted: u64,
    pub rejected: u64,
}

/// How long one attempt may take and how many a job gets.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub timeout: Duration,
    pub max_attempts: u32,
}

impl RetryPolicy {
    pub fn new(timeout: Duration, max_retries: u32) -> Self {
        Self {
            timeout,
            max_attempts: max_retries + 1,
        }
    }
}

/// Sends `job` with `attempt` until it is answered, fails with a code not worth retrying or has
/// used its attempts (same bytes each time: the server dedups a retry by its key), and records
/// the outcome measured from `job.intended`.
pub async fn publish_with_retries<F, Fut>(mut job: Job, policy: RetryPolicy, recorder: &Recorder, mut attempt: F)
where
    F: FnMut(&RawRequest) -> Fut,
    Fut: Future<Output = Result<Answer, Status>>,
{
    recorder.inflight.fetch_add(1, Ordering::Relaxed);
    let outcome = loop {
        job.attempts += 1;
        recorder.requests_sent.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(policy.timeout, attempt(&job.request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("client timeout")));
        match result {
            Ok(Answer { accepted, rejected }) => break Outcome::Acked { accepted, rejected },
            Err(status) => {
                recorder.error(status.code());
                if !retryable(status.code()) || job.attempts >= policy.max_attempts {
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

/// Opens `connections` HTTP/2 connections to `urls` (`http://host:port`, or several
/// comma-separated: the connections go round-robin over them, at least one each).
pub async fn connect_channels(urls: &str, connections: usize, timeout: Duration) -> Result<Vec<Channel>> {
    let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
    if urls.is_empty() {
        return Err(Error::Config("no ingestor address given".into()));
    }
    let connect_error = |url: &str, reason: String| Error::Connect {
        url: url.to_owned(),
        reason,
    };
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
        let channel = endpoints[i % endpoints.len()]
            .connect()
            .await
            .map_err(|err| connect_error(urls[i % urls.len()], format!("{err:?}")))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// `authorization: Bearer <key>` as gRPC metadata (also a valid HTTP header value).
pub fn bearer(api_key: Option<&str>) -> Result<Option<MetadataValue<Ascii>>> {
    api_key
        .map(|key| format!("Bearer {key}").parse())
        .transpose()
        .map_err(|_| Error::Config("the API key is not a valid header value".into()))
}

/// A request whose protobuf bytes are ready: the codec copies them as they are.
pub trait PreEncoded: Send + 'static {
    fn put(&self, dst: &mut EncodeBuf<'_>);
}

impl PreEncoded for Bytes {
    fn put(&self, dst: &mut EncodeBuf<'_>) {
        dst.put_slice(self);
    }
}

impl PreEncoded for RawRequest {
    fn put(&self, dst: &mut EncodeBuf<'_>) {
        dst.put_slice(&self.events);
        dst.put_slice(&self.key_field);
    }
}

/// Sends `Request`s as they are encoded and decodes `Response` with prost.
pub type PreEncodedCodec<Request, Response> = PairCodec<PreEncodedEncoder<Request>, ProstDecoder<Response>>;

pub struct PreEncodedEncoder<Request>(PhantomData<fn(Request)>);

impl<Request> Default for PreEncodedEncoder<Request> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Request: PreEncoded> Encoder for PreEncodedEncoder<Request> {
    type Item = Request;
    type Error = Status;

    fn encode(&mut self, item: Request, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.put(dst);
        Ok(())
    }
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

    fn job(event_count: u64) -> Job {
        Job {
            request: RawRequest {
                events: Bytes::from_static(b"events"),
                key_field: Bytes::new(),
                event_count,
            },
            intended: Instant::now(),
            attempts: 0,
        }
    }

    fn counts(recorder: &Recorder) -> [u64; 6] {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        [
            load(&recorder.requests_sent),
            load(&recorder.retries),
            load(&recorder.requests_acked),
            load(&recorder.events_acked),
            load(&recorder.events_failed),
            load(&recorder.inflight),
        ]
    }

    #[tokio::test]
    async fn a_retryable_failure_is_sent_again_with_the_same_bytes_until_answered() {
        let recorder = Recorder::default();
        let policy = RetryPolicy::new(Duration::from_secs(5), 3);
        let mut seen = Vec::new();
        publish_with_retries(job(7), policy, &recorder, |request| {
            seen.push(request.events.clone());
            let attempt = seen.len();
            async move {
                match attempt {
                    1 => Err(Status::unavailable("down")),
                    2 => Err(Status::deadline_exceeded("slow")),
                    _ => Ok(Answer {
                        accepted: 6,
                        rejected: 1,
                    }),
                }
            }
        })
        .await;
        assert_eq!(seen, vec![Bytes::from_static(b"events"); 3]);
        // sent, retries, acked requests, acked events, failed events, in flight
        assert_eq!(counts(&recorder), [3, 2, 1, 6, 0, 0]);
        assert_eq!(recorder.events_rejected.load(Ordering::Relaxed), 1);
        assert_eq!(recorder.error_count(), 2);
    }

    #[tokio::test]
    async fn a_final_failure_or_the_last_attempt_ends_the_job_as_failed() {
        let recorder = Recorder::default();
        let policy = RetryPolicy::new(Duration::from_secs(5), 3);
        publish_with_retries(job(4), policy, &recorder, |_| async {
            Err(Status::invalid_argument("bad"))
        })
        .await;
        assert_eq!(counts(&recorder), [1, 0, 0, 0, 4, 0]);
        assert_eq!(
            recorder.events_unknown.load(Ordering::Relaxed),
            0,
            "refused: not stored"
        );

        // An attempt that never answers times out; with no retries left the events may be stored.
        let recorder = Recorder::default();
        let policy = RetryPolicy::new(Duration::from_millis(20), 0);
        let started = Instant::now();
        publish_with_retries(job(5), policy, &recorder, |_| std::future::pending()).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert_eq!(counts(&recorder), [1, 0, 0, 0, 5, 0]);
        assert_eq!(recorder.events_unknown.load(Ordering::Relaxed), 5);
        assert_eq!(recorder.errors().get("DeadlineExceeded"), Some(&1));
    }
}

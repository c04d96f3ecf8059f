//! OTLP/HTTP: `POST /v1/traces` and `POST /v1/logs`, protobuf (`application/x-protobuf`) or the
//! OTLP JSON mapping (`application/json`), optionally `Content-Encoding: gzip`.
//!
//! Answers follow the OTLP/HTTP spec: 200 with the export response (its `partial_success` naming
//! rejected items) in the request's encoding; 4xx/5xx with a `google.rpc.Status` body in the
//! request's encoding (JSON when the content type was not understood); 503 with `Retry-After`
//! when JetStream could not store the export, so exporters retry it.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chute_common::tls::ClientIdentity;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::decode::{self, Lenient};
use super::export::Otlp;
use super::mapping::MapItem;
use super::signal::{Logs, OtlpSignal, Traces, Transport};
use crate::admission::AdmissionSettings;
use crate::error::{Error, ErrorCode};
use crate::telemetry;

/// Seconds an exporter is asked to wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// The OTLP/HTTP routes. `max_body_bytes` bounds the body as sent and after gzip; `limits`
/// bound the requests in progress and their bytes (the gRPC admission layer's settings, with
/// budgets of their own).
pub fn router(otlp: Otlp, max_body_bytes: usize, limits: &AdmissionSettings) -> Router {
    let state = HttpState {
        otlp,
        max_body_bytes,
        calls: Arc::new(Semaphore::new(limits.max_concurrent_calls.max(1))),
        bytes: Arc::new(Semaphore::new(
            usize::try_from(limits.max_inflight_bytes)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        )),
        bytes_wait: limits.inflight_bytes_wait,
    };
    Router::new()
        .route("/v1/traces", post(export::<Traces>))
        .route("/v1/logs", post(export::<Logs>))
        .with_state(state)
}

#[derive(Clone)]
struct HttpState {
    otlp: Otlp,
    max_body_bytes: usize,
    /// `--max-concurrent-calls` requests in progress at once; more are answered 429.
    calls: Arc<Semaphore>,
    /// `--max-inflight-bytes`: a request holds its body's bytes (its Content-Length, else the
    /// body limit) from before the body is read until it is answered.
    bytes: Arc<Semaphore>,
    bytes_wait: Duration,
}

/// The permits a request holds until it is answered.
struct Admitted {
    _call: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Takes a call slot at once and the body's bytes within `bytes_wait`; else 429 (retryable:
/// OTLP exporters back off and send again).
async fn admit(state: &HttpState, headers: &HeaderMap) -> Result<Admitted, Failure> {
    let too_many = |message: String| Failure {
        code: ErrorCode::TooManyRequests,
        message,
    };
    let call = state
        .calls
        .clone()
        .try_acquire_owned()
        .map_err(|_| too_many("too many OTLP/HTTP requests in progress (--max-concurrent-calls)".into()))?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(state.max_body_bytes);
    // At least one permit, at most the body limit (a longer body is refused while read).
    let wanted = u32::try_from(declared.clamp(1, state.max_body_bytes.max(1))).unwrap_or(u32::MAX);
    let bytes = tokio::time::timeout(state.bytes_wait, state.bytes.clone().acquire_many_owned(wanted))
        .await
        .map_err(|_| {
            too_many(format!(
                "no room for {wanted} request bytes within {:?} (--max-inflight-bytes)",
                state.bytes_wait
            ))
        })?
        .expect("the semaphore is never closed");
    Ok(Admitted {
        _call: call,
        _bytes: bytes,
    })
}

/// The two encodings OTLP/HTTP defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// `google.rpc.Status`, the body of every OTLP/HTTP error.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// An error answer: its code (the HTTP status and the `Status` body's gRPC code, from
/// [`ErrorCode`]'s one table) and message.
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
        }
    }

    fn too_large(limit: usize) -> Self {
        Self {
            code: ErrorCode::TooLarge,
            message: format!("body larger than {limit} bytes"),
        }
    }

    fn response(self, encoding: Encoding) -> Response {
        let status = RpcStatus {
            code: self.code.grpc_code() as i32,
            message: self.message,
            details: Vec::new(),
        };
        let body = match encoding {
            Encoding::Protobuf => status.encode_to_vec(),
            Encoding::Json => serde_json::json!({ "code": status.code, "message": status.message })
                .to_string()
                .into_bytes(),
        };
        let mut response = (
            self.code.http_status(),
            [(header::CONTENT_TYPE, encoding.content_type())],
            body,
        )
            .into_response();
        if self.code.is_retryable() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// `POST /v1/traces` or `/v1/logs`.
async fn export<S: OtlpSignal>(State(state): State<HttpState>, request: Request) -> Response
where
    S::Item: MapItem,
{
    let state = &state;
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // The verified client certificate's names (empty without mutual TLS).
    let client_names = parts
        .extensions
        .get::<ConnectInfo<ClientIdentity>>()
        .map_or(&[][..], |ConnectInfo(client)| client.names());
    let started = Instant::now();
    // Errors before the content type is known are answered in JSON.
    let mut encoding = Encoding::Json;
    let result = async {
        encoding = request_encoding(headers)?;
        let _admitted = admit(state, headers).await?;
        let body = read_body(headers, body, state.max_body_bytes).await?;
        let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        let key_tenant = state.otlp.authenticate(authorization, client_names).map_err(failure)?;
        let key_tenant = key_tenant.as_deref();
        let Lenient { request, undecodable } = decode_export::<S>(encoding, body)?;
        let outcome = state
            .otlp
            .export::<S>(key_tenant, &request, undecodable)
            .await
            .map_err(failure)?;
        let response = encode(encoding, &outcome.response::<S>());
        Ok::<_, Failure>(response)
    }
    .await;
    let (code, response) = match result {
        Ok(body) => (
            tonic::Code::Ok,
            (StatusCode::OK, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response(),
        ),
        Err(failure) => (failure.code.grpc_code(), failure.response(encoding)),
    };
    telemetry::request_finished(S::SIGNAL.method(Transport::Http), code, started.elapsed());
    response
}

/// The service error as an HTTP answer: its [`ErrorCode`] gives both statuses.
fn failure(err: Error) -> Failure {
    Failure {
        code: err.code(),
        message: err.to_string(),
    }
}

fn request_encoding(headers: &HeaderMap) -> Result<Encoding, Failure> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    match media_type.to_ascii_lowercase().as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(Failure {
            code: ErrorCode::UnsupportedMediaType,
            message: format!(
                "unsupported content type {content_type:?}: send application/x-protobuf or application/json"
            ),
        }),
    }
}

/// The body, gunzipped when `Content-Encoding: gzip`, at most `limit` bytes either way.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Failure> {
    let bytes = to_bytes(body, limit).await.map_err(|err| {
        if std::error::Error::source(&err).is_some_and(|source| source.is::<http_body_util::LengthLimitError>()) {
            Failure::too_large(limit)
        } else {
            Failure::bad_request(format!("could not read the body: {err}"))
        }
    })?;
    let content_encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match content_encoding.as_str() {
        "identity" | "" => Ok(bytes),
        "gzip" => {
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut decoded)
                .map_err(|err| Failure::bad_request(format!("invalid gzip body: {err}")))?;
            if decoded.len() > limit {
                return Err(Failure::too_large(limit));
            }
            Ok(Bytes::from(decoded))
        }
        other => Err(Failure {
            code: ErrorCode::UnsupportedMediaType,
            message: format!("unsupported content encoding {other:?}: send gzip or none"),
        }),
    }
}

/// Protobuf through the lenient decoder (an undecodable item is rejected alone); JSON with the
/// OTLP JSON mapping (a JSON error refuses the whole export: the text has no item boundaries
/// to recover at).
fn decode_export<S: OtlpSignal>(encoding: Encoding, body: Bytes) -> Result<Lenient<S::Request>, Failure> {
    match encoding {
        Encoding::Protobuf => {
            decode::export::<S>(body).map_err(|err| Failure::bad_request(format!("malformed protobuf: {err}")))
        }
        Encoding::Json => serde_json::from_slice(&body)
            .map(|request| Lenient {
                request,
                undecodable: Vec::new(),
            })
            .map_err(|err| Failure::bad_request(format!("malformed OTLP JSON: {err}"))),
    }
}

fn encode<M: Message + serde::Serialize>(encoding: Encoding, message: &M) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => message.encode_to_vec(),
        Encoding::Json => {
            // The OTLP JSON mapping leaves unset fields out (serde would write `null`).
            let mut json = serde_json::to_value(message).expect("an OTLP response serialises");
            if let Some(object) = json.as_object_mut() {
                object.retain(|_, value| !value.is_null());
            }
            json.to_string().into_bytes()
        }
    }
}

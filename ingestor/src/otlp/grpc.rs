//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` and
//! `...logs.v1.LogsService/Export`, served beside `chute.v1` (and on the OTLP gRPC listener).
//!
//! The services are tonic services written here rather than the generated ones, for one reason:
//! their codec decodes an export with [`super::decode`] (item by item), so a span or log
//! record that prost cannot decode (an attribute that is not valid UTF-8) is rejected alone in
//! `partial_success` instead of failing the whole export. The wire contract (paths, messages,
//! gzip, status codes) is the generated services'.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use chute_proto::codec::{PairCodec, ProstEncoder};
use tonic::body::Body;
use tonic::codec::{CompressionEncoding, DecodeBuf, Decoder};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::decode::{self, Lenient};
use super::export::{Otlp, Outcome};
use super::mapping::MapItem;
use super::signal::{Logs, OtlpSignal, Signal, Traces, Transport};
use crate::admission::{Caller, MessagePermits};
use crate::telemetry;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `Export` of either signal: the caller's tenant, the admission layer's bytes permit of this
/// message (main gRPC server) held until the export is answered (as `chute.v1` holds its own),
/// the signal's mapping and publish, and the answer.
fn export<S: OtlpSignal>(
    otlp: Otlp,
    request: Request<Lenient<S::Request>>,
) -> BoxFuture<Result<Response<S::Response>, Status>>
where
    S::Item: MapItem,
{
    Box::pin(async move {
        let started = Instant::now();
        let result = match key_tenant(&otlp, &request) {
            Ok(tenant) => {
                let _budget = request
                    .extensions()
                    .get::<MessagePermits>()
                    .and_then(MessagePermits::take_next);
                let Lenient { request, undecodable } = request.into_inner();
                otlp.export::<S>(tenant.as_deref(), &request, undecodable).await
            }
            Err(err) => Err(err),
        };
        let outcome = finish(S::SIGNAL, started, result)?;
        Ok(Response::new(outcome.response::<S>()))
    })
}

/// One OTLP service: `Export` with the lenient codec, gzip accepted (OTel exporters send it with
/// `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`), messages bounded by `max_decoding_message_size`.
pub struct OtlpService<S> {
    otlp: Otlp,
    max_decoding_message_size: usize,
    signal: PhantomData<S>,
}

impl<S> Clone for OtlpService<S> {
    fn clone(&self) -> Self {
        Self {
            otlp: self.otlp.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
            signal: PhantomData,
        }
    }
}

impl<S: OtlpSignal> NamedService for OtlpService<S> {
    const NAME: &'static str = S::SERVICE;
}

pub fn trace_service(otlp: Otlp, max_decoding_message_size: usize) -> OtlpService<Traces> {
    OtlpService {
        otlp,
        max_decoding_message_size,
        signal: PhantomData,
    }
}

pub fn logs_service(otlp: Otlp, max_decoding_message_size: usize) -> OtlpService<Logs> {
    OtlpService {
        otlp,
        max_decoding_message_size,
        signal: PhantomData,
    }
}

impl<S, B> tower::Service<http::Request<B>> for OtlpService<S>
where
    S: OtlpSignal,
    S::Item: MapItem,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != S::PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let export = ExportCall::<S> {
            otlp: self.otlp.clone(),
            signal: PhantomData,
        };
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(LenientCodec::<S>::default())
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max);
            Ok(grpc.unary(export, request).await)
        })
    }
}

struct ExportCall<S> {
    otlp: Otlp,
    signal: PhantomData<S>,
}

impl<S: OtlpSignal> UnaryService<Lenient<S::Request>> for ExportCall<S>
where
    S::Item: MapItem,
{
    type Response = S::Response;
    type Future = BoxFuture<Result<Response<S::Response>, Status>>;

    fn call(&mut self, request: Request<Lenient<S::Request>>) -> Self::Future {
        export::<S>(self.otlp.clone(), request)
    }
}

/// Encodes the export response with prost, decodes the export with the lenient decoder.
type LenientCodec<S> = PairCodec<ProstEncoder<<S as OtlpSignal>::Response>, LenientDecoder<S>>;

struct LenientDecoder<S>(PhantomData<S>);

impl<S> Default for LenientDecoder<S> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<S: OtlpSignal> Decoder for LenientDecoder<S> {
    type Item = Lenient<S::Request>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Lenient<S::Request>>, Status> {
        let body = src.copy_to_bytes(src.remaining());
        decode::export::<S>(body)
            .map(Some)
            .map_err(|err| Status::invalid_argument(format!("malformed protobuf: {err}")))
    }
}

/// The caller's tenant (`None` when keys are off): the one the admission layer authenticated
/// (API key or client certificate) on the main gRPC server, else the `authorization` metadata's.
fn key_tenant<T>(otlp: &Otlp, request: &Request<T>) -> crate::Result<Option<String>> {
    if let Some(caller) = request.extensions().get::<Caller>() {
        return Ok(caller.tenant.clone());
    }
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    otlp.authenticate(authorization, &[])
}

/// Counts the call and maps its error to the gRPC status (`UNAVAILABLE` when JetStream could
/// not store the export: OTLP exporters retry it).
fn finish(signal: Signal, started: Instant, result: crate::Result<Outcome>) -> Result<Outcome, Status> {
    let result = result.map_err(Status::from);
    let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
    telemetry::request_finished(signal.method(Transport::Grpc), code, started.elapsed());
    result
}

/// Reports both OTLP services SERVING or NOT_SERVING in `grpc.health.v1`, with `chute.v1`.
pub async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<OtlpService<Traces>>().await;
        health.set_serving::<OtlpService<Logs>>().await;
    } else {
        health.set_not_serving::<OtlpService<Traces>>().await;
        health.set_not_serving::<OtlpService<Logs>>().await;
    }
}

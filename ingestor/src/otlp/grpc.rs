//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` and
//! `...logs.v1.LogsService/Export`, served beside `chute.v1` (and on the OTLP gRPC listener).

use std::time::Instant;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::export::{Otlp, Outcome, Signal, Transport};
use crate::admission::Caller;
use crate::telemetry;

/// The trace service, gzip accepted (OTel exporters send it with `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`).
pub fn trace_service(otlp: Otlp, max_decoding_message_size: usize) -> TraceServiceServer<Otlp> {
    TraceServiceServer::new(otlp)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_decoding_message_size)
}

pub fn logs_service(otlp: Otlp, max_decoding_message_size: usize) -> LogsServiceServer<Otlp> {
    LogsServiceServer::new(otlp)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_decoding_message_size)
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

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let started = Instant::now();
        let result = match key_tenant(self, &request) {
            Ok(tenant) => {
                self.export_traces(tenant.as_deref(), request.get_ref(), Vec::new())
                    .await
            }
            Err(err) => Err(err),
        };
        let outcome = finish(Signal::Traces, started, result)?;
        Ok(Response::new(outcome.trace_response()))
    }
}

#[tonic::async_trait]
impl LogsService for Otlp {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let started = Instant::now();
        let result = match key_tenant(self, &request) {
            Ok(tenant) => self.export_logs(tenant.as_deref(), request.get_ref(), Vec::new()).await,
            Err(err) => Err(err),
        };
        let outcome = finish(Signal::Logs, started, result)?;
        Ok(Response::new(outcome.logs_response()))
    }
}

/// Reports both OTLP services SERVING or NOT_SERVING in `grpc.health.v1`, with `chute.v1`.
pub async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<TraceServiceServer<Otlp>>().await;
        health.set_serving::<LogsServiceServer<Otlp>>().await;
    } else {
        health.set_not_serving::<TraceServiceServer<Otlp>>().await;
        health.set_not_serving::<LogsServiceServer<Otlp>>().await;
    }
}

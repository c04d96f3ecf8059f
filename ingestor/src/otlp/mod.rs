//! OTLP ingest: OpenTelemetry traces and logs (gRPC and HTTP) become Chute events, with the
//! same validation, durability and exactly-once guarantees as `chute.v1.IngestService`.
//!
//! Stages: the transports ([`grpc`]: `TraceService`/`LogsService`, [`http`]: `POST /v1/traces`
//! and `/v1/logs`) decode an export -> [`mapping`] turns spans and log records into events (pure,
//! deterministic) -> [`export`] hands them to the ingestor's own path (`Ingest::handle`: validate,
//! chunk, publish with `Nats-Msg-Id`s) under an idempotency key derived from the export's
//! content, and shapes the OTLP answer. [`pricing`] is the optional `--pricing-file`.

pub mod decode;
pub mod export;
pub mod grpc;
pub mod http;
pub mod mapping;
pub mod pricing;

use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::server::OtlpListeners;

/// The tasks serving the OTLP listeners, joined after the drain.
pub struct OtlpTasks(Vec<JoinHandle<()>>);

impl OtlpTasks {
    pub async fn join(self) {
        for task in self.0 {
            let _ = task.await;
        }
    }
}

/// Serves OTLP/gRPC and OTLP/HTTP on their own listeners (each optional) until `shutdown`;
/// bodies and messages are bounded by `max_body_bytes`, as sent and decompressed.
pub fn serve_listeners(
    listeners: OtlpListeners,
    otlp: export::Otlp,
    max_body_bytes: usize,
    shutdown: CancellationToken,
) -> std::io::Result<OtlpTasks> {
    let mut tasks = Vec::new();
    if let Some(listener) = listeners.grpc {
        tracing::info!(otlp_grpc = %listener.local_addr()?, "otlp/grpc listening");
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(grpc::trace_service(otlp.clone(), max_body_bytes))
            .add_service(grpc::logs_service(otlp.clone(), max_body_bytes))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone().cancelled_owned());
        tasks.push(tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::error!(error = %err, "otlp/grpc server failed");
            }
        }));
    }
    if let Some(listener) = listeners.http {
        tracing::info!(otlp_http = %listener.local_addr()?, "otlp/http listening");
        let server = http::serve(listener, otlp, max_body_bytes, shutdown);
        tasks.push(tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::error!(error = %err, "otlp/http server failed");
            }
        }));
    }
    Ok(OtlpTasks(tasks))
}

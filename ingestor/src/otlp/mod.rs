//! OTLP ingest: OpenTelemetry traces and logs (gRPC and HTTP) become Chute events, with the
//! same validation, durability and exactly-once guarantees as `chute.v1.IngestService`.
//!
//! Stages: the transports ([`grpc`]: `TraceService`/`LogsService`, [`http`]: `POST /v1/traces`
//! and `/v1/logs`) decode an export -> [`mapping`] turns spans and log records into events (pure,
//! deterministic) -> [`export`] hands them to the ingestor's own path (`Ingest::handle`: validate,
//! chunk, publish with `Nats-Msg-Id`s) under an idempotency key derived from the export's
//! content, and shapes the OTLP answer. [`pricing`] is the optional `--pricing-file`. [`signal`] holds what differs between traces
//! and logs (messages, nesting, item name, service); every stage is written once over it.

pub mod decode;
pub mod export;
pub mod grpc;
pub mod http;
pub mod mapping;
pub mod pricing;
pub mod signal;
#[cfg(any(test, feature = "test-util"))]
pub mod test_support;

use std::future::IntoFuture;

use chute_common::tls::{ClientIdentity, ReloadingConfig, TlsIncoming};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::{AdmissionLayer, AdmissionSettings};
use crate::listener::Incoming;

/// The OTLP listeners besides the main gRPC server (which serves OTLP/gRPC too); `main` binds
/// them from `--otlp-grpc-listen` / `--otlp-http-listen`.
#[derive(Debug, Default)]
pub struct OtlpListeners {
    pub grpc: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

/// What guards the OTLP listeners, as on the main gRPC server: TLS (`--tls-*`; `None`:
/// plaintext) and, for OTLP/gRPC, the admission layer (who, how many calls, how many bytes).
/// OTLP/HTTP authenticates in its handler (key, else client certificate), bounds each body and
/// caps requests in progress and their bytes with `http_limits`.
pub struct Security {
    pub grpc_tls: Option<ReloadingConfig>,
    pub http_tls: Option<ReloadingConfig>,
    pub admission: AdmissionLayer,
    /// OTLP/HTTP's request and bytes limits (the admission layer's settings, budgets apart).
    pub http_limits: AdmissionSettings,
}

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
    security: Security,
    shutdown: CancellationToken,
) -> std::io::Result<OtlpTasks> {
    let mut tasks = Vec::new();
    if let Some(listener) = listeners.grpc {
        let tls = security.grpc_tls.is_some();
        tracing::info!(otlp_grpc = %listener.local_addr()?, tls, "otlp/grpc listening");
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .layer(security.admission)
            .add_service(grpc::trace_service(otlp.clone(), max_body_bytes))
            .add_service(grpc::logs_service(otlp.clone(), max_body_bytes))
            .serve_with_incoming_shutdown(
                Incoming::new(listener, security.grpc_tls)?,
                shutdown.clone().cancelled_owned(),
            );
        tasks.push(tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::error!(error = %err, "otlp/grpc server failed");
            }
        }));
    }
    if let Some(listener) = listeners.http {
        let tls = security.http_tls.is_some();
        tracing::info!(otlp_http = %listener.local_addr()?, tls, "otlp/http listening");
        // Every connection carries its client certificate's names (none without mutual TLS).
        let service = http::router(otlp, max_body_bytes, &security.http_limits)
            .into_make_service_with_connect_info::<ClientIdentity>();
        let stopped = shutdown.cancelled_owned();
        let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
            match security.http_tls {
                Some(config) => Box::pin(
                    axum::serve(TlsIncoming::new(listener, config)?, service)
                        .with_graceful_shutdown(stopped)
                        .into_future(),
                ),
                None => Box::pin(
                    axum::serve(listener, service)
                        .with_graceful_shutdown(stopped)
                        .into_future(),
                ),
            };
        tasks.push(tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::error!(error = %err, "otlp/http server failed");
            }
        }));
    }
    Ok(OtlpTasks(tasks))
}

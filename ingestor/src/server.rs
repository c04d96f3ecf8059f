//! Wiring: NATS connection, stream, gRPC server, admin server, readiness, drain.

use std::time::Duration;

use chute_common::admin::{self, Readiness};
use chute_common::auth::ApiKeys;
use chute_common::stream::{self, EVENTS_STREAM};
use chute_common::tls::{ReloadingConfig, ALPN_H2, ALPN_HTTP1};
use chute_proto::v1::ingest_service_server::IngestServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::AdmissionLayer;
use crate::config::Config;
use crate::error::Result;
use crate::hooks::Hooks;
use crate::listener::Incoming;
use crate::otlp::{self, export::Otlp, OtlpListeners};
use crate::publisher::Publisher;
use crate::service::{Ingest, IngestSettings};
use crate::telemetry;

/// How often readiness re-checks that JetStream answers.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the ingestor on the given listeners until `shutdown` is cancelled, then drains in-flight
/// calls (bounded by `config.drain_timeout`). Fails early, with a clear error, when NATS cannot
/// be reached within `config.nats.connect_wait` or the API keys file is invalid.
pub async fn run(
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    run_with_hooks(grpc_listener, admin_listener, config, Hooks::default(), shutdown).await
}

/// [`run`] with test seams: a receive clock, lost publishes (see [`Hooks`]; only the
/// `test-util` feature lets a caller set them, production's `Hooks` is empty).
pub async fn run_with_hooks(
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<()> {
    run_with_otlp(
        grpc_listener,
        admin_listener,
        OtlpListeners::default(),
        config,
        hooks,
        shutdown,
    )
    .await
}

/// [`run_with_hooks`] that also serves OTLP/gRPC and OTLP/HTTP on their own listeners.
pub async fn run_with_otlp(
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    otlp_listeners: OtlpListeners,
    config: Config,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<()> {
    telemetry::describe();
    let api_keys = config.api_keys.file.as_deref().map(ApiKeys::load).transpose()?;
    if api_keys.is_none() {
        tracing::warn!("no api keys file configured: ingest is open to any caller and tenant");
    }
    let tls = ReloadingConfig::load(&config.tls, ALPN_H2)?;
    match &tls {
        Some(tls) => {
            let mutual = tls.requires_client_certificates();
            tracing::info!(client_certificates = mutual, "grpc listener serves tls");
            tokio::spawn(tls.clone().watch(config.tls.reload_interval, shutdown.clone()));
        }
        None => tracing::warn!("no --tls-cert: the grpc listener is plaintext"),
    }
    let admission = AdmissionLayer::new(api_keys.clone(), &config.admission());

    let client = config.nats.connect("chute-ingestor").await?;
    let publisher = Publisher::with_hooks(
        client.clone(),
        config.max_inflight_publishes,
        config.publish_timeout,
        hooks.clone(),
    );
    let info = stream::ensure_events_stream(publisher.jetstream(), &config.stream_settings()).await?;
    tracing::info!(
        stream = EVENTS_STREAM,
        messages = info.state.messages,
        partitions = config.partitions,
        "events stream ready"
    );

    let settings = IngestSettings {
        partitions: config.partitions,
        max_message_bytes: config.max_message_bytes as usize,
        max_request_events: config.max_request_events,
        max_request_bytes: config.max_request_bytes,
        limits: config.limits(),
    };
    let ingest = Ingest::with_hooks(settings, api_keys.clone(), publisher.clone(), hooks.clone());
    let otlp = Otlp::new(ingest.clone(), api_keys, otlp_mapping_settings(&config)?, hooks);

    let readiness = Readiness::default();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IngestServiceServer<Ingest>>().await;
    otlp::grpc::set_health(&health_reporter, true).await;
    tokio::spawn(watch_readiness(
        publisher.clone(),
        readiness.clone(),
        health_reporter.clone(),
        shutdown.clone(),
    ));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chute_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(opentelemetry_proto::DESCRIPTORS)
        .build_v1()
        .expect("embedded descriptor sets are valid");

    let admin_addr = admin_listener.local_addr()?;
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(readiness.clone()),
        shutdown.clone(),
    ));

    // The decoder's hard cap is twice the documented limit: requests between the two are
    // decoded and refused with RESOURCE_EXHAUSTED and a clear message by `Ingest::handle`.
    let decode_cap = usize::try_from(config.max_request_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
    let grpc_addr = grpc_listener.local_addr()?;
    let otlp_security = otlp::Security {
        grpc_tls: tls.clone(),
        http_tls: otlp_http_tls(&config, otlp_listeners.http.is_some(), &shutdown)?,
        admission: admission.clone(),
        http_limits: config.admission(),
    };
    let otlp_tasks = otlp::serve_listeners(
        otlp_listeners,
        otlp.clone(),
        decode_cap,
        otlp_security,
        shutdown.clone(),
    )?;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "ingestor listening");
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(config.max_concurrent_streams)
        .layer(admission)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(IngestServiceServer::new(ingest).max_decoding_message_size(decode_cap))
        .add_service(otlp::grpc::trace_service(otlp.clone(), decode_cap))
        .add_service(otlp::grpc::logs_service(otlp, decode_cap))
        .serve_with_incoming_shutdown(Incoming::new(grpc_listener, tls)?, {
            let shutdown = shutdown.clone();
            let health_reporter = health_reporter.clone();
            let readiness = readiness.clone();
            async move {
                shutdown.cancelled().await;
                readiness.set(false);
                health_reporter.set_not_serving::<IngestServiceServer<Ingest>>().await;
                otlp::grpc::set_health(&health_reporter, false).await;
                tracing::info!("draining in-flight calls");
            }
        });

    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(config.drain_timeout).await } => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timeout: exiting with calls still in flight");
        }
    }
    // Every acknowledged call already had its PubAck; flushing only hurries stragglers.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    let _ = admin_task.await;
    otlp_tasks.join().await;
    tracing::info!("ingestor stopped");
    Ok(())
}

/// Ready (HTTP `/readyz`, gRPC health) only while JetStream answers.
async fn watch_readiness(
    publisher: Publisher,
    readiness: Readiness,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut was_ready = None;
    while !shutdown.is_cancelled() {
        let ready = publisher.is_connected()
            && tokio::time::timeout(READINESS_INTERVAL, publisher.jetstream().get_stream(EVENTS_STREAM))
                .await
                .is_ok_and(|result| result.is_ok());
        readiness.set(ready);
        if was_ready != Some(ready) {
            if ready {
                tracing::info!("jetstream answers: ready");
                health.set_serving::<IngestServiceServer<Ingest>>().await;
                otlp::grpc::set_health(&health, true).await;
            } else {
                tracing::warn!("jetstream does not answer: not ready");
                health.set_not_serving::<IngestServiceServer<Ingest>>().await;
                otlp::grpc::set_health(&health, false).await;
            }
            was_ready = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// The OTLP mapping's settings: the body limit of the event rules and the pricing file, if any.
fn otlp_mapping_settings(config: &Config) -> Result<otlp::mapping::MappingSettings> {
    let pricing = config
        .pricing_file
        .as_deref()
        .map(otlp::pricing::Pricing::load)
        .transpose()?;
    if let Some(path) = &config.pricing_file {
        tracing::info!(path = %path.display(), "otlp: cost_usd from the pricing file");
    }
    Ok(otlp::mapping::MappingSettings {
        max_body_bytes: config.limits().max_body_bytes,
        pricing,
    })
}

/// The OTLP/HTTP listener's TLS: the gRPC listener's certificate and client CA (`--tls-*`),
/// offered for HTTP/1.1, reloaded like it.
fn otlp_http_tls(config: &Config, serving: bool, shutdown: &CancellationToken) -> Result<Option<ReloadingConfig>> {
    if !serving {
        return Ok(None);
    }
    let tls = ReloadingConfig::load(&config.tls, ALPN_HTTP1)?;
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch(config.tls.reload_interval, shutdown.clone()));
    }
    Ok(tls)
}

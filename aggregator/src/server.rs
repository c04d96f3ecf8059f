//! Wiring: NATS, the ledger bucket, the dead-letter stream, ClickHouse, the admin server, and
//! the pipeline loop.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chute_common::admin::{self, Readiness};
use chute_common::stream::{self, StreamSettings, DLQ_STREAM};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::pipeline::Pipeline;
use crate::writer::Backoff;
use crate::{consumer, dlq, telemetry};

/// Runs the aggregator until `shutdown` is cancelled, then drains (final flush and commit,
/// leases released).
pub async fn run(admin_listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<()> {
    telemetry::describe();
    let client = stream::connect(&config.nats_url, "chute-aggregator", config.nats_connect_wait).await?;
    let js = jetstream::new(client.clone());
    // Ingestors own the stream's settings; create it with defaults only if nobody has yet.
    stream::get_or_create(&js, StreamSettings::default().events_config())
        .await
        .map_err(|err| Error::Nats(err.to_string()))?;
    dlq::ensure_stream(&js, config.replicas).await?;
    let ledger = Ledger::new(ledger_bucket(&js, &config).await?);

    let me = config
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("agg-{}", uuid::Uuid::now_v7().simple()));
    let readiness = Readiness::default();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(readiness.clone()),
        shutdown.clone(),
    ));
    tokio::spawn(watch_dlq(js.clone(), shutdown.clone()));

    let pipeline = Pipeline {
        me: me.clone(),
        partitions: config.partitions,
        lease: config.lease_ttl,
        batch_limits: config.batch_limits(),
        limits: config.limits(),
        ledger,
        stream: consumer::events_stream(&js).await?,
        jetstream: js,
        clickhouse: config.clickhouse(),
        read_buffer: config.read_buffer_messages,
        drain_timeout: config.drain_timeout,
        backoff: Backoff::default(),
    };
    tracing::info!(instance = %me, partitions = config.partitions, "aggregator starting");
    let ready = readiness.clone();
    let result = std::sync::Arc::new(pipeline)
        .run(shutdown.clone(), move || ready.set(true))
        .await;
    readiness.set(false);
    shutdown.cancel();
    let _ = admin_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!(instance = %me, "aggregator stopped");
    result
}

async fn ledger_bucket(js: &jetstream::Context, config: &Config) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&config.ledger_bucket).await {
        return Ok(store);
    }
    // The bucket's backing stream is created directly: async-nats' `create_key_value` first
    // parses the account info, which fails against NATS 2.9 (Debian's). Same settings as a KV
    // bucket with history 1.
    stream::get_or_create(
        js,
        jetstream::stream::Config {
            name: format!("KV_{}", config.ledger_bucket),
            description: Some("Chute aggregator ledger: partition leases, positions, pending batches".to_owned()),
            subjects: vec![format!("$KV.{}.>", config.ledger_bucket)],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: config.replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        },
    )
    .await
    .map_err(|err| Error::Ledger(format!("create bucket {}: {err}", config.ledger_bucket)))?;
    js.get_key_value(&config.ledger_bucket)
        .await
        .map_err(|err| Error::Ledger(format!("open bucket {}: {err}", config.ledger_bucket)))
}

/// Keeps the DLQ size gauge current.
async fn watch_dlq(js: jetstream::Context, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(mut stream) = js.get_stream(DLQ_STREAM).await {
            if let Ok(info) = stream.info().await {
                telemetry::dlq_size(info.state.messages);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

//! Chute query API: HTTP JSON over the ClickHouse rollups with a moka hot cache, and a
//! Server-Sent Events live stream fed by NATS.
//!
//! Stages: [`params`] (parse and validate into a normalized query) -> [`cache`] (single-flight,
//! TTL by freshness) -> [`sql`] (bound-parameter SQL) -> ClickHouse -> [`render`] (JSON), tied
//! together per endpoint by [`endpoint::QueryEndpoint`] and served by [`routes`]; [`live`] fans the NATS event subjects out to `/v1/stream` SSE subscribers.

pub mod cache;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod gate;
pub mod live;
pub mod openapi;
pub mod page;
pub mod params;
pub mod render;
pub mod routes;
pub mod sql;
pub mod telemetry;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use chute_common::admin::Readiness;
use chute_common::tls::{ClientIdentity, ReloadingConfig, TlsIncoming, ALPN_HTTP1};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};
pub use live::StreamHub;
pub use routes::{app, AppState};

/// A ClickHouse client for the configured server (HTTP, or HTTPS verified with
/// `--clickhouse-ca`), database and credentials (`--clickhouse-password-file` wins over
/// `--clickhouse-password`). Fails when the CA or password file cannot be used.
pub fn try_clickhouse_client(config: &Config) -> std::io::Result<clickhouse::Client> {
    let mut client = chute_schema::client::client_for_url(&config.clickhouse_url, config.clickhouse_ca.as_deref())
        .map_err(std::io::Error::other)?
        .with_database(&config.clickhouse_database);
    if let Some(user) = &config.clickhouse_user {
        client = client.with_user(user);
    }
    let inline = config.clickhouse_password.as_deref().unwrap_or_default();
    let password = chute_common::config::read_secret(config.clickhouse_password_file.as_deref(), inline)?;
    if !password.is_empty() {
        client = client.with_password(password);
    }
    Ok(client)
}

/// [`try_clickhouse_client`] for tests and examples.
///
/// # Panics
/// When the CA or password file cannot be used ([`run`] reports that as an error instead).
pub fn clickhouse_client(config: &Config) -> clickhouse::Client {
    try_clickhouse_client(config).unwrap_or_else(|err| panic!("clickhouse client: {err}"))
}

/// Serves the query API on `listener` until `shutdown`, then lets open requests finish for up
/// to the drain timeout. Fails at start when NATS (if configured) is unreachable within the
/// connect wait or the API keys file is unreadable.
pub async fn run(listener: tokio::net::TcpListener, config: Config, shutdown: CancellationToken) -> Result<()> {
    run_with_admin(listener, None, config, shutdown).await
}

/// [`run`] that also serves `/metrics`, `/healthz` and `/readyz` in plaintext on `admin`
/// (`--admin-listen`), for probes and scrapers without a client certificate.
pub async fn run_with_admin(
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    telemetry::describe();
    let clickhouse = try_clickhouse_client(&config)?;
    let readiness = Readiness::default();

    let nats = if config.nats.url.is_empty() {
        tracing::warn!("no NATS url: /v1/stream is disabled");
        None
    } else {
        let client = config
            .nats
            .connect("chute-query-api")
            .await
            .map_err(Error::NatsConnect)?;
        Some(client)
    };
    let hub = nats.as_ref().map(|client| {
        let hub = StreamHub::with_max_subscribers(config.stream_buffer, config.max_streams);
        tokio::spawn(hub.clone().run(client.clone(), shutdown.clone()));
        hub
    });

    let state = AppState::new(clickhouse.clone(), &config, hub, readiness.clone(), shutdown.clone())?;
    if let Some(admin) = admin {
        tracing::info!(admin = %admin.local_addr()?, "admin endpoints listening");
        let router = chute_common::admin::router(readiness.clone());
        tokio::spawn(chute_common::admin::serve(admin, router, shutdown.clone()));
    }
    tokio::spawn(watch_readiness(clickhouse, nats, readiness, shutdown.clone()));

    tracing::info!(
        listen = %listener.local_addr()?,
        clickhouse = %config.clickhouse_url,
        database = %config.clickhouse_database,
        api_keys = config.api_keys.file.is_some(),
        "query api serving"
    );
    if config.api_keys.file.is_none() {
        tracing::warn!("no API keys file: every caller may read every tenant");
    }
    // Every connection carries its client certificate's names (none without mutual TLS).
    let service = app(state).into_make_service_with_connect_info::<ClientIdentity>();
    let stopped = shutdown.clone().cancelled_owned();
    let server: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match ReloadingConfig::load(&config.tls, ALPN_HTTP1)? {
            Some(tls) => {
                let mutual = tls.requires_client_certificates();
                tracing::info!(client_certificates = mutual, "http listener serves tls");
                tokio::spawn(tls.clone().watch(config.tls.reload_interval, shutdown.clone()));
                let incoming = TlsIncoming::new(listener, tls)?;
                Box::pin(
                    axum::serve(incoming, service)
                        .with_graceful_shutdown(stopped)
                        .into_future(),
                )
            }
            None => {
                tracing::warn!("no --tls-cert: the http listener is plaintext");
                Box::pin(
                    axum::serve(listener, service)
                        .with_graceful_shutdown(stopped)
                        .into_future(),
                )
            }
        };
    let drain_timeout = config.drain_timeout;
    tokio::select! {
        result = server => result?,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain_timeout).await;
        } => tracing::warn!("drain timeout passed; exiting with requests still open"),
    }
    Ok(())
}

/// Ready once ClickHouse answered a `SELECT 1` (retried every 2 s until it does) and, while
/// NATS is configured, as long as the connection is up. After the first answer ClickHouse is
/// not polled again: query errors surface as 502s and in `chute_query_clickhouse_queries_total`.
async fn watch_readiness(
    clickhouse: clickhouse::Client,
    nats: Option<async_nats::Client>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut clickhouse_ok = false;
    let mut since_check = Duration::MAX;
    while !shutdown.is_cancelled() {
        if !clickhouse_ok && since_check >= Duration::from_secs(2) {
            since_check = Duration::ZERO;
            match clickhouse.query("SELECT 1").fetch_one::<u8>().await {
                Ok(_) => clickhouse_ok = true,
                Err(err) => tracing::warn!(error = %err, "clickhouse not reachable yet"),
            }
        }
        let nats_ok = nats
            .as_ref()
            .is_none_or(|client| client.connection_state() == async_nats::connection::State::Connected);
        readiness.set(clickhouse_ok && nats_ok);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        since_check = since_check.saturating_add(Duration::from_millis(250));
    }
    readiness.set(false);
}

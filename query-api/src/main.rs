use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = chute_query_api::Config::parse();
    chute_common::telemetry::init_tracing(&config.log, config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(chute_common::shutdown::cancel_on_signal(shutdown.clone()));
    chute_query_api::run(listener, config, shutdown)
        .await
        .context("query api failed")
}

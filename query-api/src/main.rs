use anyhow::Context;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: chute_query_api::Config =
        chute_common::config::load(std::env::args_os(), std::env::vars_os()).unwrap_or_else(|err| err.exit());
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

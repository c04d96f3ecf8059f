use anyhow::Context;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: chute_ingestor::Config =
        chute_common::config::load(std::env::args_os(), std::env::vars_os()).unwrap_or_else(|err| err.exit());
    chute_common::telemetry::init_tracing(&config.log, config.log_format);
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("bind gRPC {}", config.grpc_listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("bind admin {}", config.admin_listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(chute_common::shutdown::cancel_on_signal(shutdown.clone()));
    chute_ingestor::run(grpc, admin, config, shutdown)
        .await
        .context("ingestor failed")
}

use anyhow::Context;
use chute_common::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: chute_ingestor::Config = service::config_from_process();
    config.log.init_tracing();
    let grpc = service::bind("gRPC", config.grpc_listen).await?;
    let admin = service::bind("admin", config.admin_listen).await?;
    chute_ingestor::run(grpc, admin, config, service::shutdown_on_signal())
        .await
        .context("ingestor failed")
}

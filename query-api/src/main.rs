use anyhow::Context;
use chute_common::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: chute_query_api::Config = service::config_from_process();
    config.log.init_tracing();
    let listener = service::bind("HTTP", config.listen).await?;
    let admin = match config.admin_listen {
        Some(address) => Some(service::bind("admin", address).await?),
        None => None,
    };
    chute_query_api::run_with_admin(listener, admin, config, service::shutdown_on_signal())
        .await
        .context("query api failed")
}

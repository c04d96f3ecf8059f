use anyhow::Context;
use chute_common::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: chute_ingestor::Config = service::config_from_process();
    config.log.init_tracing();
    let grpc = service::bind("gRPC", config.grpc_listen).await?;
    let admin = service::bind("admin", config.admin_listen).await?;
    let otlp = chute_ingestor::OtlpListeners {
        grpc: bind_optional("OTLP/gRPC", config.otlp_grpc_listen).await?,
        http: bind_optional("OTLP/HTTP", config.otlp_http_listen).await?,
    };
    let hooks = chute_ingestor::hooks::Hooks::default();
    chute_ingestor::run_with_otlp(grpc, admin, otlp, config, hooks, service::shutdown_on_signal())
        .await
        .context("ingestor failed")
}

/// Binds a listener that `off` may have turned off.
async fn bind_optional(
    what: &'static str,
    address: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match address {
        Some(address) => Ok(Some(service::bind(what, address).await?)),
        None => Ok(None),
    }
}

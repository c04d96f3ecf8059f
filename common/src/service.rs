//! What a service binary's `main` does around the service's `run`: read its config from the
//! process (the one place that does), bind its listeners and turn SIGTERM / SIGINT into a
//! cancelled shutdown token. Tests skip all of this and call `run` with listeners on port 0.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `C` from the process's arguments and environment ([`crate::config::load`]). A bad flag or
/// variable prints clap's message and exits with status 2; `--help` and `--version` print and
/// exit 0.
pub fn config_from_process<C: clap::Parser>() -> C {
    crate::config::load(std::env::args_os(), std::env::vars_os()).unwrap_or_else(|err| err.exit())
}

/// A listener that could not be bound, naming what it was for.
#[derive(Debug, thiserror::Error)]
#[error("bind {purpose} {address}")]
pub struct BindError {
    purpose: &'static str,
    address: SocketAddr,
    source: std::io::Error,
}

/// Binds the listener `purpose` names (e.g. `"admin"`) on `address`.
pub async fn bind(purpose: &'static str, address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address).await.map_err(|source| BindError {
        purpose,
        address,
        source,
    })
}

/// A token cancelled on the first SIGTERM or SIGINT, for the service's drain. Call it only for
/// a long-running service: until the process exits, the signals no longer stop it directly.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::shutdown::cancel_on_signal(shutdown.clone()));
    shutdown
}

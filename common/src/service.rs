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

/// Starts the process again (same pid, arguments and environment) with glibc's mmap threshold
/// fixed at 128 KiB, unless `MALLOC_MMAP_THRESHOLD_` is already set (an operator's own value, or
/// this re-exec done): call it first thing in `main`, before the async runtime starts, in a
/// service that holds large, short-lived buffers.
///
/// glibc raises the threshold to the size of each large buffer freed, so batch-sized buffers
/// soon come from the heap, and their freed pages stay in the process. The aggregator's closed
/// loop peaked at 483 MiB of RSS for a 263 MiB heap peak (heaptrack); with the threshold fixed,
/// 284 MiB. glibc reads the variable only at start, and setting it in-process needs `mallopt`,
/// which is `unsafe` (forbidden in this workspace): hence the re-exec, which costs one `execve`.
/// Elsewhere than Linux with glibc, and when the re-exec fails (it logs why), nothing changes.
pub fn reexec_with_bounded_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        /// glibc reads it at start.
        const MMAP_THRESHOLD_VAR: &str = "MALLOC_MMAP_THRESHOLD_";
        /// Allocations from this size up get their own mapping, returned to the system when
        /// freed: glibc's own starting value, made fixed.
        const MMAP_THRESHOLD: &str = "131072";
        if std::env::var_os(MMAP_THRESHOLD_VAR).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else { return };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        let failure = command.args(args).env(MMAP_THRESHOLD_VAR, MMAP_THRESHOLD).exec();
        eprintln!("could not restart with {MMAP_THRESHOLD_VAR}={MMAP_THRESHOLD} ({failure}); going on without");
    }
}

//! Test harnesses: real dependencies started on free loopback ports in temp dirs, killed on
//! `Drop`. Enabled by the `test-util` feature.

pub mod clickhouse;
pub mod nats;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common/ lives inside the workspace")
        .to_path_buf()
}

//! Pieces every Chute service shares.
//!
//! - [`validate`]: the event rules (the ingestor enforces them; the aggregator re-checks before
//!   inserting and dead-letters what fails).
//! - [`partition`]: which `events.<partition>` subject a request goes to.
//! - [`hash`]: FNV-1a 64, the stable hash behind partitions, migration checksums and ETags.
//! - [`payload`]: the `EventBatch` codec carried by JetStream messages (chunking, versioning).
//! - [`stream`]: names and configuration of the JetStream streams (one file-stream base, one
//!   dead-letter stream definition and replay path for the aggregator's and the router's DLQs)
//!   and the connection helper.
//! - [`admin`] and [`telemetry`]: `/metrics`, `/healthz`, `/readyz`, logs.
//! - [`config`]: loads a service's clap `Config` from arguments and an environment passed in
//!   (never the process's), the flag groups the services share (NATS, API keys, ClickHouse login,
//!   logging), and the duration / byte-size value parsers.
//! - [`auth`] and [`tls`]: API keys (and client certificates) -> tenant; TLS on the services'
//!   listeners, reloaded on SIGHUP and file change.
//! - [`service`]: what a binary's `main` does around `run`: config from the process, listeners,
//!   shutdown on SIGTERM / SIGINT.
//! - `testing` (feature `test-util`): a guard that runs a real nats-server, and small helpers.
//!
//! The ClickHouse schema, its row types and the ClickHouse dev server guard live in
//! `chute-schema`, so that services which never talk to ClickHouse do not build its client.

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod hash;
pub mod partition;
pub mod payload;
pub mod service;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod validate;

#[cfg(feature = "test-util")]
pub mod testing;

pub use error::{Error, Result};

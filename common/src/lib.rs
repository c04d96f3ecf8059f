//! Pieces every Chute service shares.
//!
//! - [`validate`]: the event rules (the ingestor enforces them; the aggregator re-checks before
//!   inserting and dead-letters what fails).
//! - [`partition`]: which `events.<partition>` subject a request goes to.
//! - [`payload`]: the `EventBatch` codec carried by JetStream messages (chunking, versioning).
//! - [`stream`]: names and configuration of the JetStream streams and the connection helper.
//! - [`admin`] and [`telemetry`]: `/metrics`, `/healthz`, `/readyz`, logs.
//! - [`config`]: loads a service's clap `Config` from arguments and an environment passed in
//!   (never the process's), and the duration / byte-size value parsers.
//! - [`migrate`] and [`row`]: the ClickHouse schema runner and the `events` row type.
//! - `testing` (feature `test-util`): guards that run a real nats-server / ClickHouse dev server.

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod migrate;
pub mod partition;
pub mod payload;
pub mod row;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod validate;

#[cfg(feature = "test-util")]
pub mod testing;

pub use error::{Error, Result};

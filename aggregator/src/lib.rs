//! Chute aggregator: JetStream -> ClickHouse, exactly once, rollups included.
//!
//! Stages: [`consumer`] (ordered readers per owned partition) -> [`batcher`] (one batch over all
//! owned partitions, flush policy) -> [`row`] (decode, validate, encode; poison to [`dlq`]) ->
//! [`writer`] (ClickHouse insert with the batch's dedup token, retries) -> commit in the
//! [`ledger`] (leases, positions and pending batches in one CAS-updated KV entry).
//! [`pipeline`] runs the loop; [`server::run`] wires it. See `EXACTLY_ONCE.md`.

pub mod batcher;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod ledger;
pub mod pipeline;
pub mod row;
pub mod server;
pub mod telemetry;
pub mod writer;

pub use config::Config;
pub use error::{Error, Result};
pub use server::run;

//! Chute aggregator: JetStream -> ClickHouse, exactly once, rollups included.
//!
//! Stages: [`consumer`] (a reader per owned partition, pulls bounded in bytes) -> [`batcher`] (one batch over all
//! owned partitions, flush policy) -> [`commit`] (the protocol for a recorded batch: [`row`]
//! encodes, invalid messages go to [`dlq`] once, [`writer`] inserts with the batch's dedup
//! token, [`classify`] decides retry or split, the [`ledger`] records splits and commits).
//! [`pipeline`] runs the loop (ownership, reading, one batch in flight, [`progress`] for
//! stalls); [`trim`] removes committed messages from the stream; [`server::run`] wires it.
//! See `EXACTLY_ONCE.md`.

pub mod batcher;
pub mod classify;
pub mod commit;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod ledger;
pub mod pipeline;
pub mod progress;
pub mod recover;
pub mod row;
pub mod server;
pub mod telemetry;
pub mod transcode;
pub mod trim;
pub mod writer;

pub use config::Config;
pub use error::{Error, Result};
pub use server::run;

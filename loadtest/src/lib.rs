//! Chute load generator and benchmark tools.
//!
//! Stages of a run: [`generate`] (a pool of pre-encoded request templates) -> [`pacing`] (open
//! loop: intended send times) -> [`client`] (gRPC `Publish` / `PublishStream`) or [`otlp`] (OTLP
//! trace exports), each call retried with the same bytes by [`call`] -> [`stats`] (HDR
//! histograms, counters) -> [`live`] (accepted -> live stream latency) -> [`warehouse`] (what
//! landed in ClickHouse) + [`verify`] (the loss and duplicate verdict), [`cpu`] (CPU per event of
//! each process) -> [`report`]. [`driver::run`] wires a run; [`ceiling`] measures the raw
//! ClickHouse and JetStream ceilings for `make bench`; [`backlog`] samples the aggregator's
//! backlog during a run, and [`steady`] searches the highest rate the pipeline sustains.

pub mod backlog;
pub mod call;
pub mod ceiling;
pub mod client;
pub mod config;
pub mod cpu;
pub mod driver;
pub mod error;
pub mod generate;
pub mod json;
pub mod live;
pub mod otlp;
pub mod pacing;
pub mod report;
pub mod stats;
pub mod steady;
pub mod verify;
pub mod warehouse;

pub use config::Cli;
pub use driver::{run, RunReport};
pub use error::{Error, Result};

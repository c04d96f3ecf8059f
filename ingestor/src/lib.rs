//! Chute ingestor: a stateless tonic server that validates events and makes them durable in
//! NATS JetStream before acknowledging.
//!
//! Stages: [`admission`] (API key or client certificate, call and bytes limits, before the body
//! is read) -> [`service`] (validation, chunking) -> [`publisher`] (JetStream, PubAcks).
//! [`server::run`] wires them with the admin endpoints and gRPC health; `main.rs` only loads the
//! configuration ([`config`]) and calls it. [`error`] maps every failure to its gRPC and HTTP
//! status in one table; [`telemetry`] names the metrics and log events; [`hooks`] holds the test seams
//! (a receive clock, a lost publish), settable only with the `test-util` feature. [`otlp`] takes
//! OpenTelemetry traces and logs (gRPC and HTTP) into the same path.

pub mod admission;
pub mod config;
pub mod error;
pub mod hooks;
pub mod listener;
pub mod otlp;
pub mod publisher;
pub mod server;
pub mod service;
pub mod telemetry;

pub use config::Config;
pub use error::{Error, Result};
pub use otlp::OtlpListeners;
#[cfg(feature = "test-util")]
pub use server::run_with_hooks;
pub use server::{run, run_with_otlp};

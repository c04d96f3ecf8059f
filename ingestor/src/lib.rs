//! Chute ingestor: a stateless tonic server that validates events and makes them durable in
//! NATS JetStream before acknowledging.
//!
//! Stages: [`service`] (auth, validation, chunking) -> [`publisher`] (JetStream, PubAcks).
//! [`server::run`] wires them with the admin endpoints; `main.rs` only parses flags.

pub mod config;
pub mod error;
pub mod hooks;
pub mod publisher;
pub mod server;
pub mod service;
pub mod telemetry;

pub use config::Config;
pub use error::{Error, Result};
pub use server::run;
#[cfg(feature = "test-util")]
pub use server::run_with_hooks;

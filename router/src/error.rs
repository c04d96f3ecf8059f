//! The router's error type. Variants keep their source, so logs show the whole chain.

use chute_common::error::{BoxError, OperationError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] chute_common::Error),
    /// A NATS or JetStream call failed: streams, consumers and KV (`nats`), or the alert state
    /// in its KV bucket.
    #[error(transparent)]
    Operation(#[from] OperationError),
    /// The consumer of `EVENTS` stopped.
    #[error("consumer: {0}")]
    Consumer(String),
    /// Queueing a webhook delivery failed.
    #[error("webhook: {0}")]
    Webhook(String),
    /// The rules file was refused (the message names the line).
    #[error("rules: {0}")]
    Rules(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Schema(#[from] chute_schema::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn nats(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        OperationError::new("nats", what, source).into()
    }

    /// Alert state in the KV bucket could not be read or written.
    pub fn state(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        OperationError::new("alert state", what, source).into()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

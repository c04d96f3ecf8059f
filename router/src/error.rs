//! The router's error type. Variants keep their source, so logs show the whole chain.

use chute_common::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared building blocks' errors, among them a failed NATS or JetStream call
    /// ([`NatsFailure::nats`](chute_common::error::NatsFailure::nats),
    /// [`Error::state`]).
    #[error(transparent)]
    Common(#[from] chute_common::Error),
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
    /// Alert state in the KV bucket could not be read or written.
    pub fn state(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Common(chute_common::Error::operation("alert state", what, source))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The router's error type. Variants keep their source, so logs show the whole chain.

/// A boxed error from a NATS / JetStream call (async-nats has one error type per operation).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] chute_common::Error),
    /// A NATS or JetStream operation failed; `what` names it.
    #[error("nats: {what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: BoxError,
    },
    /// The consumer of `EVENTS` stopped.
    #[error("consumer: {0}")]
    Consumer(String),
    /// Queueing a webhook delivery failed.
    #[error("webhook: {0}")]
    Webhook(String),
    /// Alert state in the KV bucket could not be read or written.
    #[error("alert state: {what}: {source}")]
    State {
        what: String,
        #[source]
        source: BoxError,
    },
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
        Self::Nats {
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn state(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::State {
            what: what.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

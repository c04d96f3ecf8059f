//! The aggregator's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] chute_common::Error),
    #[error("nats: {0}")]
    Nats(String),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("replay: {0}")]
    Replay(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Migrate(#[from] chute_common::migrate::MigrateError),
    #[error("dead-letter stream: {0}")]
    Dlq(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

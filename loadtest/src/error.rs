//! The loadtest's error type.

/// Everything that can stop a load run, a ceiling measurement or a summary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("grpc connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse migrations: {0}")]
    Migrate(String),
    #[error("ceiling insert: {0}")]
    Insert(String),
    #[error("nats: {0}")]
    Nats(String),
    #[error("live stream: {0}")]
    Live(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("json {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_string(),
            source,
        }
    }
}

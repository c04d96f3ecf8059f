//! The error type of `chute-schema`.

use std::path::PathBuf;

/// Errors of the migration files, the renderer, the ledger and the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid migration file name {file_name:?}: expected NNNN_name.sql")]
    InvalidFileName { file_name: String },
    #[error("migrations {first} and {second} share version {version}")]
    DuplicateVersion {
        version: u32,
        first: String,
        second: String,
    },
    #[error(
        "migration {file_name} was changed after it was applied (applied checksum {applied}, \
         file checksum {current}); restore it and add a new migration instead"
    )]
    ChecksumMismatch {
        file_name: String,
        applied: String,
        current: String,
    },
    #[error("{file_name}: unknown placeholder {{{{{placeholder}}}}}")]
    UnknownPlaceholder { file_name: String, placeholder: String },
    #[error("{file_name}: {{{{{placeholder}}}}} is only valid in cluster mode")]
    ClusterOnlyPlaceholder { file_name: String, placeholder: String },
    #[error("{file_name}: {{{{cluster_only}}}} must start a statement")]
    MisplacedClusterOnly { file_name: String },
    #[error("{file_name}: unterminated {what}")]
    Unterminated { file_name: String, what: &'static str },
    #[error("invalid {what} name {name:?}: expected letters, digits and underscores")]
    InvalidIdentifier { what: &'static str, name: String },
    #[error("reading migrations from {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file_name}: statement failed: {source}\n{statement}")]
    Statement {
        file_name: String,
        statement: String,
        source: clickhouse::error::Error,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse password: {0}")]
    Secret(std::io::Error),
    #[error("clickhouse TLS: {0}")]
    Tls(String),
    #[error("user {user}: the password is empty")]
    EmptyPassword { user: String },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

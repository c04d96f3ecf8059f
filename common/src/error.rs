//! The error type of `chute-common`.

/// Errors from the shared building blocks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nats connection to {url} failed: {reason}")]
    NatsConnect { url: String, reason: String },
    #[error("jetstream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("payload: {0}")]
    Payload(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

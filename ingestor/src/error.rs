//! The ingestor's error type and its one mapping to gRPC status codes.

use chute_common::auth::{AuthError, KeysFileError};

/// Everything that can go wrong while starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] chute_common::Error),
    #[error(transparent)]
    KeysFile(#[from] KeysFileError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] chute_common::tls::TlsError),
    #[error(transparent)]
    Pricing(#[from] crate::otlp::pricing::PricingError),
    #[error("request has {count} events; the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("request is {size} bytes; the limit is {limit}")]
    RequestTooLarge { size: usize, limit: u64 },
    #[error("invalid idempotency_key: {0}")]
    IdempotencyKey(&'static str),
    #[error("jetstream unavailable: {0}")]
    Unavailable(String),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Auth(_) => tonic::Status::unauthenticated(message),
            Error::TooManyEvents { .. } | Error::IdempotencyKey(_) => tonic::Status::invalid_argument(message),
            Error::RequestTooLarge { .. } => tonic::Status::resource_exhausted(message),
            Error::Unavailable(_) | Error::Common(_) => tonic::Status::unavailable(message),
            Error::KeysFile(_) | Error::Tls(_) | Error::Pricing(_) | Error::Transport(_) | Error::Io(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

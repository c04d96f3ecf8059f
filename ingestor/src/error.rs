//! The ingestor's error type. Every error has an [`ErrorCode`], and the code alone decides
//! both the gRPC status code and the HTTP status (OTLP/HTTP), in one table; the same shape as
//! quickwit-proto's `ServiceErrorCode` (and query-api's `ErrorCode`).

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

/// What kind of failure an error is for the caller, on either transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request (or one of its fields) is malformed.
    InvalidArgument,
    /// OTLP/HTTP: a content type or content encoding the ingestor does not speak.
    UnsupportedMediaType,
    /// No API key or client certificate, or an unknown one.
    Unauthenticated,
    /// The request is over a size or count limit.
    TooLarge,
    /// Too many requests or request bytes in progress: retry after a while.
    TooManyRequests,
    /// JetStream could not store the request: retry it.
    Unavailable,
    /// The service itself is misconfigured or broken.
    Internal,
}

impl ErrorCode {
    /// The one table: each code's gRPC status code and HTTP status.
    pub fn statuses(self) -> (tonic::Code, http::StatusCode) {
        use http::StatusCode;
        use tonic::Code;
        match self {
            Self::InvalidArgument => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            Self::UnsupportedMediaType => (Code::InvalidArgument, StatusCode::UNSUPPORTED_MEDIA_TYPE),
            Self::Unauthenticated => (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            Self::TooLarge => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
            Self::TooManyRequests => (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            Self::Unavailable => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            Self::Internal => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        self.statuses().0
    }

    pub fn http_status(self) -> http::StatusCode {
        self.statuses().1
    }

    /// Whether the caller is asked to retry (HTTP answers carry `Retry-After`).
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::TooManyRequests | Self::Unavailable)
    }
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Auth(_) => ErrorCode::Unauthenticated,
            Error::TooManyEvents { .. } | Error::IdempotencyKey(_) => ErrorCode::InvalidArgument,
            Error::RequestTooLarge { .. } => ErrorCode::TooLarge,
            Error::Unavailable(_) | Error::Common(_) => ErrorCode::Unavailable,
            Error::KeysFile(_) | Error::Tls(_) | Error::Pricing(_) | Error::Transport(_) | Error::Io(_) => {
                ErrorCode::Internal
            }
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code().grpc_code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_grpc_code_and_http_status() {
        let cases = [
            (
                Error::TooManyEvents { count: 2, limit: 1 },
                tonic::Code::InvalidArgument,
                http::StatusCode::BAD_REQUEST,
            ),
            (
                Error::RequestTooLarge { size: 2, limit: 1 },
                tonic::Code::ResourceExhausted,
                http::StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                Error::Unavailable("down".into()),
                tonic::Code::Unavailable,
                http::StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::Io(std::io::Error::other("disk")),
                tonic::Code::Internal,
                http::StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (err, grpc, http) in cases {
            let code = err.code();
            assert_eq!((code.grpc_code(), code.http_status()), (grpc, http), "{err}");
            let message = err.to_string();
            let status = tonic::Status::from(err);
            assert_eq!((status.code(), status.message()), (grpc, message.as_str()));
        }
        assert!(ErrorCode::Unavailable.is_retryable() && ErrorCode::TooManyRequests.is_retryable());
        assert!(!ErrorCode::TooLarge.is_retryable());
    }
}

//! The crate's one error type. Every error has an [`ErrorCode`], and the code alone decides
//! the HTTP status, in one table ([`ErrorCode::http_status`]); the same shape as quickwit-proto's
//! `ServiceErrorCode`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chute_common::auth::{AuthError, KeysFileError};
use chute_schema::server_error::error_code as clickhouse_error_code;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a query refused by the gate ([`Error::Overloaded`]) is told to wait before retrying.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// ClickHouse's `TIMEOUT_EXCEEDED`: the query ran past `max_execution_time`.
const CLICKHOUSE_TIMEOUT_EXCEEDED: u32 = 159;

/// What kind of failure an error is for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A parameter is missing, malformed or out of range.
    BadRequest,
    /// No API key, or an unknown one.
    Unauthenticated,
    /// A valid key asking for another tenant.
    Forbidden,
    /// The query hit its time limit.
    Timeout,
    /// ClickHouse failed the query for another reason.
    Upstream,
    /// The live stream is off or full.
    Unavailable,
    /// Every ClickHouse query slot is taken and the queue is full (or waited too long).
    Overloaded,
    /// The service itself is misconfigured or broken.
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream => StatusCode::BAD_GATEWAY,
            Self::Unavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A query parameter is missing, malformed or out of range.
    #[error("{message}")]
    InvalidParameter { parameter: String, message: String },
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    #[error("the api key of tenant {key_tenant:?} may not read tenant {requested:?}")]
    Forbidden { key_tenant: String, requested: String },
    /// ClickHouse stopped the query at `max_execution_time`, or the client gave up waiting.
    #[error("query exceeded the time limit")]
    QueryTimeout(#[source] clickhouse::error::Error),
    #[error("clickhouse query failed: {0}")]
    ClickHouse(#[source] clickhouse::error::Error),
    /// `/v1/stream` without a NATS url, or with every slot taken.
    #[error("live stream unavailable: {0}")]
    StreamUnavailable(&'static str),
    #[error("live stream unavailable: {0}")]
    NatsConnect(#[source] chute_common::Error),
    /// The query gate is full; the answer carries `Retry-After`.
    #[error("too many queries in flight ({running} running, {queued} queued): retry shortly")]
    Overloaded { running: usize, queued: usize },
    #[error(transparent)]
    KeysFile(#[from] KeysFileError),
    #[error(transparent)]
    Tls(#[from] chute_common::tls::TlsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<clickhouse::error::Error> for Error {
    /// The time limit is told apart from other failures by ClickHouse's error code.
    fn from(err: clickhouse::error::Error) -> Self {
        let timed_out = matches!(err, clickhouse::error::Error::TimedOut)
            || clickhouse_error_code(&err) == Some(CLICKHOUSE_TIMEOUT_EXCEEDED);
        if timed_out {
            Self::QueryTimeout(err)
        } else {
            Self::ClickHouse(err)
        }
    }
}

impl Error {
    pub fn invalid(parameter: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            parameter: parameter.into(),
            message: message.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidParameter { .. } => ErrorCode::BadRequest,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden { .. } => ErrorCode::Forbidden,
            Self::QueryTimeout(_) => ErrorCode::Timeout,
            Self::ClickHouse(_) => ErrorCode::Upstream,
            Self::StreamUnavailable(_) | Self::NatsConnect(_) => ErrorCode::Unavailable,
            Self::Overloaded { .. } => ErrorCode::Overloaded,
            Self::KeysFile(_) | Self::Tls(_) | Self::Io(_) => ErrorCode::Internal,
        }
    }

    /// `{"error": "...", "parameter": "..."}` (parameter only for a bad parameter). ClickHouse
    /// details stay in the log, not in the answer.
    pub fn body(&self) -> serde_json::Value {
        match self {
            Self::InvalidParameter { parameter, message } => {
                serde_json::json!({ "error": message, "parameter": parameter })
            }
            Self::ClickHouse(_) => serde_json::json!({ "error": "clickhouse query failed" }),
            other => serde_json::json!({ "error": other.to_string() }),
        }
    }
}

/// An error as a handler returns it: shared, because the cache hands one failure to every
/// caller that waited on the same query.
#[derive(Debug, Clone)]
pub struct ApiError(pub Arc<Error>);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(Arc::new(err))
    }
}

impl From<Arc<Error>> for ApiError {
    fn from(err: Arc<Error>) -> Self {
        Self(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status = code.http_status();
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        let mut response = (status, axum::Json(self.0.body())).into_response();
        if code == ErrorCode::Overloaded {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
            );
        }
        if code == ErrorCode::Unauthenticated {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_response(text: &str) -> clickhouse::error::Error {
        clickhouse::error::Error::BadResponse(text.to_owned())
    }

    #[test]
    fn codes_and_bodies() {
        let err = Error::invalid("step", "bad step");
        assert_eq!(err.code().http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            err.body(),
            serde_json::json!({"error": "bad step", "parameter": "step"})
        );
        assert_eq!(Error::from(AuthError::Missing).code(), ErrorCode::Unauthenticated);
        let forbidden = Error::Forbidden {
            key_tenant: "a".into(),
            requested: "b".into(),
        };
        assert_eq!(forbidden.code().http_status(), StatusCode::FORBIDDEN);
        let failed = Error::from(bad_response("Code: 60. DB::Exception: Unknown table (UNKNOWN_TABLE)"));
        assert_eq!(failed.code().http_status(), StatusCode::BAD_GATEWAY);
        assert_eq!(failed.body(), serde_json::json!({"error": "clickhouse query failed"}));
    }

    #[test]
    fn time_limits_are_504s_that_keep_the_clickhouse_error() {
        let text = "Code: 159. DB::Exception: Timeout exceeded: elapsed 10.2 seconds, maximum: 10. \
                    (TIMEOUT_EXCEEDED) (version 26.9.1.1 (official build))";
        for err in [
            bad_response(text),
            bad_response("159"),
            clickhouse::error::Error::TimedOut,
        ] {
            let err = Error::from(err);
            assert_eq!(err.code().http_status(), StatusCode::GATEWAY_TIMEOUT, "{err:?}");
            assert_eq!(
                err.body(),
                serde_json::json!({"error": "query exceeded the time limit"})
            );
            assert!(std::error::Error::source(&err).is_some());
        }
    }

    #[test]
    fn the_code_is_read_from_the_exception_text() {
        let code = |text: &str| clickhouse_error_code(&bad_response(text));
        assert_eq!(code("Code: 159. DB::Exception: Timeout exceeded"), Some(159));
        assert_eq!(
            code("Code: 72. DB::Exception: Code: 72. DB::Exception: nested (version x). (NAME)"),
            Some(72)
        );
        assert_eq!(code("396"), Some(396));
        // Another code that merely mentions 159 is not a timeout.
        assert_eq!(
            code("Code: 62. DB::Exception: Syntax error near 'Code: 159.'"),
            Some(62)
        );
        assert_eq!(code("Expected at least one column in the header"), None);
        assert_eq!(code("Code: x. DB::Exception"), None);
        assert_eq!(clickhouse_error_code(&clickhouse::error::Error::TimedOut), None);
    }
}

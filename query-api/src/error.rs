//! The crate's one error type and its mapping to HTTP status codes and JSON bodies.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chute_common::auth::AuthError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A query parameter is missing, malformed or out of range.
    #[error("{message}")]
    InvalidParameter { parameter: String, message: String },
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    #[error("the api key of tenant {key_tenant:?} may not read tenant {requested:?}")]
    Forbidden { key_tenant: String, requested: String },
    #[error("query exceeded the time limit")]
    QueryTimeout,
    #[error("clickhouse query failed: {0}")]
    ClickHouse(#[source] clickhouse::error::Error),
    #[error("live stream unavailable: {0}")]
    StreamUnavailable(String),
    #[error("{0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn invalid(parameter: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            parameter: parameter.into(),
            message: message.into(),
        }
    }

    /// ClickHouse errors, with the time limit told apart (a 504, not a 502).
    pub fn from_clickhouse(err: clickhouse::error::Error) -> Self {
        let text = err.to_string();
        if text.contains("TIMEOUT_EXCEEDED") || text.contains("Code: 159.") {
            Self::QueryTimeout
        } else {
            Self::ClickHouse(err)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::QueryTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ClickHouse(_) => StatusCode::BAD_GATEWAY,
            Self::StreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Config(_) | Self::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        let status = self.0.status();
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        let mut response = (status, axum::Json(self.0.body())).into_response();
        if matches!(*self.0, Error::Unauthenticated(_)) {
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

    #[test]
    fn statuses_and_bodies() {
        let err = Error::invalid("step", "bad step");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            err.body(),
            serde_json::json!({"error": "bad step", "parameter": "step"})
        );
        assert_eq!(Error::from(AuthError::Missing).status(), StatusCode::UNAUTHORIZED);
        let forbidden = Error::Forbidden {
            key_tenant: "a".into(),
            requested: "b".into(),
        };
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    }
}

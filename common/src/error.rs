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
    /// A NATS or JetStream call of a service failed (the aggregator's and the router's errors
    /// hold it through their `Common` variant).
    #[error(transparent)]
    Operation(#[from] OperationError),
}

impl Error {
    /// [`OperationError::new`] as an [`Error`].
    pub fn operation(area: &'static str, what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Operation(OperationError::new(area, what, source))
    }
}

/// `E::nats(what, source)`: a failed NATS or JetStream call (area `nats`), for [`Error`] and every
/// service error that holds it (the aggregator's and the router's), written once here.
pub trait NatsFailure: From<Error> {
    fn nats(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::from(Error::operation("nats", what, source))
    }
}

impl<E: From<Error>> NatsFailure for E {}

/// A boxed error from a NATS / JetStream call (async-nats has one error type per operation).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A NATS or JetStream operation of a service failed: `area` is what it served (`nats` for the
/// stream and connection, `ledger`, `dead-letter stream`, `alert state`), `what` names the call.
/// [`Error::Operation`] and the services' errors hold it transparently, so their message and
/// source chain are this one's.
#[derive(Debug, thiserror::Error)]
#[error("{area}: {what}: {source}")]
pub struct OperationError {
    pub area: &'static str,
    pub what: String,
    #[source]
    pub source: BoxError,
}

impl OperationError {
    pub fn new(area: &'static str, what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            area,
            what: what.into(),
            source: source.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_error_names_the_operation_and_keeps_its_source() {
        let error = OperationError::new("nats", "stream EVENTS", std::io::Error::other("timed out"));
        assert_eq!(error.to_string(), "nats: stream EVENTS: timed out");
        let source = std::error::Error::source(&error).expect("a source");
        assert_eq!(source.to_string(), "timed out");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }
}

//! The aggregator's error type. Variants keep their source: the insert retry policy
//! ([`crate::classify`]) reads the original ClickHouse error, and logs show the whole chain.

use chute_common::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared building blocks' errors, among them a failed NATS or JetStream call
    /// ([`NatsFailure::nats`](chute_common::error::NatsFailure::nats),
    /// [`Error::ledger`], [`Error::dlq`]).
    #[error(transparent)]
    Common(#[from] chute_common::Error),
    /// The ledger entry does not parse.
    #[error("ledger: corrupt entry: {0}")]
    CorruptLedger(#[source] serde_json::Error),
    /// The ledger describes another stream than the one in NATS (recreated stream, or a ledger
    /// restored elsewhere). Nothing is guessed: the operator picks the recovery.
    #[error(
        "the ledger belongs to stream {stream} with epoch {ledger_epoch} (unix ns of its creation), \
         but the stream now in NATS has epoch {stream_epoch} (recreated?); refusing to start rather \
         than guess positions. \
         With every aggregator stopped, rebuild the positions from what ClickHouse holds: \
         `aggregator ledger reset --from-clickhouse` (add --dry-run to see them first)"
    )]
    EpochMismatch {
        stream: String,
        ledger_epoch: i64,
        stream_epoch: i64,
    },
    /// The ledger is missing while the stream and ClickHouse already hold data: starting from
    /// position 0 would insert everything again under new tokens.
    #[error(
        "the ledger is empty but stream {stream} already holds up to sequence {last_sequence} and \
         ClickHouse holds events; refusing to re-insert from the start (rollups would count it \
         twice). With every aggregator stopped, rebuild the positions from what ClickHouse holds: \
         `aggregator ledger reset --from-clickhouse` (add --dry-run to see them first)"
    )]
    LedgerMissing { stream: String, last_sequence: u64 },
    /// Reading a recorded batch back from the stream failed.
    #[error("replay of partition {partition}: {reason}")]
    Replay { partition: u32, reason: String },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Migrate(#[from] chute_schema::Error),
    /// A batch task panicked or was cancelled.
    #[error("batch task: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Reading or writing the ledger KV entry failed.
    pub fn ledger(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Common(chute_common::Error::operation("ledger", what, source))
    }

    pub fn dlq(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Common(chute_common::Error::operation("dead-letter stream", what, source))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

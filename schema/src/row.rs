//! The row of `events` (see `sql/migrations/0001_events.sql`): the aggregator inserts it, and
//! the query API's `/v1/events` reads it back (`sql::events` selects these columns by name).
//!
//! Every column except `inserted_at`, which ClickHouse fills (`DEFAULT now64(3)`); the
//! `clickhouse` crate inserts with an explicit column list built from the field names, so the
//! column order of the table does not matter and defaulted columns may be left out.
//!
//! Encoding is on the aggregator's hot path, so the fields are what RowBinary wants with no
//! conversion: times are `i64` milliseconds since the Unix epoch (the wire form of
//! `DateTime64(3)`), maps are `Vec`s of pairs (the wire form of `Map`: a length, then keys and
//! values in order; duplicate keys are kept as given), and the UUID goes out as its two `u64`
//! halves.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the raw events table (in the configured database).
pub const EVENTS_TABLE: &str = "events";

/// One row of `events`, as the aggregator inserts it and `/v1/events` reads it: every column but
/// `inserted_at`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EventsRow {
    pub tenant: String,
    pub name: String,
    /// Event time, milliseconds since the Unix epoch (UTC).
    pub time: i64,
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Empty when the event has none (not counted as a session).
    pub session_id: String,
    /// Empty when the event has none (not counted as a user).
    pub user_id: String,
    pub attributes: Vec<(String, String)>,
    pub metrics: Vec<(String, f64)>,
    pub body: String,
    /// When the ingestor accepted the event, milliseconds since the Unix epoch (UTC).
    pub ingested_at: i64,
}

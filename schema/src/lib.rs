//! The ClickHouse side of Chute, shared by the services that talk to ClickHouse (aggregator,
//! query API, load generator). It is a crate of its own so that the ingestor, which never talks
//! to ClickHouse, does not build the `clickhouse` crate.
//!
//! - [`migrate`]: the schema runner over `sql/bootstrap.sql` and `sql/migrations/`
//!   (`aggregator migrate [--dry-run] [--cluster]`).
//! - [`row`]: the row the aggregator inserts into `events`, and the row read back.
//! - `testing` (feature `test-util`): a guard that runs the ClickHouse dev server.

pub mod migrate;
pub mod row;

#[cfg(feature = "test-util")]
pub mod testing;

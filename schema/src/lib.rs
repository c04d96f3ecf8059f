//! The ClickHouse side of Chute, shared by the services that talk to ClickHouse (aggregator,
//! query API, load generator). It is a crate of its own so that the ingestor, which never talks
//! to ClickHouse, does not build the `clickhouse` crate.
//!
//! The schema runner (`aggregator migrate [--dry-run] [--cluster]`), three pure pieces and the I/O:
//! - [`migration`]: the files `sql/migrations/NNNN_name.sql`, embedded in the binary.
//! - [`split`]: a file's text into its statements.
//! - [`render`]: the statements for one node or a cluster ([`Target`]); [`render::DEDUP_WINDOW`].
//! - [`ledger`]: `schema_migrations` against the files: applied, pending, changed (checksums).
//! - [`migrate`]: the runner ([`Migrator`]), and why running it twice, or twice at once, is safe.
//!
//! And:
//! - [`row`]: the row the aggregator inserts into `events`, and the row read back.
//! - [`server_error`]: the `Code: N` of a ClickHouse error, for retry and status decisions.
//! - [`users`]: the services' least-privilege ClickHouse users, applied by the runner.
//! - [`client`]: ClickHouse clients over HTTP or HTTPS (a private CA), logged in.
//! - `testing` (feature `test-util`): a guard that runs the ClickHouse dev server.

pub mod client;
pub mod error;
pub mod ledger;
pub mod migrate;
pub mod migration;
pub mod render;
pub mod row;
pub mod server_error;
pub mod split;
pub mod users;

#[cfg(feature = "test-util")]
pub mod testing;

pub use error::{Error, Result};
pub use migrate::{Migrator, Plan};
pub use render::Target;
pub use users::{Role, ServiceUser, Users};

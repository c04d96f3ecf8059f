//! Integration tests for chute-schema against the ClickHouse dev server.

mod clickhouse_dev;
mod migrate;
mod schema;
mod users;

//! Integration tests for chute-common against real processes (nats-server, ClickHouse dev server).

mod clickhouse_dev;
mod migrate;
mod schema;

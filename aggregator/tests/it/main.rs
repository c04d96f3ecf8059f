//! Aggregator integration tests: real nats-server, the ClickHouse dev server, the real ingestor
//! (in-process) and the real aggregator binary, killed mid-flight.

mod clickhouse_users;
mod cluster;
mod crash;
mod dlq;
mod e2e;
mod identity;
mod ledger_cas;
mod nats_users;
mod otlp;
mod process;
mod reader;
mod refused;
mod stall;
mod support;
mod trim;

//! Router integration tests against a real nats-server and the ClickHouse dev server.

mod webhook;
mod window_sql;

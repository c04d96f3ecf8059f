//! Router integration tests against a real nats-server and the ClickHouse dev server.

mod alerts;
mod matcher_sql;
mod routing;
mod support;
mod webhook;
mod window_sql;

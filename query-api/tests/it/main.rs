//! Integration tests against the ClickHouse dev server (one database per test, named after it)
//! and a real nats-server + in-process ingestor for the live stream.

mod support;

mod auth;
mod cache;
mod edge;
mod endpoints;
mod injection;
mod limits;
mod live;
mod page;
mod query_of_death;
mod server;
mod server_timing;
mod sessions_limit;
mod tls;

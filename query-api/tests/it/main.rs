//! Integration tests against the ClickHouse dev server (one database per test, named after it)
//! and a real nats-server + in-process ingestor for the live stream.

mod support;

mod auth;
mod cache;
mod endpoints;
mod injection;
mod live;
mod page;
mod server;

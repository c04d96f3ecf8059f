//! Chute router: live rules on the event stream.
//!
//! It reads `EVENTS` through its own durable consumer ([`engine`]), independent of the
//! aggregators, and evaluates tenant-scoped rules from a YAML file ([`rules`] parses it into a
//! [`spec::RuleSet`]; [`matcher`] decides which events a rule looks at):
//! - route rules copy matching events to `routes.<tenant>.<rule>` in the `ROUTES` stream;
//! - threshold rules keep bounded sliding windows ([`window`]) and fire and resolve alerts
//!   ([`alert`]);
//! - anomaly rules keep a per-series baseline over minute buckets ([`anomaly`]) and publish
//!   `chute.anomaly` events into the normal pipeline.
//!
//! [`evaluate`] owns the windows, alert states and baselines and turns them into outputs;
//! [`seed`] rebuilds them from ClickHouse at start. Webhooks ([`webhook`]) are queued in the
//! `WEBHOOKS` stream and delivered, signed, at least once; deliveries that run out of attempts
//! go to `ROUTES_DLQ` ([`dlq`]), from which [`webhook::replay_dead_letters`] queues them again.
//! [`headers`] lists every header the router writes. [`server::run`] wires it all.

pub mod alert;
pub mod anomaly;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod headers;
pub mod matcher;
pub mod rules;
pub mod seed;
pub mod server;
pub mod spec;
pub mod telemetry;
pub mod webhook;
pub mod window;

pub use config::Config;
pub use error::{Error, Result};
pub use server::run;

//! Ingestor integration tests: a real nats-server, the real gRPC server, real clients.

mod auth;
mod edge;
mod limits;
mod otlp;
mod outage;
mod publish;
mod python_client;
mod retry;
mod support;
mod tls;
mod validation;

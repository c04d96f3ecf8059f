//! `chute-common` integration tests against a real nats-server.

mod nats_security;

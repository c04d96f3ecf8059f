//! Every header the router writes, in one place: what a consumer of `ROUTES`, a webhook
//! destination and a reader of `ROUTES_DLQ` each see.

/// NATS headers on a routed copy in `ROUTES` ([`crate::engine`]).
pub mod routed {
    pub const TENANT: &str = "Chute-Tenant";
    pub const RULE: &str = "Chute-Rule";
    pub const EVENT_ID: &str = "Chute-Event-Id";
}

/// HTTP headers of a webhook delivery ([`crate::webhook`]).
pub mod webhook {
    /// The same on every attempt of one delivery: destinations deduplicate on it.
    pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
    pub const ATTEMPT: &str = "Chute-Delivery-Attempt";
    pub const SIGNATURE: &str = "Chute-Signature";
}

/// NATS headers of a dead-lettered delivery in `ROUTES_DLQ` ([`crate::dlq`]).
pub mod dead_letter {
    pub const ERROR: &str = "Chute-Error";
    pub const REASON: &str = "Chute-Reason";
    pub const ATTEMPTS: &str = "Chute-Attempts";
    pub const DESTINATION: &str = "Chute-Destination";
    /// The delivery's [`super::webhook::IDEMPOTENCY_KEY`].
    pub const IDEMPOTENCY_KEY: &str = "Chute-Idempotency-Key";
    /// The delivery's sequence in `WEBHOOKS`.
    pub const SEQUENCE: &str = "Chute-Original-Sequence";
    /// On a replayed delivery: the `ROUTES_DLQ` entry it came from.
    pub const REPLAY_OF: &str = "Chute-Replay-Of";
}

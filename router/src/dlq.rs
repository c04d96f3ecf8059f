//! `ROUTES_DLQ`: webhook deliveries that ran out of attempts; `router dlq list|replay`. Owned by
//! WEBHOOK (to be completed).

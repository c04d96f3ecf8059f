//! Which events a rule looks at: a compiled match on the event name (glob), attributes (equals,
//! in, regex, exists) and metric predicates (`quality < 0.7`).
//!
//! Owned by RULES (to be completed): `Matcher::matches(&Event) -> bool` and
//! `Matcher::to_sql() -> String` (a ClickHouse boolean expression over the raw `events` table).

/// A compiled match. `Matcher::default()` matches every event.
#[derive(Debug, Clone, Default)]
pub struct Matcher {}

//! The event rules, as plain functions over data.
//!
//! The ingestor calls [`normalize`] on every event of a request: it fills the defaults (tenant
//! from the API key, `event_id`, receive time) and then applies [`check`]. The aggregator calls
//! [`check`] again on what it reads from the stream, against the batch's receive time, so the
//! verdict for a message never depends on when it is (re)processed.

use std::time::Duration;

use chute_proto::v1::Event;
use uuid::Uuid;

/// Namespace for UUIDv5 event ids derived from an idempotency key (a fixed random UUID).
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2c9e_0b7a_4e55_9a43_52c1_d8e6_b0f4);

/// Per-event limits. The defaults are the documented contract.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_attributes: usize,
    pub max_metrics: usize,
    pub max_key_bytes: usize,
    pub max_attribute_value_bytes: usize,
    pub max_body_bytes: usize,
    /// `session_id` and `user_id`.
    pub max_id_bytes: usize,
    /// How far before the receive time an event's `time` may be.
    pub max_past: Duration,
    /// How far after the receive time an event's `time` may be.
    pub max_future: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_attributes: 64,
            max_metrics: 64,
            max_key_bytes: 128,
            max_attribute_value_bytes: 4 * 1024,
            max_body_bytes: 64 * 1024,
            max_id_bytes: 256,
            max_past: Duration::from_secs(7 * 24 * 3600),
            max_future: Duration::from_secs(5 * 60),
        }
    }
}

/// Why one event was refused: the offending field and a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub field: String,
    pub reason: String,
}

impl Rejection {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short, stable label for metrics (`field` without map keys).
    pub fn metric_label(&self) -> &str {
        self.field.split('[').next().unwrap_or(&self.field)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// What [`normalize`] needs to know about the request an event came in.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    /// Receive time of the request, unix nanoseconds.
    pub received_unix_nanos: i64,
    /// The tenant bound to the caller's API key, if API keys are enforced.
    pub key_tenant: Option<&'a str>,
    /// The request's idempotency key ("" when none).
    pub idempotency_key: &'a str,
}

/// Fills the defaults of one event and validates it. `index` is the event's position in the
/// request (it seeds the derived event id, so a retried request yields the same ids).
pub fn normalize(event: &mut Event, index: usize, ctx: &RequestContext<'_>, limits: &Limits) -> Result<(), Rejection> {
    match ctx.key_tenant {
        Some(key_tenant) if event.tenant.is_empty() => event.tenant = key_tenant.to_owned(),
        Some(key_tenant) if event.tenant != key_tenant => {
            return Err(Rejection::new("tenant", "tenant does not match the API key's tenant"));
        }
        _ => {}
    }
    check_tenant(&event.tenant)?;

    if event.event_id.is_empty() {
        event.event_id = derive_event_id(&event.tenant, ctx.idempotency_key, index).to_string();
    } else {
        let parsed = Uuid::try_parse(&event.event_id)
            .map_err(|_| Rejection::new("event_id", "must be a UUID (e.g. 0190b7e4-6f1e-7c3a-9d2b-1f0e5a6b7c8d)"))?;
        event.event_id = parsed.hyphenated().to_string();
    }
    if event.time.is_none() {
        event.time = Some(timestamp_from_nanos(ctx.received_unix_nanos));
    }
    check(event, ctx.received_unix_nanos, limits)
}

/// Validates an already normalized event (id, tenant and time present) against `limits`, with
/// the time window anchored at `received_unix_nanos`.
pub fn check(event: &Event, received_unix_nanos: i64, limits: &Limits) -> Result<(), Rejection> {
    check_tenant(&event.tenant)?;
    if Uuid::try_parse(&event.event_id).is_err() {
        return Err(Rejection::new("event_id", "must be a UUID"));
    }
    check_name(&event.name)?;
    check_time(event, received_unix_nanos, limits)?;
    at_most("session_id", event.session_id.len(), limits.max_id_bytes, "bytes")?;
    at_most("user_id", event.user_id.len(), limits.max_id_bytes, "bytes")?;
    at_most(
        "attributes",
        event.attributes.len(),
        limits.max_attributes,
        "attributes",
    )?;
    for (key, value) in &event.attributes {
        check_key("attributes", key, limits)?;
        if value.len() > limits.max_attribute_value_bytes {
            return Err(Rejection::new(
                format!("attributes[{}]", truncated(key, 32)),
                format!("value longer than {} bytes", limits.max_attribute_value_bytes),
            ));
        }
    }
    at_most("metrics", event.metrics.len(), limits.max_metrics, "metrics")?;
    for (key, value) in &event.metrics {
        check_key("metrics", key, limits)?;
        if !value.is_finite() {
            return Err(Rejection::new(
                format!("metrics[{}]", truncated(key, 32)),
                "must be a finite number",
            ));
        }
    }
    at_most("body", event.body.len(), limits.max_body_bytes, "bytes")?;
    Ok(())
}

/// `field` holds at most `max` `unit`s: "longer than 64 bytes", "more than 32 attributes".
fn at_most(field: &'static str, len: usize, max: usize, unit: &str) -> Result<(), Rejection> {
    if len <= max {
        return Ok(());
    }
    let comparison = if unit == "bytes" { "longer than" } else { "more than" };
    Err(Rejection::new(field, format!("{comparison} {max} {unit}")))
}

/// `[a-z0-9_-]{1,64}`.
pub fn is_valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[A-Za-z0-9_.:-]{1,128}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The event id for an event without one: UUIDv5 of (tenant, idempotency key, index) when a key
/// is given, so retries reproduce it; otherwise a fresh, time-ordered UUIDv7.
pub fn derive_event_id(tenant: &str, idempotency_key: &str, index: usize) -> Uuid {
    if idempotency_key.is_empty() {
        return Uuid::now_v7();
    }
    let name = format!("{tenant}\u{0}{idempotency_key}\u{0}{index}");
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

/// The wall clock in unix nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or_default()
}

/// The wall clock in unix milliseconds (0 if the clock is before 1970).
pub fn unix_millis_now() -> i64 {
    unix_nanos_now() / 1_000_000
}

/// Unix nanoseconds of a protobuf timestamp, `None` when out of range or malformed.
pub fn timestamp_to_nanos(ts: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds.checked_mul(1_000_000_000)?.checked_add(i64::from(ts.nanos))
}

/// The protobuf timestamp of unix nanoseconds.
pub fn timestamp_from_nanos(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

fn check_tenant(tenant: &str) -> Result<(), Rejection> {
    present_and_valid(
        "tenant",
        tenant,
        is_valid_tenant,
        "required (no API key tenant to default to)",
        "must match [a-z0-9_-]{1,64}",
    )
}

fn check_name(name: &str) -> Result<(), Rejection> {
    present_and_valid(
        "name",
        name,
        is_valid_name,
        "required",
        "must be 1-128 characters of [A-Za-z0-9_.:-]",
    )
}

/// `value` is not empty (else `when_empty`) and passes `is_valid` (else `rule`).
fn present_and_valid(
    field: &'static str,
    value: &str,
    is_valid: fn(&str) -> bool,
    when_empty: &'static str,
    rule: &'static str,
) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::new(field, when_empty));
    }
    if !is_valid(value) {
        return Err(Rejection::new(field, rule));
    }
    Ok(())
}

fn check_time(event: &Event, received_unix_nanos: i64, limits: &Limits) -> Result<(), Rejection> {
    let Some(ts) = &event.time else {
        return Err(Rejection::new("time", "required"));
    };
    let Some(nanos) = timestamp_to_nanos(ts) else {
        return Err(Rejection::new("time", "not a valid timestamp"));
    };
    let earliest = received_unix_nanos.saturating_sub(limits.max_past.as_nanos() as i64);
    let latest = received_unix_nanos.saturating_add(limits.max_future.as_nanos() as i64);
    if nanos < earliest {
        return Err(Rejection::new(
            "time",
            format!("more than {:?} in the past", limits.max_past),
        ));
    }
    if nanos > latest {
        return Err(Rejection::new(
            "time",
            format!("more than {:?} in the future", limits.max_future),
        ));
    }
    Ok(())
}

fn check_key(map: &str, key: &str, limits: &Limits) -> Result<(), Rejection> {
    if key.is_empty() {
        return Err(Rejection::new(map, "empty key"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(Rejection::new(
            format!("{map}[{}]", truncated(key, 32)),
            format!("key longer than {} bytes", limits.max_key_bytes),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Rejection::new(
            format!("{map}[{}]", truncated(key, 32).escape_debug()),
            "key has control characters",
        ));
    }
    Ok(())
}

/// At most `max` characters of user-supplied text, for error messages (cut on a character
/// boundary).
pub fn truncated(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// `items` joined with ", " for a message, or "none" when there are none.
pub fn list_or_none<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    let items: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    items.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_name_their_items_or_none() {
        assert_eq!(list_or_none::<String>(&[]), "none");
        assert_eq!(list_or_none(&["0001_events.sql"]), "0001_events.sql");
        assert_eq!(list_or_none(&["a".to_owned(), "b".to_owned()]), "a, b");
    }

    const NOW: i64 = 1_780_000_000_000_000_000;

    fn valid() -> Event {
        Event {
            tenant: "acme".into(),
            name: "llm.request".into(),
            time: Some(timestamp_from_nanos(NOW)),
            metrics: [("tokens_in".to_string(), 12.0)].into(),
            attributes: [("model".to_string(), "small".to_string())].into(),
            ..Default::default()
        }
    }

    fn ctx<'a>(key_tenant: Option<&'a str>, idempotency_key: &'a str) -> RequestContext<'a> {
        RequestContext {
            received_unix_nanos: NOW,
            key_tenant,
            idempotency_key,
        }
    }

    fn rejection(mut event: Event) -> Rejection {
        normalize(&mut event, 0, &ctx(None, ""), &Limits::default()).expect_err("must be rejected")
    }

    fn accepted(mut event: Event) -> Event {
        normalize(&mut event, 0, &ctx(None, ""), &Limits::default()).expect("must be accepted");
        event
    }

    #[test]
    fn a_valid_event_gets_an_id_and_keeps_its_fields() {
        let event = accepted(valid());
        assert_eq!(Uuid::parse_str(&event.event_id).unwrap().get_version_num(), 7);
        assert_eq!(event.name, "llm.request");
    }

    #[test]
    fn name_rules() {
        accepted(Event {
            name: "a:b-c_d.E9".into(),
            ..valid()
        });
        accepted(Event {
            name: "n".repeat(128),
            ..valid()
        });
        assert_eq!(
            rejection(Event {
                name: String::new(),
                ..valid()
            })
            .field,
            "name"
        );
        assert_eq!(
            rejection(Event {
                name: "has space".into(),
                ..valid()
            })
            .field,
            "name"
        );
        assert_eq!(
            rejection(Event {
                name: "n".repeat(129),
                ..valid()
            })
            .field,
            "name"
        );
    }

    #[test]
    fn tenant_rules() {
        accepted(Event {
            tenant: "a_b-9".into(),
            ..valid()
        });
        let missing = rejection(Event {
            tenant: String::new(),
            ..valid()
        });
        assert_eq!(
            (missing.field.as_str(), missing.reason.starts_with("required")),
            ("tenant", true)
        );
        assert_eq!(
            rejection(Event {
                tenant: "Upper".into(),
                ..valid()
            })
            .field,
            "tenant"
        );
        assert_eq!(
            rejection(Event {
                tenant: "t".repeat(65),
                ..valid()
            })
            .field,
            "tenant"
        );
    }

    #[test]
    fn tenant_defaults_to_the_api_key_and_must_match_it() {
        let mut event = Event {
            tenant: String::new(),
            ..valid()
        };
        normalize(&mut event, 0, &ctx(Some("acme"), ""), &Limits::default()).unwrap();
        assert_eq!(event.tenant, "acme");
        let mut other = Event {
            tenant: "globex".into(),
            ..valid()
        };
        let err = normalize(&mut other, 0, &ctx(Some("acme"), ""), &Limits::default()).unwrap_err();
        assert_eq!(err.field, "tenant");
        assert!(err.reason.contains("API key"));
    }

    #[test]
    fn time_window() {
        let limits = Limits::default();
        let day = 24 * 3600 * 1_000_000_000_i64;
        accepted(Event {
            time: Some(timestamp_from_nanos(NOW - 6 * day)),
            ..valid()
        });
        accepted(Event {
            time: Some(timestamp_from_nanos(NOW + 4 * 60 * 1_000_000_000)),
            ..valid()
        });
        let old = rejection(Event {
            time: Some(timestamp_from_nanos(NOW - 8 * day)),
            ..valid()
        });
        assert_eq!((old.field.as_str(), old.reason.contains("past")), ("time", true));
        let future = rejection(Event {
            time: Some(timestamp_from_nanos(NOW + 6 * 60 * 1_000_000_000)),
            ..valid()
        });
        assert_eq!(
            (future.field.as_str(), future.reason.contains("future")),
            ("time", true)
        );
        let bad_nanos = rejection(Event {
            time: Some(prost_types::Timestamp { seconds: 1, nanos: -1 }),
            ..valid()
        });
        assert_eq!(bad_nanos.field, "time");
        let unset = accepted(Event { time: None, ..valid() });
        assert_eq!(timestamp_to_nanos(unset.time.as_ref().unwrap()), Some(NOW));
        assert!(limits.max_past > limits.max_future);
    }

    #[test]
    fn attribute_and_metric_limits() {
        let many_attributes = (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert_eq!(
            rejection(Event {
                attributes: many_attributes,
                ..valid()
            })
            .field,
            "attributes"
        );
        let sixty_four = (0..64).map(|i| (format!("k{i}"), "v".to_string())).collect();
        accepted(Event {
            attributes: sixty_four,
            ..valid()
        });

        let many_metrics = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
        assert_eq!(
            rejection(Event {
                metrics: many_metrics,
                ..valid()
            })
            .field,
            "metrics"
        );

        let long_key = [("k".repeat(129), "v".to_string())].into();
        let err = rejection(Event {
            attributes: long_key,
            ..valid()
        });
        assert!(err.field.starts_with("attributes[") && err.reason.contains("128"));
        accepted(Event {
            attributes: [("k".repeat(128), "v".to_string())].into(),
            ..valid()
        });

        let big_value = [("k".to_string(), "v".repeat(4097))].into();
        assert_eq!(
            rejection(Event {
                attributes: big_value,
                ..valid()
            })
            .field,
            "attributes[k]"
        );
        accepted(Event {
            attributes: [("k".to_string(), "v".repeat(4096))].into(),
            ..valid()
        });

        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = rejection(Event {
                metrics: [("latency_ms".to_string(), bad)].into(),
                ..valid()
            });
            assert_eq!(
                (err.field.as_str(), err.reason.as_str()),
                ("metrics[latency_ms]", "must be a finite number")
            );
        }
        assert_eq!(
            rejection(Event {
                metrics: [(String::new(), 1.0)].into(),
                ..valid()
            })
            .field,
            "metrics"
        );
    }

    #[test]
    fn body_and_id_limits() {
        accepted(Event {
            body: "b".repeat(64 * 1024),
            ..valid()
        });
        assert_eq!(
            rejection(Event {
                body: "b".repeat(64 * 1024 + 1),
                ..valid()
            })
            .field,
            "body"
        );
        assert_eq!(
            rejection(Event {
                session_id: "s".repeat(257),
                ..valid()
            })
            .field,
            "session_id"
        );
        assert_eq!(
            rejection(Event {
                user_id: "u".repeat(257),
                ..valid()
            })
            .field,
            "user_id"
        );
    }

    #[test]
    fn event_id_is_checked_and_canonicalized() {
        let upper = accepted(Event {
            event_id: "6F1D2C9E-0B7A-4E55-9A43-52C1D8E6B0F4".into(),
            ..valid()
        });
        assert_eq!(upper.event_id, "6f1d2c9e-0b7a-4e55-9a43-52c1d8e6b0f4");
        let err = rejection(Event {
            event_id: "not-a-uuid".into(),
            ..valid()
        });
        assert_eq!(err.field, "event_id");
    }

    #[test]
    fn derived_ids_are_stable_per_key_and_index() {
        let first = derive_event_id("acme", "req-1", 3);
        assert_eq!(first, derive_event_id("acme", "req-1", 3));
        assert_ne!(first, derive_event_id("acme", "req-1", 4));
        assert_ne!(first, derive_event_id("globex", "req-1", 3));
        assert_eq!(first.get_version_num(), 5);
        assert_ne!(derive_event_id("acme", "", 3), derive_event_id("acme", "", 3));
    }

    #[test]
    fn aggregator_check_uses_the_batch_receive_time() {
        let event = accepted(valid());
        let much_later = NOW + 30 * 24 * 3600 * 1_000_000_000;
        assert!(check(&event, NOW, &Limits::default()).is_ok());
        assert_eq!(check(&event, much_later, &Limits::default()).unwrap_err().field, "time");
    }
}

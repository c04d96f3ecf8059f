//! Workload generation: a pool of request templates, encoded once.
//!
//! Building protobuf events per request would make the load generator the bottleneck on a
//! 2-core machine shared with the pipeline, so the generator encodes a pool of templates up
//! front (the `events` field of `PublishRequest`) and every request is one template plus its
//! own idempotency key (field 2, appended on the wire: protobuf fields may come in any order).
//! The ingestor derives each event id from (tenant, idempotency key, index), so every request
//! still carries distinct events, and a retry with the same key carries the same ones.

use std::collections::HashMap;

use bytes::Bytes;
use chute_proto::v1::{Event, PublishRequest};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The attribute every generated event carries, valued with the run id.
pub const RUN_ID_ATTRIBUTE: &str = "run_id";

/// Metric names of an LLM-call event; more metrics get `metric_<i>`.
const METRIC_NAMES: [&str; 4] = ["tokens_in", "tokens_out", "latency_ms", "cost_usd"];

/// Shape of the generated events.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Workload {
    pub run_id: String,
    pub events_per_request: usize,
    /// Tenants `tenant-0` .. `tenant-<n-1>`; a request belongs to one tenant.
    pub tenants: usize,
    /// Event names `llm.request.0` ..
    pub event_names: usize,
    pub users: usize,
    pub sessions: usize,
    /// Attributes per event besides `run_id`, each value `attribute_bytes` long.
    pub attributes: usize,
    pub attribute_bytes: usize,
    pub metrics: usize,
    pub body_bytes: usize,
    /// Distinct request templates in the pool.
    pub templates: usize,
    pub seed: u64,
}

/// One request template: the encoded events plus what is needed to account for them.
#[derive(Debug, Clone)]
pub struct Template {
    pub tenant: String,
    pub events: Vec<Event>,
    /// `PublishRequest { events, idempotency_key: "" }` encoded.
    pub encoded_events: Bytes,
    /// The same events as an OTLP trace export (`--protocol otlp-*` only).
    pub otlp: Option<crate::otlp::OtlpTemplate>,
}

pub fn tenant_name(index: usize) -> String {
    format!("tenant-{index}")
}

impl Workload {
    /// Every tenant name of the workload.
    pub fn tenant_names(&self) -> Vec<String> {
        (0..self.tenants.max(1)).map(tenant_name).collect()
    }

    /// The template pool; event times are `time_unix_nanos` (the run's start).
    pub fn templates(&self, time_unix_nanos: i64) -> Vec<Template> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        (0..self.templates.max(1))
            .map(|index| {
                let tenant = tenant_name(index % self.tenants.max(1));
                let events: Vec<Event> = (0..self.events_per_request.max(1))
                    .map(|_| self.event(&mut rng, &tenant, time_unix_nanos))
                    .collect();
                let encoded_events = Bytes::from(
                    PublishRequest {
                        events: events.clone(),
                        idempotency_key: String::new(),
                    }
                    .encode_to_vec(),
                );
                Template {
                    tenant,
                    events,
                    encoded_events,
                    otlp: None,
                }
            })
            .collect()
    }

    fn event(&self, rng: &mut StdRng, tenant: &str, time_unix_nanos: i64) -> Event {
        let mut attributes = HashMap::with_capacity(self.attributes + 1);
        attributes.insert(RUN_ID_ATTRIBUTE.to_owned(), self.run_id.clone());
        for index in 0..self.attributes {
            attributes.insert(format!("attr_{index}"), random_text(rng, self.attribute_bytes));
        }
        let metrics = (0..self.metrics)
            .map(|index| {
                let name = METRIC_NAMES
                    .get(index)
                    .map_or_else(|| format!("metric_{index}"), |name| (*name).to_owned());
                let value = match index {
                    0 | 1 => f64::from(rng.random_range(1..4000u32)),
                    2 => rng.random_range(5.0..3000.0),
                    3 => f64::from(rng.random_range(0..10_000u32)) / 100_000.0,
                    _ => rng.random_range(0.0..1.0),
                };
                (name, value)
            })
            .collect();
        Event {
            event_id: String::new(),
            tenant: tenant.to_owned(),
            name: format!("llm.request.{}", rng.random_range(0..self.event_names.max(1))),
            time: Some(chute_common::validate::timestamp_from_nanos(time_unix_nanos)),
            session_id: format!("session-{}", rng.random_range(0..self.sessions.max(1))),
            user_id: format!("user-{}", rng.random_range(0..self.users.max(1))),
            attributes,
            metrics,
            body: random_text(rng, self.body_bytes),
        }
    }
}

/// The wire form of a `PublishRequest`: a template's encoded events followed by the
/// idempotency key field.
pub fn key_field(idempotency_key: &str) -> Bytes {
    let mut buf = Vec::with_capacity(idempotency_key.len() + 4);
    prost::encoding::string::encode(2, &idempotency_key.to_owned(), &mut buf);
    Bytes::from(buf)
}

/// The idempotency key of request `sequence` of a run.
pub fn idempotency_key(run_id: &str, sequence: u64) -> String {
    format!("{run_id}-{sequence}")
}

fn random_text(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            run_id: "lt-test".into(),
            events_per_request: 5,
            tenants: 3,
            event_names: 4,
            users: 10,
            sessions: 10,
            attributes: 2,
            attribute_bytes: 8,
            metrics: 5,
            body_bytes: 12,
            templates: 4,
            seed: 7,
        }
    }

    #[test]
    fn template_plus_key_field_is_a_valid_publish_request() {
        let templates = workload().templates(1_700_000_000_000_000_000);
        assert_eq!(templates.len(), 4);
        let template = &templates[1];
        let mut wire = template.encoded_events.to_vec();
        wire.extend_from_slice(&key_field("lt-test-42"));
        let decoded = PublishRequest::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded.idempotency_key, "lt-test-42");
        assert_eq!(decoded.events, template.events);
        assert_eq!(decoded.events.len(), 5);
        let event = &decoded.events[0];
        assert_eq!(event.tenant, "tenant-1");
        assert_eq!(event.attributes[RUN_ID_ATTRIBUTE], "lt-test");
        assert_eq!(event.attributes.len(), 3);
        assert_eq!(event.metrics.len(), 5);
        assert!(event.metrics.contains_key("metric_4"));
        assert_eq!(event.body.len(), 12);
    }

    #[test]
    fn generated_events_pass_the_ingestor_validation() {
        let now = 1_700_000_000_000_000_000;
        let limits = chute_common::validate::Limits::default();
        for template in workload().templates(now) {
            for (index, mut event) in template.events.into_iter().enumerate() {
                let ctx = chute_common::validate::RequestContext {
                    received_unix_nanos: now,
                    key_tenant: None,
                    idempotency_key: "k",
                };
                chute_common::validate::normalize(&mut event, index, &ctx, &limits).unwrap();
            }
        }
    }

    #[test]
    fn templates_are_deterministic_per_seed() {
        let a = workload().templates(1);
        let b = workload().templates(1);
        // Same events (the encoding may order map entries differently).
        assert_eq!(a[3].events, b[3].events);
    }
}

//! The consumer loop: reads `EVENTS` through the router's durable consumer, evaluates every
//! event against the current rules, and acknowledges a group of messages only once everything
//! it caused is stored: routed copies in `ROUTES` (PubAck) and webhook deliveries in `WEBHOOKS`.
//!
//! Delivery: a crash before the acks redelivers the group. A routed copy carries `Nats-Msg-Id`
//! = `<rule>:<event_id>`, so `ROUTES` stores it once within its duplicate window; a webhook
//! delivery is queued under its idempotency key the same way. Threshold windows and anomaly
//! series are fed once the group's outputs are stored ([`crate::evaluate`]), so a group asked
//! again after a failed store is not counted twice; what a crash loses of them is rebuilt from
//! ClickHouse at start ([`crate::seed`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chute_common::error::NatsFailure;
use chute_proto::v1::{Event, EventBatch};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::evaluate::Evaluation;
use crate::headers::routed;
use crate::rules::RuleIndex;
use crate::spec::{RuleKind, RuleSet};
use crate::webhook::{self, Delivery, DeliveryKind};
use crate::{telemetry, Error, Result};

/// Stream of routed events.
pub const ROUTES_STREAM: &str = "ROUTES";
/// `routes.<tenant>.<rule>`.
pub const ROUTES_SUBJECT_PREFIX: &str = "routes";

/// `routes.<tenant>.<rule>`: a valid tenant and rule name are subject tokens.
pub fn routes_subject(tenant: &str, rule: &str) -> String {
    format!("{ROUTES_SUBJECT_PREFIX}.{tenant}.{rule}")
}

/// `Nats-Msg-Id` of a routed copy, and the idempotency key of its webhook delivery.
pub fn route_id(rule: &str, event_id: &str) -> String {
    format!("{rule}:{event_id}")
}

/// Messages evaluated together and acknowledged after their outputs are stored, at most.
const GROUP: usize = 256;
/// Routed copies published and not yet acknowledged by JetStream, at most.
const IN_FLIGHT: usize = 256;

/// The router's side of the stream: rules, outputs, and the windows fed by events.
pub struct Engine {
    pub js: jetstream::Context,
    pub rules: watch::Receiver<Arc<RuleSet>>,
    pub evaluation: Arc<Mutex<Evaluation>>,
}

impl Engine {
    /// Consumes `messages` until `shutdown`. A group whose outputs could not be stored is not
    /// acknowledged: it is asked again after a pause, and the loop goes on.
    pub async fn run(&self, consumer: consumer::PullConsumer, shutdown: CancellationToken) -> Result<()> {
        let mut messages = consumer
            .messages()
            .await
            .map_err(|err| Error::nats("EVENTS consumer", err))?
            .ready_chunks(GROUP);
        let mut rules = self.rules.borrow().clone();
        let mut index = RuleIndex::new(&rules);
        let mut ids = self.evaluation.lock().await.rule_ids(&rules);
        loop {
            let group = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                group = messages.next() => match group {
                    Some(group) => group,
                    None => return Err(Error::Consumer("EVENTS consumer ended".to_owned())),
                },
            };
            let mut received = Vec::with_capacity(group.len());
            for message in group {
                match message {
                    Ok(message) => received.push(message),
                    Err(err) => tracing::warn!(error = %err, "EVENTS consumer"),
                }
            }
            if received.is_empty() {
                continue;
            }
            let started = Instant::now();
            if !Arc::ptr_eq(&rules, &self.rules.borrow()) {
                rules = self.rules.borrow().clone();
                index = RuleIndex::new(&rules);
                ids = self.evaluation.lock().await.rule_ids(&rules);
            }
            match self.process(&received, &rules, &index, &ids).await {
                Ok(()) => {
                    for message in &received {
                        if let Err(err) = message.ack().await {
                            tracing::warn!(error = %err, "ack; the message comes again and is deduplicated");
                        }
                    }
                    telemetry::processed(started.elapsed());
                    tracing::debug!(
                        messages = received.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "group done"
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, messages = received.len(), "outputs not stored; asking again");
                    for message in &received {
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                }
            }
        }
    }

    /// Evaluates `messages` against `rules` (`index` built from them, `ids` their stable ids)
    /// and stores their outputs; an error means some may be missing.
    pub async fn process(
        &self,
        messages: &[jetstream::Message],
        rules: &RuleSet,
        index: &RuleIndex,
        ids: &[usize],
    ) -> Result<()> {
        let mut routed = Vec::new();
        let mut matches = vec![0u64; rules.rules.len()];
        let mut deliveries = Vec::new();
        let mut batches = Vec::with_capacity(messages.len());
        // Window and series updates, applied once the group's outputs are stored: a group that
        // is asked again must not count its events twice.
        let mut observations: Vec<(usize, usize, usize)> = Vec::new();
        for message in messages {
            match EventBatch::decode(message.payload.as_ref()) {
                Ok(batch) => batches.push(batch),
                Err(err) => telemetry::skipped(1, &format!("undecodable message: {err}")),
            }
        }
        for (batch_index, batch) in batches.iter().enumerate() {
            telemetry::events(batch.events.len());
            for (event_index, event) in batch.events.iter().enumerate() {
                if !evaluable(event) {
                    telemetry::skipped(1, "invalid tenant or name");
                    continue;
                }
                for (position, rule) in index.matching(rules, event) {
                    matches[position] += 1;
                    let RuleKind::Route = rule.kind else {
                        observations.push((batch_index, event_index, position));
                        continue;
                    };
                    let id = route_id(&rule.name, &event.event_id);
                    let copy = EventBatch {
                        version: batch.version,
                        received_unix_nanos: batch.received_unix_nanos,
                        idempotency_key: String::new(),
                        chunk_index: 0,
                        chunk_count: 1,
                        events: vec![event.clone()],
                    };
                    routed.push((rule.name.clone(), event.tenant.clone(), id.clone(), copy));
                    if let Some(destination) = &rule.webhook {
                        deliveries.push(Delivery {
                            destination: destination.clone(),
                            idempotency_key: id,
                            kind: DeliveryKind::Route,
                            tenant: event.tenant.clone(),
                            rule: rule.name.clone(),
                            payload: event_json(event, batch.received_unix_nanos),
                        });
                    }
                }
            }
        }
        for (rule, count) in rules.rules.iter().zip(matches) {
            if count > 0 {
                telemetry::matched(rule, count);
            }
        }
        self.store_routed(routed).await?;
        for delivery in &deliveries {
            webhook::enqueue(&self.js, delivery).await?;
        }
        let mut evaluation = self.evaluation.lock().await;
        for (batch_index, event_index, position) in observations {
            let batch = &batches[batch_index];
            let event = &batch.events[event_index];
            match &rules.rules[position].kind {
                RuleKind::Threshold(spec) => {
                    evaluation.observe_threshold(ids[position], spec, event, batch.received_unix_nanos);
                }
                RuleKind::Anomaly(spec) => {
                    evaluation.observe_anomaly(ids[position], spec, event, batch.received_unix_nanos);
                }
                RuleKind::Route => {}
            }
        }
        Ok(())
    }

    /// Publishes the routed copies and waits for every PubAck, with at most [`IN_FLIGHT`]
    /// unanswered at a time (async-nats bounds them too, and a publish beyond its bound waits for
    /// an answer that only an awaited PubAck delivers).
    async fn store_routed(&self, routed: Vec<(String, String, String, EventBatch)>) -> Result<()> {
        let mut acks = std::collections::VecDeque::with_capacity(routed.len().min(IN_FLIGHT));
        for (rule, tenant, id, copy) in routed {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            headers.insert(routed::TENANT, tenant.as_str());
            headers.insert(routed::RULE, rule.as_str());
            if let Some(event) = copy.events.first() {
                headers.insert(routed::EVENT_ID, event.event_id.as_str());
            }
            let ack = self
                .js
                .publish_with_headers(
                    routes_subject(&tenant, &rule),
                    headers,
                    Bytes::from(copy.encode_to_vec()),
                )
                .await
                .map_err(|err| Error::nats("publish to ROUTES", err))?;
            acks.push_back((rule, ack));
            if acks.len() >= IN_FLIGHT {
                if let Some((rule, ack)) = acks.pop_front() {
                    let ack = ack.await.map_err(|err| Error::nats("ROUTES PubAck", err))?;
                    telemetry::routed(&rule, ack.duplicate);
                }
            }
        }
        for (rule, ack) in acks {
            let ack = ack.await.map_err(|err| Error::nats("ROUTES PubAck", err))?;
            telemetry::routed(&rule, ack.duplicate);
        }
        Ok(())
    }
}

/// What the router can evaluate: an event whose tenant and name are valid (tenant is a subject
/// token). The aggregator dead-letters the others; the router skips them.
fn evaluable(event: &Event) -> bool {
    chute_common::validate::is_valid_tenant(&event.tenant) && chute_common::validate::is_valid_name(&event.name)
}

/// An event as JSON for a webhook body: the same field names as the query API's raw events.
pub fn event_json(event: &Event, received_unix_nanos: i64) -> serde_json::Value {
    let time_ms = event
        .time
        .as_ref()
        .and_then(chute_common::validate::timestamp_to_nanos)
        .map(|nanos| nanos / 1_000_000);
    let attributes: std::collections::BTreeMap<&String, &String> = event.attributes.iter().collect();
    let metrics: std::collections::BTreeMap<&String, &f64> = event.metrics.iter().collect();
    serde_json::json!({
        "event_id": event.event_id,
        "tenant": event.tenant,
        "name": event.name,
        "time_ms": time_ms,
        "ingested_at_ms": received_unix_nanos / 1_000_000,
        "session_id": event.session_id,
        "user_id": event.user_id,
        "attributes": attributes,
        "metrics": metrics,
        "body": event.body,
    })
}

/// The `ROUTES` stream: limits retention, a byte cap that drops the oldest, and a duplicate
/// window that makes a redelivered routed copy count once.
pub fn routes_config(
    max_age: Duration,
    max_bytes: u64,
    duplicate_window: Duration,
    replicas: usize,
) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: ROUTES_STREAM.to_owned(),
        description: Some("Chute routed events: routes.<tenant>.<rule> (see the router's rules)".to_owned()),
        subjects: vec![format!("{ROUTES_SUBJECT_PREFIX}.>")],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        max_age,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        discard: jetstream::stream::DiscardPolicy::Old,
        duplicate_window,
        ..Default::default()
    }
}

//! Evaluation state and its outputs: threshold windows with their alert states, anomaly series
//! with their baselines, and what a transition or an anomaly produces.
//!
//! - Events feed windows and minute series as the consumer reads them ([`Evaluation::observe_threshold`],
//!   [`Evaluation::observe_anomaly`]), keyed by a per-rule id that changes when the rule's
//!   definition does, so an edited rule starts fresh and the old one's series expire.
//! - A ticker ([`run_ticker`]) evaluates every window each `--eval-interval`, closes finished
//!   minutes, and hands transitions and anomalies to [`Outputs`].
//! - Alert states live in the `chute_router` KV bucket. A transition is first stored with its
//!   notification marked pending, then notified (a `chute.alert` event into `EVENTS` and the
//!   rule's webhook, both under ids derived from the alert id, so a repeat is dropped as a
//!   duplicate), then stored as done. A restart restores the states, so a firing alert is not
//!   fired again, and re-sends a notification left pending by a crash.
//! - Windows restart empty and are rebuilt from ClickHouse ([`crate::seed`]) for events received up
//!   to the consumer's position (`Evaluation::boundary_ms`); events received later come again from
//!   the stream, and events at or before it are skipped, so nothing counts twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use chute_common::error::NatsFailure;
use chute_common::validate::unix_millis_now;
use chute_proto::v1::{Event, EventBatch};
use futures::StreamExt;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::alert::{AlertMachine, AlertRecord, AlertState, Transition, TransitionKind};
use crate::anomaly::{Anomaly, AnomalyStore};
use crate::config::Config;
use crate::spec::{AnomalySpec, Rule, RuleKind, RuleSet, SeriesValue, ThresholdSpec, WindowValue};
use crate::webhook::{self, Delivery, DeliveryKind};
use crate::window::Observed;
use crate::window::{SeriesKey, WindowStore};
use crate::{telemetry, Error, Result};

/// Name of the events the router publishes for alert transitions.
pub const ALERT_EVENT: &str = "chute.alert";
/// Name of the events the router publishes for anomalies.
pub const ANOMALY_EVENT: &str = "chute.anomaly";
/// Namespace of the ids of the router's own events (UUID v5).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x9e41_2c7d_0b6a_4f13_8d5e_a3c2_61f0_7b94);

/// Stable ids for rules: one per (name, definition), kept across reloads.
#[derive(Debug, Default)]
struct RuleIds {
    by_definition: HashMap<String, usize>,
}

impl RuleIds {
    fn id(&mut self, rule: &Rule) -> usize {
        let definition = format!("{}|{:?}|{:?}|{:?}", rule.name, rule.tenants, rule.matcher, rule.kind);
        let next = self.by_definition.len();
        *self.by_definition.entry(definition).or_insert(next)
    }
}

/// Windows, alert states and anomaly series of the current rules.
pub struct Evaluation {
    ids: RuleIds,
    /// The ids of the rules file last asked about, by position.
    current_ids: Option<(Arc<RuleSet>, Arc<[usize]>)>,
    windows: WindowStore,
    alerts: HashMap<SeriesKey, AlertMachine>,
    anomalies: AnomalyStore,
    /// Events received up to this time (unix ms) were rebuilt from ClickHouse: skipped here.
    boundary_ms: i64,
    /// How long after its end a minute of an anomaly series still takes events.
    grace_ms: i64,
}

impl Evaluation {
    pub fn new(config: &Config) -> Self {
        Self {
            ids: RuleIds::default(),
            current_ids: None,
            windows: WindowStore::new(config.max_series),
            alerts: HashMap::new(),
            anomalies: AnomalyStore::new(config.max_series, config.minute_grace),
            boundary_ms: i64::MIN,
            grace_ms: config.minute_grace.as_millis() as i64,
        }
    }

    /// Events received at or before `boundary_ms` are known from ClickHouse ([`crate::seed`]).
    pub fn set_boundary(&mut self, boundary_ms: i64) {
        self.boundary_ms = boundary_ms;
    }

    /// The stable id of every rule of `rules`, by position: computed once per rules file (the
    /// consumer passes a rule's id with each event; ticks and seeding look them up).
    pub fn rule_ids(&mut self, rules: &Arc<RuleSet>) -> Arc<[usize]> {
        if let Some((known, ids)) = &self.current_ids {
            if Arc::ptr_eq(known, rules) {
                return ids.clone();
            }
        }
        let ids: Arc<[usize]> = rules.rules.iter().map(|rule| self.ids.id(rule)).collect();
        self.current_ids = Some((rules.clone(), ids.clone()));
        ids
    }

    /// Feeds one matching event into the window of the rule whose id is `rule_id`.
    pub fn observe_threshold(&mut self, rule_id: usize, spec: &ThresholdSpec, event: &Event, received_unix_nanos: i64) {
        if received_unix_nanos / 1_000_000 <= self.boundary_ms {
            return;
        }
        let key = series_key(rule_id, &event.tenant, spec.group_by.as_deref(), Some(event));
        let (metric, flag) = window_inputs(spec, event);
        self.windows
            .observe(&key, spec, unix_millis_now(), event_time_ms(event), metric, flag);
    }

    /// Seeds one slot of a rule's window (see [`crate::seed`]).
    pub fn seed_slot(
        &mut self,
        key: SeriesKey,
        spec: &ThresholdSpec,
        slot_start_ms: i64,
        seed: crate::window::SlotSeed,
    ) {
        self.windows.seed(&key, spec, slot_start_ms, seed);
    }

    /// Feeds one matching event into its rule's minute series. The router's own events are left
    /// out, so an anomaly never feeds the series that reported it.
    pub fn observe_anomaly(&mut self, rule_id: usize, spec: &AnomalySpec, event: &Event, received_unix_nanos: i64) {
        if received_unix_nanos / 1_000_000 <= self.boundary_ms || event.name.starts_with("chute.") {
            return;
        }
        let key = series_key(rule_id, &event.tenant, spec.group_by.as_deref(), Some(event));
        let value = match &spec.series {
            SeriesValue::Rate => None,
            SeriesValue::Mean { metric } => event.metrics.get(metric).copied(),
        };
        self.anomalies
            .observe(&key, spec, unix_millis_now(), event_time_ms(event), value);
    }

    /// Seeds one minute of an anomaly series read from ClickHouse: `events` matching events
    /// (with the metric, for a mean) whose value is `value` (events per minute, or the mean). A
    /// minute already over at `now_ms` teaches the baseline; a minute still open is counted
    /// into the series, where live events complete it.
    pub fn seed_minute(
        &mut self,
        key: &SeriesKey,
        spec: &AnomalySpec,
        minute_ms: i64,
        events: u64,
        value: f64,
        now_ms: i64,
    ) {
        if minute_ms + 60_000 + self.grace_ms <= now_ms {
            self.anomalies.warm(key, spec, minute_ms, value);
            return;
        }
        let metric = match spec.series {
            SeriesValue::Rate => None,
            SeriesValue::Mean { .. } => Some(value),
        };
        for _ in 0..events {
            if self.anomalies.observe(key, spec, now_ms, minute_ms, metric) != Observed::Recorded {
                return;
            }
        }
    }

    /// Restores alert states from the KV bucket and re-sends notifications a crash left pending.
    pub async fn restore(&mut self, outputs: &Outputs, rules: &Arc<RuleSet>) -> Result<()> {
        let ids = self.rule_ids(rules);
        for stored in outputs.stored_alerts().await? {
            let Some(position) = rules.rules.iter().position(|rule| rule.name == stored.rule) else {
                continue;
            };
            let rule = &rules.rules[position];
            let RuleKind::Threshold(_) = &rule.kind else {
                continue;
            };
            let key = SeriesKey {
                rule: ids[position],
                tenant: stored.tenant.clone(),
                group: stored.group.clone(),
            };
            if let Some(pending) = &stored.pending {
                outputs.notify_alert(rule, pending).await?;
                outputs
                    .store_alert(
                        &key_name(&stored.rule, &key),
                        &StoredAlert {
                            pending: None,
                            ..stored.clone()
                        },
                    )
                    .await?;
            }
            self.alerts.insert(key, AlertMachine::from_record(stored.record));
        }
        telemetry::alerts_firing(self.firing());
        Ok(())
    }

    fn firing(&self) -> usize {
        self.alerts
            .values()
            .filter(|machine| machine.state() == AlertState::Firing)
            .count()
    }

    /// Evaluates every threshold window at `now_ms` and drops expired series.
    pub fn tick_thresholds(&mut self, rules: &Arc<RuleSet>, now_ms: i64) -> Vec<(Rule, SeriesKey, Transition)> {
        let ids = self.rule_ids(rules);
        let specs: HashMap<usize, (&Rule, &ThresholdSpec)> = ids
            .iter()
            .zip(&rules.rules)
            .filter_map(|(id, rule)| match &rule.kind {
                RuleKind::Threshold(spec) => Some((*id, (rule, spec))),
                _ => None,
            })
            .collect();
        let mut transitions = Vec::new();
        let keys: Vec<SeriesKey> = self
            .windows
            .keys()
            .chain(self.alerts.keys())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for key in keys {
            let Some((rule, spec)) = specs.get(&key.rule) else {
                self.alerts.remove(&key);
                continue;
            };
            let reading = self.windows.evaluate(&key, spec, now_ms);
            let machine = self.alerts.entry(key.clone()).or_default();
            if let Some(transition) = machine.update(&rule.name, &key, spec, reading, now_ms) {
                transitions.push(((*rule).clone(), key.clone(), transition));
            }
            // An inactive series is kept only while its window has events (a series that fires
            // again later gets a new alert id anyway).
            if machine.state() == AlertState::Inactive && (machine.record().alert_id.is_none() || reading.events == 0) {
                self.alerts.remove(&key);
            }
        }
        self.windows.expire(now_ms, |id| specs.get(&id).map(|(_, spec)| *spec));
        transitions
    }

    /// Closes finished minutes of every anomaly series and returns the anomalies found.
    pub fn tick_anomalies(&mut self, rules: &Arc<RuleSet>, now_ms: i64) -> Vec<(Rule, SeriesKey, Anomaly)> {
        let ids = self.rule_ids(rules);
        let by_id: HashMap<usize, &Rule> = ids
            .iter()
            .zip(&rules.rules)
            .filter(|(_, rule)| matches!(rule.kind, RuleKind::Anomaly(_)))
            .map(|(id, rule)| (*id, rule))
            .collect();
        let anomalies = self
            .anomalies
            .close(now_ms)
            .into_iter()
            .filter_map(|closed| {
                let rule = by_id.get(&closed.key.rule)?;
                Some(((*rule).clone(), closed.key, closed.anomaly?))
            })
            .collect();
        // A series idle for a day goes (its baseline with it); so do the series of removed rules.
        self.anomalies
            .expire(now_ms, Duration::from_secs(86_400), |id| by_id.contains_key(&id));
        anomalies
    }

    /// The record to store for `key` after a transition.
    fn stored(&self, rule: &str, key: &SeriesKey, pending: Option<Transition>) -> Option<StoredAlert> {
        let machine = self.alerts.get(key)?;
        Some(StoredAlert {
            rule: rule.to_owned(),
            tenant: key.tenant.clone(),
            group: key.group.clone(),
            record: machine.record().clone(),
            pending,
        })
    }
}

fn series_key(rule_id: usize, tenant: &str, group_by: Option<&str>, event: Option<&Event>) -> SeriesKey {
    SeriesKey {
        rule: rule_id,
        tenant: tenant.to_owned(),
        group: group_by.map(|attribute| {
            event
                .and_then(|event| event.attributes.get(attribute).cloned())
                .unwrap_or_default()
        }),
    }
}

/// What a threshold window takes from an event: the rule's metric (quantile, avg) and whether
/// it also matches a share rule's `of`.
fn window_inputs(spec: &ThresholdSpec, event: &Event) -> (Option<f64>, bool) {
    match &spec.value {
        WindowValue::Quantile { metric, .. } | WindowValue::Avg { metric } => {
            (event.metrics.get(metric).copied(), false)
        }
        WindowValue::Share { of } => (None, of.matches(event)),
        WindowValue::Rate | WindowValue::Count => (None, false),
    }
}

/// An event's time in unix ms (normalised events always have one).
pub fn event_time_ms(event: &Event) -> i64 {
    event
        .time
        .as_ref()
        .and_then(chute_common::validate::timestamp_to_nanos)
        .map_or(0, |nanos| nanos / 1_000_000)
}

/// An alert state as stored in the KV bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAlert {
    pub rule: String,
    pub tenant: String,
    pub group: Option<String>,
    pub record: AlertRecord,
    /// A transition stored but not yet known to be notified.
    pub pending: Option<Transition>,
}

/// The KV key of a series' alert state: `alert.<rule>.<hash of tenant and group>`.
fn key_name(rule: &str, key: &SeriesKey) -> String {
    let hash = chute_common::hash::fnv1a64(
        key.tenant
            .bytes()
            .chain([0xFF])
            .chain(key.group.as_deref().unwrap_or("\u{0}").bytes()),
    );
    format!("alert.{rule}.{hash:016x}")
}

/// Where transitions and anomalies go: the state bucket, `EVENTS` and webhooks.
#[derive(Clone)]
pub struct Outputs {
    js: jetstream::Context,
    state: kv::Store,
    partitions: u32,
}

impl Outputs {
    pub fn new(js: jetstream::Context, state: kv::Store, partitions: u32) -> Self {
        Self { js, state, partitions }
    }

    async fn stored_alerts(&self) -> Result<Vec<StoredAlert>> {
        let mut keys = self.state.keys().await.map_err(|err| Error::state("list", err))?;
        let mut stored = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|err| Error::state("list", err))?;
            if !key.starts_with("alert.") {
                continue;
            }
            let Some(value) = self.state.get(&key).await.map_err(|err| Error::state("get", err))? else {
                continue;
            };
            match serde_json::from_slice::<StoredAlert>(&value) {
                Ok(alert) => stored.push(alert),
                Err(err) => tracing::warn!(key, error = %err, "unreadable alert state; ignored"),
            }
        }
        Ok(stored)
    }

    async fn store_alert(&self, key: &str, alert: &StoredAlert) -> Result<()> {
        let value = serde_json::to_vec(alert).map_err(|err| Error::state("encode", err))?;
        self.state
            .put(key, Bytes::from(value))
            .await
            .map_err(|err| Error::state("put", err))?;
        Ok(())
    }

    /// Stores, notifies, and marks done one transition.
    async fn transition(
        &self,
        evaluation: &Mutex<Evaluation>,
        rule: &Rule,
        key: &SeriesKey,
        transition: Transition,
    ) -> Result<()> {
        let name = key_name(&rule.name, key);
        let pending = evaluation
            .lock()
            .await
            .stored(&rule.name, key, Some(transition.clone()));
        if let Some(pending) = &pending {
            self.store_alert(&name, pending).await?;
        }
        self.notify_alert(rule, &transition).await?;
        if let Some(pending) = pending {
            self.store_alert(
                &name,
                &StoredAlert {
                    pending: None,
                    ..pending
                },
            )
            .await?;
        }
        Ok(())
    }

    /// The `chute.alert` event and the webhook of one transition.
    async fn notify_alert(&self, rule: &Rule, transition: &Transition) -> Result<()> {
        let (state, kind) = match transition.kind {
            TransitionKind::Fired => ("firing", "fired"),
            TransitionKind::Resolved => ("resolved", "resolved"),
        };
        telemetry::alert(&rule.name, kind);
        let id = format!("{}:{}:{state}", rule.name, transition.alert_id);
        let mut attributes = HashMap::from([
            ("rule".to_owned(), rule.name.clone()),
            ("state".to_owned(), state.to_owned()),
            ("alert_id".to_owned(), transition.alert_id.clone()),
        ]);
        if let Some(group) = &transition.group {
            attributes.insert("group".to_owned(), group.clone());
        }
        let metrics = HashMap::from([
            ("value".to_owned(), transition.value),
            ("threshold".to_owned(), transition.threshold),
            ("events".to_owned(), transition.events as f64),
            ("window_seconds".to_owned(), transition.window_seconds as f64),
        ]);
        self.publish_event(
            &transition.tenant,
            ALERT_EVENT,
            &id,
            transition.at_ms,
            attributes,
            metrics,
        )
        .await?;
        if let Some(destination) = &rule.webhook {
            let mut payload = serde_json::to_value(transition).map_err(|err| Error::Webhook(err.to_string()))?;
            // The body's `kind` is the delivery's (`alert`); the transition's is `state`.
            if let Some(fields) = payload.as_object_mut() {
                fields.remove("kind");
                fields.insert("state".to_owned(), state.into());
            }
            self.enqueue(Delivery {
                destination: destination.clone(),
                idempotency_key: id,
                kind: DeliveryKind::Alert,
                tenant: transition.tenant.clone(),
                rule: rule.name.clone(),
                payload,
            })
            .await?;
        }
        Ok(())
    }

    /// The `chute.anomaly` event and the webhook of one anomaly.
    async fn anomaly(&self, rule: &Rule, key: &SeriesKey, anomaly: &Anomaly) -> Result<()> {
        telemetry::anomaly(&rule.name);
        let series = match &rule.kind {
            RuleKind::Anomaly(AnomalySpec {
                series: SeriesValue::Mean { metric },
                ..
            }) => format!("mean({metric})"),
            _ => "rate".to_owned(),
        };
        let id = format!(
            "{}:anomaly:{}",
            rule.name,
            Uuid::new_v5(
                &EVENT_ID_NAMESPACE,
                format!("{}\0{}\0{:?}\0{}", rule.name, key.tenant, key.group, anomaly.minute_ms).as_bytes()
            )
        );
        let mut attributes = HashMap::from([
            ("rule".to_owned(), rule.name.clone()),
            ("series".to_owned(), series),
            (
                "direction".to_owned(),
                format!("{:?}", anomaly.direction).to_lowercase(),
            ),
        ]);
        if let Some(group) = &key.group {
            attributes.insert("group".to_owned(), group.clone());
        }
        let metrics = HashMap::from([
            ("value".to_owned(), anomaly.value),
            ("expected".to_owned(), anomaly.expected),
            ("z".to_owned(), anomaly.z),
        ]);
        self.publish_event(&key.tenant, ANOMALY_EVENT, &id, anomaly.minute_ms, attributes, metrics)
            .await?;
        if let Some(destination) = &rule.webhook {
            self.enqueue(Delivery {
                destination: destination.clone(),
                idempotency_key: id,
                kind: DeliveryKind::Anomaly,
                tenant: key.tenant.clone(),
                rule: rule.name.clone(),
                payload: serde_json::json!({
                    "group": key.group,
                    "minute_ms": anomaly.minute_ms,
                    "value": anomaly.value,
                    "expected": anomaly.expected,
                    "z": anomaly.z,
                    "direction": format!("{:?}", anomaly.direction).to_lowercase(),
                }),
            })
            .await?;
        }
        Ok(())
    }

    async fn enqueue(&self, delivery: Delivery) -> Result<()> {
        webhook::enqueue(&self.js, &delivery).await.map(drop)
    }

    /// Publishes one of the router's own events into `EVENTS`, like an ingestor would: its
    /// `Nats-Msg-Id` and event id derive from `id`, so a repeat is dropped as a duplicate.
    async fn publish_event(
        &self,
        tenant: &str,
        name: &str,
        id: &str,
        time_ms: i64,
        attributes: HashMap<String, String>,
        metrics: HashMap<String, f64>,
    ) -> Result<()> {
        let event_id = Uuid::new_v5(&EVENT_ID_NAMESPACE, id.as_bytes()).to_string();
        let received = chute_common::validate::unix_nanos_now();
        let batch = EventBatch {
            version: chute_proto::BATCH_VERSION,
            received_unix_nanos: received,
            idempotency_key: id.to_owned(),
            chunk_index: 0,
            chunk_count: 1,
            events: vec![Event {
                event_id: event_id.clone(),
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                time: Some(chute_common::validate::timestamp_from_nanos(time_ms * 1_000_000)),
                attributes,
                metrics,
                ..Event::default()
            }],
        };
        let partition = chute_common::partition::partition_for(tenant, id, self.partitions);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("router-{event_id}").as_str());
        self.js
            .publish_with_headers(
                chute_common::stream::events_subject(partition),
                headers,
                Bytes::from(batch.encode_to_vec()),
            )
            .await
            .map_err(|err| Error::nats("publish to EVENTS", err))?
            .await
            .map_err(|err| Error::nats("EVENTS PubAck", err))?;
        Ok(())
    }
}

/// Evaluates windows and closes minutes every `interval` until `shutdown`. An output that
/// fails is retried at the next tick (its state stays pending).
pub async fn run_ticker(
    evaluation: Arc<Mutex<Evaluation>>,
    outputs: Outputs,
    rules: watch::Receiver<Arc<RuleSet>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failed: Vec<(Rule, SeriesKey, Transition)> = Vec::new();
    let mut failed_anomalies: Vec<(Rule, SeriesKey, Anomaly)> = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let rules = rules.borrow().clone();
        let now = unix_millis_now();
        let (transitions, anomalies, firing) = {
            let mut evaluation = evaluation.lock().await;
            let transitions = evaluation.tick_thresholds(&rules, now);
            let anomalies = evaluation.tick_anomalies(&rules, now);
            (transitions, anomalies, evaluation.firing())
        };
        telemetry::alerts_firing(firing);
        for (rule, key, transition) in std::mem::take(&mut failed).into_iter().chain(transitions) {
            if let Err(err) = outputs.transition(&evaluation, &rule, &key, transition.clone()).await {
                tracing::warn!(rule = %rule.name, error = %err, "alert notification failed; retrying next tick");
                failed.push((rule, key, transition));
            }
        }
        for (rule, key, anomaly) in std::mem::take(&mut failed_anomalies).into_iter().chain(anomalies) {
            if let Err(err) = outputs.anomaly(&rule, &key, &anomaly).await {
                tracing::warn!(rule = %rule.name, error = %err, "anomaly output failed; retrying next tick");
                failed_anomalies.push((rule, key, anomaly));
            }
        }
    }
}

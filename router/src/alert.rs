//! Threshold alert state: fire and resolve with hysteresis.
//!
//! One [`AlertMachine`] per series ([`SeriesKey`]). Each evaluation hands it the window's
//! [`Reading`]; it answers with a [`Transition`] when the alert fires or resolves:
//! - `Inactive -> Firing` when the value is strictly beyond `fire` (above it for
//!   [`Direction::Above`], below it for [`Direction::Below`]);
//! - `Firing -> Inactive` when the value is strictly back beyond `resolve` on the other side;
//! - a window with fewer than `min_events` matching events, or without a value, changes nothing.
//!
//! Between `resolve` and `fire` nothing changes, so a value hovering at the threshold does not
//! flap. The alert id is a UUID v5 of (rule name, tenant, group, fired-at slot): a replay of the
//! same events after a restart fires with the same id. The [`AlertRecord`] is what the lead keeps
//! in a KV bucket; [`AlertMachine::from_record`] restores it so a firing alert is not fired again
//! and its resolve carries the original id.

use chute_common::telemetry::{MetricDescription, MetricKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::{Direction, ThresholdSpec, SLOT};
use crate::window::{Reading, SeriesKey};

/// The namespace of alert ids (UUID v5), fixed so ids are the same in every process.
const ALERT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c0f_7e1a_43b2_4d8e_9a61_2f3c_8b7d_0e14);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Inactive,
    Firing,
}

/// What the lead stores per series (JSON in a KV bucket) and restores after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub state: AlertState,
    /// The id of the firing alert, or of the last one for an inactive series.
    pub alert_id: Option<String>,
    /// When the series entered `state` (ms since the epoch; 0 for a series that never fired).
    pub since_ms: i64,
    /// The value of the last evaluation that had one.
    pub last_value: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    Fired,
    Resolved,
}

/// An alert fired or resolved, with what made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub kind: TransitionKind,
    /// Same for the fire and the resolve of one alert.
    pub alert_id: String,
    pub rule: String,
    pub tenant: String,
    pub group: Option<String>,
    /// The window's value that crossed.
    pub value: f64,
    /// The threshold it crossed: `fire` when firing, `resolve` when resolving.
    pub threshold: f64,
    pub direction: Direction,
    pub window_seconds: u64,
    /// Matching events in the window.
    pub events: u64,
    /// Evaluation time (ms since the epoch).
    pub at_ms: i64,
    /// When the alert fired (ms; equal to `at_ms` for `Fired`).
    pub fired_at_ms: i64,
}

/// The alert state of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertMachine {
    record: AlertRecord,
}

impl Default for AlertMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// The id of the alert of (`rule`, `tenant`, `group`) fired at `fired_at_ms`. The time is taken
/// to its [`SLOT`], so evaluations a few ms apart (a replay) give the same id.
pub fn alert_id(rule: &str, tenant: &str, group: Option<&str>, fired_at_ms: i64) -> String {
    let slot = fired_at_ms.div_euclid(SLOT.as_millis() as i64);
    // NUL cannot occur in a rule name or tenant; the group's presence is explicit.
    let name = format!(
        "{rule}\0{tenant}\0{}\0{slot}",
        group.map_or_else(|| "-".to_owned(), |group| format!("={group}"))
    );
    Uuid::new_v5(&ALERT_ID_NAMESPACE, name.as_bytes()).to_string()
}

impl AlertMachine {
    pub fn new() -> Self {
        Self {
            record: AlertRecord {
                state: AlertState::Inactive,
                alert_id: None,
                since_ms: 0,
                last_value: None,
            },
        }
    }

    /// Restores the state saved by [`AlertMachine::record`].
    pub fn from_record(record: AlertRecord) -> Self {
        Self { record }
    }

    pub fn record(&self) -> &AlertRecord {
        &self.record
    }

    pub fn state(&self) -> AlertState {
        self.record.state
    }

    /// Takes one evaluation of the window of rule `rule_name` for `key` at `now_ms`.
    pub fn update(
        &mut self,
        rule_name: &str,
        key: &SeriesKey,
        spec: &ThresholdSpec,
        reading: Reading,
        now_ms: i64,
    ) -> Option<Transition> {
        let value = reading.value?;
        self.record.last_value = Some(value);
        if reading.events < spec.min_events {
            return None;
        }
        let (kind, threshold) = match self.record.state {
            AlertState::Inactive if beyond(spec.direction, value, spec.fire) => (TransitionKind::Fired, spec.fire),
            AlertState::Firing if beyond(opposite(spec.direction), value, spec.resolve) => {
                (TransitionKind::Resolved, spec.resolve)
            }
            _ => return None,
        };
        let fired_at_ms = match kind {
            TransitionKind::Fired => now_ms,
            TransitionKind::Resolved => self.record.since_ms,
        };
        let alert_id = match (kind, &self.record.alert_id) {
            (TransitionKind::Resolved, Some(id)) => id.clone(),
            _ => alert_id(rule_name, &key.tenant, key.group.as_deref(), fired_at_ms),
        };
        self.record = AlertRecord {
            state: match kind {
                TransitionKind::Fired => AlertState::Firing,
                TransitionKind::Resolved => AlertState::Inactive,
            },
            alert_id: Some(alert_id.clone()),
            since_ms: now_ms,
            last_value: Some(value),
        };
        Some(Transition {
            kind,
            alert_id,
            rule: rule_name.to_owned(),
            tenant: key.tenant.clone(),
            group: key.group.clone(),
            value,
            threshold,
            direction: spec.direction,
            window_seconds: spec.window.as_secs(),
            events: reading.events,
            at_ms: now_ms,
            fired_at_ms,
        })
    }
}

fn beyond(direction: Direction, value: f64, threshold: f64) -> bool {
    match direction {
        Direction::Above => value > threshold,
        Direction::Below => value < threshold,
    }
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Above => Direction::Below,
        Direction::Below => Direction::Above,
    }
}

pub const ALERTS_FIRING: MetricDescription = MetricDescription {
    name: "chute_router_alerts_firing",
    kind: MetricKind::Gauge,
    unit: None,
    help: "threshold alerts firing now",
    zero_at_start: true,
};

pub const ALERT_TRANSITIONS: MetricDescription = MetricDescription {
    name: "chute_router_alert_transitions_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "threshold alerts fired or resolved (labels rule, kind = fired | resolved)",
    zero_at_start: false,
};

/// The alert metrics; the engine that holds every series' [`AlertMachine`] updates them.
pub const METRICS: &[MetricDescription] = &[ALERTS_FIRING, ALERT_TRANSITIONS];

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::spec::WindowValue;

    fn spec(direction: Direction, fire: f64, resolve: f64, min_events: u64) -> ThresholdSpec {
        ThresholdSpec {
            value: WindowValue::Quantile {
                q: 0.99,
                metric: "latency_ms".into(),
            },
            window: Duration::from_secs(300),
            direction,
            fire,
            resolve,
            group_by: Some("model".into()),
            min_events,
        }
    }

    fn key() -> SeriesKey {
        SeriesKey {
            rule: 3,
            tenant: "acme".into(),
            group: Some("gpt".into()),
        }
    }

    fn reading(value: f64, events: u64) -> Reading {
        Reading {
            value: Some(value),
            events,
        }
    }

    /// Feeds `values` to a new machine at one evaluation per 10 s and returns the transitions as
    /// (step, kind).
    fn transitions(spec: &ThresholdSpec, values: &[f64]) -> Vec<(usize, TransitionKind)> {
        let mut machine = AlertMachine::new();
        values
            .iter()
            .enumerate()
            .filter_map(|(step, &value)| {
                let now = 1_700_000_000_000 + step as i64 * 10_000;
                machine
                    .update("p99", &key(), spec, reading(value, 100), now)
                    .map(|t| (step, t.kind))
            })
            .collect()
    }

    #[test]
    fn hysteresis_fires_above_fire_and_resolves_only_below_resolve() {
        use TransitionKind::{Fired, Resolved};
        let spec = spec(Direction::Above, 2000.0, 1500.0, 10);
        let values = [
            1000.0, 2000.0, 2100.0, 1900.0, 2200.0, 1600.0, 1500.0, 1499.0, 1800.0, 2001.0,
        ];
        assert_eq!(transitions(&spec, &values), [(2, Fired), (7, Resolved), (9, Fired)]);
    }

    #[test]
    fn below_alerts_mirror_above_ones() {
        use TransitionKind::{Fired, Resolved};
        let spec = spec(Direction::Below, 0.9, 0.95, 1);
        let values = [0.99, 0.91, 0.89, 0.93, 0.95, 0.951, 0.5];
        assert_eq!(transitions(&spec, &values), [(2, Fired), (5, Resolved), (6, Fired)]);
    }

    #[test]
    fn windows_under_min_events_or_without_a_value_change_nothing() {
        let spec = spec(Direction::Above, 2000.0, 1500.0, 50);
        let mut machine = AlertMachine::new();
        assert_eq!(machine.update("p99", &key(), &spec, reading(5000.0, 49), 0), None);
        assert_eq!(
            machine.update(
                "p99",
                &key(),
                &spec,
                Reading {
                    value: None,
                    events: 500
                },
                0
            ),
            None
        );
        let fired = machine
            .update("p99", &key(), &spec, reading(5000.0, 50), 10_000)
            .unwrap();
        assert_eq!(
            (fired.kind, fired.value, fired.threshold, fired.events),
            (TransitionKind::Fired, 5000.0, 2000.0, 50)
        );
        assert_eq!(machine.update("p99", &key(), &spec, reading(10.0, 49), 20_000), None);
        assert_eq!(machine.state(), AlertState::Firing);
        let resolved = machine.update("p99", &key(), &spec, reading(10.0, 50), 30_000).unwrap();
        assert_eq!((resolved.kind, resolved.threshold), (TransitionKind::Resolved, 1500.0));
        assert_eq!(resolved.alert_id, fired.alert_id);
        assert_eq!(resolved.fired_at_ms, 10_000);
        assert_eq!(resolved.window_seconds, 300);
    }

    #[test]
    fn a_restored_firing_alert_is_not_fired_again_and_resolves_with_its_id() {
        let spec = spec(Direction::Above, 2000.0, 1500.0, 1);
        let mut machine = AlertMachine::new();
        let fired = machine
            .update("p99", &key(), &spec, reading(2500.0, 10), 60_000)
            .unwrap();
        let saved = serde_json::to_string(machine.record()).unwrap();

        let mut restored = AlertMachine::from_record(serde_json::from_str(&saved).unwrap());
        assert_eq!(restored, machine);
        assert_eq!(
            restored.update("p99", &key(), &spec, reading(2600.0, 10), 120_000),
            None
        );
        let resolved = restored
            .update("p99", &key(), &spec, reading(100.0, 10), 180_000)
            .unwrap();
        assert_eq!(resolved.kind, TransitionKind::Resolved);
        assert_eq!(resolved.alert_id, fired.alert_id);
        assert_eq!(resolved.fired_at_ms, 60_000);
    }

    #[test]
    fn alert_ids_are_deterministic_per_rule_tenant_group_and_slot() {
        let id = alert_id("p99", "acme", Some("gpt"), 1_000_000);
        assert_eq!(id, alert_id("p99", "acme", Some("gpt"), 1_009_999));
        for other in [
            alert_id("p99", "acme", Some("gpt"), 1_010_000),
            alert_id("p98", "acme", Some("gpt"), 1_000_000),
            alert_id("p99", "acme2", Some("gpt"), 1_000_000),
            alert_id("p99", "acme", None, 1_000_000),
            alert_id("p99", "acme", Some(""), 1_000_000),
        ] {
            assert_ne!(id, other);
        }
        // A replay of the same readings fires the same alert.
        let spec = spec(Direction::Above, 1.0, 1.0, 1);
        let fire = |now| {
            AlertMachine::new()
                .update("p99", &key(), &spec, reading(2.0, 1), now)
                .unwrap()
                .alert_id
        };
        assert_eq!(fire(1_000_000), fire(1_000_003));
        assert_eq!(fire(1_000_000), alert_id("p99", "acme", Some("gpt"), 1_000_000));
    }
}

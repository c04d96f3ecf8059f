//! What a rules file says, once parsed and validated ([`crate::rules::parse`]): the types every
//! other part of the router works from. Nothing here does I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::matcher::Matcher;

/// A validated rules file: the rules in file order and the webhook destinations they name.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub webhooks: BTreeMap<String, WebhookSpec>,
}

/// One rule. `name` is unique in the file and matches `[a-z0-9_]{1,64}`, so it can be a NATS
/// subject token and part of a message id.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// The tenants the rule applies to; `None` is every tenant. Rules are always evaluated per
    /// tenant: windows, alerts and anomaly series never mix two tenants.
    pub tenants: Option<Vec<String>>,
    /// Which events the rule looks at.
    pub matcher: Matcher,
    pub kind: RuleKind,
    /// The webhook (a key of [`RuleSet::webhooks`]) told about each routed event, alert
    /// transition or anomaly; `None` for no webhook.
    pub webhook: Option<String>,
    /// 1-based line of the rule in the file, for messages about it.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub enum RuleKind {
    /// Every matching event is copied to `routes.<tenant>.<rule>` in the `ROUTES` stream.
    Route,
    Threshold(ThresholdSpec),
    Anomaly(AnomalySpec),
}

/// A threshold alert over a sliding window of event time.
#[derive(Debug, Clone)]
pub struct ThresholdSpec {
    pub value: WindowValue,
    /// Window length: a multiple of [`SLOT`], at most 24 h.
    pub window: Duration,
    /// Fires when the value is above `fire` (or below it when `direction` is `Below`).
    pub direction: Direction,
    pub fire: f64,
    /// Resolves when the value is back below (above, for `Below`) `resolve`. Hysteresis:
    /// `resolve <= fire` for `Above`, `resolve >= fire` for `Below`. Defaults to `fire`.
    pub resolve: f64,
    /// Per value of this attribute (e.g. `model`) rather than per tenant only.
    pub group_by: Option<String>,
    /// A window with fewer matching events than this neither fires nor resolves.
    pub min_events: u64,
}

/// Slot width of sliding windows: windows are made of slots of event time this long.
pub const SLOT: Duration = Duration::from_secs(10);

/// Serializable: alert transitions and anomalies carry it to webhooks and KV records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Above,
    Below,
}

/// What a threshold alert measures over its window, over the events its rule matches.
#[derive(Debug, Clone)]
pub enum WindowValue {
    /// The `q` quantile (0 < q < 1) of a metric, over events that carry it.
    Quantile { q: f64, metric: String },
    /// The mean of a metric, over events that carry it.
    Avg { metric: String },
    /// Matching events per second over the window.
    Rate,
    /// Matching events in the window.
    Count,
    /// The share (0..=1) of matching events that also match `of`.
    Share { of: Matcher },
}

/// Anomaly detection on a per-minute series of the rule's matching events.
#[derive(Debug, Clone)]
pub struct AnomalySpec {
    pub series: SeriesValue,
    /// Per value of this attribute as well as per tenant.
    pub group_by: Option<String>,
    /// How many standard deviations from the baseline make an anomaly (z-score), e.g. 4.
    pub sensitivity: f64,
    /// Which side counts.
    pub side: Side,
    /// Minutes of data before the baseline may flag anything.
    pub warmup_minutes: u32,
}

#[derive(Debug, Clone)]
pub enum SeriesValue {
    /// Matching events per minute.
    Rate,
    /// The mean of a metric per minute.
    Mean { metric: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Up,
    Down,
    Both,
}

/// A webhook destination.
#[derive(Debug, Clone)]
pub struct WebhookSpec {
    pub name: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key for the `Chute-Signature` header (read from `secret_env` or `secret_file`
    /// at load; never logged).
    pub secret: String,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Requests in flight to this destination at most.
    pub concurrency: usize,
    /// Attempts before the delivery goes to `ROUTES_DLQ` (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before attempt 2; doubles per attempt up to `backoff_max`, with full jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

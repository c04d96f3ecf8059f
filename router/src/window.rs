//! Bounded sliding windows of event time for threshold alerts.
//!
//! A [`WindowStore`] keeps one window per series ([`SeriesKey`]: rule, tenant, group value). A
//! window is made of [`SLOT`]-wide slots of event time; each slot holds what a
//! [`WindowValue`] needs: the matching events, those that also match the `share` matcher, the sum
//! and count of the metric, and (for quantiles) a log-bucket [`Sketch`] with a relative error of
//! at most 1%.
//!
//! Memory is bounded by construction:
//! - at most `max_series` series: an observation (or seed) for a new series beyond the cap is
//!   refused and counted in [`WindowStore::dropped_series`] and
//!   `chute_router_series_dropped_total{kind="window"}`;
//! - at most `window / SLOT` slots per series (only slots that saw events take memory; slots
//!   leave when they fall out of the window);
//! - at most [`MAX_BUCKETS`] buckets per slot sketch, and never more than the slot's events
//!   (a bucket is about 20 bytes): a quantile rule over 5 minutes holds at most 30 x 1024
//!   buckets per series, and far fewer in practice (latencies from 1 ms to 100 s span 576).
//!
//! The window read at `now` is the `window / SLOT` slots ending with the slot that holds `now`,
//! so its oldest end moves in steps of one slot. Events older than that, or more than
//! [`MAX_AHEAD`] ahead of `now`, are ignored and counted
//! (`chute_router_window_events_ignored_total{reason="late"|"future"}`).
//!
//! On restart the lead seeds the windows from ClickHouse: [`bucket_index_sql`] is the SQL twin of
//! [`bucket_index`], so a `GROUP BY slot, bucket` over the raw events rebuilds each slot's sketch
//! exactly, and [`WindowStore::seed`] loads one slot.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge};

use crate::spec::{ThresholdSpec, WindowValue, SLOT};

/// Events further than this ahead of `now` (clock skew, bad client clocks) are ignored.
pub const MAX_AHEAD: Duration = Duration::from_secs(300);

/// Relative error of [`Sketch::quantile`] (DDSketch's alpha).
pub const RELATIVE_ERROR: f64 = 0.01;
/// `1 / ln(gamma)` with `gamma = (1 + alpha) / (1 - alpha)`: bucket `m` holds magnitudes in
/// `[gamma^m, gamma^(m+1))`. Written out (not computed) so the SQL twin uses the same digits.
const INV_LN_GAMMA: f64 = 49.99833328888678;
/// Magnitudes below this count as zero (bucket 0).
pub const MIN_MAGNITUDE: f64 = 1e-9;
/// Added to the log index so every non-zero magnitude gets a positive index:
/// `floor(ln(1e-9) * INV_LN_GAMMA) = -1037`.
const INDEX_OFFSET: i64 = 1100;
/// Largest magnitude index; magnitudes above `gamma^(MAX_INDEX - INDEX_OFFSET)` (about 1e25) share it.
const MAX_INDEX: i64 = 4000;
/// Buckets per sketch at most; beyond it the two lowest buckets merge (only the lowest
/// quantiles lose precision, as in DDSketch's collapsing store).
pub const MAX_BUCKETS: usize = 1024;

/// The log bucket of `value`: 0 for zero (and magnitudes below [`MIN_MAGNITUDE`]), a positive
/// index for positive values, its negation for negative ones. Bucket order is value order.
/// NaN and infinities have no bucket (the store never records them); they map to 0.
pub fn bucket_index(value: f64) -> i32 {
    if !value.is_finite() || value.abs() < MIN_MAGNITUDE {
        return 0;
    }
    let magnitude = ((value.abs().ln() * INV_LN_GAMMA).floor() as i64 + INDEX_OFFSET).clamp(1, MAX_INDEX);
    let magnitude = magnitude as i32;
    if value > 0.0 {
        magnitude
    } else {
        -magnitude
    }
}

/// The ClickHouse expression that computes [`bucket_index`] of the Float64 expression `expr`
/// (an `Int32`). `expr` is SQL written by the caller (a column name), never user input.
pub fn bucket_index_sql(expr: &str) -> String {
    format!(
        "toInt32(multiIf(NOT isFinite({expr}) OR abs({expr}) < {MIN_MAGNITUDE:e}, 0, \
         sign({expr}) * least(greatest(toInt64(floor(log(abs({expr})) * {INV_LN_GAMMA:?})) + {INDEX_OFFSET}, 1), {MAX_INDEX})))"
    )
}

/// The value that stands for bucket `index`: within [`RELATIVE_ERROR`] of every value in it.
pub fn bucket_value(index: i32) -> f64 {
    if index == 0 {
        return 0.0;
    }
    let gamma = (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR);
    let magnitude = i64::from(index.unsigned_abs()) - INDEX_OFFSET;
    // The bucket is [gamma^m, gamma^(m+1)); 2 gamma^(m+1) / (gamma + 1) is alpha from both ends.
    let lower = (magnitude as f64 / INV_LN_GAMMA).exp();
    let estimate = 2.0 * lower * gamma / (gamma + 1.0);
    if index > 0 {
        estimate
    } else {
        -estimate
    }
}

/// A mergeable log-bucket histogram (DDSketch-style): quantiles within [`RELATIVE_ERROR`],
/// at most [`MAX_BUCKETS`] buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    buckets: BTreeMap<i32, u64>,
    total: u64,
}

impl Sketch {
    pub fn add(&mut self, value: f64) {
        if value.is_finite() {
            self.add_bucket(bucket_index(value), 1);
        }
    }

    pub fn add_bucket(&mut self, index: i32, count: u64) {
        if count == 0 {
            return;
        }
        *self.buckets.entry(index).or_insert(0) += count;
        self.total += count;
        while self.buckets.len() > MAX_BUCKETS {
            self.collapse_lowest();
        }
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (&index, &count) in &other.buckets {
            self.add_bucket(index, count);
        }
    }

    fn collapse_lowest(&mut self) {
        let (_, lowest) = self.buckets.pop_first().expect("more than MAX_BUCKETS buckets");
        let mut next = self.buckets.first_entry().expect("more than MAX_BUCKETS buckets");
        *next.get_mut() += lowest;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn buckets(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.buckets.iter().map(|(&index, &count)| (index, count))
    }

    /// The `q` quantile (0..=1), `None` when empty: the value of the bucket holding the value of
    /// rank `q * (count - 1)` (0-based, lower rank), as DDSketch does.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(self.total, self.buckets(), q)
    }
}

/// The `q` quantile of `total` values in `buckets` (in bucket order), `None` when empty.
fn quantile(total: u64, buckets: impl Iterator<Item = (i32, u64)>, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * (total - 1) as f64).floor() as u64;
    let mut seen = 0;
    for (index, count) in buckets {
        seen += count;
        if seen > rank {
            return Some(bucket_value(index));
        }
    }
    debug_assert!(false, "rank {rank} beyond total {total}");
    None
}

/// One series of a rule: the rule's index in the rule set, the tenant and the `group_by`
/// attribute's value (`None` without `group_by`; an event without the attribute is the caller's
/// choice, e.g. the empty string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub rule: usize,
    pub tenant: String,
    pub group: Option<String>,
}

/// What one [`SLOT`] of event time holds.
#[derive(Debug, Clone, Default, PartialEq)]
struct Slot {
    /// Slot number: `event time / SLOT`.
    number: i64,
    count: u64,
    flagged: u64,
    sum: f64,
    valued: u64,
    /// Only for quantile rules.
    sketch: Option<Sketch>,
}

/// One slot as the lead reads it back from ClickHouse on restart (one `SlotSeed` is the whole
/// slot): matching events, those matching `share`'s `of`, the metric's sum and how many events
/// carried it, and the metric's sketch as `(bucket_index, count)` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotSeed {
    pub count: u64,
    pub flagged: u64,
    pub sum: f64,
    pub valued: u64,
    pub buckets: Vec<(i32, u64)>,
}

/// A window's value and how many matching events it saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// `None` when the window has nothing to measure (no events, or none with the metric).
    pub value: Option<f64>,
    /// Matching events in the window.
    pub events: u64,
}

/// What became of an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    Recorded,
    /// A new series beyond `max_series`.
    SeriesDropped,
    /// Older than the window at `now`.
    TooOld,
    /// More than [`MAX_AHEAD`] ahead of `now`.
    TooFarAhead,
}

/// One window: its slots in slot order, only those that saw events.
#[derive(Debug, Clone, Default)]
struct Series {
    slots: VecDeque<Slot>,
}

impl Series {
    /// The slot numbered `number`, created in order if missing.
    fn slot_mut(&mut self, number: i64, with_sketch: bool) -> &mut Slot {
        let position = self.slots.partition_point(|slot| slot.number < number);
        if self.slots.get(position).is_none_or(|slot| slot.number != number) {
            let sketch = with_sketch.then(Sketch::default);
            self.slots.insert(
                position,
                Slot {
                    number,
                    sketch,
                    ..Slot::default()
                },
            );
        }
        &mut self.slots[position]
    }

    /// Drops slots numbered `oldest_kept - 1` and below.
    fn prune(&mut self, oldest_kept: i64) {
        while self.slots.front().is_some_and(|slot| slot.number < oldest_kept) {
            self.slots.pop_front();
        }
    }
}

/// Sliding windows of event time per series, bounded in series, slots and buckets.
#[derive(Debug)]
pub struct WindowStore {
    series: HashMap<SeriesKey, Series>,
    max_series: usize,
    dropped_series: u64,
    ignored_late: u64,
    ignored_future: u64,
}

fn slot_ms() -> i64 {
    SLOT.as_millis() as i64
}

fn slot_number(time_ms: i64) -> i64 {
    time_ms.div_euclid(slot_ms())
}

fn window_slots(spec: &ThresholdSpec) -> i64 {
    (spec.window.as_millis() as i64 / slot_ms()).max(1)
}

/// The first slot number inside the window that ends with the slot holding `now_ms`.
fn oldest_slot(spec: &ThresholdSpec, now_ms: i64) -> i64 {
    slot_number(now_ms) - window_slots(spec) + 1
}

impl WindowStore {
    pub fn new(max_series: usize) -> Self {
        Self {
            series: HashMap::new(),
            max_series,
            dropped_series: 0,
            ignored_late: 0,
            ignored_future: 0,
        }
    }

    /// Records one matching event of event time `time_ms` at wall time `now_ms`: `metric` is the
    /// rule's metric when the event carries it (quantile and avg rules), `flag` whether it also
    /// matches a `share` rule's `of`.
    pub fn observe(
        &mut self,
        key: &SeriesKey,
        spec: &ThresholdSpec,
        now_ms: i64,
        time_ms: i64,
        metric: Option<f64>,
        flag: bool,
    ) -> Observed {
        if time_ms > now_ms + MAX_AHEAD.as_millis() as i64 {
            self.ignored_future += 1;
            counter!(EVENTS_IGNORED.name, "reason" => "future").increment(1);
            return Observed::TooFarAhead;
        }
        let oldest = oldest_slot(spec, now_ms);
        let number = slot_number(time_ms);
        if number < oldest {
            self.ignored_late += 1;
            counter!(EVENTS_IGNORED.name, "reason" => "late").increment(1);
            return Observed::TooOld;
        }
        let Some(series) = self.series_mut(key) else {
            return Observed::SeriesDropped;
        };
        series.prune(oldest);
        let slot = series.slot_mut(number, is_quantile(spec));
        slot.count += 1;
        slot.flagged += u64::from(flag);
        if let Some(value) = metric.filter(|value| value.is_finite()) {
            slot.sum += value;
            slot.valued += 1;
            if let Some(sketch) = &mut slot.sketch {
                sketch.add(value);
            }
        }
        Observed::Recorded
    }

    /// Loads the slot that starts at `slot_start_ms`, replacing what it held. Refused (and
    /// counted) like an observation when the series is new and the store is full.
    pub fn seed(&mut self, key: &SeriesKey, spec: &ThresholdSpec, slot_start_ms: i64, seed: SlotSeed) -> Observed {
        let Some(series) = self.series_mut(key) else {
            return Observed::SeriesDropped;
        };
        let slot = series.slot_mut(slot_number(slot_start_ms), is_quantile(spec));
        slot.count = seed.count;
        slot.flagged = seed.flagged;
        slot.sum = seed.sum;
        slot.valued = seed.valued;
        if let Some(sketch) = &mut slot.sketch {
            *sketch = Sketch::default();
            for (index, count) in seed.buckets {
                sketch.add_bucket(index, count);
            }
        }
        Observed::Recorded
    }

    /// The rule's value over the window that ends with the slot holding `now_ms`.
    pub fn evaluate(&self, key: &SeriesKey, spec: &ThresholdSpec, now_ms: i64) -> Reading {
        let oldest = oldest_slot(spec, now_ms);
        let newest = slot_number(now_ms);
        let mut total = Slot::default();
        // The window's buckets, one cell per possible bucket: merging a slot is one pass over
        // its buckets, even for a day of slots.
        let mut cells: Vec<u64> = Vec::new();
        if let Some(series) = self.series.get(key) {
            for slot in series
                .slots
                .iter()
                .filter(|slot| (oldest..=newest).contains(&slot.number))
            {
                total.count += slot.count;
                total.flagged += slot.flagged;
                total.sum += slot.sum;
                total.valued += slot.valued;
                if let Some(sketch) = &slot.sketch {
                    if cells.is_empty() {
                        cells = vec![0; 2 * MAX_INDEX as usize + 1];
                    }
                    for (index, count) in sketch.buckets() {
                        cells[(i64::from(index) + MAX_INDEX) as usize] += count;
                    }
                }
            }
        }
        let value = match &spec.value {
            WindowValue::Quantile { q, .. } => {
                let buckets = cells.iter().enumerate().filter(|(_, &count)| count > 0);
                quantile(
                    cells.iter().sum(),
                    buckets.map(|(cell, &count)| ((cell as i64 - MAX_INDEX) as i32, count)),
                    *q,
                )
            }
            WindowValue::Avg { .. } => (total.valued > 0).then(|| total.sum / total.valued as f64),
            WindowValue::Rate => Some(total.count as f64 / spec.window.as_secs_f64()),
            WindowValue::Count => Some(total.count as f64),
            WindowValue::Share { .. } => (total.count > 0).then(|| total.flagged as f64 / total.count as f64),
        };
        Reading {
            value,
            events: total.count,
        }
    }

    /// Drops the slots that left their window at `now_ms`, and the series left empty. `specs`
    /// gives each rule's spec by rule index (`None` for a rule that is gone: its series go).
    /// Returns how many series were dropped.
    pub fn expire<'a>(&mut self, now_ms: i64, spec_of: impl Fn(usize) -> Option<&'a ThresholdSpec>) -> usize {
        let before = self.series.len();
        self.series.retain(|key, series| {
            let Some(spec) = spec_of(key.rule) else {
                return false;
            };
            series.prune(oldest_slot(spec, now_ms));
            !series.slots.is_empty()
        });
        gauge!(SERIES.name, "kind" => "window").set(self.series.len() as f64);
        before - self.series.len()
    }

    /// The series, created if there is room.
    fn series_mut(&mut self, key: &SeriesKey) -> Option<&mut Series> {
        if !self.series.contains_key(key) {
            if self.series.len() >= self.max_series {
                self.dropped_series += 1;
                counter!(SERIES_DROPPED.name, "kind" => "window").increment(1);
                return None;
            }
            self.series.insert(key.clone(), Series::default());
            gauge!(SERIES.name, "kind" => "window").set(self.series.len() as f64);
        }
        self.series.get_mut(key)
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The series held (each has events in a slot not yet expired).
    pub fn keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.series.keys()
    }

    /// Observations and seeds refused because the store was full.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }

    /// Events ignored for being older than their window.
    pub fn ignored_late(&self) -> u64 {
        self.ignored_late
    }

    /// Events ignored for being more than [`MAX_AHEAD`] ahead.
    pub fn ignored_future(&self) -> u64 {
        self.ignored_future
    }
}

fn is_quantile(spec: &ThresholdSpec) -> bool {
    matches!(spec.value, WindowValue::Quantile { .. })
}

pub const SERIES_DROPPED: MetricDescription = MetricDescription {
    name: "chute_router_series_dropped_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "observations refused because their new series was over the cap (kind: window, anomaly)",
    zero_at_start: true,
};

pub const SERIES: MetricDescription = MetricDescription {
    name: "chute_router_series",
    kind: MetricKind::Gauge,
    unit: None,
    help: "series held in memory (kind: window, anomaly)",
    zero_at_start: false,
};

pub const EVENTS_IGNORED: MetricDescription = MetricDescription {
    name: "chute_router_window_events_ignored_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "events a window or minute series ignored (reason: late = older than the window or an already closed minute, future = more than 5 min ahead)",
    zero_at_start: false,
};

/// The window and series metrics; [`crate::anomaly::METRICS`] does not repeat them.
pub const METRICS: &[MetricDescription] = &[SERIES_DROPPED, SERIES, EVENTS_IGNORED];

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::spec::Direction;

    fn spec(value: WindowValue, window_secs: u64) -> ThresholdSpec {
        ThresholdSpec {
            value,
            window: Duration::from_secs(window_secs),
            direction: Direction::Above,
            fire: 1.0,
            resolve: 1.0,
            group_by: None,
            min_events: 1,
        }
    }

    fn p99() -> WindowValue {
        WindowValue::Quantile {
            q: 0.99,
            metric: "latency_ms".into(),
        }
    }

    fn key(tenant: &str) -> SeriesKey {
        SeriesKey {
            rule: 0,
            tenant: tenant.into(),
            group: None,
        }
    }

    #[test]
    fn inv_ln_gamma_is_one_over_ln_gamma() {
        let gamma = (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR);
        assert!((INV_LN_GAMMA - 1.0 / f64::ln(gamma)).abs() < 1e-9);
        assert_eq!((MIN_MAGNITUDE.ln() * INV_LN_GAMMA).floor() as i64, -1037);
    }

    #[test]
    fn bucket_value_is_within_the_relative_error_of_every_value_in_its_bucket() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100_000 {
            let magnitude = 10f64.powf(rng.random_range(-8.0..20.0));
            let value = if rng.random_bool(0.5) { magnitude } else { -magnitude };
            let estimate = bucket_value(bucket_index(value));
            let error = (estimate - value).abs() / value.abs();
            assert!(error <= RELATIVE_ERROR + 1e-9, "{value} -> {estimate}: error {error}");
        }
        assert_eq!(bucket_index(0.0), 0);
        assert_eq!(bucket_index(1e-12), 0);
        assert_eq!(bucket_index(f64::NAN), 0);
        assert_eq!(bucket_index(1e300), MAX_INDEX as i32);
        assert_eq!(bucket_index(-1e300), -(MAX_INDEX as i32));
    }

    #[test]
    fn bucket_order_is_value_order() {
        let values = [-1e6, -300.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 2.0, 300.0, 1e6];
        let indexes: Vec<i32> = values.iter().map(|&value| bucket_index(value)).collect();
        assert!(indexes.windows(2).all(|pair| pair[0] < pair[1]), "{indexes:?}");
    }

    #[test]
    fn sketch_quantiles_are_within_one_percent_of_the_exact_ones() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut values: Vec<f64> = (0..20_000)
            .map(|_| rng.random_range(0.5f64..4000.0).powf(1.3))
            .collect();
        values.extend((0..500).map(|_| -rng.random_range(1.0..100.0)));
        values.extend([0.0; 300]);
        let mut sketch = Sketch::default();
        for &value in &values {
            sketch.add(value);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.02, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let exact = values[(q * (values.len() - 1) as f64).floor() as usize];
            let estimate = sketch.quantile(q).unwrap();
            assert!(
                (estimate - exact).abs() <= RELATIVE_ERROR * exact.abs() + 1e-12,
                "q {q}: {estimate} against {exact}"
            );
        }
    }

    #[test]
    fn sketch_merge_equals_one_sketch_of_everything_and_stays_bounded() {
        let mut whole = Sketch::default();
        let mut halves = [Sketch::default(), Sketch::default()];
        for i in 0..10_000 {
            let value = 1.001f64.powi(i) - 3.0;
            whole.add(value);
            halves[(i % 2) as usize].add(value);
        }
        let [mut first, second] = halves;
        first.merge(&second);
        assert_eq!(first, whole);
        // 1.001^10000 spans about 460 buckets: no collapse. A range of 1e-8 .. 1e20 does collapse.
        let mut wide = Sketch::default();
        for i in 0..3000 {
            wide.add(1e-8 * 1.025f64.powi(i));
        }
        assert!(wide.buckets.len() <= MAX_BUCKETS);
        assert_eq!(wide.count(), 3000);
        let top = 1e-8 * 1.025f64.powi(2999);
        assert!((wide.quantile(1.0).unwrap() - top).abs() <= RELATIVE_ERROR * top);
    }

    #[test]
    fn window_reads_the_slots_ending_with_now_and_forgets_older_ones() {
        let spec = spec(WindowValue::Count, 30);
        let mut store = WindowStore::new(10);
        let now = 1_000_000; // slot 100: the window at `now` is slots 98, 99 and 100
        for time in [now - 15_000, now - 5_000, now, now + 5_000] {
            assert_eq!(
                store.observe(&key("a"), &spec, now, time, None, false),
                Observed::Recorded
            );
        }
        assert_eq!(store.evaluate(&key("a"), &spec, now).events, 4);
        assert_eq!(
            store.observe(&key("a"), &spec, now, now - 20_001, None, false),
            Observed::TooOld
        );
        assert_eq!(
            store.observe(&key("a"), &spec, now, now + 300_001, None, false),
            Observed::TooFarAhead
        );
        assert_eq!((store.ignored_late(), store.ignored_future()), (1, 1));
        // Ten seconds later the oldest slot has left.
        assert_eq!(store.evaluate(&key("a"), &spec, now + 10_000).value, Some(3.0));
        assert_eq!(store.evaluate(&key("b"), &spec, now).value, Some(0.0));
        assert_eq!(store.expire(now + 20_000, |_| Some(&spec)), 0);
        assert_eq!(store.expire(now + 40_000, |_| Some(&spec)), 1);
        assert_eq!(store.series_count(), 0);
    }

    #[test]
    fn values_of_every_kind() {
        let now = 600_000;
        let mut store = WindowStore::new(10);
        let avg = spec(WindowValue::Avg { metric: "m".into() }, 60);
        let rate = spec(WindowValue::Rate, 60);
        let share = spec(
            WindowValue::Share {
                of: crate::matcher::Matcher::default(),
            },
            60,
        );
        let quantile = spec(p99(), 60);
        for (rule, spec) in [&avg, &rate, &share, &quantile].into_iter().enumerate() {
            let key = SeriesKey {
                rule,
                tenant: "t".into(),
                group: None,
            };
            assert_eq!(store.evaluate(&key, spec, now).events, 0);
            for i in 0..120 {
                let metric = (i % 3 != 0).then_some(i as f64);
                store.observe(&key, spec, now, now - i * 400, metric, i % 4 == 0);
            }
        }
        let read = |rule: usize, spec: &ThresholdSpec| {
            store.evaluate(
                &SeriesKey {
                    rule,
                    tenant: "t".into(),
                    group: None,
                },
                spec,
                now,
            )
        };
        let values: Vec<f64> = (0..120).filter(|i| i % 3 != 0).map(|i| i as f64).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert_eq!(
            read(0, &avg),
            Reading {
                value: Some(mean),
                events: 120
            }
        );
        assert_eq!(read(1, &rate).value, Some(2.0));
        assert_eq!(read(2, &share).value, Some(0.25));
        let p99 = read(3, &quantile).value.unwrap();
        assert!((p99 - 118.0).abs() <= 1.18, "{p99}");
    }

    #[test]
    fn a_day_long_window_reads_quantiles_of_every_slot() {
        let spec = spec(
            WindowValue::Quantile {
                q: 0.5,
                metric: "latency_ms".into(),
            },
            86_400,
        );
        let now = 1_000 * 86_400_000;
        let mut store = WindowStore::new(1);
        let mut rng = StdRng::seed_from_u64(5);
        let mut values = Vec::new();
        for slot in 0..8640 {
            for _ in 0..3 {
                let value = rng.random_range(1.0..10_000.0);
                values.push(value);
                let time = now - slot * 10_000;
                assert_eq!(
                    store.observe(&key("a"), &spec, now, time, Some(value), false),
                    Observed::Recorded
                );
            }
        }
        values.sort_by(f64::total_cmp);
        let exact = values[(values.len() - 1) / 2];
        let reading = store.evaluate(&key("a"), &spec, now);
        assert_eq!(reading.events, 3 * 8640);
        let median = reading.value.unwrap();
        assert!(
            (median - exact).abs() <= RELATIVE_ERROR * exact,
            "{median} against {exact}"
        );
    }

    #[test]
    fn the_series_cap_refuses_new_series_and_counts_them() {
        let spec = spec(WindowValue::Count, 60);
        let mut store = WindowStore::new(2);
        for tenant in ["a", "b", "c", "a", "d"] {
            store.observe(&key(tenant), &spec, 0, 0, None, false);
        }
        assert_eq!(store.series_count(), 2);
        assert_eq!(store.dropped_series(), 2);
        assert_eq!(store.evaluate(&key("a"), &spec, 0).events, 2);
        assert_eq!(
            store.seed(&key("e"), &spec, 0, SlotSeed::default()),
            Observed::SeriesDropped
        );
    }

    #[test]
    fn seeding_the_slots_reproduces_the_observed_window() {
        let spec = spec(p99(), 300);
        let now = 10_000_000;
        let mut rng = StdRng::seed_from_u64(3);
        let mut live = WindowStore::new(10);
        let mut slots: BTreeMap<i64, SlotSeed> = BTreeMap::new();
        for _ in 0..5000 {
            let time = now - rng.random_range(0..290_000);
            let value = rng.random_range(1.0..5000.0);
            let flag = rng.random_bool(0.1);
            live.observe(&key("a"), &spec, now, time, Some(value), flag);
            // What the seeding query's GROUP BY slot, bucket returns, gathered per slot.
            let seed = slots.entry(slot_number(time) * slot_ms()).or_default();
            seed.count += 1;
            seed.flagged += u64::from(flag);
            seed.sum += value;
            seed.valued += 1;
            match seed.buckets.iter_mut().find(|(index, _)| *index == bucket_index(value)) {
                Some((_, count)) => *count += 1,
                None => seed.buckets.push((bucket_index(value), 1)),
            }
        }
        let mut seeded = WindowStore::new(10);
        for (start, seed) in slots {
            assert_eq!(seeded.seed(&key("a"), &spec, start, seed), Observed::Recorded);
        }
        let (live, seeded) = (
            live.evaluate(&key("a"), &spec, now),
            seeded.evaluate(&key("a"), &spec, now),
        );
        assert_eq!(live.events, 5000);
        assert_eq!(live, seeded);
    }
}

//! Per-series anomaly detection over minute buckets.
//!
//! A [`Detector`] keeps an exponentially weighted baseline of one series of minute values (the
//! rule's matching events per minute, or a metric's mean per minute): the mean, and the variance
//! of the one-step prediction error. A minute is anomalous when its z-score
//! `(value - mean) / sigma` is beyond the spec's `sensitivity`; the spec's `side` says which
//! signs are reported. Choices:
//! - anomalous minutes do not move the baseline, so a spike does not hide the next one;
//! - [`LEVEL_SHIFT_MINUTES`] anomalous minutes in a row on the same side are a level shift: the
//!   baseline moves to their mean, so the onset is flagged and then the detector adapts instead
//!   of flagging forever (a spike longer than that is taken for a shift as well);
//! - sigma has a floor: `sqrt(mean)` for rates (Poisson counting noise, so a rate of a few
//!   events per minute with empty minutes does not flag every non-empty one) and 0.1% of the
//!   mean for metric means;
//! - nothing is flagged before `max(warmup_minutes, MIN_WARMUP_MINUTES)` minutes of data; during
//!   warm-up the weights are `1/n`, so the baseline starts as the plain mean and variance.
//!
//! Feeding history ([`Detector::warm`], e.g. the 1-minute rollups read from ClickHouse on
//! restart) runs exactly the same update as live minutes, so a warm start leaves the same state.
//!
//! An [`AnomalyStore`] keeps a detector and a [`MinuteSeries`] per series ([`SeriesKey`]), at most
//! `max_series` of them: observations for a new series beyond the cap are refused and counted
//! (`chute_router_series_dropped_total{kind="anomaly"}`). The engine calls
//! [`AnomalyStore::observe`] for each matching event and [`AnomalyStore::close`] every few
//! seconds; `close` hands back every minute that is over (event time past the minute plus the
//! grace), with the anomaly it was, if any.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chute_common::telemetry::{MetricDescription, MetricKind};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};

use crate::spec::{AnomalySpec, Direction, SeriesValue, Side};
use crate::window::{Observed, SeriesKey, EVENTS_IGNORED, MAX_AHEAD, SERIES, SERIES_DROPPED};

/// Weight of a new minute in the baseline mean (about a 10-minute memory: it follows slow
/// daily cycles).
const MEAN_WEIGHT: f64 = 0.1;
/// Weight of a new minute in the variance (about a 50-minute memory: a steadier scale).
const VARIANCE_WEIGHT: f64 = 0.02;
/// Anomalous minutes in a row, on one side, taken for a level shift.
pub const LEVEL_SHIFT_MINUTES: usize = 5;
/// Warm-up minutes at least, whatever the spec says: a variance needs some data.
pub const MIN_WARMUP_MINUTES: u32 = 10;
/// Sigma of a metric mean is at least this share of the mean.
const MEAN_SIGMA_FLOOR: f64 = 0.001;

const MINUTE_MS: i64 = 60_000;

/// A minute that was beyond the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Start of the minute (ms since the epoch).
    pub minute_ms: i64,
    pub value: f64,
    /// The baseline's mean before this minute.
    pub expected: f64,
    /// `(value - expected) / sigma`.
    pub z: f64,
    pub direction: Direction,
}

/// The baseline of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    rate: bool,
    sensitivity: f64,
    side: Side,
    warmup_minutes: u32,
    /// Minutes that went into the baseline.
    minutes: u64,
    mean: f64,
    variance: f64,
    last_minute_ms: Option<i64>,
    /// The current run of anomalous minutes on one side (values), for level shifts.
    run: Vec<f64>,
    run_direction: Option<Direction>,
}

impl Detector {
    pub fn new(spec: &AnomalySpec) -> Self {
        Self {
            rate: matches!(spec.series, SeriesValue::Rate),
            sensitivity: spec.sensitivity,
            side: spec.side,
            warmup_minutes: spec.warmup_minutes.max(MIN_WARMUP_MINUTES),
            minutes: 0,
            mean: 0.0,
            variance: 0.0,
            last_minute_ms: None,
            run: Vec::new(),
            run_direction: None,
        }
    }

    /// Takes the value of the minute that starts at `minute_ms` and says whether it is an
    /// anomaly on the spec's side. Minutes must come in order: a minute at or before the last
    /// one is ignored. Rate series must be fed their empty minutes as 0 ([`MinuteSeries`] does).
    pub fn observe_minute(&mut self, minute_ms: i64, value: f64) -> Option<Anomaly> {
        if !value.is_finite() || self.last_minute_ms.is_some_and(|last| minute_ms <= last) {
            return None;
        }
        self.last_minute_ms = Some(minute_ms);
        if self.minutes < u64::from(self.warmup_minutes) {
            self.learn(value);
            return None;
        }
        let expected = self.mean;
        let z = (value - expected) / self.sigma();
        if z.abs() <= self.sensitivity {
            self.run.clear();
            self.run_direction = None;
            self.learn(value);
            return None;
        }
        let direction = if z > 0.0 { Direction::Above } else { Direction::Below };
        if self.run_direction != Some(direction) {
            self.run.clear();
            self.run_direction = Some(direction);
        }
        self.run.push(value);
        if self.run.len() >= LEVEL_SHIFT_MINUTES {
            // A level shift: the baseline moves to the new level and keeps its scale.
            self.mean = self.run.iter().sum::<f64>() / self.run.len() as f64;
            self.run.clear();
            self.run_direction = None;
        }
        let reported = match self.side {
            Side::Up => direction == Direction::Above,
            Side::Down => direction == Direction::Below,
            Side::Both => true,
        };
        reported.then_some(Anomaly {
            minute_ms,
            value,
            expected,
            z,
            direction,
        })
    }

    /// Feeds a minute of history (warm start): the same update as [`Detector::observe_minute`],
    /// without an answer.
    pub fn warm(&mut self, minute_ms: i64, value: f64) {
        let _ = self.observe_minute(minute_ms, value);
    }

    /// Whether the detector is past its warm-up and may flag minutes.
    pub fn is_warm(&self) -> bool {
        self.minutes >= u64::from(self.warmup_minutes)
    }

    /// The baseline mean and sigma.
    pub fn baseline(&self) -> (f64, f64) {
        (self.mean, self.sigma())
    }

    fn sigma(&self) -> f64 {
        let floor = if self.rate {
            self.mean.max(1.0).sqrt()
        } else {
            (MEAN_SIGMA_FLOOR * self.mean.abs()).max(f64::MIN_POSITIVE)
        };
        self.variance.sqrt().max(floor)
    }

    fn learn(&mut self, value: f64) {
        self.minutes += 1;
        if self.minutes == 1 {
            self.mean = value;
            return;
        }
        let n = self.minutes as f64;
        let error = value - self.mean;
        self.variance += (error * error - self.variance) * VARIANCE_WEIGHT.max(1.0 / (n - 1.0));
        self.mean += error * MEAN_WEIGHT.max(1.0 / n);
    }
}

/// Turns the events of one series into minute values: matching events per minute for rates, the
/// metric's mean per minute for means. A minute closes once event time (`now`) is past its end
/// plus the grace; an event for a closed minute is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteSeries {
    rate: bool,
    /// Open minutes: start -> (events, sum of values, values).
    open: BTreeMap<i64, (u64, f64, u64)>,
    /// The first minute not closed yet; `None` before anything was observed or warmed.
    next_minute_ms: Option<i64>,
}

impl MinuteSeries {
    pub fn new(series: &SeriesValue) -> Self {
        Self {
            rate: matches!(series, SeriesValue::Rate),
            open: BTreeMap::new(),
            next_minute_ms: None,
        }
    }

    /// Counts one event of time `time_ms` with the metric's `value` (ignored for rates; an event
    /// without the metric still counts nothing for a mean).
    pub fn observe(&mut self, now_ms: i64, time_ms: i64, value: Option<f64>) -> Observed {
        if time_ms > now_ms + MAX_AHEAD.as_millis() as i64 {
            return Observed::TooFarAhead;
        }
        let minute = time_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        if self.next_minute_ms.is_some_and(|next| minute < next) {
            return Observed::TooOld;
        }
        let slot = self.open.entry(minute).or_insert((0, 0.0, 0));
        slot.0 += 1;
        if let Some(value) = value.filter(|value| value.is_finite()) {
            slot.1 += value;
            slot.2 += 1;
        }
        Observed::Recorded
    }

    /// Closes the minutes that ended `grace` or more before `now_ms`, in order: for rates every
    /// minute from the first one seen (or after the last warmed one), 0 when empty; for means
    /// only the minutes with values.
    pub fn close(&mut self, now_ms: i64, grace: Duration) -> Vec<(i64, f64)> {
        // The last minute that may close: its end + grace <= now.
        let last = (now_ms - grace.as_millis() as i64 - MINUTE_MS).div_euclid(MINUTE_MS) * MINUTE_MS;
        let Some(first) = self.next_minute_ms.or_else(|| self.open.keys().next().copied()) else {
            return Vec::new();
        };
        if last < first {
            return Vec::new();
        }
        let mut closed = Vec::new();
        if self.rate {
            let mut minute = first;
            while minute <= last {
                let events = self.open.remove(&minute).map_or(0, |(events, _, _)| events);
                closed.push((minute, events as f64));
                minute += MINUTE_MS;
            }
        } else {
            let later = self.open.split_off(&(last + MINUTE_MS));
            for (minute, (_, sum, values)) in std::mem::replace(&mut self.open, later) {
                if values > 0 {
                    closed.push((minute, sum / values as f64));
                }
            }
        }
        self.next_minute_ms = Some(last + MINUTE_MS);
        closed
    }

    /// Marks the minutes up to `minute_ms` as closed (they came from history).
    fn warmed(&mut self, minute_ms: i64) {
        let next = minute_ms + MINUTE_MS;
        if self.next_minute_ms.is_none_or(|current| current < next) {
            self.next_minute_ms = Some(next);
            self.open = self.open.split_off(&next);
        }
    }

    fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// A minute [`AnomalyStore::close`] closed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedMinute {
    pub key: SeriesKey,
    pub minute_ms: i64,
    pub value: f64,
    pub anomaly: Option<Anomaly>,
}

#[derive(Debug, Clone)]
struct AnomalySeries {
    minutes: MinuteSeries,
    detector: Detector,
    /// Event time of the last observation (or warmed minute), for [`AnomalyStore::expire`].
    last_seen_ms: i64,
}

/// The detectors and minute series of every anomaly rule's series, bounded in series.
#[derive(Debug)]
pub struct AnomalyStore {
    series: HashMap<SeriesKey, AnomalySeries>,
    max_series: usize,
    grace: Duration,
    dropped_series: u64,
    ignored: u64,
}

impl AnomalyStore {
    /// `grace`: how long after a minute's end its late events are still counted.
    pub fn new(max_series: usize, grace: Duration) -> Self {
        Self {
            series: HashMap::new(),
            max_series,
            grace,
            dropped_series: 0,
            ignored: 0,
        }
    }

    /// Counts one matching event of time `time_ms` at `now_ms`; `value` is the spec's metric
    /// for mean series.
    pub fn observe(
        &mut self,
        key: &SeriesKey,
        spec: &AnomalySpec,
        now_ms: i64,
        time_ms: i64,
        value: Option<f64>,
    ) -> Observed {
        let Some(series) = self.series_mut(key, spec) else {
            return Observed::SeriesDropped;
        };
        let observed = series.minutes.observe(now_ms, time_ms, value);
        match observed {
            Observed::Recorded => series.last_seen_ms = series.last_seen_ms.max(time_ms),
            Observed::TooOld => {
                self.ignored += 1;
                counter!(EVENTS_IGNORED.name, "reason" => "late").increment(1);
            }
            Observed::TooFarAhead => {
                self.ignored += 1;
                counter!(EVENTS_IGNORED.name, "reason" => "future").increment(1);
            }
            Observed::SeriesDropped => {}
        }
        observed
    }

    /// Feeds a closed minute of history (warm start from the rollups, oldest first, before live
    /// events): the detector learns it as if it had been live, and live events for that minute
    /// or earlier are refused afterwards.
    pub fn warm(&mut self, key: &SeriesKey, spec: &AnomalySpec, minute_ms: i64, value: f64) -> Observed {
        let Some(series) = self.series_mut(key, spec) else {
            return Observed::SeriesDropped;
        };
        series.detector.warm(minute_ms, value);
        series.minutes.warmed(minute_ms);
        series.last_seen_ms = series.last_seen_ms.max(minute_ms);
        Observed::Recorded
    }

    /// Closes every minute that is over at `now_ms` and runs it through its series' detector.
    pub fn close(&mut self, now_ms: i64) -> Vec<ClosedMinute> {
        let mut closed = Vec::new();
        for (key, series) in &mut self.series {
            for (minute_ms, value) in series.minutes.close(now_ms, self.grace) {
                let anomaly = series.detector.observe_minute(minute_ms, value);
                closed.push(ClosedMinute {
                    key: key.clone(),
                    minute_ms,
                    value,
                    anomaly,
                });
            }
        }
        closed.sort_by(|a, b| (a.minute_ms, &a.key).cmp(&(b.minute_ms, &b.key)));
        closed
    }

    /// Drops the series that saw nothing for `idle` (event time) and have no open minute, and
    /// those whose rule is gone (`keep(rule)` false). Returns how many went.
    pub fn expire(&mut self, now_ms: i64, idle: Duration, keep: impl Fn(usize) -> bool) -> usize {
        let before = self.series.len();
        let idle_ms = idle.as_millis() as i64;
        self.series.retain(|key, series| {
            keep(key.rule) && !(series.minutes.is_empty() && now_ms - series.last_seen_ms > idle_ms)
        });
        gauge!(SERIES.name, "kind" => "anomaly").set(self.series.len() as f64);
        before - self.series.len()
    }

    /// The detector of a series, e.g. to read its baseline.
    pub fn detector(&self, key: &SeriesKey) -> Option<&Detector> {
        self.series.get(key).map(|series| &series.detector)
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Observations and warm minutes refused because the store was full.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }

    /// Events refused for a closed minute or for being too far ahead.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    fn series_mut(&mut self, key: &SeriesKey, spec: &AnomalySpec) -> Option<&mut AnomalySeries> {
        if !self.series.contains_key(key) {
            if self.series.len() >= self.max_series {
                self.dropped_series += 1;
                counter!(SERIES_DROPPED.name, "kind" => "anomaly").increment(1);
                return None;
            }
            let series = AnomalySeries {
                minutes: MinuteSeries::new(&spec.series),
                detector: Detector::new(spec),
                last_seen_ms: i64::MIN / 2,
            };
            self.series.insert(key.clone(), series);
            gauge!(SERIES.name, "kind" => "anomaly").set(self.series.len() as f64);
        }
        self.series.get_mut(key)
    }
}

pub const ANOMALIES: MetricDescription = MetricDescription {
    name: "chute_router_anomalies_total",
    kind: MetricKind::Counter,
    unit: None,
    help: "anomalous minutes reported (labels rule, direction = above | below)",
    zero_at_start: true,
};

/// The anomaly metrics (the series gauge and dropped counter are [`crate::window::METRICS`]).
pub const METRICS: &[MetricDescription] = &[ANOMALIES];

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn spec(series: SeriesValue, side: Side) -> AnomalySpec {
        AnomalySpec {
            series,
            group_by: None,
            sensitivity: 4.0,
            side,
            warmup_minutes: 120,
        }
    }

    fn mean_spec() -> AnomalySpec {
        spec(
            SeriesValue::Mean {
                metric: "latency_ms".into(),
            },
            Side::Both,
        )
    }

    fn key(tenant: &str) -> SeriesKey {
        SeriesKey {
            rule: 1,
            tenant: tenant.into(),
            group: None,
        }
    }

    /// A standard normal sample (Box-Muller), so the test needs no distribution crate.
    fn normal(rng: &mut StdRng) -> f64 {
        let u1: f64 = rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A Poisson sample (Knuth; small means only).
    fn poisson(rng: &mut StdRng, mean: f64) -> f64 {
        let limit = (-mean).exp();
        let mut product: f64 = rng.random_range(0.0..1.0);
        let mut count = 0.0;
        while product > limit {
            product *= rng.random_range(0.0..1.0);
            count += 1.0;
        }
        count
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Injected {
        Spike { minutes: i64, factor: f64 },
        Dip { minutes: i64, factor: f64 },
        Shift { factor: f64 },
    }

    /// One synthetic series: `days` of minutes of `base(minute) * level` with noise, and the
    /// anomalies injected (start minute, kind), one every 6 hours after the first day.
    struct Synthetic {
        values: Vec<f64>,
        injected: Vec<(i64, Injected)>,
    }

    fn synthetic(
        rng: &mut StdRng,
        days: i64,
        base: impl Fn(i64) -> f64,
        noise: impl Fn(&mut StdRng, f64) -> f64,
    ) -> Synthetic {
        let minutes = days * 1440;
        let mut injected = Vec::new();
        let mut start = 1440 + 180;
        let mut shifted = false;
        while start < minutes - 60 {
            let kind = match injected.len() % 3 {
                0 => Injected::Spike {
                    minutes: rng.random_range(1..=3),
                    factor: 1.0 + rng.random_range(0.25..0.6),
                },
                1 => Injected::Dip {
                    minutes: rng.random_range(1..=3),
                    factor: 1.0 - rng.random_range(0.25..0.6),
                },
                _ => {
                    // Up, then back down at the next shift.
                    shifted = !shifted;
                    let step = 1.0 + rng.random_range(0.2..0.35);
                    Injected::Shift {
                        factor: if shifted { step } else { 1.0 / step },
                    }
                }
            };
            injected.push((start, kind));
            start += 360 + rng.random_range(-30..30);
        }
        let mut level = 1.0;
        let values = (0..minutes)
            .map(|minute| {
                let mut factor = 1.0;
                for &(start, kind) in &injected {
                    match kind {
                        Injected::Spike { minutes, factor: f } | Injected::Dip { minutes, factor: f }
                            if (start..start + minutes).contains(&minute) =>
                        {
                            factor = f
                        }
                        Injected::Shift { factor: f } if start == minute => level *= f,
                        _ => {}
                    }
                }
                noise(rng, base(minute) * level * factor).max(0.0)
            })
            .collect();
        Synthetic { values, injected }
    }

    /// (anomalies detected, anomalies injected, flags inside detection windows, flags outside).
    fn score(synthetic: &Synthetic, spec: &AnomalySpec) -> (usize, usize, usize, usize) {
        let mut detector = Detector::new(spec);
        let flags: Vec<i64> = synthetic
            .values
            .iter()
            .enumerate()
            .filter_map(|(minute, &value)| detector.observe_minute(minute as i64 * MINUTE_MS, value))
            .map(|anomaly| anomaly.minute_ms / MINUTE_MS)
            .collect();
        // A spike or dip must be flagged during it; a level shift within 10 minutes of its onset.
        let windows: Vec<(i64, i64)> = synthetic
            .injected
            .iter()
            .map(|&(start, kind)| match kind {
                Injected::Spike { minutes, .. } | Injected::Dip { minutes, .. } => (start, start + minutes),
                Injected::Shift { .. } => (start, start + 10),
            })
            .collect();
        let detected = windows
            .iter()
            .filter(|(start, end)| flags.iter().any(|flag| (start..end).contains(&flag)))
            .count();
        let inside = flags
            .iter()
            .filter(|flag| windows.iter().any(|(start, end)| (start..end).contains(flag)))
            .count();
        (detected, windows.len(), inside, flags.len() - inside)
    }

    /// Three rate series (~1000/min, sigma ~37 per minute) and three latency-mean series (300 ms,
    /// sigma 12 ms), 8 days each, sensitivity 4. Spikes and dips of 25-60% last 1-3 minutes and
    /// level shifts are of 20-35%: at least ~5 sigma of the noise. (Anomalies of 12-25%, 3-7
    /// sigma, give a recall of about 0.64 with the same false positives: that is what a
    /// sensitivity of 4 means.)
    #[test]
    fn precision_and_recall_on_synthetic_series_with_spikes_dips_and_level_shifts() {
        const DAYS: i64 = 8;
        const SERIES_EACH: u64 = 3;
        let mut totals = [0usize; 4];
        let mut steady_days = 0.0;
        for seed in 0..SERIES_EACH {
            let mut rng = StdRng::seed_from_u64(1000 + seed);
            // ~1000 events/min with a ±15% daily cycle; Poisson counting noise plus 2% extra.
            let rate = synthetic(
                &mut rng,
                DAYS,
                |minute| 1000.0 * (1.0 + 0.15 * (std::f64::consts::TAU * minute as f64 / 1440.0).sin()),
                |rng, mean| mean + normal(rng) * (mean + (0.02 * mean).powi(2)).sqrt(),
            );
            // A latency mean of ~300 ms per minute with 4% noise.
            let latency = synthetic(&mut rng, DAYS, |_| 300.0, |rng, mean| mean * (1.0 + 0.04 * normal(rng)));
            for (name, series, spec) in [
                ("rate", &rate, spec(SeriesValue::Rate, Side::Both)),
                ("mean", &latency, mean_spec()),
            ] {
                let scored = score(series, &spec);
                println!(
                    "anomaly {name} series {seed}: detected {}/{}, flags inside {} outside {}",
                    scored.0, scored.1, scored.2, scored.3
                );
                for (total, part) in totals.iter_mut().zip([scored.0, scored.1, scored.2, scored.3]) {
                    *total += part;
                }
                // The first day is warm-up and carries no injected anomaly.
                steady_days += (DAYS - 1) as f64;
            }
        }
        let [detected, injected, inside, outside] = totals;
        let recall = detected as f64 / injected as f64;
        let precision = inside as f64 / (inside + outside) as f64;
        let false_positives_per_day = outside as f64 / steady_days;
        println!(
            "anomaly detection: {injected} injected anomalies over {steady_days} series-days, recall {recall:.3}, \
             precision {precision:.3} ({inside} flags inside the anomalies, {outside} outside), \
             {false_positives_per_day:.3} false positives per day"
        );
        assert!(injected >= 100, "only {injected} anomalies injected");
        assert!(recall >= 0.9, "recall {recall}");
        assert!(
            false_positives_per_day <= 1.0,
            "{false_positives_per_day} false positives per day"
        );
    }

    #[test]
    fn a_level_shift_is_flagged_at_its_onset_and_then_adopted() {
        let mut detector = Detector::new(&mean_spec());
        let mut rng = StdRng::seed_from_u64(5);
        let mut flags = Vec::new();
        for minute in 0..600 {
            let level = if minute < 300 { 300.0 } else { 450.0 };
            let value = level * (1.0 + 0.03 * normal(&mut rng));
            if let Some(anomaly) = detector.observe_minute(minute * MINUTE_MS, value) {
                flags.push(anomaly.minute_ms / MINUTE_MS);
                assert_eq!(anomaly.direction, Direction::Above);
                assert!((anomaly.expected - 300.0).abs() < 15.0, "{anomaly:?}");
            }
        }
        assert_eq!(flags, (300..300 + LEVEL_SHIFT_MINUTES as i64).collect::<Vec<_>>());
        let (mean, _) = detector.baseline();
        assert!((mean - 450.0).abs() < 15.0, "baseline {mean}");
    }

    #[test]
    fn the_side_filters_what_is_reported_but_both_sides_protect_the_baseline() {
        let feed = |side| {
            let mut detector = Detector::new(&spec(SeriesValue::Mean { metric: "m".into() }, side));
            let mut rng = StdRng::seed_from_u64(9);
            (0..400)
                .filter_map(|minute| {
                    let spike = match minute {
                        200 => 2.0,
                        300 => 0.3,
                        _ => 1.0,
                    };
                    detector.observe_minute(minute * MINUTE_MS, 100.0 * spike * (1.0 + 0.02 * normal(&mut rng)))
                })
                .map(|anomaly| (anomaly.minute_ms / MINUTE_MS, anomaly.direction))
                .collect::<Vec<_>>()
        };
        assert_eq!(feed(Side::Both), [(200, Direction::Above), (300, Direction::Below)]);
        assert_eq!(feed(Side::Up), [(200, Direction::Above)]);
        assert_eq!(feed(Side::Down), [(300, Direction::Below)]);
    }

    #[test]
    fn a_sparse_rate_with_empty_minutes_is_not_flagged_and_an_outage_is() {
        let mut detector = Detector::new(&spec(SeriesValue::Rate, Side::Both));
        let mut rng = StdRng::seed_from_u64(21);
        let mut flags = 0;
        // Two days at 0.5 events per minute: most minutes are 0.
        for minute in 0..2880 {
            flags += usize::from(
                detector
                    .observe_minute(minute * MINUTE_MS, poisson(&mut rng, 0.5))
                    .is_some(),
            );
        }
        assert!(flags <= 2, "{flags} false positives in two days of a sparse rate");

        let mut detector = Detector::new(&spec(SeriesValue::Rate, Side::Down));
        for minute in 0..300 {
            assert_eq!(
                detector.observe_minute(minute * MINUTE_MS, 100.0 + normal(&mut rng) * 10.0),
                None
            );
        }
        let outage = detector
            .observe_minute(300 * MINUTE_MS, 0.0)
            .expect("an outage is an anomaly");
        assert_eq!(outage.direction, Direction::Below);
        assert!(outage.z < -4.0);
    }

    #[test]
    fn warming_with_history_leaves_the_state_of_live_feeding() {
        let mut rng = StdRng::seed_from_u64(33);
        let history: Vec<f64> = (0..500)
            .map(|minute| {
                if minute == 250 {
                    900.0
                } else {
                    300.0 + 10.0 * normal(&mut rng)
                }
            })
            .collect();
        let mut live = Detector::new(&mean_spec());
        let mut warmed = Detector::new(&mean_spec());
        for (minute, &value) in history.iter().enumerate() {
            live.observe_minute(minute as i64 * MINUTE_MS, value);
            warmed.warm(minute as i64 * MINUTE_MS, value);
        }
        assert_eq!(live, warmed);
        assert!(live.is_warm());
        // A minute already seen is ignored.
        assert_eq!(warmed.observe_minute(10 * MINUTE_MS, 5000.0), None);
        assert_eq!(live, warmed);
    }

    #[test]
    fn minute_series_close_minutes_after_the_grace_and_fill_empty_rate_minutes() {
        let grace = Duration::from_secs(5);
        let mut rate = MinuteSeries::new(&SeriesValue::Rate);
        let mut mean = MinuteSeries::new(&SeriesValue::Mean { metric: "m".into() });
        let now = 10 * MINUTE_MS;
        for (time, value) in [
            (0, Some(1.0)),
            (30_000, None),
            (130_000, Some(4.0)),
            (185_000, Some(6.0)),
        ] {
            assert_eq!(rate.observe(now, time, value), Observed::Recorded);
            assert_eq!(mean.observe(now, time, value), Observed::Recorded);
        }
        // At 2:04 minute 1 is over but within its grace; at 2:05 it closes.
        assert_eq!(rate.close(124_999, grace), [(0, 2.0)]);
        assert_eq!(rate.close(125_000, grace), [(60_000, 0.0)]);
        assert_eq!(rate.close(185_000, grace), [(120_000, 1.0)]);
        assert_eq!(mean.close(185_000, grace), [(0, 1.0), (120_000, 4.0)]);
        assert_eq!(rate.observe(now, 119_999, None), Observed::TooOld);
        assert_eq!(rate.observe(now, now + 300_001, None), Observed::TooFarAhead);
        assert_eq!(rate.close(305_000, grace), [(180_000, 1.0), (240_000, 0.0)]);
        assert_eq!(mean.close(305_000, grace), [(180_000, 6.0)]);
        assert_eq!(rate.close(305_000, grace), []);
    }

    #[test]
    fn the_store_detects_from_events_bounds_series_and_warms_like_live() {
        let spec = spec(SeriesValue::Rate, Side::Both);
        let grace = Duration::from_secs(10);
        let mut rng = StdRng::seed_from_u64(44);
        // Events of 180 minutes at ~50/min, with minute 150 at 5x.
        let mut events: Vec<i64> = Vec::new();
        for minute in 0..180i64 {
            let count = if minute == 150 {
                250
            } else {
                45 + rng.random_range(0..10)
            };
            events.extend((0..count).map(|_| minute * MINUTE_MS + rng.random_range(0..MINUTE_MS)));
        }
        let mut live = AnomalyStore::new(2, grace);
        let mut anomalies = Vec::new();
        let mut closed_values = Vec::new();
        for chunk in events.chunks(50) {
            let now = *chunk.iter().max().unwrap();
            for &time in chunk {
                assert_eq!(live.observe(&key("a"), &spec, now, time, None), Observed::Recorded);
            }
            for closed in live.close(now) {
                closed_values.push(closed.value);
                anomalies.extend(closed.anomaly.map(|anomaly| anomaly.minute_ms / MINUTE_MS));
            }
        }
        assert_eq!(anomalies, [150]);
        assert_eq!(
            closed_values.len(),
            179,
            "minutes 0..=178 are closed at minute 179's last event"
        );

        // The cap: a third series is refused.
        assert_eq!(live.observe(&key("b"), &spec, 0, 0, None), Observed::Recorded);
        assert_eq!(live.observe(&key("c"), &spec, 0, 0, None), Observed::SeriesDropped);
        assert_eq!(live.dropped_series(), 1);

        // Warming another store with the closed minutes gives the same detector.
        let mut warmed = AnomalyStore::new(2, grace);
        for (minute, &value) in closed_values.iter().enumerate() {
            warmed.warm(&key("a"), &spec, minute as i64 * MINUTE_MS, value);
        }
        assert_eq!(warmed.detector(&key("a")), live.detector(&key("a")));
        // Live events for a warmed minute are refused, later ones count.
        assert_eq!(
            warmed.observe(&key("a"), &spec, 180 * MINUTE_MS, 178 * MINUTE_MS, None),
            Observed::TooOld
        );
        assert_eq!(
            warmed.observe(&key("a"), &spec, 180 * MINUTE_MS, 179 * MINUTE_MS, None),
            Observed::Recorded
        );
        assert_eq!(warmed.ignored(), 1);

        assert_eq!(live.expire(400 * MINUTE_MS, Duration::from_secs(3600), |_| true), 0);
        live.close(400 * MINUTE_MS);
        assert_eq!(live.expire(400 * MINUTE_MS, Duration::from_secs(3600), |_| true), 2);
    }
}

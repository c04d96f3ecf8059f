//! Parsing and validation of query parameters into normalized queries. Pure: no I/O, the clock
//! is an argument.
//!
//! A normalized query is what the SQL is built from and what the cache is keyed by, so two
//! requests that mean the same thing (e.g. `from` given in RFC 3339 and in unix ms, or in a
//! different parameter order) share one cache entry.

use std::collections::BTreeMap;

use chute_common::validate::{is_valid_name, is_valid_tenant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};

const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;
/// A range whose end is later than this before now is still filling (rollups of the current
/// minutes change with every insert): cached briefly.
pub const FRESH_HORIZON_MS: i64 = 120_000;

/// Whether an answer over a range ending at `range_end_ms` may still change: its range ends
/// within the last [`FRESH_HORIZON_MS`] or later.
pub fn touches_now(range_end_ms: i64, now_ms: i64) -> bool {
    range_end_ms > now_ms - FRESH_HORIZON_MS
}
/// Latest accepted time (unix ms): the end of ClickHouse's `DateTime` (2106-02-07T06:28:15Z),
/// which the rollups use. Every range computation below stays far from `i64` overflow with
/// times in `[0, MAX_TIME_MS]`.
pub const MAX_TIME_MS: i64 = u32::MAX as i64 * 1000 + 999;
/// Longest sliding window, and most rollup buckets one sliding point may span.
const MAX_WINDOW_SECONDS: i64 = 31 * DAY;
const MAX_WINDOW_STEPS: i64 = 1_440;

/// How large an answer a request may ask for (from the configuration; a request beyond them is
/// a 400 naming the parameter). Not the ingest limits of `chute_common::validate::Limits`.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Most points of one time series (`step`).
    pub max_points: u64,
    /// Largest `limit`.
    pub max_rows: u64,
    /// Longest range of a query over raw events (`/v1/events`, `/v1/top` by user, session or
    /// attribute), in ms.
    pub max_raw_range_ms: i64,
}

impl QueryLimits {
    /// A query over raw events may span at most `max_raw_range_ms`.
    fn check_raw_range(self, from_ms: i64, to_ms: i64) -> Result<()> {
        if to_ms - from_ms <= self.max_raw_range_ms {
            return Ok(());
        }
        Err(Error::invalid(
            "from",
            format!(
                "queries over raw events may span at most {} (--max-raw-range): narrow from/to, or \
                 use by=name, which the rollups answer",
                humantime::format_duration(std::time::Duration::from_millis(self.max_raw_range_ms as u64))
            ),
        ))
    }
}

/// The normalized query of one `/v1` query endpoint, parsed from its parameters: what its
/// statement and answer are built from. Its `Debug` text is the cache key, so it names the
/// endpoint and every normalized parameter.
pub trait EndpointQuery: std::fmt::Debug + Sized {
    /// The accepted query parameters; any other is a 400 naming it.
    const PARAMETERS: &'static [&'static str];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self>;

    /// Cache policy: where the answer's range ends (unix ms). An answer whose range touches the
    /// last two minutes is still filling and lives the fresh TTL, others the historical one
    /// ([`touches_now`]).
    fn range_end_ms(&self) -> i64;
}

/// The raw `name=value` pairs of one request, checked against the endpoint's parameter list.
#[derive(Debug)]
pub struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    /// Refuses parameters the endpoint does not know and repeated parameters, naming them.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                let shown: String = name.chars().take(64).collect();
                return Err(Error::invalid(
                    shown.clone(),
                    format!("unknown parameter {shown:?} (expected one of {})", allowed.join(", ")),
                ));
            }
            if values.contains_key(&name) {
                return Err(Error::invalid(name.clone(), format!("{name} given twice")));
            }
            values.insert(name, value);
        }
        Ok(Self { values })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// Which table family answers a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Minute,
    Hour,
    Raw,
}

impl Source {
    /// The `source` field of answers.
    pub fn label(self) -> &'static str {
        match self {
            Self::Minute => "rollup_1m",
            Self::Hour => "rollup_1h",
            Self::Raw => "raw",
        }
    }
}

/// Aggregations; the ones over a metric need `metric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agg {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    P50,
    P90,
    P99,
    UniqUsers,
    UniqSessions,
}

impl Agg {
    pub const NAMES: &'static str = "count, sum, min, max, avg, p50, p90, p99, uniq_users, uniq_sessions";

    pub fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "min" => Self::Min,
            "max" => Self::Max,
            "avg" => Self::Avg,
            "p50" => Self::P50,
            "p90" => Self::P90,
            "p99" => Self::P99,
            "uniq_users" => Self::UniqUsers,
            "uniq_sessions" => Self::UniqSessions,
            _ => return Err(Error::invalid("agg", format!("agg must be one of {}", Self::NAMES))),
        })
    }

    /// Aggregations of metric values (count works with or without a metric).
    pub fn needs_metric(self) -> bool {
        matches!(
            self,
            Self::Sum | Self::Min | Self::Max | Self::Avg | Self::P50 | Self::P90 | Self::P99
        )
    }

    /// The aggregations of metric values need `metric`; `uniq_*` count users or sessions and
    /// refuse one.
    pub fn check_metric(self, metric: Option<&str>) -> Result<()> {
        if self.needs_metric() && metric.is_none() {
            return Err(Error::invalid("metric", "metric is required for this agg"));
        }
        if matches!(self, Self::UniqUsers | Self::UniqSessions) && metric.is_some() {
            return Err(Error::invalid(
                "metric",
                "uniq_users and uniq_sessions do not take a metric",
            ));
        }
        Ok(())
    }

    pub fn quantile(self) -> Option<f64> {
        match self {
            Self::P50 => Some(0.5),
            Self::P90 => Some(0.9),
            Self::P99 => Some(0.99),
            _ => None,
        }
    }

    /// Whether an empty bucket is 0 (counts, sums) rather than `null` (min, max, avg, pN).
    pub fn zero_when_empty(self) -> bool {
        matches!(self, Self::Count | Self::Sum | Self::UniqUsers | Self::UniqSessions)
    }
}

/// What `/v1/timeseries` and `/v1/top` aggregate: `agg` over `metric` (checked together,
/// [`Agg::check_metric`]) of the events named `name` (all events when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Measure {
    pub name: Option<String>,
    pub metric: Option<String>,
    pub agg: Agg,
}

impl Measure {
    /// `name`, `agg` (default `count`) and `metric`.
    fn parse(params: &Params) -> Result<Self> {
        let name = optional_name(params, "name")?;
        let agg = Agg::parse(params.get("agg").unwrap_or("count"))?;
        let metric = optional_name(params, "metric")?;
        agg.check_metric(metric.as_deref())?;
        Ok(Self { name, metric, agg })
    }
}

/// `GET /v1/timeseries`. Point `k` is at `from + k * step` and aggregates
/// `[from + (k + 1) * step - window, from + (k + 1) * step)`; tumbling is `window == step`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TimeseriesQuery {
    pub tenant: String,
    pub measure: Measure,
    /// Unix seconds, aligned to `step`.
    pub from: i64,
    /// Unix seconds, aligned to `step`; exclusive.
    pub to: i64,
    pub step: i64,
    pub window: i64,
    pub source: Source,
}

impl EndpointQuery for TimeseriesQuery {
    const PARAMETERS: &'static [&'static str] = &["tenant", "name", "metric", "agg", "from", "to", "step", "window"];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self> {
        let measure = Measure::parse(params)?;
        let step = parse_step(params.get("step").unwrap_or("1m"))?;
        let window = match params.get("window") {
            None => step,
            Some(value) => parse_window(value, step)?,
        };
        let (from_ms, to_ms) = time_range(params, now_ms)?;
        let from = from_ms.div_euclid(1000).div_euclid(step) * step;
        let to = ceil_div(ceil_div(to_ms, 1000), step) * step;
        let points = (to - from) / step;
        if points as u64 > limits.max_points {
            return Err(Error::invalid(
                "step",
                format!(
                    "{points} points requested, at most {} allowed: use a larger step or a \
                     shorter range",
                    limits.max_points
                ),
            ));
        }
        // Hour rollups answer whenever every bucket and window is made of whole hours; they
        // hold 400 days where the minute rollups hold 90.
        let source = if step % HOUR == 0 && window % HOUR == 0 {
            Source::Hour
        } else {
            Source::Minute
        };
        Ok(Self {
            tenant: tenant.to_owned(),
            measure,
            from,
            to,
            step,
            window,
            source,
        })
    }

    fn range_end_ms(&self) -> i64 {
        self.to * 1000
    }
}

impl TimeseriesQuery {
    pub fn points(&self) -> i64 {
        (self.to - self.from) / self.step
    }
}

/// What `/v1/top` ranks by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopBy {
    Name,
    User,
    Session,
    Attribute(String),
}

/// `GET /v1/top`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopQuery {
    pub tenant: String,
    pub by: TopBy,
    pub measure: Measure,
    /// Unix ms; whole minutes (hours) when a rollup answers.
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: u64,
    pub source: Source,
}

impl EndpointQuery for TopQuery {
    const PARAMETERS: &'static [&'static str] = &["tenant", "by", "name", "metric", "agg", "from", "to", "limit"];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self> {
        let by = match params.get("by").unwrap_or("name") {
            "name" => TopBy::Name,
            "user" => TopBy::User,
            "session" => TopBy::Session,
            other => match other.strip_prefix("attribute:") {
                Some(key) if is_valid_identifier(key) => TopBy::Attribute(key.to_owned()),
                _ => {
                    return Err(Error::invalid(
                        "by",
                        "by must be name, user, session or attribute:<key> with a key of \
                         [A-Za-z0-9_.:-]{1,128}",
                    ))
                }
            },
        };
        let measure = Measure::parse(params)?;
        let limit = parse_limit(params, 10, limits)?;
        let (mut from_ms, mut to_ms) = time_range(params, now_ms)?;
        let source = if by == TopBy::Name {
            // Rollups answer in whole minutes: widen the range to them.
            from_ms = from_ms.div_euclid(MINUTE * 1000) * MINUTE * 1000;
            to_ms = ceil_div(to_ms, MINUTE * 1000) * MINUTE * 1000;
            if from_ms % (HOUR * 1000) == 0 && to_ms % (HOUR * 1000) == 0 {
                Source::Hour
            } else {
                Source::Minute
            }
        } else {
            limits.check_raw_range(from_ms, to_ms)?;
            Source::Raw
        };
        Ok(Self {
            tenant: tenant.to_owned(),
            by,
            measure,
            from_ms,
            to_ms,
            limit,
            source,
        })
    }

    fn range_end_ms(&self) -> i64 {
        self.to_ms
    }
}

/// `GET /v1/sessions`: sessions overlapping `[from, to)`, newest start first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionsQuery {
    pub tenant: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: u64,
    pub min_events: u64,
}

impl EndpointQuery for SessionsQuery {
    const PARAMETERS: &'static [&'static str] = &["tenant", "from", "to", "limit", "min_events"];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self> {
        let (from_ms, to_ms) = time_range(params, now_ms)?;
        let min_events = match params.get("min_events") {
            None => 1,
            Some(value) => value
                .parse::<u64>()
                .map_err(|_| Error::invalid("min_events", "min_events must be a whole number"))?,
        };
        Ok(Self {
            tenant: tenant.to_owned(),
            from_ms,
            to_ms,
            limit: parse_limit(params, 100, limits)?,
            min_events,
        })
    }

    fn range_end_ms(&self) -> i64 {
        self.to_ms
    }
}

/// `GET /v1/events`: raw events in `[from, to)`, newest first, deduplicated by event id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventsQuery {
    pub tenant: String,
    pub name: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: u64,
}

impl EndpointQuery for EventsQuery {
    const PARAMETERS: &'static [&'static str] = &["tenant", "name", "from", "to", "limit"];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self> {
        let (from_ms, to_ms) = time_range(params, now_ms)?;
        limits.check_raw_range(from_ms, to_ms)?;
        Ok(Self {
            tenant: tenant.to_owned(),
            name: optional_name(params, "name")?,
            from_ms,
            to_ms,
            limit: parse_limit(params, 100, limits)?,
        })
    }

    fn range_end_ms(&self) -> i64 {
        self.to_ms
    }
}

/// `GET /v1/stream` filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamQuery {
    pub tenant: String,
    pub name: Option<String>,
}

impl StreamQuery {
    pub const PARAMETERS: &'static [&'static str] = &["tenant", "name"];

    pub fn parse(tenant: &str, params: &Params) -> Result<Self> {
        Ok(Self {
            tenant: tenant.to_owned(),
            name: optional_name(params, "name")?,
        })
    }
}

/// The tenant named by the request; with API keys the caller's key decides (see `routes`).
pub fn check_tenant(value: &str) -> Result<()> {
    if is_valid_tenant(value) {
        Ok(())
    } else {
        Err(Error::invalid("tenant", "tenant must match [a-z0-9_-]{1,64}"))
    }
}

/// Metric names and attribute keys usable in queries: `[A-Za-z0-9_.:-]{1,128}`. They are bound
/// as parameters anyway; the pattern keeps error messages and cache keys sane.
pub fn is_valid_identifier(value: &str) -> bool {
    is_valid_name(value)
}

/// A time: unix milliseconds (digits) or RFC 3339 (`2025-01-31T12:00:00Z`), at most
/// [`MAX_TIME_MS`].
pub fn parse_time(parameter: &str, value: &str) -> Result<i64> {
    let out_of_range = || {
        Error::invalid(
            parameter,
            format!("{parameter} is out of range: times end at 2106-02-07T06:28:15Z"),
        )
    };
    let ms = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse::<i64>().map_err(|_| out_of_range())?
    } else {
        let time = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
            Error::invalid(
                parameter,
                format!("{parameter} must be RFC 3339 (2025-01-31T12:00:00Z) or unix milliseconds"),
            )
        })?;
        i64::try_from(time.unix_timestamp_nanos().div_euclid(1_000_000)).map_err(|_| out_of_range())?
    };
    if ms > MAX_TIME_MS {
        return Err(out_of_range());
    }
    Ok(ms)
}

/// `step`: 1m, 5m, 15m, 1h or 1d, in seconds.
pub fn parse_step(value: &str) -> Result<i64> {
    Ok(match value {
        "1m" => MINUTE,
        "5m" => 5 * MINUTE,
        "15m" => 15 * MINUTE,
        "1h" => HOUR,
        "1d" => DAY,
        _ => return Err(Error::invalid("step", "step must be one of 1m, 5m, 15m, 1h, 1d")),
    })
}

/// `window=sliding:<duration>`: a whole number of steps, at most 31 days and 1440 steps.
pub fn parse_window(value: &str, step: i64) -> Result<i64> {
    let invalid = |message: String| Error::invalid("window", message);
    let duration = value
        .strip_prefix("sliding:")
        .ok_or_else(|| invalid("window must be sliding:<duration>, e.g. sliding:15m".into()))?;
    let seconds = chute_common::config::parse_duration(duration)
        .ok()
        .and_then(|duration| i64::try_from(duration.as_secs()).ok())
        .ok_or_else(|| invalid(format!("window duration {duration:?} is not a duration")))?;
    if seconds < step || seconds % step != 0 {
        return Err(invalid(format!("window must be a whole number of steps ({step}s)")));
    }
    if seconds > MAX_WINDOW_SECONDS || seconds / step > MAX_WINDOW_STEPS {
        return Err(invalid(format!(
            "window may span at most 31 days and {MAX_WINDOW_STEPS} steps"
        )));
    }
    Ok(seconds)
}

/// `from`/`to` in unix ms; `to` defaults to now and `from` to one hour before `to`.
fn time_range(params: &Params, now_ms: i64) -> Result<(i64, i64)> {
    let to = match params.get("to") {
        Some(value) => parse_time("to", value)?,
        None => now_ms,
    };
    let from = match params.get("from") {
        Some(value) => parse_time("from", value)?,
        None => to - HOUR * 1000,
    };
    if from < 0 {
        return Err(Error::invalid("from", "from is before 1970"));
    }
    if from >= to {
        return Err(Error::invalid("from", "from must be before to"));
    }
    Ok((from, to))
}

fn parse_limit(params: &Params, default: u64, limits: QueryLimits) -> Result<u64> {
    let Some(value) = params.get("limit") else {
        return Ok(default.min(limits.max_rows));
    };
    match value.parse::<u64>() {
        Ok(limit) if (1..=limits.max_rows).contains(&limit) => Ok(limit),
        _ => Err(Error::invalid(
            "limit",
            format!("limit must be between 1 and {}", limits.max_rows),
        )),
    }
}

fn optional_name(params: &Params, parameter: &str) -> Result<Option<String>> {
    match params.get(parameter) {
        None => Ok(None),
        Some(value) if is_valid_identifier(value) => Ok(Some(value.to_owned())),
        Some(_) => Err(Error::invalid(
            parameter,
            format!("{parameter} must match [A-Za-z0-9_.:-]{{1,128}}"),
        )),
    }
}

fn ceil_div(value: i64, divisor: i64) -> i64 {
    -(-value).div_euclid(divisor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueryLimits = QueryLimits {
        max_points: 1500,
        max_rows: 1000,
        max_raw_range_ms: 86_400_000,
    };
    const NOW: i64 = 1_750_000_000_000;

    fn params(pairs: &[(&str, &str)], allowed: &[&str]) -> Result<Params> {
        Params::new(
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            allowed,
        )
    }

    fn timeseries(pairs: &[(&str, &str)]) -> Result<TimeseriesQuery> {
        let params = params(pairs, TimeseriesQuery::PARAMETERS)?;
        TimeseriesQuery::parse("acme", &params, NOW, LIMITS)
    }

    fn parameter_of(err: Error) -> String {
        match err {
            Error::InvalidParameter { parameter, .. } => parameter,
            other => panic!("not a parameter error: {other}"),
        }
    }

    #[test]
    fn times_parse_as_rfc3339_or_unix_ms() {
        assert_eq!(parse_time("from", "1700000000123").unwrap(), 1_700_000_000_123);
        assert_eq!(
            parse_time("from", "2023-11-14T22:13:20.123Z").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(
            parse_time("from", "2023-11-14T23:13:20+01:00").unwrap(),
            1_700_000_000_000
        );
        for bad in ["yesterday", "-5", "1e9", "2023-11-14", "' OR 1=1 --"] {
            assert_eq!(parameter_of(parse_time("from", bad).unwrap_err()), "from");
        }
    }

    #[test]
    fn timeseries_is_aligned_and_picks_the_rollup() {
        let query = timeseries(&[("from", "1700000030000"), ("to", "1700003590000"), ("step", "5m")]).unwrap();
        assert_eq!(query.from % 300, 0);
        assert_eq!(query.to % 300, 0);
        assert!(query.from * 1000 <= 1_700_000_030_000);
        assert!(query.to * 1000 >= 1_700_003_590_000);
        assert_eq!(query.source, Source::Minute);
        assert_eq!(query.window, 300);
        let hourly = timeseries(&[
            ("from", "1700000000000"),
            ("to", "1700086400000"),
            ("step", "1h"),
            ("window", "sliding:3h"),
            ("agg", "p99"),
            ("metric", "latency_ms"),
        ])
        .unwrap();
        assert_eq!(hourly.source, Source::Hour);
        assert_eq!(hourly.window, 3 * 3600);
        let sliding_minutes = timeseries(&[("step", "1h"), ("window", "sliding:90m")]);
        assert_eq!(parameter_of(sliding_minutes.unwrap_err()), "window");
    }

    #[test]
    fn too_many_points_is_a_clear_400_on_step() {
        let err = timeseries(&[("from", "1700000000000"), ("to", "1710000000000"), ("step", "1m")]).unwrap_err();
        assert!(err.to_string().contains("at most 1500"));
        assert_eq!(parameter_of(err), "step");
    }

    #[test]
    fn bad_parameters_are_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("agg", "median")], "agg"),
            (&[("agg", "sum")], "metric"),
            (&[("agg", "uniq_users"), ("metric", "x")], "metric"),
            (&[("metric", "latency ms")], "metric"),
            (&[("metric", "x'); DROP TABLE events; --")], "metric"),
            (&[("name", "a\"b")], "name"),
            (&[("step", "2m")], "step"),
            (&[("window", "tumbling:5m")], "window"),
            (&[("window", "sliding:90s")], "window"),
            (&[("from", "1700000000000"), ("to", "1600000000000")], "from"),
            (&[("format", "CSV")], "format"),
        ];
        for (pairs, expected) in cases {
            let err = timeseries(pairs).unwrap_err();
            assert_eq!(parameter_of(err), *expected, "{pairs:?}");
        }
        let twice = params(&[("to", "1"), ("to", "2")], TimeseriesQuery::PARAMETERS);
        assert_eq!(parameter_of(twice.unwrap_err()), "to");
    }

    #[test]
    fn top_validates_by_and_limit() {
        let parse = |pairs: &[(&str, &str)]| {
            let params = params(pairs, TopQuery::PARAMETERS)?;
            TopQuery::parse("acme", &params, NOW, LIMITS)
        };
        let query = parse(&[("by", "attribute:model"), ("limit", "5")]).unwrap();
        assert_eq!(query.by, TopBy::Attribute("model".into()));
        assert_eq!(query.source, Source::Raw);
        let by_name = parse(&[("from", "1700000030000"), ("to", "1700000090000")]).unwrap();
        assert_eq!(by_name.source, Source::Minute);
        assert_eq!(by_name.from_ms, 1_699_999_980_000);
        assert_eq!(by_name.to_ms, 1_700_000_100_000);
        assert_eq!(parameter_of(parse(&[("by", "attribute:a b")]).unwrap_err()), "by");
        assert_eq!(parameter_of(parse(&[("by", "host")]).unwrap_err()), "by");
        assert_eq!(parameter_of(parse(&[("limit", "0")]).unwrap_err()), "limit");
        assert_eq!(parameter_of(parse(&[("limit", "1001")]).unwrap_err()), "limit");
        assert_eq!(parameter_of(parse(&[("agg", "p50")]).unwrap_err()), "metric");
        let uniq_with_metric = parse(&[("agg", "uniq_sessions"), ("metric", "tokens")]);
        assert_eq!(parameter_of(uniq_with_metric.unwrap_err()), "metric");
    }

    #[test]
    fn times_never_overflow() {
        for huge in [
            "9223372036854775807",
            "9223372036854775808",
            "99999999999999999999999",
            "4294967296000",
        ] {
            assert!(
                parse_time("to", huge).unwrap_err().to_string().contains("out of range"),
                "{huge}"
            );
        }
        assert_eq!(parse_time("to", "4294967295999").unwrap(), MAX_TIME_MS);
        assert!(parse_time("to", "9999-12-31T23:59:59Z").is_err());
        // Every endpoint answers the largest `to` with a 400 on `to`, not a panic.
        let to = [("to", "9223372036854775807")];
        assert_eq!(parameter_of(timeseries(&to).unwrap_err()), "to");
        let top = TopQuery::parse("acme", &params(&to, TopQuery::PARAMETERS).unwrap(), NOW, LIMITS);
        assert_eq!(parameter_of(top.unwrap_err()), "to");
        // The largest accepted times compute their buckets without overflow.
        let last = MAX_TIME_MS.to_string();
        let end = [("from", "4294960000000"), ("to", last.as_str()), ("step", "1d")];
        assert!(timeseries(&end).is_ok());
        let top = TopQuery::parse("acme", &params(&end[..2], TopQuery::PARAMETERS).unwrap(), NOW, LIMITS);
        assert!(top.is_ok());
        assert_eq!(
            parameter_of(timeseries(&[("window", "sliding:99999999999999999999d")]).unwrap_err()),
            "window"
        );
    }

    proptest::proptest! {
        /// Whatever the numbers, parsing answers (a query or a 400) and never panics.
        #[test]
        fn any_numbers_parse_or_are_refused(from in proptest::num::i64::ANY, to in proptest::num::i64::ANY, limit in proptest::num::u64::ANY) {
            let (from, to, limit) = (from.unsigned_abs().to_string(), to.unsigned_abs().to_string(), limit.to_string());
            let pairs = [("from", from.as_str()), ("to", to.as_str())];
            let _ = timeseries(&pairs);
            for by in ["name", "user"] {
                let with = [("from", from.as_str()), ("to", to.as_str()), ("limit", limit.as_str()), ("by", by)];
                let _ = TopQuery::parse("acme", &params(&with, TopQuery::PARAMETERS).unwrap(), NOW, LIMITS);
            }
            let with = [("from", from.as_str()), ("to", to.as_str()), ("limit", limit.as_str())];
            let _ = EventsQuery::parse("acme", &params(&with, EventsQuery::PARAMETERS).unwrap(), NOW, LIMITS);
            let _ = SessionsQuery::parse("acme", &params(&with, SessionsQuery::PARAMETERS).unwrap(), NOW, LIMITS);
        }
    }

    #[test]
    fn raw_event_queries_span_at_most_the_raw_range() {
        let day = 86_400_000;
        let (from, to) = ((NOW - day).to_string(), NOW.to_string());
        let longer = (NOW - day - 1).to_string();
        let events = |from: &str| {
            let pairs = [("from", from), ("to", to.as_str())];
            EventsQuery::parse("acme", &params(&pairs, EventsQuery::PARAMETERS).unwrap(), NOW, LIMITS)
        };
        assert!(events(&from).is_ok());
        assert_eq!(parameter_of(events(&longer).unwrap_err()), "from");
        let top = |by: &str| {
            let pairs = [("from", "0"), ("to", to.as_str()), ("by", by)];
            TopQuery::parse("acme", &params(&pairs, TopQuery::PARAMETERS).unwrap(), NOW, LIMITS)
        };
        // The rollups answer top names over any range; raw rankings are bounded.
        assert!(top("name").is_ok());
        for by in ["user", "session", "attribute:model"] {
            let err = top(by).unwrap_err();
            assert!(err.to_string().contains("at most 1day"), "{err}");
            assert_eq!(parameter_of(err), "from");
        }
    }

    #[test]
    fn freshness_follows_the_end_of_the_range() {
        assert!(touches_now(NOW, NOW));
        assert!(touches_now(NOW - FRESH_HORIZON_MS + 1, NOW));
        assert!(!touches_now(NOW - FRESH_HORIZON_MS, NOW));
        assert!(!touches_now(NOW - 3_600_000, NOW));
    }

    #[test]
    fn tenants_are_checked() {
        assert!(check_tenant("acme-1").is_ok());
        assert_eq!(parameter_of(check_tenant("Acme").unwrap_err()), "tenant");
        assert_eq!(parameter_of(check_tenant("a' OR '1'='1").unwrap_err()), "tenant");
    }
}

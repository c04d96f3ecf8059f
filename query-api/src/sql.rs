//! SQL for each query, built from normalized queries. Every value from a request travels as a
//! ClickHouse query parameter (`{name:Type}`); the SQL text is assembled only from fixed
//! fragments chosen by enums, so nothing a caller sends becomes SQL.

use serde::Serialize;

use crate::params::{Agg, EventsQuery, SessionsQuery, Source, TimeseriesQuery, TopBy, TopQuery};

/// A bound parameter value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Str(String),
    Int(i64),
    UInt(u64),
}

/// SQL text plus the values of its `{name:Type}` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<(&'static str, Value)>,
}

impl Statement {
    fn new() -> Self {
        Self {
            sql: String::new(),
            params: Vec::new(),
        }
    }

    fn bind(&mut self, name: &'static str, value: Value) {
        debug_assert!(self.params.iter().all(|(existing, _)| *existing != name));
        self.params.push((name, value));
    }

    /// Binds the time range in unix ms (`{from_ms:Int64}`, `{to_ms:Int64}`) and the row limit
    /// (`{limit:UInt64}`) of the listing queries.
    fn bind_range_and_limit(&mut self, from_ms: i64, to_ms: i64, limit: u64) {
        self.bind("from_ms", Value::Int(from_ms));
        self.bind("to_ms", Value::Int(to_ms));
        self.bind("limit", Value::UInt(limit));
    }

    /// Binds the filters the event queries share: `tenant`, and `name` and `metric` when the
    /// query has them (see [`NAME_FILTER`] and [`METRIC_FILTER`]).
    fn bind_filters(&mut self, tenant: &str, name: Option<&String>, metric: Option<&String>) {
        self.bind("tenant", Value::Str(tenant.to_owned()));
        if let Some(name) = name {
            self.bind("name", Value::Str(name.clone()));
        }
        if let Some(metric) = metric {
            self.bind("metric", Value::Str(metric.clone()));
        }
    }
}

/// The condition on the event name, for a query that has one.
const NAME_FILTER: &str = " AND name = {name:String}";
/// The condition on the metric name of the metric rollups, for a query that has one.
const METRIC_FILTER: &str = " AND metric = {metric:String}";

/// `condition` when the query filters on it, else nothing.
fn filter_if(filtered: bool, condition: &'static str) -> &'static str {
    if filtered {
        condition
    } else {
        ""
    }
}

/// Rows of the rollup table answering `agg` (with or without a metric) at `source` resolution:
/// (table, time column).
fn rollup_table(source: Source, has_metric: bool) -> (&'static str, &'static str) {
    match (source, has_metric) {
        (Source::Hour, true) => ("metrics_1h", "hour"),
        (Source::Hour, false) => ("events_1h", "hour"),
        (_, true) => ("metrics_1m", "minute"),
        (_, false) => ("events_1m", "minute"),
    }
}

/// The aggregate over rollup rows (partial states merged).
fn rollup_aggregate(agg: Agg, has_metric: bool) -> &'static str {
    match agg {
        Agg::Count if has_metric => "sum(value_count)",
        Agg::Count => "sum(event_count)",
        Agg::Sum => "sum(value_sum)",
        Agg::Min => "min(value_min)",
        Agg::Max => "max(value_max)",
        Agg::Avg => "sum(value_sum) / sum(value_count)",
        Agg::P50 => "quantileTDigestMerge(0.5)(value_digest)",
        Agg::P90 => "quantileTDigestMerge(0.9)(value_digest)",
        Agg::P99 => "quantileTDigestMerge(0.99)(value_digest)",
        Agg::UniqUsers => "uniqMerge(users_state)",
        Agg::UniqSessions => "uniqMerge(sessions_state)",
    }
}

/// The aggregate over raw events, where `v` is the metric's value.
fn raw_aggregate(agg: Agg) -> &'static str {
    match agg {
        Agg::Count => "count()",
        Agg::Sum => "sum(v)",
        Agg::Min => "min(v)",
        Agg::Max => "max(v)",
        Agg::Avg => "avg(v)",
        Agg::P50 => "quantileTDigest(0.5)(v)",
        Agg::P90 => "quantileTDigest(0.9)(v)",
        Agg::P99 => "quantileTDigest(0.99)(v)",
        Agg::UniqUsers => "uniqIf(user_id, user_id != '')",
        Agg::UniqSessions => "uniqIf(session_id, session_id != '')",
    }
}

/// Time series: one row `(k, value)` per point that has data.
///
/// Tumbling and sliding windows share one shape: each rollup row at time `ts` belongs to every
/// point `k` whose window `[from + (k+1)*step - window, from + (k+1)*step)` contains it, i.e.
/// `a - window/step <= k < a` with `a = (ts - from + window) div step`; `arrayJoin` emits the row
/// once per such point and the -Merge aggregates combine the partial states per point. With
/// `window == step` every row lands in exactly one point (tumbling).
pub fn timeseries(query: &TimeseriesQuery) -> Statement {
    let has_metric = query.measure.metric.is_some();
    let (table, time_column) = rollup_table(query.source, has_metric);
    let mut statement = Statement::new();
    let bucket =
        format!("intDiv(toInt64(toUnixTimestamp({time_column})) - {{from:Int64}} + {{window:Int64}}, {{step:Int64}})");
    statement.sql = format!(
        "SELECT arrayJoin(range(toUInt64(greatest({bucket}, {{window_steps:Int64}}) - {{window_steps:Int64}}), \
         toUInt64(least({bucket}, {{points:Int64}})))) AS k, toFloat64({aggregate}) AS value \
         FROM {table} \
         WHERE tenant = {{tenant:String}}{name}{metric} \
         AND {time_column} >= toDateTime({{scan_from:Int64}}, 'UTC') \
         AND {time_column} < toDateTime({{scan_to:Int64}}, 'UTC') \
         GROUP BY k ORDER BY k",
        aggregate = rollup_aggregate(query.measure.agg, has_metric),
        name = filter_if(query.measure.name.is_some(), NAME_FILTER),
        metric = filter_if(has_metric, METRIC_FILTER),
    );
    statement.bind_filters(
        &query.tenant,
        query.measure.name.as_ref(),
        query.measure.metric.as_ref(),
    );
    statement.bind("from", Value::Int(query.from));
    statement.bind("window", Value::Int(query.window));
    statement.bind("step", Value::Int(query.step));
    statement.bind("window_steps", Value::Int(query.window / query.step));
    statement.bind("points", Value::Int(query.points()));
    statement.bind("scan_from", Value::Int(query.from + query.step - query.window));
    statement.bind("scan_to", Value::Int(query.to));
    statement
}

/// Top-N: rows `(key, value)`, best first.
pub fn top(query: &TopQuery) -> Statement {
    let mut statement = Statement::new();
    let name = filter_if(query.measure.name.is_some(), NAME_FILTER);
    if query.source == Source::Raw {
        let (key, key_filter) = match &query.by {
            TopBy::User => ("user_id", "user_id != ''"),
            TopBy::Session => ("session_id", "session_id != ''"),
            TopBy::Attribute(_) => (
                "attributes[{attribute:String}]",
                "mapContains(attributes, {attribute:String})",
            ),
            TopBy::Name => unreachable!("top by name reads the rollups"),
        };
        let (value, metric_filter) = if query.measure.metric.is_some() {
            ("metrics[{metric:String}]", " AND mapContains(metrics, {metric:String})")
        } else {
            ("0", "")
        };
        statement.sql = format!(
            "SELECT key, toFloat64({aggregate}) AS value FROM (\
             SELECT {key} AS key, user_id, session_id, {value} AS v \
             FROM events FINAL \
             WHERE tenant = {{tenant:String}}{name} \
             AND time >= fromUnixTimestamp64Milli({{from_ms:Int64}}, 'UTC') \
             AND time < fromUnixTimestamp64Milli({{to_ms:Int64}}, 'UTC') \
             AND {key_filter}{metric_filter}) \
             GROUP BY key ORDER BY value DESC, key LIMIT {{limit:UInt64}}",
            aggregate = raw_aggregate(query.measure.agg),
        );
    } else {
        let has_metric = query.measure.metric.is_some();
        let (table, time_column) = rollup_table(query.source, has_metric);
        statement.sql = format!(
            "SELECT CAST(name AS String) AS key, toFloat64({aggregate}) AS value \
             FROM {table} \
             WHERE tenant = {{tenant:String}}{name}{metric} \
             AND {time_column} >= toDateTime(intDiv({{from_ms:Int64}}, 1000), 'UTC') \
             AND {time_column} < toDateTime(intDiv({{to_ms:Int64}}, 1000), 'UTC') \
             GROUP BY key ORDER BY value DESC, key LIMIT {{limit:UInt64}}",
            aggregate = rollup_aggregate(query.measure.agg, has_metric),
            metric = filter_if(has_metric, METRIC_FILTER),
        );
    }
    statement.bind_filters(
        &query.tenant,
        query.measure.name.as_ref(),
        query.measure.metric.as_ref(),
    );
    if let TopBy::Attribute(key) = &query.by {
        statement.bind("attribute", Value::Str(key.clone()));
    }
    statement.bind_range_and_limit(query.from_ms, query.to_ms, query.limit);
    statement
}

/// Session windows overlapping the range. Overlap is decided after merging every partial row of
/// a session (a partial row alone may lie outside the range while the session overlaps it).
///
/// Two steps over the tenant's rows: the inner query picks the `limit` sessions to answer from
/// the cheap columns alone (times and counts merged per session, same order and ties as the
/// answer); the outer one merges the costly states (`uniq`, `sumMap`) of those sessions only,
/// instead of every session of the tenant before the `LIMIT` (3-4x less engine time on 50k
/// sessions, `scripts/bench_query.py`). Every partial row of a chosen session is still merged.
pub fn sessions(query: &SessionsQuery) -> Statement {
    let mut statement = Statement::new();
    statement.sql = "SELECT session_id, start, end, duration_ms, events, users, metrics FROM (\
         SELECT session_id, \
         CAST(min(first_time) AS DateTime64(3, 'UTC')) AS start, \
         CAST(max(last_time) AS DateTime64(3, 'UTC')) AS end, \
         dateDiff('millisecond', start, end) AS duration_ms, \
         toUInt64(sum(event_count)) AS events, \
         toUInt64(uniqMerge(users_state)) AS users, \
         CAST(sumMapMerge(metric_sums), 'Map(String, Float64)') AS metrics \
         FROM sessions \
         WHERE tenant = {tenant:String} AND session_id IN (\
         SELECT session_id FROM sessions \
         WHERE tenant = {tenant:String} \
         GROUP BY session_id \
         HAVING max(last_time) >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') \
         AND min(first_time) < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC') \
         AND sum(event_count) >= {min_events:UInt64} \
         ORDER BY min(first_time) DESC, session_id LIMIT {limit:UInt64}) \
         GROUP BY session_id) \
         ORDER BY start DESC, session_id LIMIT {limit:UInt64}"
        .to_owned();
    statement.bind("tenant", Value::Str(query.tenant.clone()));
    statement.bind_range_and_limit(query.from_ms, query.to_ms, query.limit);
    statement.bind("min_events", Value::UInt(query.min_events));
    statement
}

/// Raw events as [`EventsRow`](chute_schema::row::EventsRow)s, newest first (ties by event id);
/// `FINAL` collapses duplicates that escaped every dedup window.
pub fn events(query: &EventsQuery) -> Statement {
    let mut statement = Statement::new();
    statement.sql = format!(
        "SELECT tenant, name, time, event_id, session_id, user_id, attributes, metrics, body, \
         ingested_at \
         FROM events FINAL \
         WHERE tenant = {{tenant:String}}{name} \
         AND time >= fromUnixTimestamp64Milli({{from_ms:Int64}}, 'UTC') \
         AND time < fromUnixTimestamp64Milli({{to_ms:Int64}}, 'UTC') \
         ORDER BY time DESC, toString(event_id) LIMIT {{limit:UInt64}}",
        name = filter_if(query.name.is_some(), NAME_FILTER),
    );
    statement.bind_filters(&query.tenant, query.name.as_ref(), None);
    statement.bind_range_and_limit(query.from_ms, query.to_ms, query.limit);
    statement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Measure;

    fn series(agg: Agg, metric: Option<&str>, source: Source) -> TimeseriesQuery {
        TimeseriesQuery {
            tenant: "acme".into(),
            measure: Measure {
                name: Some("llm.request".into()),
                metric: metric.map(str::to_owned),
                agg,
            },
            from: 1_700_000_000 - 1_700_000_000 % 3600,
            to: 1_700_000_000 - 1_700_000_000 % 3600 + 7200,
            step: 300,
            window: 900,
            source,
        }
    }

    /// Every `{name:Type}` in the SQL has a bound value and every value is used.
    fn assert_params_match(statement: &Statement) {
        for (name, _) in &statement.params {
            assert!(
                statement.sql.contains(&format!("{{{name}:")),
                "{name} unused in {}",
                statement.sql
            );
        }
        let mut rest = statement.sql.as_str();
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find(':').unwrap() + start;
            let name = &rest[start + 1..end];
            assert!(
                statement.params.iter().any(|(bound, _)| *bound == name),
                "{name} not bound"
            );
            rest = &rest[end..];
        }
        assert!(!statement.sql.contains('?'), "the crate treats ? as a bind marker");
    }

    #[test]
    fn timeseries_picks_table_and_binds_every_value() {
        let statement = timeseries(&series(Agg::P99, Some("latency_ms"), Source::Minute));
        assert!(statement.sql.contains("FROM metrics_1m"));
        assert!(statement.sql.contains("quantileTDigestMerge(0.99)"));
        assert_params_match(&statement);
        let statement = timeseries(&series(Agg::UniqUsers, None, Source::Hour));
        assert!(statement.sql.contains("FROM events_1h"));
        assert!(statement.sql.contains("hour >="));
        assert_params_match(&statement);
        assert!(statement
            .params
            .contains(&("scan_from", Value::Int(1_699_999_200 + 300 - 900))));
    }

    #[test]
    fn user_values_never_reach_the_sql_text() {
        let hostile = "x' OR 1=1; DROP TABLE events; --";
        let mut query = series(Agg::Sum, Some(hostile), Source::Minute);
        query.tenant = hostile.into();
        query.measure.name = Some(hostile.into());
        let statement = timeseries(&query);
        assert!(!statement.sql.contains(hostile));
        let top_query = TopQuery {
            tenant: hostile.into(),
            by: TopBy::Attribute(hostile.into()),
            measure: Measure {
                name: Some(hostile.into()),
                metric: Some(hostile.into()),
                agg: Agg::P90,
            },
            from_ms: 0,
            to_ms: 1,
            limit: 5,
            source: Source::Raw,
        };
        let statement = top(&top_query);
        assert!(!statement.sql.contains(hostile));
        assert_params_match(&statement);
        for by in [TopBy::User, TopBy::Session] {
            let statement = top(&TopQuery {
                by,
                measure: Measure {
                    metric: None,
                    ..top_query.measure.clone()
                },
                ..top_query.clone()
            });
            assert_params_match(&statement);
        }
        let by_name = top(&TopQuery {
            by: TopBy::Name,
            source: Source::Hour,
            ..top_query.clone()
        });
        assert!(by_name.sql.contains("FROM metrics_1h"));
        assert_params_match(&by_name);
        assert_params_match(&sessions(&SessionsQuery {
            tenant: hostile.into(),
            from_ms: 0,
            to_ms: 1,
            limit: 1,
            min_events: 1,
        }));
        assert_params_match(&events(&EventsQuery {
            tenant: hostile.into(),
            name: Some(hostile.into()),
            from_ms: 0,
            to_ms: 1,
            limit: 1,
        }));
    }
}

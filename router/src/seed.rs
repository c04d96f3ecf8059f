//! Rebuilding windows and anomaly series from ClickHouse at start, so a restart neither misses
//! nor repeats an alert.
//!
//! The split is by receive time (`ingested_at`, the ingestor's clock), at the [`Boundary`]: the
//! receive time of the last message the router's consumer acknowledged. Events received up to it
//! are read from the raw `events` table; events received later come again from the stream (the
//! consumer resumes after its ack floor) and the evaluation skips the earlier ones
//! ([`crate::evaluate::Evaluation::set_boundary`]). Both sides apply the same matcher (the
//! matcher's SQL form is tested to agree with it on the engine).
//!
//! Limits: the split is exact for messages from one ingestor; messages of several ingestors
//! received within the same instant may land on either side. Events the aggregator has not
//! inserted yet when the router starts are missing from the rebuilt part: seeding first waits
//! (up to [`CATCH_UP_WAIT`]) until ClickHouse holds an event received at or after the boundary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chute_common::validate::unix_millis_now;
use chute_proto::v1::EventBatch;
use prost::Message;
use serde::Deserialize;

use crate::evaluate::Evaluation;
use crate::matcher::sql_string as literal;
use crate::spec::{AnomalySpec, Rule, RuleKind, RuleSet, SeriesValue, ThresholdSpec, WindowValue, SLOT};
use crate::window::{bucket_index_sql, SeriesKey, SlotSeed};
use crate::{telemetry, Result};

/// How long seeding waits for the aggregators to insert what was received before the boundary.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(15);

/// The receive time (unix ms) up to which evaluation state is rebuilt from ClickHouse; `None`:
/// nothing is (a consumer that starts with everything the stream holds). With `wait`, the message
/// received at the boundary may not be in ClickHouse yet and seeding waits for it first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boundary {
    pub received_ms: Option<i64>,
    pub wait: bool,
}

impl Boundary {
    /// The receive time of the message at `sequence`, waited for in ClickHouse; `None` when
    /// the stream no longer holds it or it does not decode.
    pub async fn at_message(stream: &jetstream::stream::Stream, sequence: u64) -> Option<Self> {
        let message = stream.get_raw_message(sequence).await.ok()?;
        let batch = EventBatch::decode(message.payload.as_ref()).ok()?;
        Some(Self {
            received_ms: Some(batch.received_unix_nanos / 1_000_000),
            wait: true,
        })
    }

    /// At `at`, without waiting: everything received before it is already in ClickHouse (the
    /// stream trimmed it, so it was committed) or there was nothing.
    pub fn at_time(at: time::OffsetDateTime) -> Self {
        Self {
            received_ms: Some((at.unix_timestamp_nanos() / 1_000_000) as i64),
            wait: false,
        }
    }
}

/// One slot of one series, as ClickHouse aggregates it.
#[derive(Debug, clickhouse::Row, Deserialize)]
struct SlotRow {
    tenant: String,
    grp: String,
    slot_ms: i64,
    events: u64,
    flagged: u64,
    sum: f64,
    valued: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BucketRow {
    tenant: String,
    grp: String,
    slot_ms: i64,
    bucket: i32,
    count: u64,
}

/// (minute start in unix ms, matching events, value) of one series.
type MinuteValue = (i64, u64, f64);

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MinuteRow {
    tenant: String,
    grp: String,
    minute_ms: i64,
    events: u64,
    value: f64,
}

/// Seeds every threshold window and anomaly series of `rules` from ClickHouse, for events
/// received up to `boundary`. Failures are logged: the router then starts with what it has.
pub async fn seed(
    client: &clickhouse::Client,
    boundary: Boundary,
    rules: &Arc<RuleSet>,
    evaluation: &mut Evaluation,
    anomaly_history: Duration,
) {
    let Some(boundary_ms) = boundary.received_ms else {
        return;
    };
    evaluation.set_boundary(boundary_ms);
    if rules.rules.iter().all(|rule| matches!(rule.kind, RuleKind::Route)) {
        return;
    }
    let started = Instant::now();
    if boundary.wait {
        wait_for_catch_up(client, boundary_ms).await;
    }
    let ids = evaluation.rule_ids(rules);
    for (rule, id) in rules.rules.iter().zip(ids.iter().copied()) {
        let result = match &rule.kind {
            RuleKind::Threshold(spec) => seed_threshold(client, boundary_ms, rule, id, spec, evaluation).await,
            RuleKind::Anomaly(spec) => {
                seed_anomaly(client, boundary_ms, rule, id, spec, evaluation, anomaly_history).await
            }
            RuleKind::Route => Ok(()),
        };
        if let Err(err) = result {
            tracing::warn!(rule = %rule.name, error = %err, "could not rebuild the rule's state from ClickHouse; it starts empty");
        }
    }
    telemetry::seeded(started.elapsed());
    tracing::info!(
        boundary_ms,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "windows rebuilt from ClickHouse"
    );
}

/// Waits until ClickHouse holds an event received at or after `boundary_ms`, or [`CATCH_UP_WAIT`].
async fn wait_for_catch_up(client: &clickhouse::Client, boundary_ms: i64) {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    let sql = format!(
        "SELECT count() FROM events WHERE ingested_at >= fromUnixTimestamp64Milli(toInt64({boundary_ms})) \
         AND time >= fromUnixTimestamp64Milli(toInt64({})) ",
        boundary_ms - 86_400_000
    );
    while Instant::now() < deadline {
        match client.query(&sql).fetch_one::<u64>().await {
            Ok(count) if count > 0 => return,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "ClickHouse not readable for seeding");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::info!(
        boundary_ms,
        "no event received after the router's position is in ClickHouse yet; seeding with what it holds"
    );
}

/// The `WHERE` part shared by every seeding query of `rule` over event times after `from_ms`.
/// Anomaly series leave out the router's own `chute.*` events, as the live evaluation does.
fn filter(rule: &Rule, from_ms: i64, boundary_ms: i64) -> String {
    let own_events = match rule.kind {
        RuleKind::Anomaly(_) => " AND name NOT LIKE 'chute.%'",
        _ => "",
    };
    let tenants = rule.tenants.as_ref().map_or_else(String::new, |tenants| {
        let list: Vec<String> = tenants.iter().map(|tenant| literal(tenant)).collect();
        format!(" AND tenant IN ({})", list.join(", "))
    });
    format!(
        "time >= fromUnixTimestamp64Milli(toInt64({from_ms})) \
         AND ingested_at <= fromUnixTimestamp64Milli(toInt64({boundary_ms})) \
         {own_events} AND ({}){tenants}",
        rule.matcher.to_sql()
    )
}

fn group_expr(group_by: Option<&str>) -> String {
    group_by.map_or_else(
        || "''".to_owned(),
        |attribute| format!("attributes[{}]", literal(attribute)),
    )
}

/// The clickhouse crate reads `?` as a bind placeholder; `??` is a literal `?`.
fn escape_placeholders(sql: &str) -> String {
    sql.replace('?', "??")
}

async fn seed_threshold(
    client: &clickhouse::Client,
    boundary_ms: i64,
    rule: &Rule,
    rule_id: usize,
    spec: &ThresholdSpec,
    evaluation: &mut Evaluation,
) -> Result<()> {
    let slot_ms = SLOT.as_millis() as i64;
    let from_ms = (unix_millis_now() - spec.window.as_millis() as i64).div_euclid(slot_ms) * slot_ms;
    let metric = match &spec.value {
        WindowValue::Quantile { metric, .. } | WindowValue::Avg { metric } => Some(literal(metric)),
        _ => None,
    };
    let flagged = match &spec.value {
        WindowValue::Share { of } => format!("countIf({})", of.to_sql()),
        _ => "toUInt64(0)".to_owned(),
    };
    let (sum, valued) = match &metric {
        Some(m) => (
            format!("sumIf(metrics[{m}], mapContains(metrics, {m}))"),
            format!("countIf(mapContains(metrics, {m}))"),
        ),
        None => ("toFloat64(0)".to_owned(), "toUInt64(0)".to_owned()),
    };
    let group = group_expr(spec.group_by.as_deref());
    let filter = filter(rule, from_ms, boundary_ms);
    let sql = format!(
        "SELECT toString(tenant) AS tenant, {group} AS grp, \
         intDiv(toUnixTimestamp64Milli(time), {slot_ms}) * {slot_ms} AS slot_ms, \
         count() AS events, {flagged} AS flagged, {sum} AS sum, {valued} AS valued \
         FROM events FINAL WHERE {filter} GROUP BY tenant, grp, slot_ms"
    );
    let rows = client.query(&escape_placeholders(&sql)).fetch_all::<SlotRow>().await?;
    let mut seeds: HashMap<(String, String, i64), SlotSeed> = HashMap::new();
    for row in rows {
        seeds.insert(
            (row.tenant, row.grp, row.slot_ms),
            SlotSeed {
                count: row.events,
                flagged: row.flagged,
                sum: row.sum,
                valued: row.valued,
                buckets: Vec::new(),
            },
        );
    }
    if let (WindowValue::Quantile { .. }, Some(m)) = (&spec.value, &metric) {
        let bucket = bucket_index_sql(&format!("metrics[{m}]"));
        let sql = format!(
            "SELECT toString(tenant) AS tenant, {group} AS grp, \
             intDiv(toUnixTimestamp64Milli(time), {slot_ms}) * {slot_ms} AS slot_ms, \
             toInt32({bucket}) AS bucket, count() AS count \
             FROM events FINAL WHERE {filter} AND mapContains(metrics, {m}) \
             GROUP BY tenant, grp, slot_ms, bucket"
        );
        for row in client
            .query(&escape_placeholders(&sql))
            .fetch_all::<BucketRow>()
            .await?
        {
            if let Some(seed) = seeds.get_mut(&(row.tenant, row.grp, row.slot_ms)) {
                seed.buckets.push((row.bucket, row.count));
            }
        }
    }
    let slots = seeds.len();
    for ((tenant, group, slot_start_ms), seed) in seeds {
        let key = SeriesKey {
            rule: rule_id,
            tenant,
            group: spec.group_by.as_ref().map(|_| group),
        };
        evaluation.seed_slot(key, spec, slot_start_ms, seed);
    }
    tracing::info!(rule = %rule.name, slots, "threshold window rebuilt");
    Ok(())
}

async fn seed_anomaly(
    client: &clickhouse::Client,
    boundary_ms: i64,
    rule: &Rule,
    rule_id: usize,
    spec: &AnomalySpec,
    evaluation: &mut Evaluation,
    history: Duration,
) -> Result<()> {
    let from_ms = (boundary_ms - history.as_millis() as i64).div_euclid(60_000) * 60_000;
    let (events, value) = match &spec.series {
        SeriesValue::Rate => ("count()".to_owned(), "toFloat64(count())".to_owned()),
        SeriesValue::Mean { metric } => {
            let m = literal(metric);
            (
                format!("countIf(mapContains(metrics, {m}))"),
                format!("avgIf(metrics[{m}], mapContains(metrics, {m}))"),
            )
        }
    };
    let group = group_expr(spec.group_by.as_deref());
    let sql = format!(
        "SELECT toString(tenant) AS tenant, {group} AS grp, \
         toInt64(toUnixTimestamp(toStartOfMinute(time))) * 1000 AS minute_ms, \
         {events} AS events, {value} AS value \
         FROM events FINAL WHERE {} GROUP BY tenant, grp, minute_ms HAVING events > 0 ORDER BY minute_ms",
        filter(rule, from_ms, boundary_ms)
    );
    let rows = client
        .query(&escape_placeholders(&sql))
        .fetch_all::<MinuteRow>()
        .await?;
    let minutes = rows.len();
    // Per series, oldest first; a rate series' empty minutes between two seen ones count 0.
    let mut series: HashMap<(String, String), Vec<MinuteValue>> = HashMap::new();
    for row in rows {
        series
            .entry((row.tenant, row.grp))
            .or_default()
            .push((row.minute_ms, row.events, row.value));
    }
    let now = unix_millis_now();
    for ((tenant, group), rows) in series {
        let key = SeriesKey {
            rule: rule_id,
            tenant,
            group: spec.group_by.as_ref().map(|_| group),
        };
        let mut next_minute: Option<i64> = None;
        for (minute_ms, events, value) in rows {
            if let (SeriesValue::Rate, Some(mut gap)) = (&spec.series, next_minute) {
                while gap < minute_ms {
                    evaluation.seed_minute(&key, spec, gap, 0, 0.0, now);
                    gap += 60_000;
                }
            }
            evaluation.seed_minute(&key, spec, minute_ms, events, value, now);
            next_minute = Some(minute_ms + 60_000);
        }
    }
    tracing::info!(rule = %rule.name, minutes, "anomaly history loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // `literal` is `matcher::sql_string`, tested beside it.
    #[test]
    fn question_marks_are_not_bind_placeholders() {
        assert_eq!(escape_placeholders("x LIKE 'a?'"), "x LIKE 'a??'");
    }
}

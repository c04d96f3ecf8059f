//! The ClickHouse schema against the dev server: insert dedup in raw and rollup tables,
//! ReplacingMergeTree collapse, rollup values against a recomputation in Rust, table settings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use chute_schema::row::EventsRow;
use clickhouse::Row;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use uuid::Uuid;

use crate::migrate::migrated;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const NAMES: [&str; 4] = ["llm.request", "page.view", "checkout", "search"];

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_millis()).unwrap()
}

/// Start of the hour two hours ago: generated times stay well inside the raw table's 30-day TTL
/// (rows older than a table's TTL are dropped on insert).
fn base_time_ms() -> i64 {
    let hour_ms = 3_600_000;
    now_ms().div_euclid(hour_ms) * hour_ms - 2 * hour_ms
}

/// `count` events over `span_minutes` from `base_ms`, across tenants, names, users and sessions
/// (some without user or session), with 1-4 metrics each.
fn generate(seed: u64, count: usize, base_ms: i64, span_minutes: i64) -> Vec<EventsRow> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(count);
    for _ in 0..count {
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let name = NAMES[rng.random_range(0..NAMES.len())];
        let time = base_ms + rng.random_range(0..span_minutes * 60_000);
        let user_id = match rng.random_range(0..10) {
            0 => String::new(),
            _ => format!("user-{}", rng.random_range(0..2_000)),
        };
        let session_id = match rng.random_range(0..10) {
            0 => String::new(),
            _ => format!("session-{}", rng.random_range(0..5_000)),
        };
        let mut metrics = vec![("latency_ms".to_owned(), -(1.0 - rng.random::<f64>()).ln() * 200.0)];
        if rng.random_bool(0.7) {
            let tokens = f64::from(rng.random_range(1..4_000u32));
            metrics.push(("tokens".to_owned(), tokens));
            metrics.push(("cost_usd".to_owned(), tokens * 0.000_015));
        }
        if rng.random_bool(0.3) {
            metrics.push(("score".to_owned(), rng.random::<f64>()));
        }
        rows.push(EventsRow {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            time,
            event_id: Uuid::from_u128(rng.random()),
            session_id,
            user_id,
            attributes: vec![("model".to_owned(), format!("m{}", rng.random_range(0..3)))],
            metrics,
            body: format!("{{\"n\":{}}}", rng.random::<u32>()),
            ingested_at: time + 5,
        });
    }
    rows
}

/// Inserts `rows` as one insert, the way the aggregator does: with a dedup token that also
/// applies to every materialized view target.
async fn insert_batch(client: &clickhouse::Client, rows: &[EventsRow], token: &str) {
    let mut insert = client
        .insert::<EventsRow>("events")
        .await
        .unwrap()
        .with_setting("insert_deduplication_token", token)
        .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1");
    for row in rows {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
}

async fn scalar(client: &clickhouse::Client, sql: &str) -> u64 {
    client
        .query(sql)
        .fetch_one()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Row counts as each table sees them: raw rows (without FINAL) and the event / metric-value
/// counts stored in every rollup.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    raw: u64,
    events_1m: u64,
    events_1h: u64,
    metrics_1m: u64,
    metrics_1h: u64,
    sessions: u64,
}

async fn counts(client: &clickhouse::Client) -> Counts {
    Counts {
        raw: scalar(client, "SELECT count() FROM events").await,
        events_1m: scalar(client, "SELECT sum(event_count) FROM events_1m").await,
        events_1h: scalar(client, "SELECT sum(event_count) FROM events_1h").await,
        metrics_1m: scalar(client, "SELECT sum(value_count) FROM metrics_1m").await,
        metrics_1h: scalar(client, "SELECT sum(value_count) FROM metrics_1h").await,
        sessions: scalar(client, "SELECT sum(event_count) FROM sessions").await,
    }
}

fn expected_counts(rows: &[EventsRow], times: u64) -> Counts {
    let events = rows.len() as u64 * times;
    let metric_values = rows.iter().map(|r| r.metrics.len() as u64).sum::<u64>() * times;
    let with_session = rows.iter().filter(|r| !r.session_id.is_empty()).count() as u64 * times;
    Counts {
        raw: events,
        events_1m: events,
        events_1h: events,
        metrics_1m: metric_values,
        metrics_1h: metric_values,
        sessions: with_session,
    }
}

#[tokio::test]
async fn same_batch_three_times_with_one_token_counts_once_everywhere() {
    let (_server, client) = migrated("schema_same_batch_three_times").await;
    let rows = generate(1, 2_000, base_time_ms(), 90);

    for _ in 0..3 {
        insert_batch(&client, &rows, "events:7:1000-1999").await;
    }
    assert_eq!(counts(&client).await, expected_counts(&rows, 1));

    // Control: the same rows under another token are a new insert, counted again everywhere
    // (so the equality above is the token's doing), and FINAL still collapses the raw rows.
    insert_batch(&client, &rows, "events:7:2000-2999").await;
    assert_eq!(counts(&client).await, expected_counts(&rows, 2));
    assert_eq!(
        scalar(&client, "SELECT count() FROM events FINAL").await,
        rows.len() as u64
    );
}

#[tokio::test]
async fn duplicate_event_id_in_two_batches_is_collapsed_by_final() {
    let (_server, client) = migrated("schema_duplicate_event_id").await;
    // Twenty minutes into an hour, so a retry a few seconds later stays in the same hour bucket.
    let base = base_time_ms() + 20 * 60_000;
    let first = generate(2, 10, base, 5);
    let mut second = generate(3, 10, base, 5);
    let exact_copy = first[5].clone();
    let mut retried = first[3].clone();
    retried.time += 1_500; // a retry whose time was unset and re-stamped on receipt
    second.push(exact_copy);
    second.push(retried.clone());

    insert_batch(&client, &first, "batch-a").await;
    insert_batch(&client, &second, "batch-b").await;

    assert_eq!(scalar(&client, "SELECT count() FROM events FINAL").await, 20);
    for id in [first[3].event_id, first[5].event_id] {
        let sql = format!("SELECT count() FROM events FINAL WHERE event_id = '{id}'");
        assert_eq!(scalar(&client, &sql).await, 1, "{id}");
    }
    // The latest insert wins (version column inserted_at), and a merge makes it permanent.
    client.query("OPTIMIZE TABLE events FINAL").execute().await.unwrap();
    assert_eq!(scalar(&client, "SELECT count() FROM events").await, 20);
    let sql = format!("SELECT time FROM events WHERE event_id = '{}'", retried.event_id);
    let time: i64 = client.query(&sql).fetch_one().await.unwrap();
    assert_eq!(time, retried.time);
}

#[derive(Debug, Row, Deserialize)]
struct EventsRollupRow {
    tenant: String,
    name: String,
    bucket: u32,
    events: u64,
    users: u64,
    sessions: u64,
}

#[derive(Debug, Row, Deserialize)]
struct MetricsRollupRow {
    tenant: String,
    name: String,
    metric: String,
    bucket: u32,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    avg: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

#[derive(Debug, Row, Deserialize)]
struct SessionRow {
    tenant: String,
    session_id: String,
    start: i64,
    end: i64,
    duration_ms: i64,
    events: u64,
    users: u64,
    metrics: Vec<(String, f64)>,
}

#[derive(Default)]
struct ExpectedEvents {
    events: u64,
    users: BTreeSet<String>,
    sessions: BTreeSet<String>,
}

#[derive(Default)]
struct ExpectedSession {
    start: i64,
    end: i64,
    events: u64,
    users: BTreeSet<String>,
    metrics: BTreeMap<String, f64>,
}

type EventsKey = (String, String, u32);
type MetricsKey = (String, String, String, u32);

fn bucket_of(time_ms: i64, bucket_seconds: i64) -> u32 {
    u32::try_from(time_ms.div_euclid(bucket_seconds * 1000) * bucket_seconds).unwrap()
}

fn expected_events(rows: &[EventsRow], bucket_seconds: i64) -> BTreeMap<EventsKey, ExpectedEvents> {
    let mut expected: BTreeMap<EventsKey, ExpectedEvents> = BTreeMap::new();
    for row in rows {
        let key = (
            row.tenant.clone(),
            row.name.clone(),
            bucket_of(row.time, bucket_seconds),
        );
        let group = expected.entry(key).or_default();
        group.events += 1;
        if !row.user_id.is_empty() {
            group.users.insert(row.user_id.clone());
        }
        if !row.session_id.is_empty() {
            group.sessions.insert(row.session_id.clone());
        }
    }
    expected
}

/// Every metric value per group, sorted (for exact quantiles).
fn expected_metrics(rows: &[EventsRow], bucket_seconds: Option<i64>) -> BTreeMap<MetricsKey, Vec<f64>> {
    let mut expected: BTreeMap<MetricsKey, Vec<f64>> = BTreeMap::new();
    for row in rows {
        let bucket = bucket_seconds.map_or(0, |seconds| bucket_of(row.time, seconds));
        for (metric, value) in &row.metrics {
            let key = (row.tenant.clone(), row.name.clone(), metric.clone(), bucket);
            expected.entry(key).or_default().push(*value);
        }
    }
    for values in expected.values_mut() {
        values.sort_by(f64::total_cmp);
    }
    expected
}

fn expected_sessions(rows: &[EventsRow]) -> BTreeMap<(String, String), ExpectedSession> {
    let mut expected: BTreeMap<(String, String), ExpectedSession> = BTreeMap::new();
    for row in rows.iter().filter(|r| !r.session_id.is_empty()) {
        let session = expected
            .entry((row.tenant.clone(), row.session_id.clone()))
            .or_insert_with(|| ExpectedSession {
                start: i64::MAX,
                end: i64::MIN,
                ..ExpectedSession::default()
            });
        session.start = session.start.min(row.time);
        session.end = session.end.max(row.time);
        session.events += 1;
        if !row.user_id.is_empty() {
            session.users.insert(row.user_id.clone());
        }
        for (metric, value) in &row.metrics {
            *session.metrics.entry(metric.clone()).or_default() += value;
        }
    }
    expected
}

/// `uniq` is approximate; at these cardinalities it is exact up to rare hash collisions.
fn assert_uniq(context: &str, got: u64, expected: usize) {
    let expected = expected as u64;
    let tolerance = (expected / 100).max(1);
    assert!(
        got.abs_diff(expected) <= tolerance,
        "{context}: uniq {got}, exact {expected}"
    );
}

fn assert_close(context: &str, got: f64, expected: f64) {
    let tolerance = 1e-9 * expected.abs().max(1.0);
    assert!((got - expected).abs() <= tolerance, "{context}: {got} vs {expected}");
}

/// A t-digest estimate of quantile `level` must lie between the exact quantiles at
/// `level ± rank_tolerance` (values are kept as Float32 inside the digest, hence the slack).
fn assert_quantile(context: &str, got: f64, sorted: &[f64], level: f64, rank_tolerance: f64) {
    let last = (sorted.len() - 1) as f64;
    let low = sorted[((level - rank_tolerance).max(0.0) * last).floor() as usize];
    let high = sorted[((level + rank_tolerance).min(1.0) * last).ceil() as usize];
    let slack = 1e-6 * high.abs().max(1.0);
    assert!(
        got >= low - slack && got <= high + slack,
        "{context}: p{level} = {got}, exact band [{low}, {high}] over {} values",
        sorted.len()
    );
}

fn check_events_rollup(table: &str, got: &[EventsRollupRow], expected: &BTreeMap<EventsKey, ExpectedEvents>) {
    assert_eq!(got.len(), expected.len(), "{table}: number of groups");
    for (row, (key, group)) in got.iter().zip(expected) {
        let context = format!("{table} {key:?}");
        assert_eq!(
            (&row.tenant, &row.name, row.bucket),
            (&key.0, &key.1, key.2),
            "{context}"
        );
        assert_eq!(row.events, group.events, "{context}: events");
        assert_uniq(&format!("{context} users"), row.users, group.users.len());
        assert_uniq(&format!("{context} sessions"), row.sessions, group.sessions.len());
    }
}

fn check_metrics_rollup(table: &str, got: &[MetricsRollupRow], expected: &BTreeMap<MetricsKey, Vec<f64>>) {
    assert_eq!(got.len(), expected.len(), "{table}: number of groups");
    for (row, (key, values)) in got.iter().zip(expected) {
        let context = format!("{table} {key:?}");
        assert_eq!(
            (&row.tenant, &row.name, &row.metric, row.bucket),
            (&key.0, &key.1, &key.2, key.3),
            "{context}"
        );
        let sum: f64 = values.iter().sum();
        assert_eq!(row.count, values.len() as u64, "{context}: count");
        assert_close(&format!("{context} sum"), row.sum, sum);
        assert_eq!(row.min, values[0], "{context}: min");
        assert_eq!(row.max, values[values.len() - 1], "{context}: max");
        assert_close(&format!("{context} avg"), row.avg, sum / values.len() as f64);
        for (level, estimate) in [(0.5, row.p50), (0.9, row.p90), (0.99, row.p99)] {
            assert_quantile(&context, estimate, values, level, 0.05);
        }
    }
}

async fn fetch_events_rollup(client: &clickhouse::Client, view: &str, bucket: &str) -> Vec<EventsRollupRow> {
    let sql = format!(
        "SELECT tenant, name, toUInt32({bucket}) AS bucket, events, users, sessions \
         FROM {view} ORDER BY tenant, name, bucket"
    );
    client.query(&sql).fetch_all().await.unwrap()
}

async fn fetch_metrics_rollup(client: &clickhouse::Client, view: &str, bucket: &str) -> Vec<MetricsRollupRow> {
    let sql = format!(
        "SELECT tenant, name, metric, toUInt32({bucket}) AS bucket, count, sum, min, max, avg, p50, p90, p99 \
         FROM {view} ORDER BY tenant, name, metric, bucket"
    );
    client.query(&sql).fetch_all().await.unwrap()
}

#[tokio::test]
async fn rollups_equal_a_recomputation_from_the_generated_events() {
    let (_server, client) = migrated("schema_rollups_recomputed").await;
    // 150 minutes from the start of an hour: three hour buckets, 150 minute buckets, 3 tenants x
    // 4 names, ~5,000 sessions per tenant spanning the whole range.
    let rows = generate(42, 100_000, base_time_ms(), 150);
    for (index, batch) in rows.chunks(25_000).enumerate() {
        insert_batch(&client, batch, &format!("rollup-test:{index}")).await;
    }
    assert_eq!(counts(&client).await, expected_counts(&rows, 1));

    // Minute and hour rollups against the rows as generated.
    let minutes = fetch_events_rollup(&client, "events_1m_v", "minute").await;
    check_events_rollup("events_1m_v", &minutes, &expected_events(&rows, 60));
    let hours = fetch_events_rollup(&client, "events_1h_v", "hour").await;
    check_events_rollup("events_1h_v", &hours, &expected_events(&rows, 3600));
    let metric_minutes = fetch_metrics_rollup(&client, "metrics_1m_v", "minute").await;
    check_metrics_rollup("metrics_1m_v", &metric_minutes, &expected_metrics(&rows, Some(60)));
    let metric_hours = fetch_metrics_rollup(&client, "metrics_1h_v", "hour").await;
    check_metrics_rollup("metrics_1h_v", &metric_hours, &expected_metrics(&rows, Some(3600)));

    // Hour rollups equal the sum of their minutes (as stored, not as generated).
    let mut summed: BTreeMap<EventsKey, u64> = BTreeMap::new();
    for row in &minutes {
        let hour = row.bucket - row.bucket % 3600;
        *summed.entry((row.tenant.clone(), row.name.clone(), hour)).or_default() += row.events;
    }
    let hour_counts: BTreeMap<EventsKey, u64> = hours
        .iter()
        .map(|row| ((row.tenant.clone(), row.name.clone(), row.bucket), row.events))
        .collect();
    assert_eq!(hour_counts, summed);
    let mut summed: BTreeMap<MetricsKey, (u64, f64, f64, f64)> = BTreeMap::new();
    for row in &metric_minutes {
        let key = (
            row.tenant.clone(),
            row.name.clone(),
            row.metric.clone(),
            row.bucket - row.bucket % 3600,
        );
        let entry = summed.entry(key).or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
        entry.0 += row.count;
        entry.1 += row.sum;
        entry.2 = entry.2.min(row.min);
        entry.3 = entry.3.max(row.max);
    }
    assert_eq!(summed.len(), metric_hours.len());
    for (row, (key, (count, sum, min, max))) in metric_hours.iter().zip(&summed) {
        assert_eq!(
            (&row.tenant, &row.name, &row.metric, row.bucket),
            (&key.0, &key.1, &key.2, key.3)
        );
        assert_eq!((row.count, row.min, row.max), (*count, *min, *max), "{key:?}");
        assert_close(&format!("{key:?} sum"), row.sum, *sum);
    }

    // Digests merge over an arbitrary window: the whole range from the minute states.
    #[derive(Debug, Row, Deserialize)]
    struct WindowQuantiles {
        tenant: String,
        name: String,
        metric: String,
        quantiles: Vec<f64>,
    }
    let window: Vec<WindowQuantiles> = client
        .query(
            "SELECT tenant, name, metric, \
                    arrayMap(q -> toFloat64(q), quantilesTDigestMerge(0.5, 0.9, 0.99)(value_digest)) AS quantiles \
             FROM metrics_1m GROUP BY tenant, name, metric ORDER BY tenant, name, metric",
        )
        .fetch_all()
        .await
        .unwrap();
    let expected = expected_metrics(&rows, None);
    assert_eq!(window.len(), expected.len());
    for (row, (key, values)) in window.iter().zip(&expected) {
        assert_eq!((&row.tenant, &row.name, &row.metric), (&key.0, &key.1, &key.2));
        for (level, estimate) in [0.5, 0.9, 0.99].into_iter().zip(&row.quantiles) {
            assert_quantile(&format!("window {key:?}"), *estimate, values, level, 0.02);
        }
    }

    // Sessions against the rows as generated.
    let sessions: Vec<SessionRow> = client
        .query(
            "SELECT tenant, session_id, start, end, duration_ms, events, users, metrics \
             FROM sessions_v ORDER BY tenant, session_id",
        )
        .fetch_all()
        .await
        .unwrap();
    let expected = expected_sessions(&rows);
    assert_eq!(sessions.len(), expected.len(), "sessions");
    for (row, (key, session)) in sessions.iter().zip(&expected) {
        let context = format!("session {key:?}");
        assert_eq!((&row.tenant, &row.session_id), (&key.0, &key.1));
        assert_eq!((row.start, row.end), (session.start, session.end), "{context}");
        assert_eq!(row.duration_ms, session.end - session.start, "{context}");
        assert_eq!(row.events, session.events, "{context}");
        assert_uniq(&context, row.users, session.users.len());
        let metric_names: Vec<&String> = row.metrics.iter().map(|(name, _)| name).collect();
        assert_eq!(metric_names, session.metrics.keys().collect::<Vec<_>>(), "{context}");
        for ((metric, got), expected) in row.metrics.iter().zip(session.metrics.values()) {
            assert_close(&format!("{context} {metric}"), *got, *expected);
        }
    }
}

#[tokio::test]
async fn ttl_partitioning_and_dedup_window_are_in_show_create_table() {
    let (_server, client) = migrated("schema_show_create").await;
    let expectations: [(&str, &[&str]); 6] = [
        (
            "events",
            &[
                "ENGINE = ReplacingMergeTree(inserted_at)",
                "PARTITION BY toDate(time)",
                "ORDER BY (tenant, name, toStartOfHour(time), event_id)",
                "TTL toDateTime(time) + toIntervalDay(30)",
                "body` String CODEC(ZSTD(3))",
            ],
        ),
        (
            "events_1m",
            &[
                "PARTITION BY toYYYYMM(minute)",
                "ORDER BY (tenant, name, minute)",
                "TTL minute + toIntervalDay(90)",
            ],
        ),
        (
            "metrics_1m",
            &[
                "PARTITION BY toYYYYMM(minute)",
                "ORDER BY (tenant, name, metric, minute)",
                "TTL minute + toIntervalDay(90)",
            ],
        ),
        (
            "events_1h",
            &[
                "PARTITION BY toYYYYMM(hour)",
                "ORDER BY (tenant, name, hour)",
                "TTL hour + toIntervalDay(400)",
            ],
        ),
        (
            "metrics_1h",
            &[
                "PARTITION BY toYYYYMM(hour)",
                "ORDER BY (tenant, name, metric, hour)",
                "TTL hour + toIntervalDay(400)",
            ],
        ),
        (
            "sessions",
            &[
                "PARTITION BY toYYYYMM(first_time)",
                "ORDER BY (tenant, session_id)",
                "TTL toDateTime(last_time) + toIntervalDay(90)",
            ],
        ),
    ];
    for (table, fragments) in expectations {
        let ddl: String = client
            .query(&format!("SHOW CREATE TABLE {table}"))
            .fetch_one()
            .await
            .unwrap();
        for fragment in fragments.iter().chain(&[format!(
            "non_replicated_deduplication_window = {}",
            chute_schema::render::DEDUP_WINDOW
        )
        .as_str()])
        {
            assert!(ddl.contains(fragment), "{table}: missing {fragment:?} in\n{ddl}");
        }
    }
}

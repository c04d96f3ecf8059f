//! Inserts shaped for ClickHouse (issue 13 item 4): insert throughput of the aggregator's own
//! RowBinary rows into the full schema on the real engine (the ClickHouse dev server: chdb's
//! ClickHouse 26.9 behind HTTP), for
//!
//! 1. `sizes`: rows per insert (10k, 50k, 100k, 200k, 500k; the same total rows each), through the
//!    aggregator's `writer::insert_batch` (its settings: `optimize_on_insert=0`,
//!    `max_insert_block_size=2000000`, a dedup token per insert);
//! 2. `settings`: at the aggregator's default rows per insert, the writer's statement and
//!    settings with one change each (`optimize_on_insert=1`, `min_insert_block_size_rows=0`,
//!    smaller parse blocks, `parallel_view_processing=1`);
//! 3. `views`: the full schema, the raw table alone (every materialized view dropped), the raw
//!    table with each view alone and the full schema without each view, so each view's share of
//!    the insert cost is known twice over; the raw table as `ENGINE = Null` (HTTP, LZ4 and
//!    RowBinary parsing only, nothing stored); and two proposed redesigns: the hour rollups fed
//!    from the minute rollups' blocks (cascaded views) instead of from the raw block, and no hour
//!    views at all (two parts fewer per insert; hours would be read from the minute rollups);
//! 4. `client`: the writer against the `clickhouse` crate's own typed insert of the same rows
//!    (`Client::insert::<EventsRow>`, validation on: it describes the table and sends
//!    `RowBinaryWithNamesAndTypes`, serialising the rows itself, which is timed).
//!
//! Every run inserts into a fresh database migrated with the full schema (dropped afterwards so
//! its background merges do not run into the next run), checks that the raw table and every
//! attached view's target hold exactly what was inserted, and records the wall time of the
//! inserts, the dev server's CPU time over them (`/proc/<pid>/stat`, utime + stime: steadier
//! than wall time on a shared machine), the bench's own CPU (the client side), the parts written
//! (each table's highest block number) and left, and the 1-minute load average. Within a section the configurations alternate (A B C,
//! A B C, ...). The table printed at the end and the JSON give min / median per configuration.
//!
//! The rows: LLM-call events shaped like the load generator's defaults (`loadtest/src/generate.rs`:
//! 100 events per request from 64 templates, 4 tenants, 8 event names, 10k users, 2k sessions,
//! `run_id` plus 3 attributes of 16 bytes, the metrics `tokens_in`, `tokens_out`, `latency_ms`,
//! `cost_usd`, a 64-byte body; times spread over the last minute), normalised as the ingestor
//! does (event ids from the idempotency key), encoded as its JetStream payloads and transcoded by
//! the aggregator's `row::encode`. Preparing them is not timed.
//!
//! `cargo bench -p chute-aggregator --bench insert_shape` (release profile). Knobs:
//! - `CHUTE_BENCH_ROWS` (default 1000000): rows inserted per run (rounded down to whole requests);
//! - `CHUTE_BENCH_REPEATS` (default 2): runs of each configuration;
//! - `CHUTE_BENCH_SIZES` (default `10000,50000,100000,200000,500000`): rows per insert of
//!   section 1 (10k is about what the aggregator inserts in steady state at 50k events/s: its
//!   insert budget is 5 inserts/s);
//! - `CHUTE_BENCH_BATCH_ROWS` (default 200000, the aggregator's `--batch-max-rows`): rows per
//!   insert of sections 2-4;
//! - `CHUTE_BENCH_SECTIONS` (default `sizes,settings,views,client`): the sections to run;
//! - `CHUTE_BENCH_OUT` (default `bench/results/insert-shape-<UTC date>.json` in the workspace).
//!
//! Starts its own dev server on a free loopback port (or uses `CHUTE_CLICKHOUSE_URL`, then the
//! CPU column is empty). One full run at the defaults took 9 minutes on 2 cores shared with other
//! work (1-minute load average 5-14); on a quiet machine it is shorter.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use chute_aggregator::consumer::PartitionMessage;
use chute_common::payload::encode_chunks;
use chute_common::validate::{normalize, timestamp_from_nanos, unix_nanos_now, Limits, RequestContext};
use chute_proto::v1::Event;
use chute_schema::row::EventsRow;
use chute_schema::testing::ClickHouseServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The load generator's defaults (`loadtest --help`).
const EVENTS_PER_REQUEST: usize = 100;
const TEMPLATES: usize = 64;
const TENANTS: usize = 4;
const EVENT_NAMES: usize = 8;
const USERS: usize = 10_000;
const SESSIONS: usize = 2_000;
const ATTRIBUTES: usize = 3;
const ATTRIBUTE_BYTES: usize = 16;
const BODY_BYTES: usize = 64;
const METRICS: [&str; 4] = ["tokens_in", "tokens_out", "latency_ms", "cost_usd"];
/// The ingestor's default `--max-message-bytes`.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// Every materialized view of the schema (`sql/migrations/`) and the table it writes to.
const VIEWS: [(&str, &str); 5] = [
    ("events_1m_mv", "events_1m"),
    ("metrics_1m_mv", "metrics_1m"),
    ("events_1h_mv", "events_1h"),
    ("metrics_1h_mv", "metrics_1h"),
    ("sessions_mv", "sessions"),
];

/// The settings `writer::insert_batch` sends, which the `settings` section's variants start from
/// (copied from `aggregator/src/writer.rs`: keep them in step; that section's baseline runs through
/// the writer itself, so a drift would show as a gap no variant explains).
const WRITER_SETTINGS: [(&str, &str); 6] = [
    ("insert_deduplicate", "1"),
    ("deduplicate_blocks_in_dependent_materialized_views", "1"),
    ("async_insert", "0"),
    ("optimize_on_insert", "0"),
    ("max_insert_block_size", "2000000"),
    ("insert_distributed_sync", "1"),
];

/// The rows of one run, RowBinary as the aggregator inserts them, cut on message boundaries.
struct Rows {
    body: Bytes,
    /// (byte end, rows) after each message, in order.
    message_ends: Vec<(usize, usize)>,
    /// The JetStream payloads the rows came from (the `client` section builds typed rows from them).
    payloads: Vec<Bytes>,
    rows: usize,
}

impl Rows {
    /// Cuts the rows into inserts of `rows_per_insert` (whole messages): (body slice, row count,
    /// first and last message index).
    fn inserts(&self, rows_per_insert: usize) -> Vec<(Bytes, usize, std::ops::Range<usize>)> {
        let messages_per_insert = (rows_per_insert / EVENTS_PER_REQUEST).max(1);
        let mut inserts = Vec::new();
        let mut first = 0;
        while first < self.message_ends.len() {
            let last = (first + messages_per_insert).min(self.message_ends.len());
            let start = if first == 0 { 0 } else { self.message_ends[first - 1].0 };
            let end = self.message_ends[last - 1].0;
            let rows = self.message_ends[first..last].iter().map(|(_, rows)| rows).sum();
            inserts.push((self.body.slice(start..end), rows, first..last));
            first = last;
        }
        inserts
    }
}

/// Generated events of one request template (the load generator's shape).
fn template(rng: &mut StdRng, index: usize, now: i64, spread_nanos: i64) -> Vec<Event> {
    let tenant = format!("tenant-{}", index % TENANTS);
    (0..EVENTS_PER_REQUEST)
        .map(|_| {
            let mut attributes = std::collections::HashMap::new();
            attributes.insert("run_id".to_owned(), "insert-shape".to_owned());
            for attribute in 0..ATTRIBUTES {
                attributes.insert(format!("attr_{attribute}"), random_text(rng, ATTRIBUTE_BYTES));
            }
            let metrics = METRICS
                .iter()
                .enumerate()
                .map(|(metric, name)| {
                    let value = match metric {
                        0 | 1 => f64::from(rng.random_range(1..4000u32)),
                        2 => rng.random_range(5.0..3000.0),
                        _ => f64::from(rng.random_range(0..10_000u32)) / 100_000.0,
                    };
                    ((*name).to_owned(), value)
                })
                .collect();
            Event {
                event_id: String::new(),
                tenant: tenant.clone(),
                name: format!("llm.request.{}", rng.random_range(0..EVENT_NAMES)),
                time: Some(timestamp_from_nanos(now - rng.random_range(0..spread_nanos.max(1)))),
                session_id: format!("session-{}", rng.random_range(0..SESSIONS)),
                user_id: format!("user-{}", rng.random_range(0..USERS)),
                attributes,
                metrics,
                body: random_text(rng, BODY_BYTES),
            }
        })
        .collect()
}

fn random_text(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// `total_rows` rows: requests of the templates with fresh idempotency keys, normalised and
/// chunked as the ingestor does, transcoded by the aggregator's `row::encode`.
fn generate(total_rows: usize) -> Rows {
    let now = unix_nanos_now();
    // Times over the last minute, but never before today's UTC midnight: `events` is partitioned
    // by day, and a batch spanning two days would make two parts per insert.
    let day_nanos = 86_400 * 1_000_000_000i64;
    let spread_nanos = (60 * 1_000_000_000i64).min(now - now.div_euclid(day_nanos) * day_nanos);
    let mut rng = StdRng::seed_from_u64(13);
    let templates: Vec<Vec<Event>> = (0..TEMPLATES)
        .map(|index| template(&mut rng, index, now, spread_nanos))
        .collect();
    let limits = Limits::default();
    let requests = (total_rows / EVENTS_PER_REQUEST).max(1);
    let mut payloads = Vec::with_capacity(requests);
    for request in 0..requests {
        let key = format!("insert-shape-{request}");
        let ctx = RequestContext {
            received_unix_nanos: now,
            key_tenant: None,
            idempotency_key: &key,
        };
        let mut events = templates[request % TEMPLATES].clone();
        for (index, event) in events.iter_mut().enumerate() {
            normalize(event, index, &ctx, &limits).expect("generated events are valid");
        }
        payloads.extend(
            encode_chunks(events, now, &key, MAX_MESSAGE_BYTES)
                .into_iter()
                .map(|chunk| chunk.payload),
        );
    }
    let messages = payloads
        .iter()
        .enumerate()
        .map(|(index, payload)| PartitionMessage::new(0, 0, index as u64 + 1, 0, payload.clone()))
        .collect();
    let encoded = chute_aggregator::row::encode(messages, &limits);
    assert!(
        encoded.poison.is_empty(),
        "generated messages are valid: {:?}",
        encoded.poison.first()
    );
    assert_eq!(encoded.valid.len(), payloads.len(), "one message per request");
    Rows {
        message_ends: encoded.valid.iter().map(|m| (m.rows.end, m.events)).collect(),
        rows: encoded.row_count,
        body: encoded.rows,
        payloads,
    }
}

/// How a run inserts its rows.
#[derive(Clone, Debug)]
enum Path {
    /// `chute_aggregator::writer::insert_batch`, as the aggregator does.
    Writer,
    /// The writer's statement and settings with these overridden or added.
    WriterSettings(Vec<(&'static str, &'static str)>),
    /// The `clickhouse` crate's typed insert of `EventsRow`s (validation on).
    CrateTyped,
}

/// One configuration of a section.
#[derive(Clone, Debug)]
struct Config {
    section: &'static str,
    name: String,
    rows_per_insert: usize,
    path: Path,
    /// The views left attached (the rest are dropped after migrating).
    views: Vec<&'static str>,
    /// Changes to the migrated schema beyond dropping views.
    schema: Schema,
}

/// The schema a run inserts into.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Schema {
    /// `sql/migrations/` as they are.
    Migrated,
    /// `events` replaced by a table of the same columns with `ENGINE = Null` (views dropped):
    /// what the dev server's HTTP layer and the engine's RowBinary parsing cost alone.
    NullRaw,
    /// The hour rollups fed from the minute rollups' insert blocks (cascaded materialized views)
    /// instead of from the raw block: a proposed redesign, measured here only.
    CascadedHours,
}

/// `events_1h_mv` and `metrics_1h_mv` reading the minute targets' blocks: the minute views have
/// already grouped the insert block by (tenant, name[, metric], minute), so the hour views
/// merge those partial states instead of aggregating every raw row (and, for the metrics, every
/// ARRAY JOINed metric value) a second time.
const CASCADED_HOUR_VIEWS: [&str; 2] = [
    "CREATE MATERIALIZED VIEW `{db}`.events_1h_mv TO `{db}`.events_1h AS SELECT tenant, name, \
     toStartOfHour(minute) AS hour, sum(event_count) AS event_count, \
     uniqMergeState(users_state) AS users_state, uniqMergeState(sessions_state) AS sessions_state \
     FROM `{db}`.events_1m GROUP BY tenant, name, hour",
    "CREATE MATERIALIZED VIEW `{db}`.metrics_1h_mv TO `{db}`.metrics_1h AS SELECT tenant, name, \
     metric, toStartOfHour(minute) AS hour, sum(value_count) AS value_count, \
     sum(value_sum) AS value_sum, min(value_min) AS value_min, max(value_max) AS value_max, \
     quantileTDigestMergeState(value_digest) AS value_digest \
     FROM `{db}`.metrics_1m GROUP BY tenant, name, metric, hour",
];

#[derive(Debug, Clone, Serialize)]
struct Run {
    section: &'static str,
    config: String,
    repeat: usize,
    rows: usize,
    rows_per_insert: usize,
    inserts: usize,
    seconds: f64,
    rows_per_s: f64,
    /// Dev server CPU (user + system) over the inserts; None against an external server.
    server_cpu_s: Option<f64>,
    /// Dev server CPU-µs per row.
    server_cpu_us_per_row: Option<f64>,
    /// Bench process CPU over the inserts (the client side: the writer or the crate).
    client_cpu_s: f64,
    /// Active parts right after the last insert: `events` and all tables of the database.
    parts_events: u64,
    parts_total: u64,
    /// Parts the inserts wrote, merged away since or not: `events` and all tables (the sum of each
    /// table's highest block number: every inserted part takes the next one, merges take none).
    parts_written_events: u64,
    parts_written_total: u64,
    load_average_1m: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    section: &'static str,
    config: String,
    rows_per_insert: usize,
    settings: BTreeMap<String, String>,
    path: String,
    views: Vec<&'static str>,
    runs: usize,
    rows_per_s_min: f64,
    rows_per_s_median: f64,
    rows_per_s_max: f64,
    seconds_median: f64,
    server_cpu_s_median: Option<f64>,
    server_cpu_us_per_row_median: Option<f64>,
    client_cpu_s_median: f64,
    parts_events_median: f64,
    /// Parts written by the inserts into every table (raw and view targets).
    parts_written_median: f64,
    load_average_1m_min: f64,
    load_average_1m_max: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ViewCost {
    view: &'static str,
    /// Dev-server CPU seconds per run the view adds, medians: (raw table + this view alone) -
    /// (raw table alone).
    alone_minus_raw_cpu_s: Option<f64>,
    /// (all views) - (all views but this one).
    all_minus_all_but_cpu_s: Option<f64>,
    /// The mean of the two estimates / (all views - raw table alone), in CPU seconds.
    share_of_all_views_cpu: Option<f64>,
    /// The same two differences in wall seconds (noisier on a shared machine).
    alone_minus_raw_seconds: f64,
    all_minus_all_but_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    started_utc: String,
    engine_version: String,
    rows_per_run: usize,
    repeats: usize,
    default_rows_per_insert: usize,
    rowbinary_bytes_per_row: f64,
    payload_bytes_per_row: f64,
    load_average_1m_start: f64,
    load_average_1m_end: f64,
    total_seconds: f64,
    summary: Vec<Summary>,
    view_cost: Vec<ViewCost>,
    runs: Vec<Run>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} does not parse")),
        Err(_) => default,
    }
}

#[tokio::main]
async fn main() {
    let bench_started = Instant::now();
    let started_utc = utc_timestamp(unix_nanos_now() / 1_000_000_000);
    let total_rows: usize = env_or("CHUTE_BENCH_ROWS", 1_000_000);
    let repeats: usize = env_or::<usize>("CHUTE_BENCH_REPEATS", 2).max(1);
    let batch_rows: usize = env_or("CHUTE_BENCH_BATCH_ROWS", 200_000);
    let sizes: Vec<usize> = std::env::var("CHUTE_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,50000,100000,200000,500000".into())
        .split(',')
        .map(|size| {
            size.trim()
                .parse()
                .expect("CHUTE_BENCH_SIZES: rows per insert, comma separated")
        })
        .collect();
    let sections: Vec<String> = std::env::var("CHUTE_BENCH_SECTIONS")
        .unwrap_or_else(|_| "sizes,settings,views,client".into())
        .split(',')
        .map(|section| section.trim().to_owned())
        .collect();
    let load_start = load_average();

    let generating = Instant::now();
    let rows = generate(total_rows);
    let payload_bytes: usize = rows.payloads.iter().map(Bytes::len).sum();
    println!(
        "{} rows in {} messages: {} RowBinary bytes ({:.1} per row), {} payload bytes; generated in {:.1} s",
        rows.rows,
        rows.payloads.len(),
        rows.body.len(),
        rows.body.len() as f64 / rows.rows as f64,
        payload_bytes,
        generating.elapsed().as_secs_f64()
    );

    let server = ClickHouseServer::start().await;
    let server_pid = dev_server_pid();
    let admin = server.client();
    let engine_version: String = admin
        .query("SELECT version()")
        .fetch_one()
        .await
        .expect("SELECT version()");
    println!("engine {engine_version}, dev server pid {server_pid:?}, 1-min load average {load_start:.2}");

    let all_views: Vec<&'static str> = VIEWS.iter().map(|(view, _)| *view).collect();
    let mut configs: Vec<Vec<Config>> = Vec::new();
    let section = |name: &str| sections.iter().any(|wanted| wanted == name);
    // A configuration of `section` on the full schema at the default rows per insert.
    let full_schema = |section: &'static str, (name, path): (&str, Path)| Config {
        section,
        name: name.to_owned(),
        rows_per_insert: batch_rows,
        path,
        views: all_views.clone(),
        schema: Schema::Migrated,
    };
    if section("sizes") {
        configs.push(
            sizes
                .iter()
                .map(|&size| Config {
                    section: "sizes",
                    name: format!("{}k rows per insert", size / 1000),
                    rows_per_insert: size,
                    path: Path::Writer,
                    views: all_views.clone(),
                    schema: Schema::Migrated,
                })
                .collect(),
        );
    }
    if section("settings") {
        let variants: [(&str, Path); 5] = [
            (
                "writer (optimize_on_insert=0, max_insert_block_size=2000000)",
                Path::Writer,
            ),
            (
                "optimize_on_insert=1",
                Path::WriterSettings(vec![("optimize_on_insert", "1")]),
            ),
            (
                "min_insert_block_size_rows=0, _bytes=0 (no squashing)",
                Path::WriterSettings(vec![
                    ("min_insert_block_size_rows", "0"),
                    ("min_insert_block_size_bytes", "0"),
                ]),
            ),
            (
                "max_insert_block_size=65536 (squashed back by the default min_insert_block_size_rows)",
                Path::WriterSettings(vec![("max_insert_block_size", "65536")]),
            ),
            (
                "parallel_view_processing=1",
                Path::WriterSettings(vec![("parallel_view_processing", "1")]),
            ),
        ];
        configs.push(
            variants
                .into_iter()
                .map(|variant| full_schema("settings", variant))
                .collect(),
        );
    }
    if section("views") {
        let mut views = vec![
            Config {
                section: "views",
                name: "all views".into(),
                rows_per_insert: batch_rows,
                path: Path::Writer,
                views: all_views.clone(),
                schema: Schema::Migrated,
            },
            Config {
                section: "views",
                name: "raw table alone".into(),
                rows_per_insert: batch_rows,
                path: Path::Writer,
                views: Vec::new(),
                schema: Schema::Migrated,
            },
        ];
        for view in &all_views {
            views.push(Config {
                section: "views",
                name: format!("{view} alone"),
                rows_per_insert: batch_rows,
                path: Path::Writer,
                views: vec![view],
                schema: Schema::Migrated,
            });
            views.push(Config {
                section: "views",
                name: format!("all views but {view}"),
                rows_per_insert: batch_rows,
                path: Path::Writer,
                views: all_views.iter().copied().filter(|other| other != view).collect(),
                schema: Schema::Migrated,
            });
        }
        views.push(Config {
            section: "views",
            name: "raw table as ENGINE = Null (transport and parsing only)".into(),
            rows_per_insert: batch_rows,
            path: Path::Writer,
            views: Vec::new(),
            schema: Schema::NullRaw,
        });
        views.push(Config {
            section: "views",
            name: "proposal: no hour views (hours read from the minute rollups)".into(),
            rows_per_insert: batch_rows,
            path: Path::Writer,
            views: all_views
                .iter()
                .copied()
                .filter(|view| !view.ends_with("_1h_mv"))
                .collect(),
            schema: Schema::Migrated,
        });
        views.push(Config {
            section: "views",
            name: "proposal: hour views cascaded from the minute targets".into(),
            rows_per_insert: batch_rows,
            path: Path::Writer,
            views: all_views.clone(),
            schema: Schema::CascadedHours,
        });
        configs.push(views);
    }
    if section("client") {
        configs.push(
            [
                ("writer::insert_batch (pre-encoded RowBinary)", Path::Writer),
                ("clickhouse crate insert::<EventsRow>", Path::CrateTyped),
            ]
            .into_iter()
            .map(|variant| full_schema("client", variant))
            .collect(),
        );
    }

    let mut runs: Vec<(Config, Run)> = Vec::new();
    let mut database_index = 0;
    for section_configs in &configs {
        println!("\n== {} ==", section_configs[0].section);
        for repeat in 0..repeats {
            for config in section_configs {
                database_index += 1;
                let database = format!("insert_shape_{database_index}");
                let run = run_once(&server, server_pid, &database, &rows, config, repeat).await;
                println!(
                    "{:<90} run {}: {:>9.0} rows/s  {:>6.2} s  server CPU {:>6} s  client CPU {:.2} s  parts written {} (events {})  load {:.2}",
                    config.name,
                    repeat + 1,
                    run.rows_per_s,
                    run.seconds,
                    run.server_cpu_s.map_or("-".into(), |cpu| format!("{cpu:.2}")),
                    run.client_cpu_s,
                    run.parts_written_total,
                    run.parts_written_events,
                    run.load_average_1m,
                );
                runs.push((config.clone(), run));
            }
        }
    }

    let summary = summarise(&configs, &runs);
    let view_cost = view_costs(&summary);
    print_tables(&summary, &view_cost);

    let report = Report {
        bench: "insert_shape",
        started_utc: started_utc.clone(),
        engine_version,
        rows_per_run: rows.rows,
        repeats,
        default_rows_per_insert: batch_rows,
        rowbinary_bytes_per_row: rows.body.len() as f64 / rows.rows as f64,
        payload_bytes_per_row: payload_bytes as f64 / rows.rows as f64,
        load_average_1m_start: load_start,
        load_average_1m_end: load_average(),
        total_seconds: bench_started.elapsed().as_secs_f64(),
        summary,
        view_cost,
        runs: runs.into_iter().map(|(_, run)| run).collect(),
    };
    let out = std::env::var("CHUTE_BENCH_OUT").unwrap_or_else(|_| {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the aggregator crate sits in the workspace");
        format!(
            "{}/bench/results/insert-shape-{}.json",
            workspace.display(),
            started_utc.replace(':', "-")
        )
    });
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    std::fs::write(&out, json + "\n").unwrap_or_else(|err| panic!("write {out}: {err}"));
    println!(
        "\nwrote {out} ({:.0} s in all; 1-min load average {:.2} -> {:.2})",
        report.total_seconds, report.load_average_1m_start, report.load_average_1m_end
    );
}

/// One run: a fresh database with the full schema minus the views `config` leaves out, every
/// row inserted, the content checked, the database dropped.
async fn run_once(
    server: &ClickHouseServer,
    server_pid: Option<u32>,
    database: &str,
    rows: &Rows,
    config: &Config,
    repeat: usize,
) -> Run {
    let admin = server.client();
    execute(&admin, &format!("DROP DATABASE IF EXISTS `{database}`")).await;
    let client = server.migrate(database).await;
    for (view, _) in VIEWS.iter().filter(|(view, _)| !config.views.contains(view)) {
        execute(&admin, &format!("DROP VIEW `{database}`.`{view}`")).await;
    }
    match config.schema {
        Schema::Migrated => {}
        Schema::NullRaw => {
            debug_assert!(config.views.is_empty());
            for sql in [
                format!("RENAME TABLE `{database}`.events TO `{database}`.events_stored"),
                format!("CREATE TABLE `{database}`.events AS `{database}`.events_stored ENGINE = Null"),
            ] {
                execute(&admin, &sql).await;
            }
        }
        Schema::CascadedHours => {
            for view in ["events_1h_mv", "metrics_1h_mv"] {
                execute(&admin, &format!("DROP VIEW IF EXISTS `{database}`.{view}")).await;
            }
            for sql in CASCADED_HOUR_VIEWS {
                execute(&admin, &sql.replace("{db}", database)).await;
            }
        }
    }
    let inserts = rows.inserts(config.rows_per_insert);
    // The typed rows are built before the clock starts; serialising them is part of the insert.
    let typed: Vec<Vec<EventsRow>> = match config.path {
        Path::CrateTyped => inserts
            .iter()
            .map(|(_, _, messages)| {
                rows.payloads[messages.clone()]
                    .iter()
                    .flat_map(|payload| {
                        chute_aggregator::row::reference::rows(payload, &Limits::default())
                            .expect("valid payload")
                            .0
                    })
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };

    let server_cpu_before = server_pid.and_then(process_cpu_seconds);
    let client_cpu_before = process_cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    for (index, (body, row_count, _)) in inserts.iter().enumerate() {
        let token = format!("insert-shape:{database}:{index}");
        match &config.path {
            Path::Writer => chute_aggregator::writer::insert_batch(&client, body.clone(), *row_count, &token)
                .await
                .unwrap_or_else(|err| panic!("{}: insert {index}: {err}", config.name)),
            Path::WriterSettings(overrides) => insert_with_settings(&client, body.clone(), &token, overrides)
                .await
                .unwrap_or_else(|err| panic!("{}: insert {index}: {err}", config.name)),
            Path::CrateTyped => insert_typed(&client, &typed[index], &token)
                .await
                .unwrap_or_else(|err| panic!("{}: insert {index}: {err}", config.name)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu_s = process_cpu_seconds(std::process::id()).unwrap_or(0.0) - client_cpu_before;
    let server_cpu_s = match (server_cpu_before, server_pid.and_then(process_cpu_seconds)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let load_average_1m = load_average();
    let parts_events = active_parts(&admin, database, Some("events")).await;
    let parts_total = active_parts(&admin, database, None).await;
    let parts_written_events = parts_written(&admin, database, Some("events")).await;
    let parts_written_total = parts_written(&admin, database, None).await;
    check_content(&client, rows.rows, config).await;
    execute(&admin, &format!("DROP DATABASE `{database}` SYNC")).await;
    Run {
        section: config.section,
        config: config.name.clone(),
        repeat: repeat + 1,
        rows: rows.rows,
        rows_per_insert: config.rows_per_insert,
        inserts: inserts.len(),
        seconds,
        rows_per_s: rows.rows as f64 / seconds,
        server_cpu_s,
        server_cpu_us_per_row: server_cpu_s.map(|cpu| cpu * 1e6 / rows.rows as f64),
        client_cpu_s,
        parts_events,
        parts_total,
        parts_written_events,
        parts_written_total,
        load_average_1m,
    }
}

/// The writer's insert (statement, settings, 256 KiB sends) with `overrides` applied.
async fn insert_with_settings(
    client: &clickhouse::Client,
    body: Bytes,
    token: &str,
    overrides: &[(&str, &str)],
) -> clickhouse::error::Result<()> {
    let mut settings: BTreeMap<&str, &str> = WRITER_SETTINGS.into_iter().collect();
    settings.insert("insert_deduplication_token", token);
    settings.extend(overrides.iter().copied());
    let mut insert = client.insert_formatted_with(chute_aggregator::writer::insert_statement());
    for (name, value) in settings {
        insert = insert.with_setting(name, value);
    }
    for offset in (0..body.len()).step_by(256 * 1024) {
        insert
            .send(body.slice(offset..body.len().min(offset + 256 * 1024)))
            .await?;
    }
    insert.end().await
}

/// The `clickhouse` crate's typed insert with the writer's settings.
async fn insert_typed(client: &clickhouse::Client, rows: &[EventsRow], token: &str) -> clickhouse::error::Result<()> {
    let mut insert = client.insert::<EventsRow>("events").await?;
    for (name, value) in WRITER_SETTINGS {
        insert = insert.with_setting(name, value);
    }
    insert = insert.with_setting("insert_deduplication_token", token);
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// The inserts stored every row once, and every attached view saw them all (a dropped insert,
/// a view that threw, or a dedup token that matched by mistake fails the bench).
async fn check_content(client: &clickhouse::Client, rows: usize, config: &Config) {
    let rows = rows as u64;
    let count = |sql: &'static str| async move {
        client
            .query(sql)
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    };
    let stored = if config.schema == Schema::NullRaw { 0 } else { rows };
    assert_eq!(
        count("SELECT count() FROM events").await,
        stored,
        "{}: raw rows",
        config.name
    );
    let metrics = METRICS.len() as u64;
    let expected: [(&str, &'static str, u64); 5] = [
        ("events_1m_mv", "SELECT toUInt64(sum(event_count)) FROM events_1m", rows),
        (
            "metrics_1m_mv",
            "SELECT toUInt64(sum(value_count)) FROM metrics_1m",
            rows * metrics,
        ),
        ("events_1h_mv", "SELECT toUInt64(sum(event_count)) FROM events_1h", rows),
        (
            "metrics_1h_mv",
            "SELECT toUInt64(sum(value_count)) FROM metrics_1h",
            rows * metrics,
        ),
        ("sessions_mv", "SELECT toUInt64(sum(event_count)) FROM sessions", rows),
    ];
    for (view, sql, want) in expected {
        let want = if config.views.contains(&view) { want } else { 0 };
        assert_eq!(count(sql).await, want, "{}: {view}'s target", config.name);
    }
}

async fn execute(client: &clickhouse::Client, sql: &str) {
    client
        .query(sql)
        .execute()
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

/// Active parts of `database` (of `table` only, if given).
async fn active_parts(client: &clickhouse::Client, database: &str, table: Option<&str>) -> u64 {
    parts_query(
        client,
        "SELECT count() FROM system.parts WHERE database = ? AND (? = '' OR table = ?) AND active",
        database,
        table,
    )
    .await
}

/// Parts inserted into `database` (into `table` only, if given) since it was created: each
/// table's highest block number, summed (the migration ledger's own parts left out).
async fn parts_written(client: &clickhouse::Client, database: &str, table: Option<&str>) -> u64 {
    parts_query(
        client,
        "SELECT toUInt64(sum(highest)) FROM (SELECT table, max(max_block_number) AS highest \
         FROM system.parts WHERE database = ? AND (? = '' OR table = ?) AND active \
         AND table != 'schema_migrations' GROUP BY table)",
        database,
        table,
    )
    .await
}

/// A `system.parts` count with `?` bound to the database and twice to the table ("" = all).
async fn parts_query(client: &clickhouse::Client, sql: &str, database: &str, table: Option<&str>) -> u64 {
    client
        .query(sql)
        .bind(database)
        .bind(table.unwrap_or(""))
        .bind(table.unwrap_or(""))
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|err| panic!("system.parts of {database}: {err}"))
}

fn summarise(configs: &[Vec<Config>], runs: &[(Config, Run)]) -> Vec<Summary> {
    let mut summary = Vec::new();
    for config in configs.iter().flatten() {
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|(c, _)| c.section == config.section && c.name == config.name)
            .map(|(_, run)| run)
            .collect();
        let pick = |value: fn(&Run) -> f64| median(mine.iter().map(|run| value(run)).collect());
        let rates: Vec<f64> = mine.iter().map(|run| run.rows_per_s).collect();
        let loads: Vec<f64> = mine.iter().map(|run| run.load_average_1m).collect();
        let server_cpu: Option<Vec<f64>> = mine.iter().map(|run| run.server_cpu_s).collect();
        let mut settings: BTreeMap<String, String> = WRITER_SETTINGS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        if let Path::WriterSettings(overrides) = &config.path {
            for (name, value) in overrides {
                settings.insert((*name).to_owned(), (*value).to_owned());
            }
        }
        summary.push(Summary {
            section: config.section,
            config: config.name.clone(),
            rows_per_insert: config.rows_per_insert,
            settings,
            path: format!("{:?}", config.path)
                .split('(')
                .next()
                .unwrap_or_default()
                .to_owned(),
            views: config.views.clone(),
            runs: mine.len(),
            rows_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
            rows_per_s_median: median(rates.clone()),
            rows_per_s_max: rates.iter().copied().fold(0.0, f64::max),
            seconds_median: pick(|run| run.seconds),
            server_cpu_s_median: server_cpu.clone().map(median),
            server_cpu_us_per_row_median: server_cpu.map(|cpu| median(cpu) * 1e6 / mine[0].rows as f64),
            client_cpu_s_median: pick(|run| run.client_cpu_s),
            parts_events_median: pick(|run| run.parts_events as f64),
            parts_written_median: pick(|run| run.parts_written_total as f64),
            load_average_1m_min: loads.iter().copied().fold(f64::INFINITY, f64::min),
            load_average_1m_max: loads.iter().copied().fold(0.0, f64::max),
        });
    }
    summary
}

/// Each view's cost from the `views` section: (view alone) - (raw table alone).
fn view_costs(summary: &[Summary]) -> Vec<ViewCost> {
    let find = |name: &str| summary.iter().find(|row| row.section == "views" && row.config == name);
    let (Some(all), Some(raw)) = (find("all views"), find("raw table alone")) else {
        return Vec::new();
    };
    let cpu_difference =
        |a: &Summary, b: &Summary| a.server_cpu_s_median.zip(b.server_cpu_s_median).map(|(a, b)| a - b);
    let all_views_cpu = cpu_difference(all, raw);
    VIEWS
        .iter()
        .filter_map(|(view, _)| {
            let alone = find(&format!("{view} alone"))?;
            let all_but = find(&format!("all views but {view}"))?;
            let alone_minus_raw_cpu_s = cpu_difference(alone, raw);
            let all_minus_all_but_cpu_s = cpu_difference(all, all_but);
            Some(ViewCost {
                view,
                alone_minus_raw_cpu_s,
                all_minus_all_but_cpu_s,
                share_of_all_views_cpu: alone_minus_raw_cpu_s
                    .zip(all_minus_all_but_cpu_s)
                    .zip(all_views_cpu)
                    .map(|((a, b), all)| (a + b) / 2.0 / all),
                alone_minus_raw_seconds: alone.seconds_median - raw.seconds_median,
                all_minus_all_but_seconds: all.seconds_median - all_but.seconds_median,
            })
        })
        .collect()
}

fn print_tables(summary: &[Summary], view_cost: &[ViewCost]) {
    println!("\n| section | configuration | rows/insert | rows/s min | rows/s median | s median | server CPU-s median | server CPU-µs/row | parts written (all tables) | load 1m |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in summary {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.0} | {:.1}-{:.1} |",
            row.section,
            row.config,
            row.rows_per_insert,
            row.rows_per_s_min,
            row.rows_per_s_median,
            row.seconds_median,
            row.server_cpu_s_median.map_or("-".into(), |cpu| format!("{cpu:.2}")),
            row.server_cpu_us_per_row_median
                .map_or("-".into(), |cpu| format!("{cpu:.2}")),
            row.parts_written_median,
            row.load_average_1m_min,
            row.load_average_1m_max,
        );
    }
    if !view_cost.is_empty() {
        println!("\n| view | + server CPU-s: alone - raw table alone | + server CPU-s: all - all but it | share of all views (CPU) | + wall s: alone - raw / all - all but |");
        println!("|---|---|---|---|---|");
        let cpu = |value: Option<f64>| value.map_or("-".into(), |cpu| format!("{cpu:.2}"));
        for cost in view_cost {
            println!(
                "| {} | {} | {} | {} | {:.2} / {:.2} |",
                cost.view,
                cpu(cost.alone_minus_raw_cpu_s),
                cpu(cost.all_minus_all_but_cpu_s),
                cost.share_of_all_views_cpu
                    .map_or("-".into(), |share| format!("{:.0} %", share * 100.0)),
                cost.alone_minus_raw_seconds,
                cost.all_minus_all_but_seconds,
            );
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// The dev server this process started: its child running `chserver.py`.
fn dev_server_pid() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let parent: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (parent == me && String::from_utf8_lossy(&cmdline).contains("chserver")).then_some(pid)
    })
}

/// utime + stime of every thread of `pid`, seconds.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// `getconf CLK_TCK` (100 on Linux unless the kernel says otherwise).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time (civil-from-days, proleptic Gregorian).
fn utc_timestamp(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let seconds = unix_seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

//! Aggregator throughput alone: drain a pre-filled EVENTS stream into ClickHouse, against the
//! raw ceiling (the same rows bulk-inserted straight into the same schema) measured in the same
//! run, for a sweep of batch sizes and lingers. Also counts inserts and the parts they left.
//!
//! `cargo bench -p chute-aggregator --bench drain` (env `CHUTE_BENCH_EVENTS`, default 400000).
//! Starts its own nats-server and ClickHouse dev server on free loopback ports.
//!
//! `CHUTE_BENCH_RSS=1`: instead of the sweep, drain the backlog with the `aggregator` binary at
//! its default settings (plus the flags in `CHUTE_BENCH_AGGREGATOR_ARGS`) and report its peak
//! RSS (`VmHWM`), the payload bytes drained and the 1-minute load average.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use chute_aggregator::consumer::PartitionMessage;
use chute_common::stream::{ensure_events_stream, events_subject, StreamSettings};
use chute_common::testing::nats::NatsServer;
use chute_common::validate::{timestamp_from_nanos, Limits};
use chute_proto::v1::{Event, EventBatch};
use chute_schema::testing::ClickHouseServer;
use prost::Message;
use tokio_util::sync::CancellationToken;

const EVENTS_PER_MESSAGE: usize = 500;

fn message(index: usize, now: i64) -> EventBatch {
    let events = (0..EVENTS_PER_MESSAGE)
        .map(|i| {
            let n = index * EVENTS_PER_MESSAGE + i;
            Event {
                event_id: uuid::Uuid::new_v4().to_string(),
                tenant: format!("tenant-{}", n % 4),
                name: ["llm.request", "llm.response", "tool.call"][n % 3].into(),
                time: Some(timestamp_from_nanos(now - (n % 3600) as i64 * 1_000_000_000)),
                session_id: format!("conv-{}", n % 5000),
                user_id: format!("user-{}", n % 1000),
                attributes: [("model", "chute-large"), ("region", "eu-west-1")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                metrics: [
                    ("tokens_in", (n % 900) as f64),
                    ("latency_ms", (n % 250) as f64),
                    ("cost_usd", 0.002),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
                body: String::new(),
            }
        })
        .collect();
    EventBatch {
        version: chute_proto::BATCH_VERSION,
        received_unix_nanos: now,
        events,
        ..Default::default()
    }
}

async fn count(client: &clickhouse::Client) -> u64 {
    client
        .query("SELECT count() FROM events")
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

async fn parts(client: &clickhouse::Client, database: &str) -> u64 {
    client
        .query("SELECT count() FROM system.parts WHERE database = ?")
        .bind(database)
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let total_events: usize = std::env::var("CHUTE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let messages = total_events / EVENTS_PER_MESSAGE;
    let total_events = messages * EVENTS_PER_MESSAGE;
    let nats = NatsServer::start();
    let clickhouse = ClickHouseServer::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    ensure_events_stream(&js, &StreamSettings::default()).await.unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;

    let mut encoded = Vec::with_capacity(messages);
    for index in 0..messages {
        let payload = bytes::Bytes::from(message(index, now).encode_to_vec());
        let partition = (index % 16) as u32;
        js.publish(events_subject(partition), payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        encoded.push(PartitionMessage::new(partition, 0, index as u64 + 1, 0, payload));
    }
    let payload_bytes: usize = encoded.iter().map(|message| message.payload.len()).sum();
    println!("pre-filled EVENTS with {total_events} events in {messages} messages ({payload_bytes} payload bytes)");
    if std::env::var_os("CHUTE_BENCH_RSS").is_some() {
        // What `--batch-max-bytes` counts (payload) against what is inserted (RowBinary).
        let rowbinary = chute_aggregator::row::encode(encoded, &Limits::default()).rows.len();
        println!(
            "RowBinary {rowbinary} bytes = {:.3} x payload",
            rowbinary as f64 / payload_bytes as f64
        );
        let database = "rss";
        clickhouse.migrate(database).await;
        drain_with_binary(&nats.url(), &clickhouse.url(), database, total_events).await;
        return;
    }

    // The ceiling: the same rows, bulk RowBinary (LZ4) into the same schema, no pipeline.
    let encoded = chute_aggregator::row::encode(encoded, &Limits::default());
    clickhouse.migrate("ceiling").await;
    let ceiling_db = clickhouse.client().with_database("ceiling");
    let started = Instant::now();
    // 200k-row blocks: whole messages of EVENTS_PER_MESSAGE rows each.
    for (index, block) in encoded.valid.chunks(200_000 / EVENTS_PER_MESSAGE).enumerate() {
        let rows = encoded.rows.slice(block[0].rows.start..block[block.len() - 1].rows.end);
        let count = block.iter().map(|message| message.events).sum();
        chute_aggregator::writer::insert_batch(&ceiling_db, rows, count, &format!("ceiling-{index}"))
            .await
            .unwrap();
    }
    let ceiling = total_events as f64 / started.elapsed().as_secs_f64();
    println!("raw ceiling (bulk RowBinary insert, 200k-row blocks): {ceiling:.0} rows/s");
    drop(encoded);

    println!("\n| batch_max_rows | linger | drain events/s | ratio to ceiling | inserts | parts left |");
    println!("|---|---|---|---|---|---|");
    for (index, (max_rows, linger_ms)) in [(50_000usize, 100u64), (200_000, 200), (200_000, 500)]
        .into_iter()
        .enumerate()
    {
        let database = format!("sweep{index}");
        clickhouse.migrate(&database).await;
        let db = clickhouse.client().with_database(&database);
        let config = chute_aggregator::Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            clickhouse_url: clickhouse.url(),
            clickhouse_login: chute_common::config::ClickHouseLoginArgs::for_database(database.clone()),
            ledger_bucket: format!("bench_ledger_{index}"),
            batch_max_rows: max_rows,
            batch_linger: Duration::from_millis(linger_ms),
            ..Default::default()
        };
        let committed_before = committed_batches();
        let shutdown = CancellationToken::new();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let task = tokio::spawn(chute_aggregator::run(admin, config, shutdown.clone()));
        while count(&db).await < total_events as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed();
        shutdown.cancel();
        task.await.unwrap().unwrap();
        let rate = total_events as f64 / elapsed.as_secs_f64();
        let inserts = committed_batches() - committed_before;
        println!(
            "| {max_rows} | {linger_ms} ms | {rate:.0} | {:.2} | {inserts} | {} |",
            rate / ceiling,
            parts(&clickhouse.client(), &database).await
        );
    }
}

/// Drains the backlog with the `aggregator` binary and prints its VmHWM just before SIGTERM.
async fn drain_with_binary(nats_url: &str, clickhouse_url: &str, database: &str, total_events: usize) {
    let extra = std::env::var("CHUTE_BENCH_AGGREGATOR_ARGS").unwrap_or_default();
    let admin = format!("127.0.0.1:{}", chute_common::testing::free_port());
    let mut child = chute_common::testing::service_command(env!("CARGO_BIN_EXE_aggregator"))
        .args(["--nats-url", nats_url, "--clickhouse-url", clickhouse_url])
        .args([
            "--clickhouse-database",
            database,
            "--admin-listen",
            &admin,
            "--log",
            "warn",
        ])
        .args(extra.split_whitespace())
        .kill_on_drop(true)
        .spawn()
        .expect("start the aggregator binary");
    let pid = child.id().expect("running");
    let client = clickhouse::Client::default()
        .with_url(clickhouse_url)
        .with_database(database);
    let started = Instant::now();
    let mut load_samples = Vec::new();
    while count(&client).await < total_events as u64 {
        load_samples.push(load_average());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
            .unwrap_or_default()
    };
    let peak_load = load_samples.iter().copied().fold(0.0f64, f64::max);
    println!(
        "aggregator binary [{extra}]: drained {total_events} events in {:.1} s ({:.0} events/s); \
         VmHWM {}, VmRSS at the end {}; 1-min load average {:.2} at the end, {peak_load:.2} peak",
        elapsed.as_secs_f64(),
        total_events as f64 / elapsed.as_secs_f64(),
        field("VmHWM:"),
        field("VmRSS:"),
        load_average(),
    );
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let _ = child.wait().await;
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Batches committed so far, from this process's Prometheus recorder.
fn committed_batches() -> u64 {
    let text = chute_common::telemetry::prometheus_handle().render();
    text.lines()
        .find(|line| line.starts_with("chute_aggregator_batches_committed_total"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

//! A whole pipeline for one test: nats-server, ClickHouse dev server with the schema applied in
//! a database named after the test, an in-process ingestor, and aggregator processes.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use chute_common::testing::http_get;
use chute_common::testing::nats::NatsServer;
use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::{Event, PublishRequest};
use chute_schema::testing::ClickHouseServer;
use tokio_util::sync::CancellationToken;

pub struct Stack {
    pub nats: NatsServer,
    pub clickhouse: ClickHouseServer,
    pub database: String,
    pub grpc: String,
    shutdown: CancellationToken,
}

impl Stack {
    pub async fn start(database: &str) -> Self {
        Self::start_with_ingestor(database, |_| {}).await
    }

    pub fn db(&self) -> clickhouse::Client {
        self.clickhouse.client().with_database(&self.database)
    }

    /// Starts an aggregator process with a short lease (fast takeovers in tests).
    pub fn aggregator(&self, extra: &[&str]) -> Aggregator {
        spawn_aggregator(&self.nats.url(), &self.clickhouse.url(), &self.database, extra)
    }

    pub async fn client(&self) -> IngestServiceClient<tonic::transport::Channel> {
        IngestServiceClient::connect(self.grpc.clone()).await.unwrap()
    }

    /// One u64 from a scalar query.
    pub async fn scalar(&self, sql: &str) -> u64 {
        scalar(&self.db(), sql).await
    }

    /// One f64 from a scalar query.
    pub async fn scalar_f64(&self, sql: &str) -> f64 {
        scalar_f64(&self.db(), sql).await
    }

    /// Waits until `events` holds `expected` distinct events (or panics after `timeout`).
    pub async fn wait_for_events(&self, expected: u64, timeout: Duration) {
        wait_for_events(&self.db(), expected, timeout).await
    }

    /// Exact totals in raw and every rollup must equal what the ingestor acknowledged.
    pub async fn assert_exact(&self, acked: &Acked) {
        assert_exact(&self.db(), acked).await
    }
}

/// One u64 from a scalar query.
pub async fn scalar(db: &clickhouse::Client, sql: &str) -> u64 {
    db.query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

/// One f64 from a scalar query.
pub async fn scalar_f64(db: &clickhouse::Client, sql: &str) -> f64 {
    db.query(sql)
        .fetch_one::<f64>()
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

/// Waits until `events` holds `expected` distinct events (or panics after `timeout`).
pub async fn wait_for_events(db: &clickhouse::Client, expected: u64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let count = scalar(db, "SELECT count() FROM events FINAL").await;
        if count >= expected {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "only {count} of {expected} events arrived within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exact totals in raw and every rollup must equal what the ingestor acknowledged.
pub async fn assert_exact(db: &clickhouse::Client, acked: &Acked) {
    let events = acked.events.load(Ordering::SeqCst);
    // An insert makes its raw part visible before its views are written: wait (bounded) until
    // every table has reached the acknowledged count. Counts only grow, so a double count
    // never goes away and still fails below; this only waits out the insert in progress.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let least = scalar(
            db,
            "SELECT assumeNotNull(least(
                        (SELECT count() FROM events),
                        (SELECT toUInt64(sum(events)) FROM events_1m_v),
                        (SELECT toUInt64(sum(events)) FROM events_1h_v),
                        (SELECT toUInt64(sum(count)) FROM metrics_1m_v WHERE metric = 'cost'),
                        (SELECT toUInt64(sum(count)) FROM metrics_1h_v WHERE metric = 'cost'),
                        (SELECT toUInt64(sum(events)) FROM sessions_v)))",
        )
        .await;
        if least >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cost = acked.cost_millis.load(Ordering::SeqCst);
    let sessions = acked.sessions.load(Ordering::SeqCst);
    assert_eq!(
        scalar(db, "SELECT count() FROM events FINAL").await,
        events,
        "raw FINAL count"
    );
    assert_eq!(
        scalar(db, "SELECT count() FROM events").await,
        events,
        "raw plain count (no duplicate row at all)"
    );
    assert_eq!(
        scalar(db, "SELECT toUInt64(sum(events)) FROM events_1m_v").await,
        events,
        "events_1m"
    );
    assert_eq!(
        scalar(db, "SELECT toUInt64(sum(events)) FROM events_1h_v").await,
        events,
        "events_1h"
    );
    assert_eq!(
        scalar(
            db,
            "SELECT toUInt64(sum(count)) FROM metrics_1m_v WHERE metric = 'cost'"
        )
        .await,
        events,
        "metrics_1m count"
    );
    assert_eq!(
        scalar(
            db,
            "SELECT toUInt64(sum(count)) FROM metrics_1h_v WHERE metric = 'cost'"
        )
        .await,
        events,
        "metrics_1h count"
    );
    let expected_cost = cost as f64 / 1000.0;
    for table in ["metrics_1m_v", "metrics_1h_v"] {
        let sum = scalar_f64(db, &format!("SELECT sum(sum) FROM {table} WHERE metric = 'cost'")).await;
        assert!(
            (sum - expected_cost).abs() < 1e-6 * expected_cost.max(1.0),
            "{table} cost sum {sum} != {expected_cost}"
        );
    }
    assert_eq!(
        scalar(db, "SELECT toUInt64(sum(events)) FROM sessions_v").await,
        events,
        "sessions events"
    );
    assert_eq!(
        scalar(db, "SELECT count() FROM sessions_v").await,
        sessions,
        "sessions count"
    );
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the ingestor acknowledged.
#[derive(Default)]
pub struct Acked {
    pub events: AtomicU64,
    /// Sum of the `cost` metric in thousandths (integers keep the comparison exact).
    pub cost_millis: AtomicU64,
    pub sessions: AtomicU64,
}

/// A request of `n` events, each in its own session `"<key>-<i>"`, with `cost` = (i % 7) / 1000.
pub fn request(key: &str, n: usize) -> (PublishRequest, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let mut cost = 0;
    let events = (0..n)
        .map(|i| {
            cost += (i % 7) as u64;
            Event {
                tenant: "acme".into(),
                name: format!("llm.{}", ["request", "tool"][i % 2]),
                time: Some(chute_common::validate::timestamp_from_nanos(now)),
                session_id: format!("{key}-{i}"),
                user_id: format!("user-{}", i % 13),
                metrics: [
                    ("cost".to_string(), (i % 7) as f64 / 1000.0),
                    ("tokens".to_string(), i as f64),
                ]
                .into(),
                attributes: [("model".to_string(), "m".to_string())].into(),
                ..Default::default()
            }
        })
        .collect();
    (
        PublishRequest {
            events,
            idempotency_key: key.to_owned(),
        },
        cost,
    )
}

/// How long the loader retries one request before the test fails (no test may hang on an
/// ingestor that refuses everything).
const PUBLISH_RETRY_LIMIT: Duration = Duration::from_secs(90);

/// Publishes requests until `stop`, retrying each (same key) until acknowledged, and counts
/// what was acknowledged. Panics when one request stays refused for [`PUBLISH_RETRY_LIMIT`].
pub async fn load(grpc: String, prefix: String, per_request: usize, acked: Arc<Acked>, stop: CancellationToken) {
    let mut client = IngestServiceClient::connect(grpc).await.unwrap();
    let mut i = 0u64;
    while !stop.is_cancelled() {
        let (request, cost) = request(&format!("{prefix}-{i}"), per_request);
        let first_try = Instant::now();
        loop {
            match client.publish(request.clone()).await {
                Ok(response) => {
                    assert_eq!(response.into_inner().accepted as usize, per_request);
                    break;
                }
                Err(status) if first_try.elapsed() < PUBLISH_RETRY_LIMIT => {
                    tracing::warn!(?status, "publish failed; retrying with the same key");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{prefix}-{i} refused for {PUBLISH_RETRY_LIMIT:?}: {status:?}"),
            }
        }
        acked.events.fetch_add(per_request as u64, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(per_request as u64, Ordering::SeqCst);
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts an aggregator process against `nats_url` (one URL or a comma-separated list) with a
/// short lease (fast takeovers in tests); its log goes to the temp dir, named after `database`.
pub fn spawn_aggregator(nats_url: &str, clickhouse_url: &str, database: &str, extra: &[&str]) -> Aggregator {
    spawn_aggregator_logged(
        nats_url,
        clickhouse_url,
        database,
        extra,
        &format!("{database}-aggregator"),
    )
}

/// [`spawn_aggregator`] logging to `chute-it-<log_name>.log` in the temp dir.
pub fn spawn_aggregator_logged(
    nats_url: &str,
    clickhouse_url: &str,
    database: &str,
    extra: &[&str],
    log_name: &str,
) -> Aggregator {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join(format!("chute-it-{log_name}.log")))
        .unwrap();
    let admin = format!("127.0.0.1:{}", chute_common::testing::free_port());
    let child = chute_common::testing::service_command(env!("CARGO_BIN_EXE_aggregator"))
        .args(["--nats-url", nats_url, "--clickhouse-url", clickhouse_url])
        .args(["--clickhouse-database", database, "--admin-listen", &admin])
        .args(["--lease-ttl", "3s", "--log", "info,chute_aggregator=debug"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the aggregator binary");
    Aggregator { child, admin }
}

/// A running aggregator process and its admin address.
pub type Aggregator = chute_common::testing::ServiceProcess;

// Stream trimming (tests/it/trim.rs): a stack with a custom ingestor, and the EVENTS stream's
// state as NATS reports it.

impl Stack {
    /// Like [`Stack::start`], with the ingestor's configuration adjusted by `configure` (e.g. a
    /// small `stream_max_bytes`, set when the ingestor creates the stream).
    pub async fn start_with_ingestor(database: &str, configure: impl FnOnce(&mut chute_ingestor::Config)) -> Self {
        Self::start_with_nats(database, NatsServer::start(), configure).await
    }

    /// Like [`Stack::start_with_ingestor`], on the given nats-server (e.g. one with users; then
    /// `configure` sets the ingestor's credentials).
    pub async fn start_with_nats(
        database: &str,
        nats: NatsServer,
        configure: impl FnOnce(&mut chute_ingestor::Config),
    ) -> Self {
        let clickhouse = ClickHouseServer::start().await;
        clickhouse.migrate(database).await;
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = format!("http://{}", grpc_listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let mut config = chute_ingestor::Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            ..Default::default()
        };
        configure(&mut config);
        tokio::spawn(chute_ingestor::run(
            grpc_listener,
            admin_listener,
            config,
            shutdown.clone(),
        ));
        let stack = Self {
            nats,
            clickhouse,
            database: database.to_owned(),
            grpc,
            shutdown,
        };
        for _ in 0..200 {
            if IngestServiceClient::connect(stack.grpc.clone()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        stack
    }

    /// A handle on the `EVENTS` stream (its own NATS connection), once the ingestor created it:
    /// `get_info()` reports bytes, messages, sequences and config as NATS sees them.
    pub async fn events_stream(&self) -> async_nats::jetstream::stream::Stream {
        let client = async_nats::connect(self.nats.url()).await.expect("connect to nats");
        let js = async_nats::jetstream::new(client);
        let started = Instant::now();
        loop {
            match js.get_stream(chute_common::stream::EVENTS_STREAM).await {
                Ok(stream) => return stream,
                Err(err) if started.elapsed() > Duration::from_secs(10) => panic!("no EVENTS stream: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Runs an `aggregator` subcommand (`dlq list`, `ledger reset ...`) against the stack, as an
/// operator would; asserts it succeeded and returns its standard output.
pub async fn cli(stack: &Stack, args: &[&str]) -> String {
    let output = chute_common::testing::service_command(env!("CARGO_BIN_EXE_aggregator"))
        .args([
            "--nats-url",
            &stack.nats.url(),
            "--clickhouse-url",
            &stack.clickhouse.url(),
        ])
        .args(["--clickhouse-database", &stack.database, "--log", "warn"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "aggregator {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

//! A pipeline for one router test: nats-server, the ClickHouse dev server with the schema in a
//! database named after the test, an in-process ingestor and aggregator, and router processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
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
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Stack {
    /// nats-server, ClickHouse with the schema, an ingestor and (with `aggregator`) an aggregator,
    /// all but the router in this process.
    pub async fn start(database: &str, aggregator: bool) -> Self {
        let nats = NatsServer::start();
        let clickhouse = ClickHouseServer::start().await;
        clickhouse.migrate(database).await;
        let shutdown = CancellationToken::new();
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = format!("http://{}", grpc_listener.local_addr().unwrap());
        let config = chute_ingestor::Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            ..Default::default()
        };
        tokio::spawn(chute_ingestor::run(
            grpc_listener,
            admin_listener,
            config,
            shutdown.clone(),
        ));
        for _ in 0..200 {
            if IngestServiceClient::connect(grpc.clone()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if aggregator {
            let args = [
                "aggregator",
                "--nats-url",
                &nats.url(),
                "--clickhouse-url",
                &clickhouse.url(),
                "--clickhouse-database",
                database,
                "--batch-linger",
                "50ms",
            ];
            let chute_aggregator::config::Cli { config, .. } =
                chute_common::config::load_str(&args[1..], &[]).expect("aggregator config");
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tokio::spawn(chute_aggregator::run(admin, config, shutdown.clone()));
        }
        Self {
            nats,
            clickhouse,
            database: database.to_owned(),
            grpc,
            dir: tempfile::tempdir().unwrap(),
            shutdown,
        }
    }

    pub fn db(&self) -> clickhouse::Client {
        self.clickhouse.client().with_database(&self.database)
    }

    pub async fn scalar(&self, sql: &str) -> u64 {
        self.db()
            .query(sql)
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.nats.url()).await.expect("connect to nats"))
    }

    /// Writes `rules` as the rules file and returns its path.
    pub fn rules_file(&self, rules: &str) -> PathBuf {
        let path = self.dir.path().join("rules.yaml");
        std::fs::write(&path, rules).unwrap();
        path
    }

    /// Starts a router process with `rules` (a path) and `extra` flags.
    pub fn router(&self, rules: &Path, env: &[(&str, &str)], extra: &[&str]) -> Router {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::env::temp_dir().join(format!("chute-it-{}-router.log", self.database)))
            .unwrap();
        let admin = format!("127.0.0.1:{}", chute_common::testing::free_port());
        let child = chute_common::testing::service_command(env!("CARGO_BIN_EXE_router"))
            .args([
                "--nats-url",
                &self.nats.url(),
                "--clickhouse-url",
                &self.clickhouse.url(),
            ])
            .args(["--clickhouse-database", &self.database, "--admin-listen", &admin])
            .args([
                "--rules-file",
                rules.to_str().unwrap(),
                "--log",
                "info,chute_router=debug",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the router binary");
        Router { child, admin }
    }

    /// Publishes `events` in one request with `key`; panics unless all are accepted.
    pub async fn publish(
        &self,
        client: &mut IngestServiceClient<tonic::transport::Channel>,
        key: &str,
        events: Vec<Event>,
    ) {
        let count = events.len() as u32;
        for attempt in 0.. {
            let request = PublishRequest {
                events: events.clone(),
                idempotency_key: key.to_owned(),
            };
            match client.publish(request).await {
                Ok(response) => {
                    assert_eq!(response.get_ref().accepted, count, "{:?}", response.get_ref().errors);
                    return;
                }
                Err(status) if attempt < 50 => {
                    tracing::warn!(%status, "publish retried");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("publish failed: {status}"),
            }
        }
    }

    pub async fn client(&self) -> IngestServiceClient<tonic::transport::Channel> {
        IngestServiceClient::connect(self.grpc.clone()).await.unwrap()
    }
}

/// A running router process and its admin address.
pub type Router = chute_common::testing::ServiceProcess;

/// Waits for a router's `/readyz` (panics after 60 s).
pub async fn ready(router: &Router) {
    let started = Instant::now();
    while chute_common::testing::http_get(&router.admin, "/readyz").await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(60), "router not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An event of `tenant` named `name`, at `time_ms`, with `attributes` and `metrics`.
pub fn event(tenant: &str, name: &str, time_ms: i64, attributes: &[(&str, &str)], metrics: &[(&str, f64)]) -> Event {
    Event {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        time: Some(chute_common::validate::timestamp_from_nanos(time_ms * 1_000_000)),
        attributes: attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        ..Event::default()
    }
}

pub fn now_ms() -> i64 {
    chute_common::validate::unix_nanos_now() / 1_000_000
}

/// Every message on `subject` in `stream`: (headers' `Chute-Event-Id`, count) — read with an
/// ordered consumer from the start.
pub async fn event_ids(js: &jetstream::Context, stream: &str, subject: &str) -> HashMap<String, usize> {
    use futures::StreamExt;
    let stream = js.get_stream(stream).await.expect("stream exists");
    let info = stream.get_info().await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut counts = HashMap::new();
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.unwrap();
    let started = Instant::now();
    let mut seen = 0;
    while seen < pending {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "read {seen} of {pending} ({info:?})"
        );
        let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else {
            panic!("read {seen} of {pending}");
        };
        seen += 1;
        let id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Chute-Event-Id"))
            .map(|value| value.to_string())
            .unwrap_or_default();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// One request a receiver got: its headers and JSON body.
pub type Request = (HashMap<String, String>, serde_json::Value);

/// A webhook receiver on loopback recording every request's body and headers.
#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<Request>>>);

impl Received {
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.0.lock().unwrap().iter().map(|(_, body)| body.clone()).collect()
    }
}

/// Starts a receiver answering 200 to every POST; returns its URL and what it received.
pub async fn webhook_receiver() -> (String, Received) {
    use axum::routing::post;
    let received = Received::default();
    let state = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let headers = headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                state.0.lock().unwrap().push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

//! A query API (`app()` via `oneshot`) over its own migrated database on a shared ClickHouse
//! dev server, plus a generated data set and its recomputation helpers.

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use chute_common::admin::Readiness;
use chute_query_api::{app, AppState, Config, StreamHub};
use chute_schema::row::EventsRow;
use chute_schema::testing::{ClickHouseServer, DevStats};
use chute_schema::{Migrator, Target};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;

/// One dev server for the whole test binary (each test uses its own database). Started on its
/// own thread so it outlives every test's runtime; it exits with the process (`--watch-stdin`).
pub fn server() -> &'static ClickHouseServer {
    static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(ClickHouseServer::start())
        })
        .join()
        .expect("dev server starts")
    })
}

pub fn now_ms() -> i64 {
    chute_common::validate::unix_nanos_now() / 1_000_000
}

pub struct TestApi {
    pub database: String,
    pub client: clickhouse::Client,
    pub state: AppState,
}

impl TestApi {
    /// A migrated, empty database `name` and an app over it.
    pub async fn start(name: &str, customize: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_hub(name, customize, None).await
    }

    pub async fn start_with_hub(name: &str, customize: impl FnOnce(&mut Config), hub: Option<StreamHub>) -> Self {
        let server = server();
        server.database(name).await;
        Migrator::new(server.client(), Target::single(name))
            .run()
            .await
            .expect("migrations apply");
        let mut config = Config {
            clickhouse_url: server.url(),
            clickhouse_database: name.to_owned(),
            ..Config::default()
        };
        customize(&mut config);
        let client = chute_query_api::clickhouse_client(&config);
        let state = AppState::new(
            client.clone(),
            &config,
            hub,
            Readiness::default(),
            CancellationToken::new(),
        )
        .expect("state");
        Self {
            database: name.to_owned(),
            client,
            state,
        }
    }

    pub async fn insert(&self, rows: &[EventsRow]) {
        let mut insert = self.client.insert::<EventsRow>("events").await.unwrap();
        for row in rows {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }

    /// (status, headers, JSON body or Null).
    pub async fn get(&self, uri: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
        self.get_with(uri, &[]).await
    }

    pub async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = app(self.state.clone())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    /// Statement counters of this test's database on the dev server.
    pub async fn stats(&self) -> chute_schema::testing::DatabaseStats {
        let stats: DevStats = server().stats().await;
        stats.databases.get(&self.database).cloned().unwrap_or_default()
    }
}

pub const TENANTS: [&str; 2] = ["acme", "globex"];
pub const NAMES: [&str; 2] = ["llm.request", "page.view"];

/// `count` events over `span_minutes` from `base_ms`: users and sessions (10 % without),
/// `latency_ms` on every event, `tokens` on 70 %, a `model` attribute.
pub fn generate(seed: u64, count: usize, base_ms: i64, span_minutes: i64) -> Vec<EventsRow> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let time = base_ms + rng.random_range(0..span_minutes * MINUTE_MS);
            let user_id = match rng.random_range(0..10) {
                0 => String::new(),
                _ => format!("user-{}", rng.random_range(0..40)),
            };
            let session_id = match rng.random_range(0..10) {
                0 => String::new(),
                _ => format!("session-{}", rng.random_range(0..150)),
            };
            let mut metrics = vec![("latency_ms".to_owned(), -(1.0 - rng.random::<f64>()).ln() * 200.0)];
            if rng.random_bool(0.7) {
                metrics.push(("tokens".to_owned(), f64::from(rng.random_range(1..4_000u32))));
            }
            EventsRow {
                tenant: TENANTS[rng.random_range(0..2)].to_owned(),
                name: NAMES[rng.random_range(0..2)].to_owned(),
                time,
                event_id: Uuid::from_u128(rng.random()),
                session_id,
                user_id,
                attributes: vec![("model".to_owned(), format!("m{}", rng.random_range(0..3)))],
                metrics,
                body: "{}".to_owned(),
                ingested_at: time + 5,
            }
        })
        .collect()
}

/// Start of the hour `hours` hours ago.
pub fn hours_ago(hours: i64) -> i64 {
    now_ms().div_euclid(HOUR_MS) * HOUR_MS - hours * HOUR_MS
}

pub fn metric(row: &EventsRow, name: &str) -> Option<f64> {
    row.metrics.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// Where `estimate` falls in `values` as a rank fraction (for t-digest tolerance checks).
pub fn rank_of(values: &[f64], estimate: f64) -> (f64, f64) {
    let below = values.iter().filter(|v| **v < estimate).count() as f64;
    let at_or_below = values.iter().filter(|v| **v <= estimate).count() as f64;
    let n = values.len() as f64;
    (below / n, at_or_below / n)
}

pub fn points(body: &serde_json::Value) -> Vec<(String, Option<f64>)> {
    body["points"]
        .as_array()
        .unwrap_or_else(|| panic!("no points in {body}"))
        .iter()
        .map(|p| (p["t"].as_str().unwrap().to_owned(), p["value"].as_f64()))
        .collect()
}

pub fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

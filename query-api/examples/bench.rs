//! Query API latency: uncached (ClickHouse) and cached (moka) p50/p99 server-side through
//! `app()` (no network), and cached requests/s with concurrent callers.
//!
//! `cargo run --release -p chute-query-api --example bench` (env `CHUTE_BENCH_EVENTS`, default
//! 1,000,000 events over the last 24 h for 4 tenants). Starts its own ClickHouse dev server.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use chute_common::admin::Readiness;
use chute_query_api::{app, AppState, Config};
use chute_schema::row::EventsRow;
use chute_schema::testing::ClickHouseServer;
use chute_schema::{Migrator, Target};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const DATABASE: &str = "bench_query_api";
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

async fn get(router: &axum::Router, uri: &str) -> Duration {
    let started = Instant::now();
    let response = router
        .clone()
        .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{uri}");
    let _ = response.into_body().collect().await.unwrap();
    started.elapsed()
}

fn report(label: &str, histogram: &Histogram<u64>) {
    println!(
        "{label:<44} n={:<6} p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
        histogram.len(),
        histogram.value_at_quantile(0.5) as f64 / 1e3,
        histogram.value_at_quantile(0.99) as f64 / 1e3,
        histogram.max() as f64 / 1e3
    );
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("CHUTE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = ClickHouseServer::start().await;
    let client = server.database(DATABASE).await;
    Migrator::new(server.client(), Target::single(DATABASE))
        .run()
        .await
        .unwrap();

    let now = chute_common::validate::unix_nanos_now() / 1_000_000;
    let start = now - 24 * 3_600_000;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(42);
    let mut remaining = events;
    while remaining > 0 {
        let batch = remaining.min(200_000);
        let mut insert = client
            .insert::<EventsRow>("events")
            .await
            .unwrap()
            .with_setting("optimize_on_insert", "0");
        for _ in 0..batch {
            let time = start + rng.random_range(0..24 * 3_600_000);
            let row = EventsRow {
                tenant: TENANTS[rng.random_range(0..4)].into(),
                name: ["llm.request", "page.view", "checkout"][rng.random_range(0..3)].into(),
                time,
                event_id: uuid::Uuid::from_u128(rng.random()),
                session_id: format!("s-{}", rng.random_range(0..50_000)),
                user_id: format!("u-{}", rng.random_range(0..10_000)),
                attributes: vec![("model".into(), format!("m{}", rng.random_range(0..5)))],
                metrics: vec![
                    ("latency_ms".into(), rng.random::<f64>() * 1000.0),
                    ("tokens".into(), f64::from(rng.random_range(1..4000u32))),
                ],
                body: String::new(),
                ingested_at: time,
            };
            insert.write(&row).await.unwrap();
        }
        insert.end().await.unwrap();
        remaining -= batch;
    }
    println!(
        "data set: {events} raw events over 24 h, 4 tenants, inserted in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let config = Config {
        clickhouse_url: server.url(),
        clickhouse_database: DATABASE.into(),
        ..Config::default()
    };
    let state = AppState::new(
        chute_query_api::clickhouse_client(&config),
        &config,
        None,
        Readiness::default(),
        CancellationToken::new(),
    )
    .unwrap();
    let router = app(state);
    // Closed 24 h range of one tenant, ending at the last whole hour.
    let to = now - now % 3_600_000;
    let queries = [
        ("timeseries count 24h step 5m (1m rollup)", "agg=count&step=5m"),
        (
            "timeseries p99 latency 24h step 1h (1h rollup)",
            "agg=p99&metric=latency_ms&step=1h",
        ),
        (
            "timeseries sum tokens 24h 15m sliding:1h",
            "agg=sum&metric=tokens&step=15m&window=sliding:1h",
        ),
    ];
    for (label, params) in queries {
        // Uncached: a distinct range per request (shifted by whole hours) so each is a miss.
        let mut uncached = Histogram::<u64>::new(3).unwrap();
        for i in 0..30i64 {
            let (from, to) = (to - 24 * 3_600_000 - i * 3_600_000, to - i * 3_600_000);
            let uri = format!("/v1/timeseries?tenant=acme&{params}&from={from}&to={to}");
            uncached.record(get(&router, &uri).await.as_micros() as u64).unwrap();
        }
        report(&format!("uncached {label}"), &uncached);
        let uri = format!(
            "/v1/timeseries?tenant=acme&{params}&from={}&to={to}",
            to - 24 * 3_600_000
        );
        let mut cached = Histogram::<u64>::new(3).unwrap();
        for _ in 0..5_000 {
            cached
                .record(get(&router, &uri).await.as_micros().max(1) as u64)
                .unwrap();
        }
        report(&format!("cached   {label}"), &cached);
    }
    let mut uncached = Histogram::<u64>::new(3).unwrap();
    for i in 0..20i64 {
        let uri = format!(
            "/v1/top?tenant=acme&by=user&metric=tokens&agg=sum&from={}&to={}",
            to - 3_600_000 - i * 3_600_000,
            to - i * 3_600_000
        );
        uncached.record(get(&router, &uri).await.as_micros() as u64).unwrap();
    }
    report("uncached top users by tokens 1h (raw FINAL)", &uncached);

    // Cached throughput with concurrent callers.
    let uri = format!(
        "/v1/timeseries?tenant=acme&agg=count&step=5m&from={}&to={to}",
        to - 24 * 3_600_000
    );
    let (tasks, per_task) = (8, 20_000);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (router, uri) = (router.clone(), uri.clone());
            tokio::spawn(async move {
                for _ in 0..per_task {
                    get(&router, &uri).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "cached throughput: {:.0} req/s ({} requests, {tasks} concurrent callers, in-process)",
        (tasks * per_task) as f64 / elapsed,
        tasks * per_task
    );
}

//! `run()` on a real listener: admin endpoints, OpenAPI, readiness, clean shutdown.

use std::time::Duration;

use chute_query_api::Config;
use tokio_util::sync::CancellationToken;

use chute_common::testing::http_get;

use crate::support::*;

#[tokio::test]
async fn run_serves_admin_endpoints_and_stops_cleanly() {
    // Migrated database via the harness, then the real `run`.
    let api = TestApi::start("qa_run_admin", |_| {}).await;
    let nats = chute_common::testing::nats::NatsServer::start();
    let config = Config {
        clickhouse_url: server().url(),
        clickhouse_database: api.database.clone(),
        nats: chute_common::config::NatsArgs::with_url(nats.url()),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(chute_query_api::run(listener, config, shutdown.clone()));

    let mut ready = false;
    for _ in 0..100 {
        if http_get(addr, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz never became 200");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (status, body) = http_get(addr, "/openapi.json").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    for path in ["/v1/timeseries", "/v1/top", "/v1/sessions", "/v1/events", "/v1/stream"] {
        assert!(doc["paths"][path].is_object(), "{path} missing from OpenAPI");
    }
    let (status, _) = http_get(addr, "/v1/timeseries?tenant=acme").await;
    assert_eq!(status, 200);
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(metrics.contains("chute_query_requests_total"), "{metrics}");
    assert!(metrics.contains("chute_query_stream_subscribers"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .expect("run returns Ok");
}

use std::sync::Arc;
use std::time::Duration;

use crate::support::{http_get, request, Acked, Stack};

#[tokio::test]
async fn events_published_through_the_ingestor_land_once_in_raw_and_every_rollup() {
    let stack = Stack::start("e2e_exact").await;
    let aggregator = stack.aggregator(&[]);
    let acked = Arc::new(Acked::default());
    let mut client = stack.client().await;
    for i in 0..40 {
        let (req, cost) = request(&format!("e2e-{i}"), 25);
        client.publish(req.clone()).await.unwrap();
        // A client retry with the same key must not count twice.
        if i % 10 == 0 {
            client.publish(req).await.unwrap();
        }
        acked.events.fetch_add(25, std::sync::atomic::Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, std::sync::atomic::Ordering::SeqCst);
        acked.sessions.fetch_add(25, std::sync::atomic::Ordering::SeqCst);
    }
    stack.wait_for_events(1000, Duration::from_secs(60)).await;
    stack.assert_exact(&acked).await;
    let latency_p99 = stack
        .scalar_f64("SELECT toFloat64(quantile(0.99)(dateDiff('millisecond', ingested_at, inserted_at))) FROM events")
        .await;
    eprintln!("accepted -> inserted p99: {latency_p99} ms (debug build)");

    // Health, readiness and the metrics the dashboards use.
    assert_eq!(http_get(&aggregator.admin, "/healthz").await.0, 200);
    assert_eq!(http_get(&aggregator.admin, "/readyz").await.0, 200);
    assert_eq!(aggregator.metric("chute_aggregator_owned_partitions").await, 16.0);
    assert!(aggregator.metric("chute_aggregator_events_inserted_total").await >= 1000.0);
    let metrics = http_get(&aggregator.admin, "/metrics").await.1;
    for name in [
        "chute_aggregator_partition_pending{",
        "chute_aggregator_batch_rows_bucket",
        "chute_aggregator_batch_bytes_bucket",
        "chute_aggregator_insert_duration_seconds_bucket",
        "chute_aggregator_ingest_to_insert_seconds_bucket",
        "chute_aggregator_dlq_size",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    // SIGTERM drains and exits cleanly.
    aggregator.terminate().await;
}

//! The response cache: hits run no ClickHouse query, concurrent misses run one, fresh ranges
//! expire after the short TTL, and ETag/If-None-Match give 304s.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn repeated_queries_hit_and_concurrent_misses_query_once() {
    let api = TestApi::start("qa_cache_hits_and_single_flight", |_| {}).await;
    let base = hours_ago(3);
    api.insert(&generate(3, 2_000, base, 120)).await;
    let uri = format!(
        "/v1/timeseries?tenant=acme&agg=p90&metric=latency_ms&from={base}&to={}&step=5m",
        base + 2 * HOUR_MS
    );

    let before = api.stats().await.selects;
    let (status, headers, first) = api.get(&uri).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(api.stats().await.selects, before + 1);
    // A closed historical range: cached long, and so may browsers and proxies.
    let cache_control = headers["cache-control"].to_str().unwrap();
    assert_eq!(cache_control, "public, max-age=600");
    let etag = headers["etag"].to_str().unwrap().to_owned();

    // The same query, parameters reordered and `from` as RFC 3339: one cache entry.
    let from_rfc3339 = chute_query_api::render::ms_to_rfc3339(base);
    let reordered = format!(
        "/v1/timeseries?step=5m&to={}&from={from_rfc3339}&metric=latency_ms&agg=p90&tenant=acme",
        base + 2 * HOUR_MS
    );
    for _ in 0..20 {
        let (status, _, again) = api.get(&reordered).await;
        assert_eq!(status, 200);
        assert_eq!(again, first);
    }
    assert_eq!(
        api.stats().await.selects,
        before + 1,
        "cache hits must not query ClickHouse"
    );

    let (status, headers, _) = api.get_with(&uri, &[("if-none-match", &etag)]).await;
    assert_eq!(status, 304);
    assert_eq!(headers["etag"].to_str().unwrap(), etag);

    // 16 concurrent identical misses: one ClickHouse query.
    let uri = format!(
        "/v1/top?tenant=globex&by=user&metric=tokens&agg=sum&from={base}&to={}",
        base + HOUR_MS
    );
    let before = api.stats().await.selects;
    let answers = futures::future::join_all((0..16).map(|_| api.get(&uri))).await;
    assert!(answers
        .iter()
        .all(|(status, _, body)| *status == 200 && *body == answers[0].2));
    assert_eq!(api.stats().await.selects, before + 1);

    let metrics = chute_common::telemetry::prometheus_handle().render();
    for name in [
        "chute_query_cache_hits_total",
        "chute_query_cache_misses_total",
        "chute_query_cache_bytes",
        "chute_query_clickhouse_queries_total",
        "chute_query_requests_total",
        "chute_query_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn new_events_in_a_range_touching_now_show_after_the_short_ttl() {
    // 4 s rather than the default 1 s: the insert and the second read must fit inside the TTL
    // even on a loaded CI machine.
    let api = TestApi::start("qa_cache_fresh_ttl", |config| {
        config.cache_fresh_ttl = Duration::from_secs(4)
    })
    .await;
    let now = now_ms();
    let from = now - now.rem_euclid(MINUTE_MS) - 10 * MINUTE_MS;
    let to = from + 15 * MINUTE_MS;
    let mut rows = generate(4, 50, from, 5);
    for row in &mut rows {
        row.tenant = "acme".into();
    }
    api.insert(&rows).await;
    let uri = format!("/v1/timeseries?tenant=acme&from={from}&to={to}&step=15m");
    let total = |body: &serde_json::Value| -> f64 { points(body).iter().filter_map(|(_, v)| *v).sum() };

    let (_, headers, body) = api.get(&uri).await;
    assert_eq!(total(&body), 50.0);
    assert_eq!(headers["cache-control"].to_str().unwrap(), "public, max-age=4");
    let first_read = std::time::Instant::now();

    let mut late = generate(5, 1, now - 1_000, 1).remove(0);
    late.tenant = "acme".into();
    late.time = now - 1_000;
    api.insert(&[late]).await;
    let (_, _, cached) = api.get(&uri).await;
    assert!(
        first_read.elapsed() < Duration::from_secs(4),
        "the machine is too slow for this test"
    );
    assert_eq!(total(&cached), 50.0, "inside the TTL the cached answer is served");

    tokio::time::sleep(Duration::from_secs(4).saturating_sub(first_read.elapsed()) + Duration::from_millis(100)).await;
    let (_, _, fresh) = api.get(&uri).await;
    assert_eq!(total(&fresh), 51.0, "after the 4 s TTL the new event is visible");
}

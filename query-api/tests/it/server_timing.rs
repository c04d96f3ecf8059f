//! `Server-Timing: app;dur=<ms>` on every answer: the query API's own time, so a client can
//! tell it from transport (the query bench reads it for cached hits).

use std::time::Instant;

use axum::http::HeaderMap;

use crate::support::*;

/// The `dur` of the `app` metric, in ms.
fn app_duration_ms(headers: &HeaderMap) -> f64 {
    let value = headers
        .get("server-timing")
        .expect("server-timing header")
        .to_str()
        .expect("ascii");
    let duration = value
        .strip_prefix("app;dur=")
        .unwrap_or_else(|| panic!("unexpected server-timing {value:?}"));
    let duration: f64 = duration
        .parse()
        .unwrap_or_else(|_| panic!("dur of {value:?} is not a number"));
    assert!(duration.is_finite() && duration >= 0.0, "{value:?}");
    duration
}

#[tokio::test]
async fn every_answer_says_how_long_the_query_api_took() {
    let api = TestApi::start("qa_server_timing", |_| {}).await;
    let base = hours_ago(3);
    api.insert(&generate(5, 1_000, base, 120)).await;
    let uri = format!(
        "/v1/timeseries?tenant=acme&agg=p99&metric=latency_ms&from={base}&to={}&step=1m",
        base + 2 * HOUR_MS
    );

    // A miss waits for ClickHouse (an HTTP round trip to the dev server and a rollup query):
    // well over half a millisecond, and never more than the caller waited in total.
    let before = api.stats().await.selects;
    let started = Instant::now();
    let (status, headers, _) = api.get(&uri).await;
    let miss_client_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(status, 200);
    assert_eq!(api.stats().await.selects, before + 1, "the first request is a miss");
    let miss_ms = app_duration_ms(&headers);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert!(miss_ms >= 0.5, "a miss that ran a ClickHouse query took {miss_ms} ms");
    assert!(
        miss_ms <= miss_client_ms,
        "server {miss_ms} ms > client {miss_client_ms} ms"
    );

    // Hits: no ClickHouse query, each within what the caller measured and below the miss.
    let mut hits = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let (status, headers, _) = api.get(&uri).await;
        let client_ms = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(status, 200);
        let hit_ms = app_duration_ms(&headers);
        assert!(hit_ms <= client_ms, "server {hit_ms} ms > client {client_ms} ms");
        hits.push(hit_ms);
    }
    assert_eq!(api.stats().await.selects, before + 1, "repeats are cache hits");
    hits.sort_by(f64::total_cmp);
    let median_hit = hits[hits.len() / 2];
    assert!(
        median_hit < miss_ms,
        "median hit {median_hit} ms is not below the miss {miss_ms} ms"
    );

    // Not only 200s: a 304 and a 400 carry it too.
    let (status, headers, _) = api.get_with(&uri, &[("if-none-match", &etag)]).await;
    assert_eq!(status, 304);
    app_duration_ms(&headers);
    let (status, headers, _) = api.get("/v1/timeseries?tenant=acme&step=7m").await;
    assert_eq!(status, 400);
    app_duration_ms(&headers);
}

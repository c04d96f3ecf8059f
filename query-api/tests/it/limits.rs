//! Query limits: overflow-safe times, the raw-event range, the ClickHouse query gate.

use crate::support::*;

#[tokio::test]
async fn the_largest_integer_time_is_a_400_on_every_endpoint() {
    let api = TestApi::start("qa_limits_overflow", |_| {}).await;
    for endpoint in ["timeseries", "top", "sessions", "events"] {
        for query in [
            "to=9223372036854775807",
            "from=9223372036854775807",
            "to=99999999999999999999",
        ] {
            let (status, _, body) = api.get(&format!("/v1/{endpoint}?tenant=acme&{query}")).await;
            assert_eq!(status, 400, "{endpoint}?{query}: {body}");
            assert!(body["error"].as_str().unwrap().contains("out of range"), "{body}");
            assert_eq!(body["parameter"], query.split('=').next().unwrap(), "{body}");
        }
    }
    let (status, _, body) = api
        .get("/v1/timeseries?tenant=acme&window=sliding:99999999999999999999d")
        .await;
    assert_eq!(
        (status.as_u16(), body["parameter"].as_str()),
        (400, Some("window")),
        "{body}"
    );
}

#[tokio::test]
async fn raw_event_queries_are_bounded_by_the_raw_range() {
    let api = TestApi::start("qa_limits_raw_range", |config| {
        config.max_raw_range = std::time::Duration::from_secs(6 * 3600);
    })
    .await;
    let to = hours_ago(0);
    let range = |hours: i64| format!("from={}&to={to}", to - hours * HOUR_MS);
    for uri in [
        format!("/v1/events?tenant=acme&{}", range(6)),
        format!("/v1/top?tenant=acme&by=user&{}", range(6)),
        format!("/v1/top?tenant=acme&by=name&{}", range(30 * 24)),
    ] {
        let (status, _, body) = api.get(&uri).await;
        assert_eq!(status, 200, "{uri}: {body}");
    }
    for uri in [
        format!("/v1/events?tenant=acme&{}", range(7)),
        format!("/v1/top?tenant=acme&by=attribute:model&{}", range(30 * 24)),
    ] {
        let (status, _, body) = api.get(&uri).await;
        assert_eq!(status, 400, "{uri}: {body}");
        assert_eq!(body["parameter"], "from");
        assert!(body["error"].as_str().unwrap().contains("at most 6h"), "{body}");
    }
}

/// One slot and no queue: of 20 concurrent distinct queries, those that find the slot taken
/// are answered 503 with Retry-After at once; the others succeed.
#[tokio::test]
async fn queries_beyond_the_slots_and_queue_are_503_with_retry_after() {
    let api = TestApi::start("qa_limits_gate", |config| {
        config.max_concurrent_queries = 1;
        config.max_queued_queries = 0;
    })
    .await;
    api.insert(&generate(7, 2_000, hours_ago(3), 180)).await;
    let to = hours_ago(0);
    let uris: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "/v1/top?tenant=acme&by=user&from={}&to={}",
                to - 3 * HOUR_MS,
                to - i * 1000
            )
        })
        .collect();
    let answers = futures::future::join_all(uris.iter().map(|uri| api.get(uri))).await;
    let mut overloaded = 0;
    for (status, headers, body) in &answers {
        match status.as_u16() {
            200 => {}
            503 => {
                overloaded += 1;
                assert_eq!(headers["retry-after"], "1");
                assert!(body["error"].as_str().unwrap().contains("too many queries"), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "20 concurrent queries never found the single slot taken"
    );
    assert!(overloaded < 20, "the slot itself serves queries");
    let documented = chute_query_api::openapi::document();
    assert!(
        documented["paths"]["/v1/top"]["get"]["responses"]["503"]["headers"]["Retry-After"].is_object(),
        "the OpenAPI document names the 503 and its Retry-After"
    );
    let metrics = chute_common::telemetry::prometheus_handle().render();
    assert!(
        metrics.contains("chute_query_overloaded_total{reason=\"queue_full\"}"),
        "{metrics}"
    );
}

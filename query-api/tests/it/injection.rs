//! Injection attempts in every parameter are rejected (400 naming the parameter) or, where a
//! value reaches ClickHouse, bound harmlessly as a parameter.

use chute_query_api::params::EventsQuery;
use chute_query_api::sql;

use crate::support::*;

const HOSTILE: &[&str] = &[
    "x' OR '1'='1",
    "x'; DROP TABLE events; --",
    "x\\' OR 1=1 --",
    "x} OR {tenant:String",
    "x\n UNION ALL SELECT * FROM system.users",
    "`events`",
    "x%00y",
];

#[tokio::test]
async fn hostile_parameters_are_rejected_or_bound() {
    let api = TestApi::start("qa_injection", |_| {}).await;
    let base = hours_ago(2);
    let rows = generate(7, 500, base, 60);
    api.insert(&rows).await;
    let range = format!("from={base}&to={}", base + HOUR_MS);
    let ok_cases = [
        format!("/v1/timeseries?tenant=acme&{range}"),
        format!("/v1/top?tenant=acme&{range}"),
        format!("/v1/sessions?tenant=acme&{range}"),
        format!("/v1/events?tenant=acme&{range}"),
    ];
    for uri in &ok_cases {
        assert_eq!(api.get(uri).await.0, 200, "{uri}");
    }
    let before = api.stats().await;

    let parameters: &[(&str, &str)] = &[
        ("timeseries", "tenant"),
        ("timeseries", "name"),
        ("timeseries", "metric"),
        ("timeseries", "agg"),
        ("timeseries", "from"),
        ("timeseries", "to"),
        ("timeseries", "step"),
        ("timeseries", "window"),
        ("top", "by"),
        ("top", "limit"),
        ("top", "metric"),
        ("sessions", "min_events"),
        ("sessions", "limit"),
        ("events", "name"),
        ("stream", "name"),
    ];
    for (endpoint, parameter) in parameters {
        for hostile in HOSTILE {
            let value = encode(hostile);
            let value = if *parameter == "by" {
                format!("attribute:{value}")
            } else {
                value
            };
            let range = if *endpoint == "stream" { "" } else { range.as_str() };
            let base_params = if *parameter == "tenant" {
                range.to_owned()
            } else {
                format!("tenant=acme&{range}")
            };
            let uri = format!("/v1/{endpoint}?{base_params}&{parameter}={value}");
            let (status, _, body) = api.get(&uri).await;
            assert_eq!(status, 400, "{uri}: {body}");
            assert_eq!(body["parameter"], *parameter, "{uri}: {body}");
        }
    }
    // A hostile parameter *name* is refused too.
    let (status, _, body) = api
        .get(&format!("/v1/events?tenant=acme&{range}&{}=1", encode("1=1;--")))
        .await;
    assert_eq!(status, 400, "{body}");

    let after = api.stats().await;
    assert_eq!(after.selects, before.selects, "nothing reached ClickHouse");
    assert_eq!(after.errors, before.errors);

    // Below the validation layer: hostile values bound as parameters are plain values.
    for hostile in HOSTILE {
        let statement = sql::events(&EventsQuery {
            tenant: (*hostile).to_owned(),
            name: Some((*hostile).to_owned()),
            from_ms: 0,
            to_ms: i64::MAX / 1_000_000,
            limit: 10,
        });
        let mut query = api.client.query(&statement.sql);
        for (name, value) in &statement.params {
            query = query.param(name, value);
        }
        let found = query
            .fetch_all::<chute_schema::row::EventsRow>()
            .await
            .unwrap_or_else(|err| panic!("{hostile:?} bound as a value must not fail: {err}"));
        assert!(found.is_empty(), "{hostile:?} matched rows");
    }
    let count: u64 = api
        .client
        .query("SELECT count() FROM events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(count, rows.len() as u64, "the events table is intact");
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

//! `Matcher::to_sql` agrees with `Matcher::matches`: the same events, stored in the real `events`
//! table (migrations applied) on the ClickHouse dev server, are selected by the SQL exactly when
//! the live matcher matches them. The queries go through the `clickhouse` crate's `query()`, as
//! the router's seeding does, so a `?` in a literal would be caught too.

use std::collections::{BTreeSet, HashMap};

use chute_proto::v1::Event;
use chute_router::matcher::{AttributeTest, Matcher};
use chute_schema::row::{EventsRow, EVENTS_TABLE};
use chute_schema::testing::ClickHouseServer;
use chute_schema::{Migrator, Target};
use uuid::Uuid;

fn event(index: u128, name: &str, attributes: &[(&str, &str)], metrics: &[(&str, f64)]) -> Event {
    Event {
        event_id: Uuid::from_u128(index + 1).to_string(),
        tenant: "acme".to_owned(),
        name: name.to_owned(),
        attributes: attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        ..Event::default()
    }
}

/// Names with LIKE metacharacters, non-ASCII characters, quotes and `?`; attributes present,
/// empty and absent; metrics on both sides of every boundary, and missing.
fn events() -> Vec<Event> {
    let names = [
        "llm.request",
        "llm.response",
        "llm_request",
        "llmXrequest",
        "llm%request",
        "llm.",
        "http.error",
        "http.errors",
        "a_b",
        "aXb",
        "é.x",
        "ab.x",
        "why?",
        "it's",
        "back\\slash",
        "llm.\nrequest",
    ];
    let attribute_sets: [&[(&str, &str)]; 8] = [
        &[],
        &[("model", "gpt-4o"), ("region", "eu"), ("path", "/api/v1")],
        &[("model", "claude-3"), ("region", ""), ("path", "/web/api/")],
        &[("model", "GPT-4O"), ("error.type", "timeout")],
        &[("region", "eu"), ("error.type", ""), ("path", "/API/x")],
        &[("quote", "it's \"quoted\" \\ ?"), ("model", "x') OR 1=1 --")],
        &[("path", "/api/é"), ("model", "gpt-4o-mini")],
        &[("path", "/api/\n"), ("model", "gpt\n4o"), ("region", "e\nu")],
    ];
    let metric_sets: [&[(&str, f64)]; 6] = [
        &[],
        &[("quality", 0.7), ("latency_ms", 2000.0)],
        &[("quality", 0.69999), ("latency_ms", 2000.5)],
        &[("quality", 0.1 + 0.2), ("latency_ms", -3.5)],
        &[("quality", 1e300), ("cost", 0.0)],
        &[("latency_ms", 1e-7)],
    ];
    let mut events = Vec::new();
    let mut index = 0u128;
    for name in names {
        for attributes in attribute_sets {
            for metrics in metric_sets {
                events.push(event(index, name, attributes, metrics));
                index += 1;
            }
        }
    }
    events
}

fn matchers() -> Vec<(String, Matcher)> {
    let glob = |g: &str| Matcher::new(g).unwrap();
    let attr = |m: Matcher, key: &str, test: AttributeTest| m.with_attribute(key, test).unwrap();
    let metric = |m: Matcher, p: &str| m.with_metric(p).unwrap();
    let regex = |p: &str| AttributeTest::regex(p).unwrap();
    let mut list = vec![
        glob("*"),
        glob("llm.request"),
        glob("llm.*"),
        glob("llm?request"),
        glob("llm_request"),
        glob("llm%request"),
        glob("*.error"),
        glob("*.error*"),
        glob("a?b"),
        glob("a_b"),
        glob("?.x"),
        glob("??.x"),
        glob("why?"),
        glob("it's"),
        glob("back\\slash"),
        glob("*\\*"),
        attr(glob("*"), "model", AttributeTest::Equals("gpt-4o".into())),
        attr(glob("*"), "region", AttributeTest::Equals(String::new())),
        attr(
            glob("*"),
            "model",
            AttributeTest::In(vec!["gpt-4o".into(), "claude-3".into()]),
        ),
        attr(glob("*"), "model", AttributeTest::In(vec![])),
        attr(glob("*"), "path", regex("^/api/")),
        attr(glob("*"), "path", regex("(?i)^/api/")),
        attr(glob("*"), "path", regex("^/api/.$")),
        attr(glob("*"), "model", regex("^gpt-[0-9]o?(-mini)?$")),
        attr(glob("*"), "error.type", AttributeTest::Exists(true)),
        attr(glob("*"), "error.type", AttributeTest::Exists(false)),
        attr(glob("*"), "model", AttributeTest::Equals("x') OR 1=1 --".into())),
        attr(glob("*"), "quote", AttributeTest::Equals("it's \"quoted\" \\ ?".into())),
        attr(glob("*"), "x' OR '1'='1", AttributeTest::Exists(false)),
        attr(glob("*"), "model", regex("'\\) OR 1=1")),
        attr(glob("*"), "model", regex("^gpt.4o$")),
        attr(glob("*"), "model", regex("(?s)^gpt.4o$")),
        attr(glob("*"), "region", regex("e.u|^eu$")),
        attr(glob("*"), "path", regex("(?m)^/api/.*$")),
        metric(glob("*"), "quality < 0.7"),
        metric(glob("*"), "quality <= 0.7"),
        metric(glob("*"), "quality == 0.30000000000000004"),
        metric(glob("*"), "quality != 0.7"),
        metric(glob("*"), "quality >= 1e300"),
        metric(glob("*"), "latency_ms > 2000"),
        metric(glob("*"), "latency_ms < 0"),
        metric(glob("*"), "latency_ms <= 1e-7"),
        metric(glob("*"), "cost == 0"),
        metric(metric(glob("llm.*"), "quality < 0.7"), "latency_ms > 1000"),
        attr(
            attr(metric(glob("llm.*"), "quality < 0.8"), "model", regex("^gpt")),
            "region",
            AttributeTest::Equals("eu".into()),
        ),
    ]
    .into_iter()
    .map(|m| (m.to_sql(), m))
    .collect::<Vec<_>>();
    // Keep the test honest: every matcher has its description (the SQL) for failure messages.
    list.dedup_by(|a, b| a.0 == b.0);
    list
}

#[tokio::test]
async fn to_sql_selects_exactly_the_events_matches_accepts() {
    let database = "router_matcher_sql";
    let server = ClickHouseServer::start().await;
    server
        .client()
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await
        .unwrap();
    Migrator::new(server.client(), Target::single(database))
        .run()
        .await
        .expect("migrations apply");
    let client = server.client().with_database(database);

    let events = events();
    // Now: older rows would fall to the table's 30-day TTL.
    let now_millis = chute_common::validate::unix_nanos_now() / 1_000_000;
    let mut insert = client.insert::<EventsRow>(EVENTS_TABLE).await.unwrap();
    for e in &events {
        insert
            .write(&EventsRow {
                tenant: e.tenant.clone(),
                name: e.name.clone(),
                time: now_millis,
                event_id: Uuid::parse_str(&e.event_id).unwrap(),
                session_id: String::new(),
                user_id: String::new(),
                attributes: e.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                metrics: e.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                body: String::new(),
                ingested_at: now_millis,
            })
            .await
            .unwrap();
    }
    insert.end().await.unwrap();
    let stored: u64 = client.query("SELECT count() FROM events").fetch_one().await.unwrap();
    assert_eq!(stored, events.len() as u64);

    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.event_id.as_str(), e)).collect();
    let mut nonempty = 0;
    let mut partial = 0;
    for (sql, matcher) in matchers() {
        let expected: BTreeSet<String> = events
            .iter()
            .filter(|e| matcher.matches(e))
            .map(|e| e.event_id.clone())
            .collect();
        let query = format!("SELECT toString(event_id) FROM events WHERE {sql}");
        let actual: BTreeSet<String> = client
            .query(&query)
            .fetch_all::<String>()
            .await
            .unwrap_or_else(|err| panic!("{query}: {err}"))
            .into_iter()
            .collect();
        let only_sql: Vec<_> = actual.difference(&expected).map(|id| by_id[id.as_str()]).collect();
        let only_rust: Vec<_> = expected.difference(&actual).map(|id| by_id[id.as_str()]).collect();
        assert!(
            only_sql.is_empty() && only_rust.is_empty(),
            "{sql}\nselected by SQL only: {only_sql:#?}\nmatched in Rust only: {only_rust:#?}"
        );
        nonempty += usize::from(!expected.is_empty());
        partial += usize::from(!expected.is_empty() && expected.len() < events.len());
    }
    // The set is varied enough to mean something: most matchers select some events, not all.
    assert!(
        nonempty >= 35 && partial >= 34,
        "nonempty {nonempty}, partial {partial}"
    );
}

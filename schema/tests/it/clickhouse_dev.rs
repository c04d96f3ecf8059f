//! The `clickhouse` crate (default settings) against the ClickHouse dev server: the insert and
//! fetch paths the services use, compression on and off, schema validation, error mapping and
//! concurrent use.

use std::collections::HashMap;

use chute_schema::testing::ClickHouseServer;
use clickhouse::{Client, Compression, Row};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

const EVENTS_DDL: &str = "
    CREATE TABLE events (
        tenant String,
        name LowCardinality(String),
        time DateTime64(3, 'UTC'),
        event_id UUID,
        attributes Map(String, String),
        metrics Map(String, Float64),
        count UInt64,
        value Float64
    ) ENGINE = MergeTree ORDER BY (tenant, event_id)";

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
struct Event {
    tenant: String,
    name: String,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    time: OffsetDateTime,
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    attributes: HashMap<String, String>,
    metrics: Vec<(String, f64)>,
    count: u64,
    value: f64,
}

fn event(tenant: &str, index: u64) -> Event {
    let millis = 1_767_225_600_000_i128 + i128::from(index) * 1_001;
    Event {
        tenant: tenant.to_owned(),
        name: format!("llm.request.{}", index % 3),
        time: OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).unwrap(),
        event_id: Uuid::from_u128(u128::from(index) << 64 | 0x1234),
        attributes: HashMap::from([
            ("model".to_owned(), format!("model-{}", index % 5)),
            ("quote".to_owned(), "it's \"quoted\"\n\t\\".to_owned()),
        ]),
        metrics: vec![
            ("tokens".to_owned(), index as f64),
            ("latency_ms".to_owned(), 0.5 + index as f64),
        ],
        count: index,
        value: index as f64 / 7.0,
    }
}

async fn insert_events(client: &Client, events: &[Event]) {
    let mut insert = client.insert::<Event>("events").await.unwrap();
    for event in events {
        insert.write(event).await.unwrap();
    }
    insert.end().await.unwrap();
}

async fn fetch_events(client: &Client, tenant: &str) -> Vec<Event> {
    client
        .query("SELECT ?fields FROM events WHERE tenant = ? ORDER BY event_id")
        .bind(tenant)
        .fetch_all::<Event>()
        .await
        .unwrap()
}

async fn round_trip(client: Client) {
    client.query(EVENTS_DDL).execute().await.unwrap();
    let events: Vec<Event> = (0..2_000).map(|index| event("acme", index)).collect();
    insert_events(&client, &events).await;
    assert_eq!(fetch_events(&client, "acme").await, events);
}

#[tokio::test]
async fn round_trip_with_default_lz4_compression() {
    let server = ClickHouseServer::start().await;
    round_trip(server.database("round_trip_lz4").await).await;
}

#[tokio::test]
async fn round_trip_without_compression() {
    let server = ClickHouseServer::start().await;
    let client = server
        .database("round_trip_plain")
        .await
        .with_compression(Compression::None);
    round_trip(client).await;
}

#[tokio::test]
async fn validation_rejects_a_row_type_that_does_not_match_the_table() {
    #[derive(Debug, Row, Serialize)]
    struct WrongEvent {
        tenant: String,
        name: u32,
    }

    let server = ClickHouseServer::start().await;
    let client = server.database("validation").await;
    client.query(EVENTS_DDL).execute().await.unwrap();
    // Missing columns fail when the insert starts; wrong types when a row is written.
    let error = match client.insert::<WrongEvent>("events").await {
        Err(error) => error,
        Ok(mut insert) => insert
            .write(&WrongEvent {
                tenant: "acme".to_owned(),
                name: 1,
            })
            .await
            .expect_err("the schema check catches the type mismatch"),
    };
    assert!(matches!(error, clickhouse::error::Error::SchemaMismatch(_)), "{error}");
}

#[tokio::test]
async fn server_errors_carry_code_and_message() {
    let server = ClickHouseServer::start().await;
    let client = server.database("errors").await;

    let error = client.query("SELECT * FROM missing_table").execute().await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("Code: 60"), "{message}");
    assert!(message.contains("UNKNOWN_TABLE"), "{message}");

    let error = client.query("SELEC 1").fetch_one::<u8>().await.unwrap_err();
    assert!(error.to_string().contains("SYNTAX_ERROR"), "{error}");

    let error = client
        .insert::<Event>("missing_table")
        .await
        .err()
        .expect("describe fails");
    assert!(error.to_string().contains("UNKNOWN_TABLE"), "{error}");
}

#[tokio::test]
async fn server_side_parameters_are_bound_not_spliced() {
    let server = ClickHouseServer::start().await;
    let client = server.database("params").await;
    let hostile = "x'); DROP DATABASE params; --\t\\";
    let echoed: String = client
        .query("SELECT {value:String}")
        .param("value", hostile)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(echoed, hostile);
    let client_bound: String = client.query("SELECT ?").bind(hostile).fetch_one().await.unwrap();
    assert_eq!(client_bound, hostile);
}

#[tokio::test]
async fn dedup_token_drops_a_repeated_batch() {
    let server = ClickHouseServer::start().await;
    let client = server.database("dedup").await;
    client
        .query(&format!(
            "{EVENTS_DDL} SETTINGS non_replicated_deduplication_window = 100"
        ))
        .execute()
        .await
        .unwrap();
    let batch: Vec<Event> = (0..10).map(|index| event("acme", index)).collect();
    let client = client
        .with_setting("insert_deduplication_token", "events:0:1-10")
        .with_setting("async_insert", "0");
    for _ in 0..3 {
        insert_events(&client, &batch).await;
    }
    let count: u64 = client.query("SELECT count() FROM events").fetch_one().await.unwrap();
    assert_eq!(count, 10);
}

#[tokio::test]
async fn concurrent_inserts_and_reads() {
    let server = ClickHouseServer::start().await;
    let client = server.database("concurrency").await;
    client.query(EVENTS_DDL).execute().await.unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..4 {
        let client = client.clone();
        tasks.spawn(async move {
            let tenant = format!("tenant-{writer}");
            for batch in 0..10_u64 {
                let events: Vec<Event> = (batch * 50..(batch + 1) * 50)
                    .map(|index| event(&tenant, index))
                    .collect();
                insert_events(&client, &events).await;
            }
        });
    }
    for _reader in 0..4 {
        let client = client.clone();
        tasks.spawn(async move {
            for _ in 0..10 {
                let _ = fetch_events(&client, "tenant-0").await;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    for writer in 0..4 {
        assert_eq!(fetch_events(&client, &format!("tenant-{writer}")).await.len(), 500);
    }
}

#[tokio::test]
async fn restart_keeps_data_and_stats_count_selects() {
    let mut server = ClickHouseServer::start().await;
    let client = server.database("restart").await;
    client.query(EVENTS_DDL).execute().await.unwrap();
    insert_events(&client, &[event("acme", 1)]).await;

    server.stop();
    assert!(client.query("SELECT 1").execute().await.is_err());
    server.restart().await;

    let before = server.stats().await;
    assert_eq!(fetch_events(&client, "acme").await, vec![event("acme", 1)]);
    let after = server.stats().await;
    assert_eq!(after.selects - before.selects, 1);
    assert_eq!(after.databases["restart"].selects, 1);
}

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chute_proto::v1::{Event, EventBatch};
use prost::Message;

use crate::support::{cli, request, Stack};

/// Poison messages go to EVENTS_DLQ with the reason, the pipeline keeps flowing, and a replay
/// after a fix lands the message exactly once (even when replay runs twice).
/// An event ten days older than its receive time `now`: outside the default 7-day window, so
/// poison until the aggregator runs with `--event-max-past 30d`.
fn late_event(now: i64) -> Event {
    Event {
        event_id: uuid::Uuid::new_v4().to_string(),
        tenant: "acme".into(),
        name: "late.arrival".into(),
        time: Some(chute_common::validate::timestamp_from_nanos(
            now - 10 * 86_400 * 1_000_000_000,
        )),
        session_id: "late-session".into(),
        metrics: [("cost".to_string(), 0.5)].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn poison_goes_to_the_dlq_and_replays_once_after_a_fix() {
    let stack = Stack::start("dlq_poison").await;
    let aggregator = stack.aggregator(&[]);
    let mut client = stack.client().await;
    client.publish(request("before", 30).0).await.unwrap();

    // Producers the ingestor did not vet: garbage, a future payload version, and an event ten
    // days older than its receive time (outside the default 7-day window).
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    let old_event = late_event(now);
    let batch = |version, events| EventBatch {
        version,
        received_unix_nanos: now,
        events,
        ..Default::default()
    };
    for (subject, payload) in [
        ("events.3", b"\xff\x00garbage".to_vec()),
        ("events.5", batch(9, vec![old_event.clone()]).encode_to_vec()),
        ("events.7", batch(1, vec![old_event.clone()]).encode_to_vec()),
    ] {
        js.publish(subject, payload.into()).await.unwrap().await.unwrap();
    }
    client.publish(request("after", 30).0).await.unwrap();
    stack.wait_for_events(60, Duration::from_secs(60)).await;
    for _ in 0..100 {
        if aggregator.metric("chute_aggregator_dlq_messages_total").await >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(aggregator.metric("chute_aggregator_dlq_messages_total").await, 3.0);

    let listed: Vec<serde_json::Value> = cli(&stack, &["dlq", "list"])
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let error_of = |subject: &str| {
        listed.iter().find(|e| e["original_subject"] == subject).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(error_of("events.3").contains("undecodable"));
    assert!(error_of("events.5").contains("unknown payload version 9"));
    assert!(error_of("events.7").contains("time"), "{}", error_of("events.7"));
    let late = listed.iter().find(|e| e["original_subject"] == "events.7").unwrap()["dlq_sequence"]
        .as_u64()
        .unwrap();

    // The fix: accept older events. Restart, then replay that message — twice.
    aggregator.kill9().await;
    let _fixed = stack.aggregator(&["--event-max-past", "30d"]);
    assert!(cli(&stack, &["dlq", "replay", "--sequence", &late.to_string()])
        .await
        .contains("replayed 1"));
    assert!(cli(&stack, &["dlq", "replay", "--sequence", &late.to_string()])
        .await
        .contains("replayed 0"));
    stack.wait_for_events(61, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stack.scalar("SELECT count() FROM events").await, 61);
    assert_eq!(
        stack
            .scalar("SELECT count() FROM events WHERE name = 'late.arrival'")
            .await,
        1
    );
    assert_eq!(stack.scalar("SELECT toUInt64(sum(events)) FROM events_1m_v").await, 61);
    assert_eq!(
        cli(&stack, &["dlq", "list"]).await.lines().count(),
        2,
        "the two unfixable ones remain"
    );
}

/// `dlq replay` crashed between publishing and deleting, and ran again after JetStream's
/// duplicate window: a second copy of the message reaches EVENTS. The aggregator claims each
/// replay id before inserting, so the event is counted once in raw and every rollup.
#[tokio::test]
async fn a_replay_repeated_after_the_duplicate_window_is_inserted_once() {
    let stack = Stack::start("dlq_replay_late").await;
    let aggregator = stack.aggregator(&[]);
    stack.client().await.publish(request("before", 20).0).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    let old_event = late_event(now);
    let payload = EventBatch {
        version: 1,
        received_unix_nanos: now,
        events: vec![old_event],
        ..Default::default()
    }
    .encode_to_vec();
    js.publish("events.6", payload.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    stack.wait_for_events(20, Duration::from_secs(60)).await;
    for _ in 0..100 {
        if aggregator.metric("chute_aggregator_dlq_messages_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed: Vec<serde_json::Value> = cli(&stack, &["dlq", "list"])
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let dlq_sequence = listed[0]["dlq_sequence"].as_u64().unwrap();
    let dlq_epoch = js
        .get_stream(chute_common::stream::DLQ_STREAM)
        .await
        .unwrap()
        .cached_info()
        .created
        .unix_timestamp_nanos();

    aggregator.kill9().await;
    let fixed = stack.aggregator(&["--event-max-past", "30d"]);
    assert!(cli(&stack, &["dlq", "replay"]).await.contains("replayed 1"));
    // The late re-run's copy: same replay id, a message id JetStream no longer remembers.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "replay-after-the-window");
    headers.insert("Chute-Replay-Id", format!("{dlq_epoch}-{dlq_sequence}").as_str());
    js.publish_with_headers("events.6", headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    stack.client().await.publish(request("after", 20).0).await.unwrap();
    stack.wait_for_events(41, Duration::from_secs(60)).await;
    for _ in 0..100 {
        if fixed.metric("chute_aggregator_replay_duplicates_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fixed.metric("chute_aggregator_replay_duplicates_total").await, 1.0);
    assert_eq!(stack.scalar("SELECT count() FROM events").await, 41, "raw plain: once");
    assert_eq!(stack.scalar("SELECT toUInt64(sum(events)) FROM events_1m_v").await, 41);
    assert_eq!(stack.scalar("SELECT toUInt64(sum(events)) FROM events_1h_v").await, 41);
    assert_eq!(stack.scalar("SELECT toUInt64(sum(events)) FROM sessions_v").await, 41);
}

//! Inserts ClickHouse refuses for good (issue: a poison batch must never wedge a partition):
//! the batch is split, the refused message is dead-lettered once with ClickHouse's reason, the
//! rest lands exactly, and a replay after the fix lands it exactly once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chute_proto::v1::{Event, EventBatch};
use prost::Message;

use crate::support::{cli, request, Acked, Aggregator, Stack};

const DAY_NANOS: i64 = 86_400 * 1_000_000_000;

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// One event shaped like `support::request`'s (own session, a `cost` metric), at `time`.
fn event(name: &str, session: &str, time: i64, cost_millis: u64) -> Event {
    Event {
        event_id: uuid::Uuid::new_v4().to_string(),
        tenant: "acme".into(),
        name: name.into(),
        time: Some(chute_common::validate::timestamp_from_nanos(time)),
        session_id: session.into(),
        metrics: [("cost".to_string(), cost_millis as f64 / 1000.0)].into(),
        ..Default::default()
    }
}

/// A message as an ingestor would have stored it, published straight to `events.<partition>`.
async fn forge(js: &async_nats::jetstream::Context, partition: u32, received: i64, events: Vec<Event>) {
    let batch = EventBatch {
        version: chute_proto::BATCH_VERSION,
        received_unix_nanos: received,
        events,
        ..Default::default()
    };
    js.publish(format!("events.{partition}"), batch.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn publish_valid(stack: &Stack, key: &str, n: usize, acked: &Acked) {
    let (request, cost) = request(key, n);
    stack.client().await.publish(request).await.unwrap();
    acked.events.fetch_add(n as u64, Ordering::SeqCst);
    acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
    acked.sessions.fetch_add(n as u64, Ordering::SeqCst);
}

async fn dlq_entries(stack: &Stack) -> Vec<serde_json::Value> {
    cli(stack, &["dlq", "list"])
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

async fn wait_for_metric(aggregator: &Aggregator, name: &str, at_least: f64) {
    for _ in 0..600 {
        if aggregator.metric(name).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never reached {at_least}");
}

async fn execute(stack: &Stack, sql: &str) {
    stack
        .db()
        .query(sql)
        .execute()
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

/// A CHECK constraint ClickHouse enforces (code 469) and 101 messages whose events fall on 101
/// different days (one block over 100 partitions: code 252), forged on `events.*` while valid
/// traffic flows. The batch is split: the constraint's victim goes to the DLQ once with the
/// server's reason, the 101 days land (halves span fewer partitions), everything else is exact.
#[tokio::test]
async fn refused_rows_are_isolated_dead_lettered_once_and_replayed_after_a_fix() {
    let stack = Stack::start("refused_rows").await;
    execute(
        &stack,
        "ALTER TABLE events ADD CONSTRAINT no_forbidden CHECK name != 'forbidden.name'",
    )
    .await;
    // One big batch: everything published before the aggregator starts is read at once.
    let acked = Arc::new(Acked::default());
    publish_valid(&stack, "before", 40, &acked).await;
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let now = now_nanos();
    forge(&js, 3, now, vec![event("forbidden.name", "refused", now - 1_000, 5)]).await;
    // Days ahead, each valid against its own (forged) receive time: the raw table's 30-day TTL
    // would drop 101 days back.
    for day in 0..101i64 {
        let time = now + day * DAY_NANOS;
        forge(
            &js,
            5,
            time + 1_000,
            vec![event("llm.request", &format!("day-{day}"), time, 3)],
        )
        .await;
        acked.events.fetch_add(1, Ordering::SeqCst);
        acked.cost_millis.fetch_add(3, Ordering::SeqCst);
        acked.sessions.fetch_add(1, Ordering::SeqCst);
    }
    publish_valid(&stack, "after", 40, &acked).await;

    let aggregator = stack.aggregator(&["--batch-linger", "2s", "--batch-idle-flush", "1s"]);
    let expected = acked.events.load(Ordering::SeqCst);
    stack.wait_for_events(expected, Duration::from_secs(120)).await;
    wait_for_metric(&aggregator, "chute_aggregator_dlq_messages_total", 1.0).await;
    stack.assert_exact(&acked).await;
    assert!(aggregator.metric("chute_aggregator_inserts_refused_total").await >= 2.0);
    assert!(aggregator.metric("chute_aggregator_batch_splits_total").await >= 1.0);
    assert_eq!(aggregator.metric("chute_aggregator_dlq_messages_total").await, 1.0);
    let entries = dlq_entries(&stack).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["original_subject"], "events.3");
    let reason = entries[0]["error"].as_str().unwrap();
    assert!(reason.contains("469") && reason.contains("no_forbidden"), "{reason}");

    // Other traffic keeps flowing after the split.
    publish_valid(&stack, "later", 25, &acked).await;
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;

    // The fix, then a replay (twice): the refused event lands exactly once.
    execute(&stack, "ALTER TABLE events DROP CONSTRAINT no_forbidden").await;
    assert!(cli(&stack, &["dlq", "replay"]).await.contains("replayed 1"));
    assert!(cli(&stack, &["dlq", "replay"]).await.contains("replayed 0"));
    acked.events.fetch_add(1, Ordering::SeqCst);
    acked.cost_millis.fetch_add(5, Ordering::SeqCst);
    acked.sessions.fetch_add(1, Ordering::SeqCst);
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
    assert_eq!(
        stack
            .scalar("SELECT count() FROM events WHERE name = 'forbidden.name'")
            .await,
        1
    );
}

/// ClickHouse down for 30 s with invalid messages in the batch: each is dead-lettered exactly
/// once (the ledger records it), however many insert attempts fail meanwhile.
#[tokio::test]
async fn poison_is_dead_lettered_once_while_clickhouse_is_down() {
    let mut stack = Stack::start("dlq_once_outage").await;
    let aggregator = stack.aggregator(&[]);
    let acked = Arc::new(Acked::default());
    publish_valid(&stack, "warm", 10, &acked).await;
    stack.wait_for_events(10, Duration::from_secs(60)).await;
    // Committed, so the poison's batch is the one recorded and retried during the outage.
    wait_for_metric(&aggregator, "chute_aggregator_batches_committed_total", 1.0).await;

    stack.clickhouse.stop();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    for partition in [1, 2, 9] {
        js.publish(format!("events.{partition}"), b"\xff\x00garbage".to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    publish_valid(&stack, "during", 30, &acked).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let failed_attempts = aggregator.metric("chute_aggregator_insert_retries_total").await;
    assert_eq!(
        aggregator.metric("chute_aggregator_dlq_messages_total").await,
        3.0,
        "dead-lettered during the outage, once each"
    );
    stack.clickhouse.restart().await;

    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
    assert!(
        failed_attempts >= 4.0,
        "inserts were retried during the outage: {failed_attempts}"
    );
    assert_eq!(aggregator.metric("chute_aggregator_dlq_messages_total").await, 3.0);
    assert_eq!(dlq_entries(&stack).await.len(), 3);
}

/// A materialized view that throws on one event's value. ClickHouse's insert is not atomic
/// across views: the failed attempt has already written the raw table and the views that ran
/// before the failing one, so splitting would count those rows twice. The batch is retried
/// whole under its token, the stall is reported (metric, `/readyz` 503), and once the view is
/// dropped the retry lands everything exactly once: raw and every rollup.
#[tokio::test]
async fn a_throwing_view_stalls_its_batch_until_fixed_then_lands_exactly() {
    let stack = Stack::start("throwing_view").await;
    execute(
        &stack,
        "CREATE TABLE guard (event_id UUID) ENGINE = MergeTree ORDER BY event_id",
    )
    .await;
    execute(
        &stack,
        "CREATE MATERIALIZED VIEW guard_mv TO guard AS \
         SELECT event_id FROM events WHERE throwIf(name = 'boom.view', 'guard refuses boom') = 0",
    )
    .await;
    let acked = Arc::new(Acked::default());
    publish_valid(&stack, "before", 30, &acked).await;
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let now = now_nanos();
    forge(&js, 4, now, vec![event("boom.view", "boom", now - 1_000, 7)]).await;
    acked.events.fetch_add(1, Ordering::SeqCst);
    acked.cost_millis.fetch_add(7, Ordering::SeqCst);
    acked.sessions.fetch_add(1, Ordering::SeqCst);
    publish_valid(&stack, "after", 30, &acked).await;

    let aggregator = stack.aggregator(&[
        "--stall-after",
        "2s",
        "--batch-linger",
        "2s",
        "--batch-idle-flush",
        "1s",
    ]);
    let mut stalled = false;
    for _ in 0..300 {
        if crate::support::http_get(&aggregator.admin, "/readyz").await.0 == 503
            && aggregator.metric("chute_aggregator_insert_retries_total").await >= 2.0
        {
            stalled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stalled, "the wedged batch is reported by /readyz");
    let metrics = crate::support::http_get(&aggregator.admin, "/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("chute_aggregator_partition_stalled{") && l.ends_with(" 1")),
        "a partition reports stalled"
    );
    assert_eq!(aggregator.metric("chute_aggregator_dlq_messages_total").await, 0.0);

    // The fix: the operator drops the broken view. The retry dedups in raw and in the views
    // the failed attempts already wrote, and fills the rest.
    execute(&stack, "DROP VIEW guard_mv").await;
    // Raw already holds the block (the failed attempts wrote it): wait for the rollups.
    let expected = acked.events.load(Ordering::SeqCst);
    for _ in 0..300 {
        if stack.scalar("SELECT toUInt64(sum(events)) FROM events_1m_v").await >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.assert_exact(&acked).await;
    for _ in 0..100 {
        if crate::support::http_get(&aggregator.admin, "/readyz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz recovers once the partition moves again");
}

/// A batch dead-lettered a message (10 days old: poison under `--event-max-past 7d`) and its
/// owner died before the insert landed (ClickHouse was down). The aggregator that replays the
/// recorded batch runs with `--event-max-past 30d`, so the message now passes validation; the
/// replay keeps the recorded verdict and leaves it out, and `dlq replay` brings it back once.
/// Raw and every rollup exact (before the verdicts were recorded it was counted twice).
#[tokio::test]
async fn a_replay_keeps_the_recorded_dead_letter_verdicts_when_the_rules_change() {
    let mut stack = Stack::start("dlq_verdict_kept").await;
    let first = stack.aggregator(&[]);
    let acked = Arc::new(Acked::default());
    publish_valid(&stack, "warm", 10, &acked).await;
    stack.wait_for_events(10, Duration::from_secs(60)).await;
    // Committed, not only visible: stopped while its views were written, the warm-up batch
    // stayed in flight and the poison was never recorded (a flaky failure seen here).
    wait_for_metric(&first, "chute_aggregator_batches_committed_total", 1.0).await;

    stack.clickhouse.stop();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let now = now_nanos();
    let ten_days_ago = now - 10 * 86_400 * 1_000_000_000;
    forge(&js, 6, now, vec![event("llm.request", "old-session", ten_days_ago, 5)]).await;
    // Counted as acknowledged: `dlq replay` brings it back below.
    acked.events.fetch_add(1, Ordering::SeqCst);
    acked.cost_millis.fetch_add(5, Ordering::SeqCst);
    acked.sessions.fetch_add(1, Ordering::SeqCst);
    publish_valid(&stack, "during", 20, &acked).await;
    wait_for_metric(&first, "chute_aggregator_dlq_messages_total", 1.0).await;
    wait_for_metric(&first, "chute_aggregator_insert_retries_total", 2.0).await; // recorded, retrying
    first.kill9().await;

    let fixed = stack.aggregator(&["--event-max-past", "30d"]);
    stack.clickhouse.restart().await;
    stack.wait_for_events(30, Duration::from_secs(90)).await;
    wait_for_metric(&fixed, "chute_aggregator_batches_replayed_total", 1.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stack.scalar("SELECT count() FROM events").await,
        30,
        "the replay left the dead-lettered message out"
    );
    assert_eq!(dlq_entries(&stack).await.len(), 1);
    assert!(cli(&stack, &["dlq", "replay"]).await.contains("replayed 1"));
    stack.wait_for_events(31, Duration::from_secs(60)).await;
    stack.assert_exact(&acked).await;
}

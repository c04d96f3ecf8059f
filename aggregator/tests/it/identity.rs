//! Every position has an identity: a lost ledger or a recreated stream makes the aggregator
//! refuse to start instead of guessing, `ledger reset --from-clickhouse` recovers without a
//! double count, and messages that leave the stream before they are inserted are counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::support::{cli, request, Acked, Stack};

async fn publish(stack: &Stack, key: &str, n: usize, acked: Option<&Acked>) {
    let (request, cost) = request(key, n);
    stack.client().await.publish(request).await.unwrap();
    if let Some(acked) = acked {
        acked.events.fetch_add(n as u64, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(n as u64, Ordering::SeqCst);
    }
}

fn log_path(stack: &Stack) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("chute-it-{}-aggregator.log", stack.database))
}

/// Starts an aggregator that must refuse to start; returns what it logged.
async fn refused_start(stack: &Stack) -> String {
    let before = std::fs::metadata(log_path(stack)).map_or(0, |m| m.len() as usize);
    let mut aggregator = stack.aggregator(&[]);
    let status = tokio::time::timeout(Duration::from_secs(30), aggregator.child.wait())
        .await
        .expect("a refusing aggregator exits")
        .unwrap();
    assert!(!status.success(), "it must not start");
    std::fs::read_to_string(log_path(stack)).unwrap()[before..].to_owned()
}

/// Creates or updates `EVENTS` as an ingestor start does, with `max_bytes`.
async fn put_events_stream(js: &async_nats::jetstream::Context, max_bytes: i64) {
    let settings = chute_common::stream::StreamSettings {
        max_bytes,
        ..Default::default()
    };
    chute_common::stream::ensure_events_stream(js, &settings).await.unwrap();
}

async fn jetstream(stack: &Stack) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap())
}

/// The ledger's KV bucket is deleted while the stream keeps its history (a long keep window,
/// so nothing committed was trimmed): starting at position 0 would insert everything again.
/// The aggregator refuses; the reset finds the positions in ClickHouse; traffic resumes exact.
#[tokio::test]
async fn a_lost_ledger_is_refused_and_rebuilt_from_clickhouse() {
    let stack = Stack::start("identity_lost_ledger").await;
    let acked = Arc::new(Acked::default());
    let aggregator = stack.aggregator(&["--stream-keep-committed", "1h"]);
    for i in 0..20 {
        publish(&stack, &format!("a-{i}"), 25, Some(&acked)).await;
    }
    stack.wait_for_events(500, Duration::from_secs(60)).await;
    aggregator.terminate().await;
    // Published while no aggregator runs: in the stream, not in ClickHouse.
    for i in 0..6 {
        publish(&stack, &format!("b-{i}"), 10, Some(&acked)).await;
    }

    let js = jetstream(&stack).await;
    js.delete_stream("KV_chute_aggregator").await.unwrap();
    let log = refused_start(&stack).await;
    assert!(
        log.contains("the ledger is empty") && log.contains("ledger reset --from-clickhouse"),
        "{log}"
    );

    let positions = cli(&stack, &["ledger", "reset", "--from-clickhouse"]).await;
    assert!(positions.contains("ledger reset: bound to stream epoch"), "{positions}");
    let ledger: serde_json::Value = serde_json::from_str(cli(&stack, &["ledger", "show"]).await.trim()).unwrap();
    assert!(ledger["ledger"]["stream_epoch"].as_i64().unwrap() > 0);

    let _aggregator = stack.aggregator(&[]);
    publish(&stack, "c", 30, Some(&acked)).await;
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
}

/// The EVENTS stream is deleted and recreated under a surviving ledger: new messages start at
/// sequence 1, below the old positions. The aggregator refuses (epoch mismatch) instead of
/// skipping them; after the reset they land, and the old data is not counted again.
#[tokio::test]
async fn a_recreated_stream_is_refused_until_the_ledger_is_reset() {
    let stack = Stack::start("identity_new_stream").await;
    let acked = Arc::new(Acked::default());
    let aggregator = stack.aggregator(&[]);
    for i in 0..10 {
        publish(&stack, &format!("a-{i}"), 20, Some(&acked)).await;
    }
    stack.wait_for_events(200, Duration::from_secs(60)).await;
    aggregator.terminate().await;

    let js = jetstream(&stack).await;
    js.delete_stream(chute_common::stream::EVENTS_STREAM).await.unwrap();
    chute_common::stream::ensure_events_stream(&js, &Default::default())
        .await
        .unwrap();
    let log = refused_start(&stack).await;
    assert!(
        log.contains("refusing to start") && log.contains("ledger reset --from-clickhouse"),
        "{log}"
    );

    for i in 0..4 {
        publish(&stack, &format!("b-{i}"), 15, Some(&acked)).await;
    }
    let dry = cli(&stack, &["ledger", "reset", "--from-clickhouse", "--dry-run"]).await;
    assert!(dry.contains("dry run"), "{dry}");
    cli(&stack, &["ledger", "reset", "--from-clickhouse"]).await;
    let _aggregator = stack.aggregator(&[]);
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
}

/// Every ingestor start updates `EVENTS`, and nats-server 2.9 reports, after its next restart,
/// the update's time as the stream's `created` time: a ledger bound to `created` refused to start
/// after any `make down && make up` ("the ledger belongs to stream EVENTS created at ..."). The
/// epoch lives in the stream's description instead, so the same stream stays the same stream.
#[tokio::test]
async fn an_updated_stream_keeps_its_identity_across_a_nats_restart() {
    let mut stack = Stack::start("identity_update_restart").await;
    let acked = Arc::new(Acked::default());
    let aggregator = stack.aggregator(&[]);
    publish(&stack, "a", 50, Some(&acked)).await;
    stack.wait_for_events(50, Duration::from_secs(60)).await;
    aggregator.terminate().await;

    // 2.9 persists, on an update, the time the stream was restored at this server's start: so
    // restart once (restore), update (as an ingestor start does), restart again.
    stack.nats.stop();
    stack.nats.restart();
    let js = jetstream(&stack).await;
    let epoch = |info: &async_nats::jetstream::stream::Info| chute_common::stream::stream_epoch(info);
    let before = js.get_stream(chute_common::stream::EVENTS_STREAM).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // an update at a later time
    put_events_stream(&js, 96 << 20).await;
    drop(js);
    stack.nats.stop();
    stack.nats.restart();

    let js = jetstream(&stack).await;
    let after = js.get_stream(chute_common::stream::EVENTS_STREAM).await.unwrap();
    assert_eq!(after.cached_info().config.max_bytes, 96 << 20);
    assert_eq!(
        epoch(after.cached_info()),
        epoch(before.cached_info()),
        "same stream, same epoch"
    );
    eprintln!(
        "nats-server reports created {} before and {} after the update and restart",
        before.cached_info().created,
        after.cached_info().created
    );

    let aggregator = stack.aggregator(&[]);
    // The ingestor reconnects to the restarted server on its own time: retry the same request
    // (same idempotency key, so an ambiguous failure is not counted twice).
    let (request, cost) = request("b", 40);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(status) = stack.client().await.publish(request.clone()).await {
        assert!(std::time::Instant::now() < deadline, "ingest still refused: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked.events.fetch_add(40, Ordering::SeqCst);
    acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
    acked.sessions.fetch_add(40, Ordering::SeqCst);
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
    aggregator.terminate().await;
}

/// Messages purged from the stream before any aggregator inserted them are a gap: counted once
/// in `chute_aggregator_events_lost_total`, and everything after lands exactly.
#[tokio::test]
async fn messages_gone_before_insert_are_counted_as_lost() {
    let stack = Stack::start("identity_gap").await;
    let acked = Arc::new(Acked::default());
    let aggregator = stack.aggregator(&[]);
    publish(&stack, "a", 40, Some(&acked)).await;
    stack.wait_for_events(40, Duration::from_secs(60)).await;
    aggregator.terminate().await;

    for i in 0..7 {
        publish(&stack, &format!("lost-{i}"), 10, None).await; // one message each
    }
    let js = jetstream(&stack).await;
    js.get_stream(chute_common::stream::EVENTS_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    let aggregator = stack.aggregator(&[]);
    publish(&stack, "b", 30, Some(&acked)).await;
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    for _ in 0..100 {
        if aggregator.metric("chute_aggregator_events_lost_total").await >= 7.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await; // a few more rounds: counted once
    assert_eq!(aggregator.metric("chute_aggregator_events_lost_total").await, 7.0);
    stack.assert_exact(&acked).await;
}

/// An aggregator that starts before any ingestor created `EVENTS` waits for it (alive, not
/// ready) and never creates it with defaults of its own; once an ingestor's stream appears, it
/// binds to it and inserts exactly.
#[tokio::test]
async fn an_aggregator_started_before_the_stream_waits_for_it() {
    let stack = Stack::start("identity_wait_stream").await;
    stack.events_stream().await; // the ingestor created it; take it away
    let js = jetstream(&stack).await;
    js.delete_stream(chute_common::stream::EVENTS_STREAM).await.unwrap();
    let aggregator = stack.aggregator(&[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(crate::support::http_get(&aggregator.admin, "/healthz").await.0, 200);
    assert_eq!(crate::support::http_get(&aggregator.admin, "/readyz").await.0, 503);
    assert!(
        js.get_stream(chute_common::stream::EVENTS_STREAM).await.is_err(),
        "the aggregator created EVENTS itself"
    );

    put_events_stream(&js, 64 << 20).await;
    let acked = Acked::default();
    publish(&stack, "after", 30, Some(&acked)).await;
    stack.wait_for_events(30, Duration::from_secs(60)).await;
    stack.assert_exact(&acked).await;
    let stream = js.get_stream(chute_common::stream::EVENTS_STREAM).await.unwrap();
    assert_eq!(
        stream.cached_info().config.max_bytes,
        64 << 20,
        "the ingestor's settings stand"
    );
    aggregator.terminate().await;
}

/// Waits (bounded) until `name` on `aggregator` reaches `at_least`.
async fn wait_for_metric(aggregator: &crate::support::Aggregator, name: &str, at_least: f64) -> f64 {
    for _ in 0..600 {
        let value = aggregator.metric(name).await;
        if value >= at_least {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never reached {at_least}");
}

/// How the recorded batch's messages leave the stream.
enum Purge {
    /// Everything (a purge by hand, or `max_age`): the stream's first sequence moves past the
    /// batch, so the gap rule sees it too.
    WholeStream,
    /// Only the batch's subjects (`nats stream purge EVENTS --subject events.<p>`): the first
    /// sequence does not move; only the replay can notice.
    BatchSubjects,
}

/// A recorded batch whose messages left the stream before it was inserted (its owner died while
/// ClickHouse was down; then the messages were purged) must not wedge or crash-loop the next
/// aggregator: the replay finds nothing to insert, commits the batch, counts the lost messages
/// once (not once by the gap rule and again by the replay), and new traffic lands exactly.
#[tokio::test]
async fn a_recorded_batch_whose_messages_are_gone_is_committed_and_counted_once() {
    gone_batch("identity_gone_batch", Purge::WholeStream).await;
}

/// The same with only the batch's subjects purged: the replay's reader used to wait for
/// messages that no longer exist and fail the batch every round (a wedged partition).
#[tokio::test]
async fn a_recorded_batch_purged_from_its_subjects_is_committed_and_counted_once() {
    gone_batch("identity_gone_subjects", Purge::BatchSubjects).await;
}

async fn gone_batch(database: &str, purge: Purge) {
    let mut stack = Stack::start(database).await;
    let acked = Arc::new(Acked::default());
    // A long linger: the lost messages, published within a second, make one batch.
    let first = stack.aggregator(&["--batch-linger", "2s", "--batch-idle-flush", "1s"]);
    publish(&stack, "warm", 10, Some(&acked)).await;
    stack.wait_for_events(10, Duration::from_secs(60)).await;
    // Committed, not only visible: its views may still be written when the raw part shows.
    wait_for_metric(&first, "chute_aggregator_batches_committed_total", 1.0).await;

    // ClickHouse down: the next batch is recorded in the ledger, and its insert retried.
    stack.clickhouse.stop();
    const LOST: u64 = 5;
    for i in 0..LOST {
        publish(&stack, &format!("lost-{i}"), 10, None).await; // one message each
    }
    wait_for_metric(&first, "chute_aggregator_insert_retries_total", 2.0).await;
    first.kill9().await;
    let ledger: serde_json::Value = serde_json::from_str(cli(&stack, &["ledger", "show"]).await.trim()).unwrap();
    let pending = ledger["ledger"]["pending"].as_object().expect("pending batches");
    assert_eq!(pending.len(), 1, "the dead owner's batch is recorded: {ledger}");
    let batch = pending.values().next().unwrap();
    let recorded: u64 = batch["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(recorded, LOST, "every lost message is in the recorded batch: {ledger}");

    // The messages go before anyone inserted them.
    let stream = jetstream(&stack)
        .await
        .get_stream(chute_common::stream::EVENTS_STREAM)
        .await
        .unwrap();
    match purge {
        Purge::WholeStream => {
            stream.purge().await.unwrap();
        }
        Purge::BatchSubjects => {
            for range in batch["ranges"].as_array().unwrap() {
                let partition = range["partition"].as_u64().unwrap() as u32;
                stream
                    .purge()
                    .filter(chute_common::stream::events_subject(partition))
                    .await
                    .unwrap();
            }
            let first_sequence = stream.get_info().await.unwrap().state.first_sequence;
            assert!(first_sequence <= 1, "the stream still starts at the warm-up message");
        }
    }
    stack.clickhouse.restart().await;

    let mut second = stack.aggregator(&[]);
    wait_for_metric(&second, "chute_aggregator_batches_replayed_total", 1.0).await;
    publish(&stack, "after", 30, Some(&acked)).await;
    stack
        .wait_for_events(acked.events.load(Ordering::SeqCst), Duration::from_secs(60))
        .await;
    stack.assert_exact(&acked).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // a few more ownership rounds
    assert!(
        second.child.try_wait().unwrap().is_none(),
        "the aggregator keeps running"
    );
    let ledger: serde_json::Value = serde_json::from_str(cli(&stack, &["ledger", "show"]).await.trim()).unwrap();
    assert!(
        ledger["ledger"]["pending"].as_object().unwrap().is_empty(),
        "the gone batch was committed: {ledger}"
    );
    assert_eq!(
        second.metric("chute_aggregator_events_lost_total").await,
        LOST as f64,
        "each lost message counted once"
    );
    assert_eq!(crate::support::http_get(&second.admin, "/readyz").await.0, 200);
    second.terminate().await;
}

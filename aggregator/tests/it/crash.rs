use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::support::{load, Acked, Stack};

const FAST: &[&str] = &["--batch-linger", "100ms", "--max-inserts-per-second", "20"];

/// Under continuous load, `kill -9` the aggregator at 20 random moments and restart it each
/// time: raw FINAL count, raw plain count and every rollup equal what was acknowledged.
#[tokio::test]
async fn kill_nine_twenty_times_under_load_loses_and_duplicates_nothing() {
    let stack = Stack::start("crash_kill9").await;
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loaders: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(load(
                stack.grpc.clone(),
                format!("k9-{i}"),
                40,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut aggregator = stack.aggregator(FAST);
    let mut replays_seen = 0.0;
    for _ in 0..20 {
        let wait = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        replays_seen += aggregator.metric("chute_aggregator_batches_replayed_total").await;
        aggregator.kill9().await;
        aggregator = stack.aggregator(FAST);
    }
    stop.cancel();
    for loader in loaders {
        loader.await.unwrap();
    }
    let total = acked.events.load(std::sync::atomic::Ordering::SeqCst);
    assert!(total > 1000, "the load should have been substantial, got {total}");
    // A restarted owner waits for the dead one's leases (3 s) before replaying its batch.
    stack.wait_for_events(total, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.assert_exact(&acked).await;
    eprintln!(
        "kill -9 x20: {total} acknowledged events exact in raw and rollups; {replays_seen} recorded batches replayed"
    );
}

/// Two aggregators share 16 partitions; one is killed mid-load and the survivor takes its
/// partitions (and its recorded batch) over.
#[tokio::test]
async fn the_survivor_of_two_takes_over_and_stays_exact() {
    let stack = Stack::start("crash_takeover").await;
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loader = tokio::spawn(load(
        stack.grpc.clone(),
        "takeover".into(),
        40,
        acked.clone(),
        stop.clone(),
    ));
    let first = stack.aggregator(FAST);
    let second = stack.aggregator(FAST);
    // Wait until the partitions are split evenly (a round or two: partitions with a batch in
    // flight are shed at the next round).
    for _ in 0..100 {
        let (a, b) = (
            first.metric("chute_aggregator_owned_partitions").await,
            second.metric("chute_aggregator_owned_partitions").await,
        );
        if a == 8.0 && b == 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(first.metric("chute_aggregator_owned_partitions").await, 8.0);
    assert_eq!(second.metric("chute_aggregator_owned_partitions").await, 8.0);
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(500..1500))).await;
    first.kill9().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        second.metric("chute_aggregator_owned_partitions").await,
        16.0,
        "the survivor owns everything"
    );
    stop.cancel();
    loader.await.unwrap();
    let total = acked.events.load(std::sync::atomic::Ordering::SeqCst);
    stack.wait_for_events(total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.assert_exact(&acked).await;
    eprintln!("takeover: {total} events exact");
}

/// A stalled owner (SIGSTOP longer than its lease) wakes up after a takeover: it gives up its
/// stale partitions without writing, and the totals stay exact.
#[tokio::test]
async fn a_zombie_woken_after_a_takeover_writes_nothing_stale() {
    let stack = Stack::start("crash_zombie").await;
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loader = tokio::spawn(load(
        stack.grpc.clone(),
        "zombie".into(),
        40,
        acked.clone(),
        stop.clone(),
    ));
    let zombie = stack.aggregator(FAST);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let survivor = stack.aggregator(FAST);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(zombie.metric("chute_aggregator_owned_partitions").await > 0.0);

    zombie.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await; // > 3 s lease: the survivor takes over
    assert_eq!(survivor.metric("chute_aggregator_owned_partitions").await, 16.0);
    let inserted_before = stack.scalar("SELECT count() FROM events").await;
    zombie.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        zombie.metric("chute_aggregator_partitions_lost_total").await >= 1.0,
        "the zombie noticed the takeover"
    );
    stop.cancel();
    loader.await.unwrap();
    let total = acked.events.load(std::sync::atomic::Ordering::SeqCst);
    assert!(inserted_before > 0);
    stack.wait_for_events(total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.assert_exact(&acked).await;
    eprintln!("zombie: {total} events exact after SIGSTOP/SIGCONT");
}

/// ClickHouse stopped for 10 s under load, then restarted: no loss, no duplicates, and the
/// aggregator's memory stays bounded while it is down (it stops pulling).
#[tokio::test]
async fn clickhouse_down_for_ten_seconds_loses_nothing_and_memory_stays_bounded() {
    let mut stack = Stack::start("crash_clickhouse_down").await;
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loader = tokio::spawn(load(
        stack.grpc.clone(),
        "chdown".into(),
        40,
        acked.clone(),
        stop.clone(),
    ));
    let aggregator = stack.aggregator(FAST);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = aggregator.rss_kib();
    stack.clickhouse.stop();
    let mut rss_peak = rss_before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_peak = rss_peak.max(aggregator.rss_kib());
    }
    assert!(aggregator.metric("chute_aggregator_insert_retries_total").await >= 1.0);
    stack.clickhouse.restart().await;
    stop.cancel();
    loader.await.unwrap();
    let total = acked.events.load(std::sync::atomic::Ordering::SeqCst);
    stack.wait_for_events(total, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.assert_exact(&acked).await;
    eprintln!(
        "clickhouse down 10 s: {total} events exact; aggregator RSS {rss_before} KiB before, {rss_peak} KiB peak"
    );
    assert!(
        rss_peak < rss_before + 256 * 1024,
        "RSS grew from {rss_before} to {rss_peak} KiB while ClickHouse was down"
    );
}

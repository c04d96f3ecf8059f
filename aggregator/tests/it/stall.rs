use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{load, Acked, Stack};

const FAST: &[&str] = &["--batch-linger", "100ms", "--max-inserts-per-second", "20"];
/// Committed history stays in `EVENTS` (the replay window the README recommends when NATS may
/// restart), so a reader reopening too early would find messages that are already committed.
const KEEP_HISTORY: &[&str] = &[
    "--batch-linger",
    "100ms",
    "--max-inserts-per-second",
    "20",
    "--stream-keep-committed",
    "10m",
];

/// nats-server frozen (SIGSTOP) for 10 s under load, longer than the aggregator's 3 s lease:
/// publishes time out and are retried with their keys, leases lapse, reads and ledger updates
/// wait; then SIGCONT. The totals are exact in raw FINAL, raw plain, every rollup and sessions,
/// and the batcher never had to refuse a message.
///
/// async-nats's ordered consumer rides out a 10 s freeze by itself (it re-creates its server-side
/// consumer with unbounded retries), so the partition readers usually do not fail here; the
/// restart test below is the one that makes them fail and resume.
#[tokio::test]
async fn nats_stalled_for_ten_seconds_under_load_stays_exact() {
    let stack = Stack::start("stall_nats").await;
    let log = fresh_log(&stack);
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loaders = start_load(&stack, "stall", &acked, &stop);
    let aggregator = stack.aggregator(FAST);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stack.scalar("SELECT count() FROM events").await > 0,
        "running before the stall"
    );

    signal_nats(&stack, "-STOP");
    let acked_at_stop = acked.events.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    signal_nats(&stack, "-CONT");
    let recovery = recover(&stack, &acked).await;

    tokio::time::sleep(Duration::from_secs(3)).await; // more load after the recovery
    let total = finish(&stack, &acked, stop, loaders).await;
    assert_eq!(aggregator.metric("chute_aggregator_out_of_order_total").await, 0.0);
    eprintln!(
        "nats SIGSTOP 10 s: {total} events exact ({acked_at_stop} acknowledged before the stall); \
         after SIGCONT {recovery}; {} reader restarts, {} partitions fenced",
        reader_restarts(&log),
        aggregator.metric("chute_aggregator_partitions_lost_total").await
    );
}

/// nats-server killed and started again (same port and store) under load. Its ordered consumers
/// are gone, so every partition reader fails and reopens: issue 10, where a reopened reader
/// started again at its first sequence and re-fed messages already batched or committed. Readers
/// resume after the last message they delivered, the batcher refuses nothing, totals are exact.
#[tokio::test]
async fn nats_restarted_under_load_readers_resume_and_stay_exact() {
    let mut stack = Stack::start("stall_nats_restart").await;
    let log = fresh_log(&stack);
    let acked = Arc::new(Acked::default());
    let stop = CancellationToken::new();
    let loaders = start_load(&stack, "restart", &acked, &stop);
    let aggregator = stack.aggregator(KEEP_HISTORY);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stack.scalar("SELECT count() FROM events").await > 0,
        "running before the restart"
    );

    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.nats.restart();
    let recovery = recover(&stack, &acked).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = finish(&stack, &acked, stop, loaders).await;
    let restarts = reader_restarts(&log);
    assert!(restarts > 0, "the restart made partition readers fail");
    assert_eq!(
        aggregator.metric("chute_aggregator_out_of_order_total").await,
        0.0,
        "resumed readers delivered nothing twice"
    );
    eprintln!("nats restart: {total} events exact; after the restart {recovery}; {restarts} reader restarts");
}

/// Sends `signal` (e.g. `-STOP`) to the test's nats-server.
fn signal_nats(stack: &Stack, signal: &str) {
    let pid = stack.nats.pid().expect("nats-server is running");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// The aggregator's log for this test, emptied (the harness appends across runs).
fn fresh_log(stack: &Stack) -> PathBuf {
    let log = std::env::temp_dir().join(format!("chute-it-{}-aggregator.log", stack.database));
    let _ = std::fs::remove_file(&log);
    log
}

/// How often a partition reader failed and reopened its partition.
fn reader_restarts(log: &PathBuf) -> usize {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.matches("partition reader failed").count()
}

/// Two clients publishing 40-event requests until `stop`, each retried with its key until
/// acknowledged (so acknowledged == stored, whatever timed out).
fn start_load(stack: &Stack, prefix: &str, acked: &Arc<Acked>, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
    (0..2)
        .map(|i| {
            tokio::spawn(load(
                stack.grpc.clone(),
                format!("{prefix}-{i}"),
                40,
                Arc::clone(acked),
                stop.clone(),
            ))
        })
        .collect()
}

/// Called as NATS comes back: waits for the first acknowledgement after it, then for ClickHouse
/// to hold every event acknowledged by then (so reading has resumed too), and says how long each
/// took.
async fn recover(stack: &Stack, acked: &Acked) -> String {
    let resumed = Instant::now();
    let acked_at_resume = acked.events.load(Ordering::SeqCst);
    while acked.events.load(Ordering::SeqCst) <= acked_at_resume {
        assert!(
            resumed.elapsed() < Duration::from_secs(60),
            "no publish succeeded after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing = resumed.elapsed();
    let target = acked.events.load(Ordering::SeqCst);
    stack.wait_for_events(target, Duration::from_secs(90)).await;
    format!(
        "publishing again in {publishing:?}, ClickHouse holding those first {target} events in {:?}",
        resumed.elapsed()
    )
}

/// Stops the load, waits for every acknowledged event and checks exact totals everywhere.
async fn finish(stack: &Stack, acked: &Acked, stop: CancellationToken, loaders: Vec<JoinHandle<()>>) -> u64 {
    stop.cancel();
    for loader in loaders {
        loader.await.unwrap();
    }
    let total = acked.events.load(Ordering::SeqCst);
    stack.wait_for_events(total, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.assert_exact(acked).await;
    total
}

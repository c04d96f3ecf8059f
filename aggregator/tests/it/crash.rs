use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::support::{kill, load, Acked, Stack};

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

    let mut aggregator =
        stack.aggregator(&["--batch-linger", "100ms", "--max-inserts-per-second", "20"]);
    for _ in 0..20 {
        let wait = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        kill(&aggregator, "-KILL");
        let _ = aggregator.wait().await;
        aggregator =
            stack.aggregator(&["--batch-linger", "100ms", "--max-inserts-per-second", "20"]);
    }
    stop.cancel();
    for loader in loaders {
        loader.await.unwrap();
    }
    let total = acked.events.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        total > 1000,
        "the load should have been substantial, got {total}"
    );
    // Restarted owners wait for the dead one's leases (3 s) before replaying its batch.
    stack.wait_for_events(total, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.assert_exact(&acked).await;
    eprintln!("kill -9 x20: {total} acknowledged events, exact in raw and rollups");
}

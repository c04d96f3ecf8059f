//! Trimming the EVENTS stream: committed data leaves it, so a caught-up pipeline never fills
//! the cap; an undelivered backlog still does, and is refused (UNAVAILABLE), never dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Stream;
use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::PublishRequest;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{request, Acked, Aggregator, Stack};

/// The ingestor's `stream_max_bytes` in these tests.
const CAP: u64 = 64 << 20;
/// ~230 KB per request: one JetStream message each (under the 512 KiB message limit).
const EVENTS_PER_REQUEST: usize = 150;
const BODY_BYTES: usize = 1_400;
/// Acknowledged but not yet inserted events allowed while loading (~12 MiB): "caught up".
const BACKLOG_EVENTS: u64 = 8_000;
const TRIM_FAST: &[&str] = &[
    "--batch-linger",
    "100ms",
    "--max-inserts-per-second",
    "20",
    "--stream-trim-interval",
    "500ms",
];

/// A request of [`EVENTS_PER_REQUEST`] events with a [`BODY_BYTES`] body each, and its cost.
fn large_request(key: &str) -> (PublishRequest, u64) {
    let (mut request, cost) = request(key, EVENTS_PER_REQUEST);
    let body = "b".repeat(BODY_BYTES);
    for event in &mut request.events {
        event.body = body.clone();
    }
    (request, cost)
}

fn count_acked(acked: &Acked, cost: u64) {
    acked.events.fetch_add(EVENTS_PER_REQUEST as u64, Ordering::SeqCst);
    acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
    acked.sessions.fetch_add(EVENTS_PER_REQUEST as u64, Ordering::SeqCst);
}

/// What the loaders and the watcher of the first phase share.
#[derive(Default)]
struct Progress {
    next_request: AtomicU64,
    published_bytes: AtomicU64,
    /// `chute_aggregator_events_inserted_total`, polled.
    inserted: AtomicU64,
    max_stream_bytes: AtomicU64,
    errors: Mutex<Vec<tonic::Code>>,
}

/// Publishes large requests until `target_bytes` went through, keeping at most
/// [`BACKLOG_EVENTS`] acknowledged events uninserted. Every error is recorded, then the same
/// request is retried.
async fn load_caught_up(grpc: String, acked: Arc<Acked>, progress: Arc<Progress>, target_bytes: u64) {
    let mut client = IngestServiceClient::connect(grpc).await.unwrap();
    while progress.published_bytes.load(Ordering::SeqCst) < target_bytes {
        while acked.events.load(Ordering::SeqCst) > progress.inserted.load(Ordering::SeqCst) + BACKLOG_EVENTS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let i = progress.next_request.fetch_add(1, Ordering::SeqCst);
        let (request, cost) = large_request(&format!("trim-{i}"));
        let bytes = request.encoded_len() as u64;
        let first_try = Instant::now();
        loop {
            match client.publish(request.clone()).await {
                Ok(_) => break,
                Err(status) if first_try.elapsed() < Duration::from_secs(90) => {
                    progress.errors.lock().unwrap().push(status.code());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("trim-{i} refused for 90 s: {status:?}"),
            }
        }
        count_acked(&acked, cost);
        progress.published_bytes.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// Polls the aggregator's inserted count and the stream's size until `stop`.
async fn watch(aggregator_admin: String, stream: Stream, progress: Arc<Progress>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let text = crate::support::http_get(&aggregator_admin, "/metrics").await.1;
        if let Some(inserted) = metric_in(&text, "chute_aggregator_events_inserted_total") {
            progress.inserted.store(inserted as u64, Ordering::SeqCst);
        }
        if let Ok(info) = stream.get_info().await {
            progress.max_stream_bytes.fetch_max(info.state.bytes, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
}

async fn trimmed_bytes(aggregator: &Aggregator) -> f64 {
    aggregator.metric("chute_aggregator_stream_trimmed_bytes_total").await
}

/// Four times the stream's cap goes through a caught-up pipeline without one refused publish,
/// exact in raw and rollups. With the aggregator killed, the backlog fills the cap and the
/// ingestor refuses (UNAVAILABLE); after a restart the refused request is retried and everything
/// acknowledged lands exactly once.
#[tokio::test]
async fn four_times_the_cap_flows_through_and_only_an_undelivered_backlog_is_refused() {
    let started = Instant::now();
    let stack = Stack::start_with_ingestor("trim_cap", |config| config.stream_max_bytes = CAP).await;
    let stream = stack.events_stream().await;
    assert_eq!(stream.get_info().await.unwrap().config.max_bytes, CAP as i64);
    let acked = Arc::new(Acked::default());
    let progress = Arc::new(Progress::default());

    // Phase 1: a caught-up pipeline, 4x the cap.
    let first = stack.aggregator(TRIM_FAST);
    let stop_watching = CancellationToken::new();
    let watcher = tokio::spawn(watch(
        first.admin.clone(),
        stack.events_stream().await,
        progress.clone(),
        stop_watching.clone(),
    ));
    let loaders: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(load_caught_up(
                stack.grpc.clone(),
                acked.clone(),
                progress.clone(),
                4 * CAP,
            ))
        })
        .collect();
    for loader in loaders {
        tokio::time::timeout(Duration::from_secs(150), loader)
            .await
            .expect("4x the cap published within 150 s")
            .unwrap();
    }
    let phase_one = started.elapsed();
    let total = acked.events.load(Ordering::SeqCst);
    stack.wait_for_events(total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the views are written after the raw part
    stop_watching.cancel();
    watcher.await.unwrap();
    let errors = progress.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "a caught-up pipeline refused publishes: {errors:?}");
    stack.assert_exact(&acked).await;
    let published = progress.published_bytes.load(Ordering::SeqCst);
    let max_stream_bytes = progress.max_stream_bytes.load(Ordering::SeqCst);
    assert!(published >= 4 * CAP);
    assert!(max_stream_bytes < CAP, "the stream stayed below its cap");
    // The trim after the last commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let trimmed_by_first = trimmed_bytes(&first).await;
    assert!(
        trimmed_by_first > (3 * CAP) as f64,
        "most of what went through was trimmed: {trimmed_by_first}"
    );
    eprintln!(
        "phase 1: {total} events, {:.1} MiB published in {phase_one:?}, stream peaked at {:.1} MiB of {} MiB, {:.1} MiB trimmed",
        published as f64 / 1048576.0,
        max_stream_bytes as f64 / 1048576.0,
        CAP >> 20,
        trimmed_by_first / 1048576.0,
    );

    // Phase 2: nobody inserts; the backlog fills the cap and publishes are refused.
    first.kill9().await;
    let mut client = stack.client().await;
    let mut refused = None;
    for i in 0..(2 * CAP / (EVENTS_PER_REQUEST * BODY_BYTES) as u64) {
        let (request, cost) = large_request(&format!("backlog-{i}"));
        match client.publish(request.clone()).await {
            Ok(_) => count_acked(&acked, cost),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                refused = Some((request, cost, status));
                break;
            }
        }
    }
    let (request, cost, status) = refused.expect("a full stream refuses publishes");
    let full = stream.get_info().await.unwrap().state;
    assert!(full.bytes <= CAP && full.bytes > CAP - 2 * request.encoded_len() as u64);
    eprintln!(
        "phase 2: refused at {:.1} MiB stored with {:?}: {}",
        full.bytes as f64 / 1048576.0,
        status.code(),
        status.message()
    );

    // Restart: the backlog drains, gets trimmed, and the client's retry of the refused request
    // (same idempotency key) is accepted.
    let second = stack.aggregator(TRIM_FAST);
    let retry_until = Instant::now() + Duration::from_secs(60);
    loop {
        match client.publish(request.clone()).await {
            Ok(_) => break,
            Err(status) if Instant::now() < retry_until => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("still refused after the restart: {status:?}"),
        }
    }
    count_acked(&acked, cost);
    let total = acked.events.load(Ordering::SeqCst);
    stack.wait_for_events(total, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.assert_exact(&acked).await;

    // Everything is committed. With the default replay window (the 10-minute duplicate
    // window) committed history stays, but never more than half the cap: above that, trimming
    // ignores the window. (The NATS-crash test below checks that with no window the stream
    // shrinks to its newest message.)
    let mut end = stream.get_info().await.unwrap().state;
    let half_cap = CAP / 2;
    let trimmed_by = Instant::now() + Duration::from_secs(15);
    while end.bytes > half_cap && Instant::now() < trimmed_by {
        tokio::time::sleep(Duration::from_millis(200)).await;
        end = stream.get_info().await.unwrap().state;
    }
    assert!(end.bytes <= half_cap, "committed history above half the cap: {end:?}");
    assert!(
        stream.get_raw_message(end.last_sequence).await.is_ok(),
        "the newest message stays: {end:?}"
    );
    let trimmed_by_second = trimmed_bytes(&second).await;
    eprintln!(
        "end: {total} events exact; {:.1} MiB trimmed in all (estimate), stream holds {} messages / {} bytes \
         (last sequence {}); {:?} in all",
        (trimmed_by_first + trimmed_by_second) / 1048576.0,
        end.messages,
        end.bytes,
        end.last_sequence,
        started.elapsed()
    );
}

/// `--stream-keep-committed` keeps committed messages in the stream for that long, then trims
/// them.
#[tokio::test]
async fn committed_messages_stay_for_the_keep_window_then_go() {
    let stack = Stack::start("trim_keep").await;
    let stream = stack.events_stream().await;
    let _aggregator = stack.aggregator(&["--stream-keep-committed", "4s", "--stream-trim-interval", "200ms"]);
    let acked = Acked::default();
    let mut client = stack.client().await;
    for i in 0..20 {
        let (request, cost) = request(&format!("keep-{i}"), 10);
        client.publish(request).await.unwrap();
        acked.events.fetch_add(10, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(10, Ordering::SeqCst);
    }
    stack.wait_for_events(200, Duration::from_secs(60)).await;
    let inserted_at = Instant::now();
    let published = stream.get_info().await.unwrap().state.last_sequence;
    assert_eq!(published, 20);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stream.get_info().await.unwrap().state.messages,
        20,
        "committed less than 4 s ago: still in the stream"
    );
    let mut messages = 20;
    while messages > 1 && inserted_at.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        messages = stream.get_info().await.unwrap().state.messages;
    }
    assert_eq!(messages, 1, "trimmed (all but the newest) once the window passed");
    let kept_for = inserted_at.elapsed();
    assert!(kept_for >= Duration::from_secs(2), "kept only {kept_for:?}");
    stack.assert_exact(&acked).await;
    eprintln!("keep window 4 s: committed messages trimmed {kept_for:?} after they were seen inserted");
}

/// NATS 2.9 restarts a stream from sequence 1 when a filtered purge emptied it and the server then
/// crashed. Trimming never purges the newest message, so after trimming and a `kill -9` of
/// nats-server the stream continues its sequence, and what is published next lands exactly.
#[tokio::test]
async fn a_nats_crash_after_trimming_keeps_the_sequence_and_loses_nothing() {
    let mut stack = Stack::start("trim_nats_crash").await;
    let _aggregator = stack.aggregator(&["--stream-keep-committed", "0s", "--stream-trim-interval", "200ms"]);
    let acked = Acked::default();
    let mut client = stack.client().await;
    let publish_ten = |round: usize| (0..10).map(move |i| request(&format!("crash-{round}-{i}"), 10));
    for (request, cost) in publish_ten(0) {
        client.publish(request).await.unwrap();
        acked.events.fetch_add(10, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(10, Ordering::SeqCst);
    }
    stack.wait_for_events(100, Duration::from_secs(60)).await;
    let stream = stack.events_stream().await;
    let mut state = stream.get_info().await.unwrap().state;
    let trimmed_by = Instant::now() + Duration::from_secs(10);
    while state.messages > 1 && Instant::now() < trimmed_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = stream.get_info().await.unwrap().state;
    }
    assert_eq!(
        (state.messages, state.last_sequence),
        (1, 10),
        "trimmed to the newest: {state:?}"
    );

    stack.nats.stop(); // SIGKILL
    stack.nats.restart();
    let stream = stack.events_stream().await;
    let after = stream.get_info().await.unwrap().state;
    assert_eq!(after.last_sequence, 10, "the sequence survived the crash: {after:?}");

    for (request, cost) in publish_ten(1) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.publish(request.clone()).await {
                Ok(_) => break,
                Err(status) if Instant::now() < deadline => {
                    tracing::debug!(?status, "nats restarting; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("publish after the NATS restart: {status:?}"),
            }
        }
        acked.events.fetch_add(10, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(10, Ordering::SeqCst);
    }
    stack.wait_for_events(200, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.assert_exact(&acked).await;
    let state = stream.get_info().await.unwrap().state;
    assert!(
        state.last_sequence >= 20,
        "new messages continued the sequence: {state:?}"
    );
    eprintln!("nats kill -9 after trimming: sequence kept ({state:?}), 200 events exact");
}

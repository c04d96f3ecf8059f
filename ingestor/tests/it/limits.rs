//! Admission limits: unauthenticated calls cost no memory, the concurrent-call cap, the
//! in-flight bytes budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chute_ingestor::hooks::Hooks;
use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::{Event, PublishRequest};

use crate::edge::{path, ChildIngestor};
use crate::support::{event, TestIngestor};

const FLOOD_REQUESTS: usize = 50;
const FLOOD_REQUEST_BYTES: usize = 15 << 20;
/// What "a few MiB" means here: 50 × 15 MiB decoded would be ~750 MiB.
const FLOOD_RSS_GROWTH_LIMIT_KIB: u64 = 8 << 10;

/// 50 concurrent 15 MiB requests without a key, each on its own connection, against the
/// `ingestor` binary: all UNAUTHENTICATED, and the process's RSS (sampled every 2 ms while they
/// run) grows by a few MiB at most.
#[tokio::test]
async fn a_flood_of_large_unauthenticated_requests_is_refused_without_growing_rss() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "acme acme-key-0123456789\n").unwrap();
    let ingestor = ChildIngestor::start(&["--api-keys-file", &path(&keys)]).await;
    let target = format!("http://{}", ingestor.grpc_addr);

    let body = "x".repeat(64 << 10);
    let request = PublishRequest {
        events: (0..FLOOD_REQUEST_BYTES / body.len())
            .map(|i| Event {
                body: body.clone(),
                ..event("acme", i)
            })
            .collect(),
        idempotency_key: "flood".into(),
    };
    let mut clients = Vec::new();
    for _ in 0..FLOOD_REQUESTS {
        clients.push(IngestServiceClient::connect(target.clone()).await.unwrap());
    }
    // Warm-up: one refused call per connection, so the baseline includes the connections.
    let small = PublishRequest {
        events: vec![event("acme", 0)],
        idempotency_key: "warm".into(),
    };
    for client in &mut clients {
        let refused = client.publish(small.clone()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    let baseline_kib = ingestor.status_kib("VmRSS");

    let peak_kib = Arc::new(AtomicU64::new(baseline_kib));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let (peak_kib, flooding) = (peak_kib.clone(), flooding.clone());
        let status = format!("/proc/{}/status", ingestor.pid());
        move || {
            while flooding.load(Ordering::Relaxed) {
                if let Some(rss) = std::fs::read_to_string(&status).ok().and_then(|text| {
                    text.lines()
                        .find_map(|line| line.strip_prefix("VmRSS:"))
                        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                }) {
                    peak_kib.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let started = Instant::now();
    let calls = clients.into_iter().map(|mut client| {
        let request = request.clone();
        tokio::spawn(async move { client.publish(request).await })
    });
    let answers = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(calls))
        .await
        .expect("the flood is answered within 120 s");
    let elapsed = started.elapsed();
    flooding.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    for answer in answers {
        let status = answer.unwrap().expect_err("an unauthenticated call is refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let peak_kib = peak_kib.load(Ordering::Relaxed);
    let after_kib = ingestor.status_kib("VmRSS");
    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    println!(
        "flood: {FLOOD_REQUESTS} x {} MiB unauthenticated requests answered UNAUTHENTICATED in {elapsed:?}; \
         ingestor RSS baseline {:.1} MiB, peak {:.1} MiB (+{:.1} MiB), after {:.1} MiB, VmHWM {:.1} MiB",
        FLOOD_REQUEST_BYTES >> 20,
        baseline_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        growth_kib as f64 / 1024.0,
        after_kib as f64 / 1024.0,
        ingestor.status_kib("VmHWM") as f64 / 1024.0,
    );
    assert!(
        growth_kib < FLOOD_RSS_GROWTH_LIMIT_KIB,
        "RSS grew by {growth_kib} KiB during the flood (limit {FLOOD_RSS_GROWTH_LIMIT_KIB} KiB)"
    );
    let metrics = chute_common::testing::http_get(ingestor.admin_addr, "/metrics").await.1;
    let refused = metrics
        .lines()
        .find(|line| line.starts_with("chute_ingest_admission_refused_total{reason=\"unauthenticated\"}"))
        .unwrap_or_else(|| panic!("no refusal counter in\n{metrics}"));
    assert!(refused.ends_with(&(2 * FLOOD_REQUESTS).to_string()), "{refused}");
}

#[tokio::test]
async fn calls_beyond_the_concurrency_cap_are_refused_until_one_ends() {
    let ingestor = TestIngestor::start_with(|config| config.max_concurrent_calls = 1).await;
    let mut client = ingestor.client().await;
    let request = PublishRequest {
        events: vec![event("acme", 0)],
        idempotency_key: "cap".into(),
    };
    assert!(client.publish(request.clone()).await.is_ok());

    // An open stream holds the only slot.
    let (sender, receiver) = tokio::sync::mpsc::channel::<PublishRequest>(1);
    let stream = client
        .clone()
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap();
    let refused = client.publish(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("concurrent calls"), "{refused:?}");

    drop(sender);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.publish(request.clone()).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("the slot never came back: {status:?}"),
        }
    }
    ingestor.stop().await;
}

/// A request whose publish is lost holds its bytes until it fails (publish timeout, 2 s); a
/// second one that does not fit in the budget meanwhile fails after the budget wait, and fits
/// once the first is answered.
#[tokio::test]
async fn request_bytes_beyond_the_budget_wait_then_fail() {
    let hooks = Hooks::default().lose_next_publish(0);
    let ingestor = TestIngestor::start_with_hooks(
        |config| {
            config.max_inflight_bytes = 96 << 10;
            config.inflight_bytes_wait = Duration::from_millis(300);
        },
        hooks,
    )
    .await;
    let client = ingestor.client().await;
    let request = |key: &str| PublishRequest {
        events: (0..4)
            .map(|i| Event {
                body: "b".repeat(15 << 10),
                ..event("acme", i)
            })
            .collect(),
        idempotency_key: key.into(),
    };
    let held = tokio::spawn({
        let mut client = client.clone();
        let request = request("held");
        async move { client.publish(request).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let refused = client.clone().publish(request("waits")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("memory budget"), "{refused:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    let lost = held.await.unwrap().unwrap_err();
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    let answer = client.clone().publish(request("fits")).await.unwrap().into_inner();
    assert_eq!(answer.accepted, 4);
    ingestor.stop().await;
}

//! The live stream delivers events published through the real ingestor, filtered by tenant and
//! name; measures accepted -> delivered latency. Each tenant is read from its own `live.<tenant>`
//! subject, and a retried (duplicate) publish sends no second live copy.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use chute_common::testing::nats::NatsServer;
use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::{Event, PublishRequest};
use chute_query_api::{app, StreamHub};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::support::*;

const EVENTS: usize = 40;

fn event(tenant: &str, name: &str, id: &uuid::Uuid) -> Event {
    let nanos = now_ms() * 1_000_000;
    Event {
        event_id: id.to_string(),
        tenant: tenant.into(),
        name: name.into(),
        time: Some(chute_common::validate::timestamp_from_nanos(nanos)),
        session_id: "conv-1".into(),
        user_id: "user-1".into(),
        metrics: [("latency_ms".to_string(), 12.5)].into(),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test]
async fn stream_delivers_ingested_events_quickly() {
    let nats = NatsServer::start();
    let shutdown = CancellationToken::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let ingestor_config = chute_ingestor::Config {
        nats: chute_common::config::NatsArgs::with_url(nats.url()),
        ..Default::default()
    };
    tokio::spawn(chute_ingestor::run(grpc, admin, ingestor_config, shutdown.clone()));

    let hub = StreamHub::new(1024);
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    tokio::spawn(hub.clone().run(nats_client.clone(), shutdown.clone()));
    let api = TestApi::start_with_hub("qa_stream_delivers", |_| {}, Some(hub.clone())).await;

    let response = app(api.state.clone())
        .oneshot(
            Request::builder()
                .uri("/v1/stream?tenant=acme&name=llm.request")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut rx = sse_frames(response);

    wait_until(Duration::from_secs(10), "the hub's live.acme subscription", || {
        hub.is_subscribed("acme")
    })
    .await;
    let mut client = IngestServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let mut sent = HashMap::new();
    let mut accepted = HashMap::new();
    for i in 0..EVENTS {
        // Events for another tenant and another name must not arrive.
        let noise = uuid::Uuid::new_v4();
        let other_name = uuid::Uuid::new_v4();
        let id = uuid::Uuid::new_v4();
        let events = vec![
            event("globex", "llm.request", &noise),
            event("acme", "page.view", &other_name),
            event("acme", "llm.request", &id),
        ];
        let started = Instant::now();
        let response = client
            .publish(PublishRequest {
                events,
                idempotency_key: format!("stream-test-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.accepted, 3);
        sent.insert(id.to_string(), started);
        accepted.insert(id.to_string(), Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut after_accept_ms = Vec::new();
    let mut after_send_ms = Vec::new();
    let mut summaries = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while after_send_ms.len() < EVENTS || summaries == 0 {
        let (kind, data, at) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .expect("every event delivered within 10 s")
            .unwrap();
        match kind.as_str() {
            "event" => {
                let json: serde_json::Value = serde_json::from_str(&data).unwrap();
                assert_eq!(json["tenant"], "acme");
                assert_eq!(json["name"], "llm.request");
                let id = json["event_id"].as_str().unwrap();
                let sent_at = sent[id];
                after_send_ms.push(at.duration_since(sent_at).as_secs_f64() * 1e3);
                // Delivery may precede the ack (the subscriber sees the message when NATS
                // stores it, the ack needs one more hop): negative values are kept.
                let accepted_at = accepted[id];
                let signed = if at >= accepted_at {
                    at.duration_since(accepted_at).as_secs_f64() * 1e3
                } else {
                    -(accepted_at.duration_since(at).as_secs_f64() * 1e3)
                };
                after_accept_ms.push(signed);
            }
            "summary" => {
                let json: serde_json::Value = serde_json::from_str(&data).unwrap();
                assert!(json["count"].is_u64() && json["rate"].is_number(), "{json}");
                summaries += 1;
            }
            other => panic!("unexpected {other} event: {data}"),
        }
    }
    after_accept_ms.sort_by(f64::total_cmp);
    after_send_ms.sort_by(f64::total_cmp);
    println!(
        "live stream latency over {EVENTS} events: publish-call start -> delivered p50 {:.2} ms \
         p99 {:.2} ms max {:.2} ms; ack received -> delivered p50 {:.2} ms p99 {:.2} ms",
        percentile(&after_send_ms, 0.5),
        percentile(&after_send_ms, 0.99),
        after_send_ms.last().unwrap(),
        percentile(&after_accept_ms, 0.5),
        percentile(&after_accept_ms, 0.99),
    );
    assert!(
        percentile(&after_send_ms, 0.99) < 100.0,
        "accepted -> delivered under 100 ms"
    );
    shutdown.cancel();
}

/// The SSE frames of `response` as `(event kind, data, arrival)`, read on a task.
fn sse_frames(response: axum::response::Response) -> tokio::sync::mpsc::UnboundedReceiver<(String, String, Instant)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
    let mut body = response.into_body();
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let kind = block
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .unwrap_or("")
                    .to_owned();
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("")
                    .to_owned();
                if tx.send((kind, data, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Polls `condition` every 20 ms; panics naming `what` after `timeout`.
async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} not reached within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_tenant_reads_only_its_live_subject_and_a_duplicate_sends_no_second_copy_with_nats_users() {
    // The users and permissions Chute ships: the ingestor may publish `live.*`, the query API
    // may only subscribe to it.
    let nats = NatsServer::with_chute_users();
    let shutdown = CancellationToken::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let ingestor_config = chute_ingestor::Config {
        nats: nats.chute_user("ingestor"),
        ..Default::default()
    };
    tokio::spawn(chute_ingestor::run(grpc, admin, ingestor_config, shutdown.clone()));

    // Every live copy the ingestor sends, as NATS carries it.
    let observer = nats.chute_user("query-api").connect("observer").await.unwrap();
    let mut copies = observer.subscribe("live.>").await.unwrap();
    observer.flush().await.unwrap();

    let hub = StreamHub::new(1024);
    let hub_client = nats.chute_user("query-api").connect("chute-query-api").await.unwrap();
    tokio::spawn(hub.clone().run(hub_client, shutdown.clone()));
    let api = TestApi::start_with_hub("qa_stream_isolation", |_| {}, Some(hub.clone())).await;
    let response = app(api.state.clone())
        .oneshot(
            Request::builder()
                .uri("/v1/stream?tenant=acme")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut frames = sse_frames(response);
    wait_until(Duration::from_secs(10), "the hub's live.acme subscription", || {
        hub.is_subscribed("acme")
    })
    .await;
    assert_eq!(hub.tenants(), ["acme"], "only the tenant asked for is subscribed");

    let mut client = IngestServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let acme_ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    let acme_request = PublishRequest {
        events: acme_ids.iter().map(|id| event("acme", "llm.request", id)).collect(),
        idempotency_key: "isolation-acme-1".into(),
    };
    assert_eq!(
        client
            .publish(acme_request.clone())
            .await
            .unwrap()
            .into_inner()
            .accepted,
        3
    );
    // The retry: JetStream answers `duplicate`, so the ingestor sends no live copy.
    assert_eq!(client.publish(acme_request).await.unwrap().into_inner().accepted, 3);
    let globex = PublishRequest {
        events: vec![event("globex", "llm.request", &uuid::Uuid::new_v4())],
        idempotency_key: "isolation-globex-1".into(),
    };
    assert_eq!(client.publish(globex).await.unwrap().into_inner().accepted, 1);
    // A request of both tenants (no API keys here): each subject gets its own tenant's events.
    let mixed_acme = uuid::Uuid::new_v4();
    let mixed = PublishRequest {
        events: vec![
            event("globex", "llm.request", &uuid::Uuid::new_v4()),
            event("acme", "llm.request", &mixed_acme),
        ],
        idempotency_key: "isolation-mixed-1".into(),
    };
    assert_eq!(client.publish(mixed).await.unwrap().into_inner().accepted, 2);
    // The fence: the ingestor's copies leave on one connection in order, so a copy of the
    // duplicate would have arrived before this one.
    let fence = uuid::Uuid::new_v4();
    let fence_request = PublishRequest {
        events: vec![event("acme", "fence", &fence)],
        idempotency_key: "isolation-fence".into(),
    };
    assert_eq!(client.publish(fence_request).await.unwrap().into_inner().accepted, 1);

    let mut per_subject: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline.into(), copies.next())
            .await
            .expect("the fence's live copy within 10 s")
            .unwrap();
        let batch = chute_common::payload::decode(&message.payload).unwrap();
        let subject_tenant = message.subject.as_str().strip_prefix("live.").unwrap().to_owned();
        for event in &batch.events {
            assert_eq!(
                event.tenant, subject_tenant,
                "an event on another tenant's live subject"
            );
        }
        let ids: Vec<String> = batch.events.iter().map(|event| event.event_id.clone()).collect();
        let is_fence = ids == [fence.to_string()];
        per_subject.entry(subject_tenant).or_default().push(ids);
        if is_fence {
            break;
        }
    }
    let acme_copies = &per_subject["acme"];
    let expected_first: Vec<String> = acme_ids.iter().map(ToString::to_string).collect();
    assert_eq!(
        acme_copies,
        &vec![expected_first, vec![mixed_acme.to_string()], vec![fence.to_string()]],
        "live.acme: the request once (not its duplicate), the mixed request's acme event, the fence"
    );
    assert_eq!(
        per_subject["globex"].len(),
        2,
        "live.globex: its request and the mixed one"
    );

    // The acme SSE subscriber: the same five events, each once, and nothing of globex.
    let mut delivered = Vec::new();
    while delivered.last() != Some(&fence.to_string()) {
        let (kind, data, _) = tokio::time::timeout_at(deadline.into(), frames.recv())
            .await
            .expect("the fence on the SSE stream within 10 s")
            .unwrap();
        if kind == "event" {
            let json: serde_json::Value = serde_json::from_str(&data).unwrap();
            assert_eq!(json["tenant"], "acme", "{json}");
            delivered.push(json["event_id"].as_str().unwrap().to_owned());
        }
    }
    let mut expected: Vec<String> = acme_ids.iter().map(ToString::to_string).collect();
    expected.extend([mixed_acme.to_string(), fence.to_string()]);
    assert_eq!(delivered, expected);

    // The last subscriber leaving drops the tenant's subscription.
    drop(frames);
    wait_until(Duration::from_secs(10), "live.acme dropped", || {
        hub.tenants().is_empty()
    })
    .await;
    let log = nats.log();
    assert!(
        !log.contains("Violation"),
        "a service needed more than its permissions:\n{log}"
    );
    shutdown.cancel();
}

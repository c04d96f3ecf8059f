use chute_common::partition::partition_for;
use chute_proto::v1::PublishRequest;
use futures::StreamExt;

use crate::support::{event, TestIngestor};

#[tokio::test]
async fn a_published_batch_lands_in_its_partition_as_one_message() {
    let ingestor = TestIngestor::start().await;
    let events: Vec<_> = (0..3).map(|i| event("acme", i)).collect();
    let response = ingestor
        .client()
        .await
        .publish(PublishRequest {
            events: events.clone(),
            idempotency_key: "req-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (3, 0));

    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 1, "one request, one message");
    assert_eq!(
        stored[0].subject,
        format!("events.{}", partition_for("acme", "req-1", 16))
    );
    assert!(stored[0].msg_id.is_some(), "an idempotency key gives a Nats-Msg-Id");
    let batch = &stored[0].batch;
    assert_eq!(
        (batch.chunk_index, batch.chunk_count, batch.idempotency_key.as_str()),
        (0, 1, "req-1")
    );
    assert!(batch.received_unix_nanos > 0);
    for (sent, got) in events.iter().zip(&batch.events) {
        assert_eq!(
            got.event_id,
            chute_common::validate::derive_event_id("acme", "req-1", sent_index(&events, sent)).to_string()
        );
        assert_eq!(
            (&got.tenant, &got.name, &got.time),
            (&sent.tenant, &sent.name, &sent.time)
        );
        assert_eq!(
            (&got.attributes, &got.metrics, &got.body),
            (&sent.attributes, &sent.metrics, &sent.body)
        );
        assert_eq!((&got.session_id, &got.user_id), (&sent.session_id, &sent.user_id));
    }
}

fn sent_index(events: &[chute_proto::v1::Event], event: &chute_proto::v1::Event) -> usize {
    events
        .iter()
        .position(|candidate| std::ptr::eq(candidate, event))
        .unwrap()
}

#[tokio::test]
async fn a_retried_request_is_stored_once_with_the_same_ids() {
    let ingestor = TestIngestor::start().await;
    let mut client = ingestor.client().await;
    let request = PublishRequest {
        events: (0..50).map(|i| event("acme", i)).collect(),
        idempotency_key: "retry-me".into(),
    };
    let first = client.publish(request.clone()).await.unwrap().into_inner();
    let second = client.publish(request.clone()).await.unwrap().into_inner();
    assert_eq!((first.accepted, second.accepted), (50, 50));
    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 1, "the retry must not add a stream message");

    // A different key is a different request.
    client
        .publish(PublishRequest {
            idempotency_key: "other".into(),
            ..request
        })
        .await
        .unwrap();
    assert_eq!(ingestor.stored_messages().await.len(), 2);
}

#[tokio::test]
async fn a_large_request_is_chunked_and_a_retry_dedupes_every_chunk() {
    let ingestor = TestIngestor::start_with(|config| config.max_message_bytes = 16 * 1024).await;
    let mut client = ingestor.client().await;
    let events: Vec<_> = (0..200)
        .map(|i| chute_proto::v1::Event {
            body: "x".repeat(500),
            ..event("acme", i)
        })
        .collect();
    let request = PublishRequest {
        events: events.clone(),
        idempotency_key: "big".into(),
    };
    assert_eq!(
        client.publish(request.clone()).await.unwrap().into_inner().accepted,
        200
    );
    let stored = ingestor.stored_messages().await;
    assert!(stored.len() > 5, "expected several chunks, got {}", stored.len());
    let subjects: std::collections::HashSet<_> = stored.iter().map(|m| m.subject.clone()).collect();
    assert_eq!(subjects.len(), 1, "all chunks of a request share its partition");
    let bodies: Vec<_> = stored
        .iter()
        .flat_map(|m| m.batch.events.iter().map(|e| e.session_id.clone() + &e.body))
        .collect();
    let expected: Vec<_> = events.iter().map(|e| e.session_id.clone() + &e.body).collect();
    assert_eq!(bodies, expected, "chunks keep the request's order");

    client.publish(request).await.unwrap();
    assert_eq!(
        ingestor.stored_messages().await.len(),
        stored.len(),
        "retry dedupes every chunk"
    );
}

#[tokio::test]
async fn requests_without_a_key_get_fresh_v7_ids_and_spread_over_partitions() {
    let ingestor = TestIngestor::start().await;
    let mut client = ingestor.client().await;
    for i in 0..40 {
        client
            .publish(PublishRequest {
                events: vec![event("acme", i)],
                idempotency_key: String::new(),
            })
            .await
            .unwrap();
    }
    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 40);
    assert!(stored.iter().all(|m| m.msg_id.is_none()));
    let partitions: std::collections::HashSet<_> = stored.iter().map(|m| m.subject.clone()).collect();
    assert!(partitions.len() > 5, "random partitions should spread: {partitions:?}");
    let id = uuid::Uuid::parse_str(&stored[0].batch.events[0].event_id).unwrap();
    assert_eq!(id.get_version_num(), 7);
}

#[tokio::test]
async fn publish_stream_answers_each_request_in_order() {
    let ingestor = TestIngestor::start().await;
    let requests: Vec<_> = (0..20)
        .map(|i| PublishRequest {
            events: (0..(i % 4 + 1)).map(|j| event("acme", j)).collect(),
            idempotency_key: format!("s-{i}"),
        })
        .collect();
    let expected: Vec<u32> = requests.iter().map(|r| r.events.len() as u32).collect();
    let responses = ingestor
        .client()
        .await
        .publish_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let accepted: Vec<u32> = responses.map(|r| r.unwrap().accepted).collect().await;
    assert_eq!(accepted, expected);
    assert_eq!(ingestor.stored_messages().await.len(), 20);
}

#[tokio::test]
async fn health_reflection_and_metrics_are_served() {
    let ingestor = TestIngestor::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", ingestor.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "chute.v1.IngestService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    ingestor
        .client()
        .await
        .publish(PublishRequest {
            events: vec![event("acme", 1)],
            idempotency_key: "m".into(),
        })
        .await
        .unwrap();
    let (status, metrics) = ingestor.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "chute_ingest_events_accepted_total",
        "chute_ingest_request_duration_seconds_bucket",
        "chute_ingest_publish_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    assert_eq!(ingestor.admin_get("/healthz").await.0, 200);
    ingestor.stop().await;
}

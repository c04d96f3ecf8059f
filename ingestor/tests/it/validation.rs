use chute_proto::v1::{Event, PublishRequest};

use crate::support::{event, TestIngestor};

/// Partial success over gRPC: each invalid event is refused with its index, field and reason,
/// the valid ones are stored, and nothing invalid reaches the stream. (Every rule's accepted and
/// rejected cases are unit-tested in `chute_common::validate`.)
#[tokio::test]
async fn invalid_events_are_refused_individually_and_never_stored() {
    let ingestor = TestIngestor::start().await;
    let valid = event("acme", 0);
    let cases: Vec<(Event, Option<&str>)> = vec![
        (valid.clone(), None),
        (
            Event {
                name: "bad name!".into(),
                ..valid.clone()
            },
            Some("name"),
        ),
        (
            Event {
                tenant: "ACME".into(),
                ..valid.clone()
            },
            Some("tenant"),
        ),
        (
            Event {
                event_id: "nope".into(),
                ..valid.clone()
            },
            Some("event_id"),
        ),
        (
            Event {
                time: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
                ..valid.clone()
            },
            Some("time"),
        ),
        (
            Event {
                metrics: [("cost".to_string(), f64::NAN)].into(),
                ..valid.clone()
            },
            Some("metrics[cost]"),
        ),
        (
            Event {
                body: "b".repeat(64 * 1024 + 1),
                ..valid.clone()
            },
            Some("body"),
        ),
        (
            Event {
                attributes: (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..valid.clone()
            },
            Some("attributes"),
        ),
        (
            Event {
                name: "ok.name:v-2_x".into(),
                event_id: uuid::Uuid::new_v4().to_string(),
                ..valid.clone()
            },
            None,
        ),
    ];
    let events: Vec<Event> = cases.iter().map(|(event, _)| event.clone()).collect();
    let response = ingestor
        .client()
        .await
        .publish(PublishRequest {
            events,
            idempotency_key: "mixed".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let expected_rejections: Vec<(u32, &str)> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, (_, field))| field.map(|field| (i as u32, field)))
        .collect();
    let got: Vec<(u32, &str)> = response.errors.iter().map(|e| (e.index, e.field.as_str())).collect();
    assert_eq!(got, expected_rejections);
    assert!(response.errors.iter().all(|e| !e.reason.is_empty()));
    assert_eq!((response.accepted, response.rejected), (2, 7));

    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 1);
    let names: Vec<_> = stored[0].batch.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["llm.request", "ok.name:v-2_x"]);
}

#[tokio::test]
async fn a_request_with_only_invalid_events_publishes_nothing() {
    let ingestor = TestIngestor::start().await;
    let bad = Event {
        name: String::new(),
        ..event("acme", 0)
    };
    let response = ingestor
        .client()
        .await
        .publish(PublishRequest {
            events: vec![bad],
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.accepted, response.rejected, response.errors[0].field.as_str()),
        (0, 1, "name")
    );
    assert_eq!(response.errors[0].reason, "required");
    assert!(ingestor.stored_messages().await.is_empty());
}

#[tokio::test]
async fn whole_request_limits_answer_with_clear_codes() {
    let ingestor = TestIngestor::start_with(|config| {
        config.max_request_events = 10;
        config.max_request_bytes = 64 * 1024;
    })
    .await;
    let mut client = ingestor.client().await;

    let too_many = PublishRequest {
        events: (0..11).map(|i| event("acme", i)).collect(),
        idempotency_key: String::new(),
    };
    let status = client.publish(too_many).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("11 events; the limit is 10"),
        "{}",
        status.message()
    );

    let too_big = PublishRequest {
        events: vec![Event {
            body: "x".repeat(65 * 1024),
            ..event("acme", 0)
        }],
        idempotency_key: String::new(),
    };
    let status = client.publish(too_big).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("the limit is 65536"), "{}", status.message());

    let bad_key = PublishRequest {
        events: vec![event("acme", 0)],
        idempotency_key: "k".repeat(300),
    };
    assert_eq!(
        client.publish(bad_key).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert!(ingestor.stored_messages().await.is_empty());
}

use chute_proto::v1::{Event, PublishRequest};
use tonic::metadata::MetadataValue;

use crate::support::{event, TestIngestor};

fn with_key(request: PublishRequest, key: &str) -> tonic::Request<PublishRequest> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    request
}

#[tokio::test]
async fn api_keys_gate_calls_and_scope_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "acme acme-key-0123456789\nglobex globex-key-0123456789\n").unwrap();
    let ingestor = TestIngestor::start_with(|config| config.api_keys.file = Some(keys)).await;
    let mut client = ingestor.client().await;
    let request = PublishRequest {
        events: vec![event("acme", 0)],
        idempotency_key: "a".into(),
    };

    let missing = client.publish(request.clone()).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    let wrong = client
        .publish(with_key(request.clone(), "not-a-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(
        (wrong.code(), wrong.message()),
        (tonic::Code::Unauthenticated, "unknown api key")
    );

    // The key's tenant fills an empty tenant; another tenant's event is refused, the rest stored.
    let mixed = PublishRequest {
        events: vec![
            event("acme", 0),
            Event {
                tenant: String::new(),
                ..event("x", 1)
            },
            event("globex", 2),
        ],
        idempotency_key: "b".into(),
    };
    let response = client
        .publish(with_key(mixed, "acme-key-0123456789"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (2, 1));
    assert_eq!(
        (response.errors[0].index, response.errors[0].field.as_str()),
        (2, "tenant")
    );
    assert!(response.errors[0].reason.contains("API key"));

    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 1);
    assert!(stored[0].batch.events.iter().all(|e| e.tenant == "acme"));

    // Streams are authenticated too.
    let stream = client
        .publish_stream(futures::stream::iter(vec![request]))
        .await
        .unwrap_err();
    assert_eq!(stream.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn a_broken_keys_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "acme\n").unwrap();
    let nats = chute_common::testing::nats::NatsServer::start();
    let config = chute_ingestor::Config {
        nats: chute_common::config::NatsArgs::with_url(nats.url()),
        api_keys: chute_common::config::ApiKeysArgs { file: Some(keys) },
        ..Default::default()
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = chute_ingestor::run(grpc, admin, config, Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

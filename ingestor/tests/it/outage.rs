use std::time::{Duration, Instant};

use chute_proto::v1::PublishRequest;

use crate::support::{event, TestIngestor};

#[tokio::test]
async fn nats_down_fails_fast_with_unavailable_and_recovers() {
    let mut ingestor = TestIngestor::start().await;
    let mut client = ingestor.client().await;
    let request = |i: usize| PublishRequest {
        events: vec![event("acme", i)],
        idempotency_key: format!("outage-{i}"),
    };
    client.publish(request(0)).await.unwrap();

    ingestor.nats.stop();
    let started = Instant::now();
    let status = loop {
        match client.publish(request(1)).await {
            Err(status) => break status,
            Ok(_) if started.elapsed() < Duration::from_secs(5) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => panic!("publishes kept succeeding with nats down"),
        }
    };
    let failed_after = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(failed_after < Duration::from_secs(5), "took {failed_after:?}");
    let call = Instant::now();
    assert_eq!(
        client.publish(request(2)).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    assert!(
        call.elapsed() < Duration::from_secs(3),
        "a call while down took {:?}",
        call.elapsed()
    );
    let mut not_ready = false;
    for _ in 0..50 {
        if ingestor.admin_get("/readyz").await.0 == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_ready, "/readyz must report 503 while jetstream is down");

    ingestor.nats.restart();
    let resumed = Instant::now();
    loop {
        match client.publish(request(3)).await {
            Ok(response) => {
                assert_eq!(response.into_inner().accepted, 1);
                break;
            }
            Err(status) if resumed.elapsed() < Duration::from_secs(20) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("publishing did not resume after nats restarted: {status:?}"),
        }
    }
    let events: Vec<String> = ingestor
        .stored_messages()
        .await
        .iter()
        .map(|m| m.batch.idempotency_key.clone())
        .collect();
    assert!(
        events.contains(&"outage-0".to_string()) && events.contains(&"outage-3".to_string()),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_unreachable_nats_refuses_to_start_after_a_bounded_wait() {
    let port = chute_common::testing::free_port();
    let config = chute_ingestor::Config {
        nats: chute_common::config::NatsArgs {
            url: format!("nats://127.0.0.1:{port}"),
            connect_wait: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let err = chute_ingestor::run(grpc, admin, config, Default::default())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let nats = chute_common::testing::nats::NatsServer::start();
    let grpc_port = chute_common::testing::free_port();
    let admin_port = chute_common::testing::free_port();
    let mut child = chute_common::testing::service_command(env!("CARGO_BIN_EXE_ingestor"))
        .args([
            "--nats-url",
            &nats.url(),
            "--grpc-listen",
            &format!("127.0.0.1:{grpc_port}"),
        ])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        // The OTLP listeners' fixed default ports (4317, 4318) may be taken on this machine.
        .args(["--otlp-grpc-listen", "off", "--otlp-http-listen", "off"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{grpc_port}");
    let connecting = Instant::now();
    let mut client = loop {
        match chute_proto::v1::ingest_service_client::IngestServiceClient::connect(addr.clone()).await {
            Ok(client) => break client,
            Err(_) if connecting.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => panic!("the ingestor binary did not listen within 30 s: {err}"),
        }
    };
    let mut accepted = 0;
    for attempt in 0..100 {
        if let Ok(response) = client
            .publish(PublishRequest {
                events: vec![event("acme", 0)],
                idempotency_key: "t".into(),
            })
            .await
        {
            accepted = response.into_inner().accepted;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50 + attempt)).await;
    }
    assert_eq!(accepted, 1);
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A NATS server that cannot reserve the stream's size (its `max_file_store` is smaller than
/// `--stream-max-bytes`, as on a machine short of disk) stops the ingestor at start with an
/// error that says what to change; a stream that fits starts.
#[tokio::test]
async fn a_stream_larger_than_the_servers_storage_is_refused_with_the_remedy() {
    let nats = chute_common::testing::nats::NatsServer::with_max_file_store("256MB");
    let run = |stream_max_bytes: u64| {
        let url = nats.url();
        async move {
            let config = chute_ingestor::Config {
                nats: chute_common::config::NatsArgs::with_url(url),
                stream_max_bytes,
                ..Default::default()
            };
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            let task = tokio::spawn(chute_ingestor::run(grpc, admin, config, shutdown));
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the ingestor stops")
                .unwrap()
        }
    };

    let err = run(16 << 30).await.expect_err("a 16 GiB stream on 256 MB of storage");
    let message = format!("{err:#}");
    assert!(message.contains("10047"), "{message}");
    assert!(message.contains("--stream-max-bytes"), "{message}");
    assert!(message.contains("16.0 GiB"), "{message}");

    run(64 << 20).await.expect("a 64 MiB stream fits");
}

//! The pipeline under the NATS users and permissions Chute ships (`deploy/nats/chute-nats.conf`):
//! the ingestor, the aggregator and the operator subcommands each with their own credentials,
//! none needing more than its permissions, and every acknowledged event lands exactly once.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chute_common::testing::nats::NatsServer;

use crate::support::{cli, request, Acked, Aggregator, Stack};

/// Waits (bounded) until the aggregator's unlabelled metric `name` reaches `at_least`.
async fn wait_for_metric(aggregator: &Aggregator, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = aggregator.metric(name).await;
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {value}, not {at_least}, after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn each_service_with_its_own_nats_user_lands_events_exactly() {
    let nats = NatsServer::with_chute_users();
    let ingestor_nats = nats.chute_user("ingestor");
    let aggregator_flags = nats.chute_user_flags("aggregator");
    let operator_flags = nats.chute_user_flags("operator");
    let stack = Stack::start_with_nats("nats_users_exact", nats, move |config| {
        config.nats = ingestor_nats;
    })
    .await;
    // A short keep window: committed messages are purged from EVENTS within the test, so the
    // aggregator's purge right is exercised too.
    let mut flags: Vec<&str> = aggregator_flags.iter().map(String::as_str).collect();
    flags.extend(["--stream-keep-committed", "1s", "--stream-trim-interval", "200ms"]);
    let aggregator = stack.aggregator(&flags);

    let acked = Acked::default();
    let mut client = stack.client().await;
    for i in 0..20 {
        let (req, cost) = request(&format!("users-{i}"), 25);
        client.publish(req.clone()).await.unwrap();
        // A retry with the same key: stored once, counted once.
        if i % 5 == 0 {
            client.publish(req).await.unwrap();
        }
        acked.events.fetch_add(25, Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, Ordering::SeqCst);
        acked.sessions.fetch_add(25, Ordering::SeqCst);
    }
    // A message the ingestor did not vet (published, now that the stream exists, with the
    // operator's user, which may publish events): the aggregator dead-letters it with its own.
    let operator = stack.nats.chute_user("operator").connect("poisoner").await.unwrap();
    async_nats::jetstream::new(operator)
        .publish("events.3", b"\xff\x00garbage".as_slice().into())
        .await
        .unwrap()
        .await
        .unwrap();

    stack.wait_for_events(500, Duration::from_secs(60)).await;
    stack.assert_exact(&acked).await;
    assert_eq!(aggregator.metric("chute_aggregator_owned_partitions").await, 16.0);

    // The operator subcommands with the operator's user.
    let mut args = vec!["ledger", "show"];
    args.extend(operator_flags.iter().map(String::as_str));
    let ledger = cli(&stack, &args).await;
    assert!(ledger.contains("\"revision\""), "{ledger}");
    wait_for_metric(&aggregator, "chute_aggregator_dlq_messages_total", 1.0).await;
    let mut args = vec!["dlq", "list"];
    args.extend(operator_flags.iter().map(String::as_str));
    let dead_letters = cli(&stack, &args).await;
    assert_eq!(dead_letters.lines().count(), 1, "{dead_letters}");
    // A replay re-publishes it to `events.3` (the operator's right); still poison, it is
    // dead-lettered again.
    let mut args = vec!["dlq", "replay"];
    args.extend(operator_flags.iter().map(String::as_str));
    assert!(cli(&stack, &args).await.contains("replayed 1"));
    wait_for_metric(&aggregator, "chute_aggregator_dlq_messages_total", 2.0).await;
    stack.assert_exact(&acked).await;
    wait_for_metric(&aggregator, "chute_aggregator_stream_trimmed_messages_total", 1.0).await;

    let log = stack.nats.log();
    assert!(
        !log.contains("Violation"),
        "a service needed more than its permissions:\n{log}"
    );

    // Refused credentials stop a service at once instead of retrying for the connect wait.
    let started = Instant::now();
    let output = chute_common::testing::service_command(env!("CARGO_BIN_EXE_aggregator"))
        .args(["--nats-url", &stack.nats.url(), "--nats-connect-wait", "30s"])
        .args(["--nats-user", "chute-aggregator", "--nats-password", "wrong"])
        .args(["--log", "warn", "dlq", "list"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refused password was retried for {:?}",
        started.elapsed()
    );
}

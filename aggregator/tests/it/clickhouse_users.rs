//! Every service with its own ClickHouse user (issue 11): `aggregator migrate` run as the
//! server's admin creates the users from secret files, a second run as the migrations user
//! converges them, the aggregator inserts as its user and the query API reads as its read-only
//! user, and events land. The dev server enforces users and grants like clickhouse-server.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{http_get, request, spawn_aggregator, Acked, Stack};

/// Runs `aggregator migrate` with `args` against the stack's ClickHouse; returns stdout.
async fn migrate(stack: &Stack, args: &[&str]) -> String {
    let output = chute_common::testing::service_command(env!("CARGO_BIN_EXE_aggregator"))
        .args(["migrate", "--clickhouse-url", &stack.clickhouse.url()])
        .args(["--clickhouse-database", &stack.database])
        .args(args)
        .output()
        .await
        .expect("run aggregator migrate");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "aggregator migrate {args:?}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn aggregator_migrate_and_query_api_each_run_as_their_own_user() {
    let stack = Stack::start("ch_users_e2e").await;
    let secrets = tempfile::tempdir().unwrap();
    let secret = |name: &str, value: &str| {
        let path = secrets.path().join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let migrate_pw = secret("migrate", "migrate-secret-1");
    let aggregator_pw = secret("aggregator", "aggregator-secret-1");
    let query_pw = secret("query", "query-secret-1");
    let users = [
        "--migrate-password-file",
        migrate_pw.as_str(),
        "--aggregator-password-file",
        aggregator_pw.as_str(),
        "--query-password-file",
        query_pw.as_str(),
        "--query-max-concurrent-queries",
        "8",
    ];

    // First run as the server's admin (`default`), then as the migrations user it created.
    let first = migrate(&stack, &users).await;
    assert!(
        first.contains("users created or updated: chute_migrate, chute_aggregator, chute_query"),
        "{first}"
    );
    let mut as_migrate = vec![
        "--clickhouse-user",
        "chute_migrate",
        "--clickhouse-password-file",
        &migrate_pw,
    ];
    as_migrate.extend(users);
    let second = migrate(&stack, &as_migrate).await;
    assert!(
        second.contains("users created or updated: chute_aggregator, chute_query"),
        "{second}"
    );

    // The aggregator as its user: events published through the ingestor land exactly.
    let aggregator = spawn_aggregator(
        &stack.nats.url(),
        &stack.clickhouse.url(),
        &stack.database,
        &[
            "--clickhouse-user",
            "chute_aggregator",
            "--clickhouse-password-file",
            &aggregator_pw,
        ],
    );
    let acked = Arc::new(Acked::default());
    let mut client = stack.client().await;
    for i in 0..8 {
        let (req, cost) = request(&format!("users-{i}"), 25);
        client.publish(req).await.unwrap();
        acked.events.fetch_add(25, std::sync::atomic::Ordering::SeqCst);
        acked.cost_millis.fetch_add(cost, std::sync::atomic::Ordering::SeqCst);
        acked.sessions.fetch_add(25, std::sync::atomic::Ordering::SeqCst);
    }
    stack.wait_for_events(200, Duration::from_secs(60)).await;
    stack.assert_exact(&acked).await;
    assert_eq!(aggregator.metric("chute_aggregator_insert_errors_total").await, 0.0);

    // The query API as its read-only user: the rollups answer through it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = chute_query_api::Config {
        clickhouse_url: stack.clickhouse.url(),
        clickhouse_database: stack.database.clone(),
        clickhouse_user: Some("chute_query".into()),
        clickhouse_password_file: Some(query_pw.clone().into()),
        ..chute_query_api::Config::default()
    };
    config.nats.url = String::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(chute_query_api::run(listener, config, shutdown.clone()));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let path = format!(
        "/v1/timeseries?tenant=acme&from={}&to={}&step=1h",
        now_ms - 2 * 3_600_000,
        now_ms + 3_600_000
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let (status, body) = http_get(address, &path).await;
        if status != 0 || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let total: f64 = answer["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|point| point["value"].as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(total, 200.0, "{body}");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;

    // The query API's user is the one in ClickHouse: it can read, never write.
    let query_user = stack
        .clickhouse
        .client()
        .with_database(&stack.database)
        .with_user("chute_query")
        .with_password("query-secret-1");
    let rows: u64 = query_user
        .query("SELECT count() FROM events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(rows, 200);
    let refused = query_user.query("TRUNCATE TABLE events").execute().await.unwrap_err();
    assert_eq!(chute_schema::server_error::error_code(&refused), Some(497), "{refused}");
}

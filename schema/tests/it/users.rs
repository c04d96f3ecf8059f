//! The services' ClickHouse users against the engine (through the dev server, which enforces
//! users and grants like clickhouse-server): what each may and may not do, re-runs that update
//! passwords, and HTTPS with a private CA.

use chute_schema::client::client_for_url;
use chute_schema::row::EventsRow;
use chute_schema::server_error::error_code;
use chute_schema::testing::ClickHouseServer;
use chute_schema::{Migrator, Role, ServiceUser, Target, Users};

const ACCESS_DENIED: u32 = 497;
const READONLY: u32 = 164;
const AUTHENTICATION_FAILED: u32 = 516;

fn users(aggregator_password: &str) -> Users {
    Users::default()
        .with(ServiceUser::new(Role::Migrate, "it_migrate", "migrate-pw").unwrap())
        .with(ServiceUser::new(Role::Aggregator, "it_aggregator", aggregator_password).unwrap())
        .with(ServiceUser::new(Role::Query, "it_query", "query-pw").unwrap())
}

fn login(server: &ClickHouseServer, database: &str, user: &str, password: &str) -> clickhouse::Client {
    server
        .client()
        .with_database(database)
        .with_user(user)
        .with_password(password)
}

/// Runs `sql` and returns ClickHouse's error code, panicking when it succeeds.
async fn refused(client: &clickhouse::Client, sql: &str) -> u32 {
    match client.query(sql).execute().await {
        Ok(()) => panic!("{sql}: allowed, expected a refusal"),
        Err(err) => error_code(&err).unwrap_or_else(|| panic!("{sql}: {err} carries no ClickHouse code")),
    }
}

fn row(index: u32) -> EventsRow {
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    EventsRow {
        tenant: "acme".into(),
        name: "llm.request".into(),
        time: now_ms - i64::from(index),
        event_id: uuid::Uuid::new_v4(),
        session_id: format!("s{}", index % 3),
        user_id: format!("u{index}"),
        attributes: vec![("model".into(), "m".into())],
        metrics: vec![("tokens".into(), f64::from(index))],
        body: String::new(),
        ingested_at: now_ms,
    }
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client
        .query(sql)
        .fetch_one()
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

#[tokio::test]
async fn each_service_user_can_do_its_job_and_nothing_more() {
    let database = "users_least_privilege";
    let server = ClickHouseServer::start().await;
    let admin = server.client();
    admin
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await
        .unwrap();
    Migrator::new(admin.clone(), Target::single(database))
        .with_users(users("aggregator-pw"))
        .run()
        .await
        .expect("migrate with users");

    // The aggregator inserts into events (the crate's validated RowBinary insert, as the
    // aggregator sends it) and reads it back; the rollups fill through the views.
    let aggregator = login(&server, database, "it_aggregator", "aggregator-pw");
    let mut insert = aggregator
        .insert::<EventsRow>("events")
        .await
        .expect("aggregator may insert");
    for index in 0..10 {
        insert.write(&row(index)).await.unwrap();
    }
    insert.end().await.expect("aggregator insert lands");
    assert_eq!(count(&aggregator, "SELECT count() FROM events").await, 10);
    let rollup = format!("SELECT toUInt64(sum(events)) FROM {database}.events_1m_v WHERE tenant = 'acme'");
    assert_eq!(count(&admin, &rollup).await, 10);
    for sql in [
        "DROP TABLE events",
        "TRUNCATE TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "INSERT INTO events_1m SELECT * FROM events_1m",
        "SELECT count() FROM events_1m",
        "CREATE TABLE mine (x UInt8) ENGINE = Memory",
        "CREATE USER sneaky IDENTIFIED BY 'x'",
    ] {
        assert_eq!(refused(&aggregator, sql).await, ACCESS_DENIED, "aggregator: {sql}");
    }

    // The query API reads everything in the database and sets its per-query limits (readonly=2),
    // but writes nothing and cannot lift readonly.
    let query = login(&server, database, "it_query", "query-pw");
    let limited = query
        .clone()
        .with_setting("max_execution_time", "5")
        .with_setting("max_memory_usage", "200000000")
        .with_setting("max_result_rows", "1000")
        .with_setting("max_rows_to_read", "10000000")
        .with_setting("result_overflow_mode", "throw");
    assert_eq!(count(&limited, "SELECT count() FROM events").await, 10);
    assert_eq!(
        count(&limited, "SELECT toUInt64(sum(events)) FROM events_1h_v").await,
        10
    );
    let readonly: String = limited
        .query("SELECT getSetting('readonly')::String")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(readonly, "2");
    for sql in [
        "INSERT INTO events (tenant, name, time, event_id) VALUES ('acme', 'x', now64(3), generateUUIDv4())",
        "ALTER TABLE events ADD COLUMN hacked UInt8",
        "ALTER TABLE events DELETE WHERE 1",
        "DROP TABLE events",
        "DROP DATABASE users_least_privilege",
        "CREATE TABLE mine (x UInt8) ENGINE = Memory",
    ] {
        assert_eq!(refused(&query, sql).await, ACCESS_DENIED, "query API: {sql}");
    }
    let lifted = query.clone().with_setting("readonly", "0");
    assert_eq!(refused(&lifted, "SELECT 1").await, READONLY, "query API: readonly=0");
    assert_eq!(
        count(&admin, &format!("SELECT count() FROM {database}.events")).await,
        10
    );

    // The migrations user re-runs the migrations and updates the other users, but cannot drop
    // the database.
    let migrate = server.client().with_user("it_migrate").with_password("migrate-pw");
    let plan = Migrator::new(migrate.clone(), Target::single(database))
        .with_users(users("aggregator-pw-2"))
        .logged_in_as("it_migrate")
        .run()
        .await
        .expect("migrations user re-runs migrate");
    assert!(plan.pending.is_empty());
    assert!(
        plan.users.iter().all(|statement| !statement.contains("it_migrate")),
        "{:?}",
        plan.users
    );
    assert_eq!(
        refused(&migrate, &format!("DROP DATABASE {database}")).await,
        ACCESS_DENIED
    );
    // The re-run changed the aggregator's password.
    assert_eq!(refused(&aggregator, "SELECT 1").await, AUTHENTICATION_FAILED);
    let aggregator = login(&server, database, "it_aggregator", "aggregator-pw-2");
    assert_eq!(count(&aggregator, "SELECT count() FROM events").await, 10);
}

#[tokio::test]
async fn rerunning_migrate_with_users_is_idempotent() {
    let database = "users_idempotent";
    let server = ClickHouseServer::start().await;
    let admin = server.client();
    admin
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await
        .unwrap();
    let migrator = Migrator::new(admin.clone(), Target::single(database)).with_users(users("agg-pw"));
    let first = migrator.run().await.unwrap();
    let second = migrator.run().await.expect("a second run with existing users");
    assert_eq!(first.users, second.users);
    let grants: Vec<String> = admin.query("SHOW GRANTS FOR it_query").fetch_all().await.unwrap();
    assert_eq!(grants, vec![format!("GRANT SELECT ON {database}.* TO it_query")]);
    let dry = migrator.plan().await.unwrap().to_sql();
    assert!(dry.contains("-- users (run every time)"));
    assert!(dry.contains("IDENTIFIED WITH sha256_hash BY '[HIDDEN]'"));
    assert!(!dry.contains("agg-pw"));
}

/// A CA and a `localhost` certificate it signed, written as PEM files into `dir`.
fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chute test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let server = ClickHouseServer::start_tls(&cert, &key).await;
    let url = server.url();
    assert!(url.starts_with("https://localhost:"), "{url}");

    let client = client_for_url(&url, Some(&ca)).unwrap();
    let answer: u64 = client
        .query("SELECT toUInt64(40 + 2)")
        .fetch_one()
        .await
        .expect("HTTPS with the CA");
    assert_eq!(answer, 42);

    // Without the CA, the system's roots do not trust the certificate.
    if let Ok(untrusting) = client_for_url(&url, None) {
        let err = untrusting.query("SELECT 1").execute().await.unwrap_err();
        assert!(error_code(&err).is_none(), "expected a TLS failure, got {err}");
    }
    // Plain HTTP to the HTTPS port gets no answer.
    let plain = client_for_url(&url.replacen("https://", "http://", 1), None).unwrap();
    assert!(plain.query("SELECT 1").execute().await.is_err());
    // Another CA is refused as well.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = private_ca(other_dir.path());
    let wrong = client_for_url(&url, Some(&other_ca)).unwrap();
    assert!(wrong.query("SELECT 1").execute().await.is_err());
}

/// Every user statement, for one node and for a cluster, parses with ClickHouse 26.9's own
/// parser (`formatQuerySingleLine`), which prints them back unchanged but for keyword forms.
#[tokio::test]
async fn user_statements_parse_on_the_engine() {
    let server = ClickHouseServer::start().await;
    let client = server.client();
    for target in [Target::single("chute"), Target::cluster("chute", "chute_cluster")] {
        let statements = chute_schema::users::render_users(
            &users("x"),
            &target,
            chute_schema::users::Passwords::Hashed { salt: "s" },
        )
        .unwrap();
        assert_eq!(statements.len(), 10);
        for statement in statements {
            let formatted: String = client
                .query("SELECT formatQuerySingleLine(?)")
                .bind(statement.sql.as_str())
                .fetch_one()
                .await
                .unwrap_or_else(|err| panic!("{}: {err}", statement.sql));
            let keyword = |sql: &str| sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            assert_eq!(keyword(&formatted), keyword(&statement.sql), "{formatted}");
        }
    }
}

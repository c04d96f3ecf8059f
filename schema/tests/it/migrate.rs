//! The migration runner against the ClickHouse dev server, and the golden renderings.

use std::path::PathBuf;

use chute_schema::migration::{self, Migration};
use chute_schema::render;
use chute_schema::testing::ClickHouseServer;
use chute_schema::users;
use chute_schema::{Error, Migrator, Target};
use chute_schema::{Role, ServiceUser};

/// Starts a dev server (or joins the shared one named by `CHUTE_CLICKHOUSE_URL`) where the
/// database `database` does not exist.
async fn server_without(database: &str) -> ClickHouseServer {
    let server = ClickHouseServer::start().await;
    let sql = format!("DROP DATABASE IF EXISTS {database}");
    server.client().query(&sql).execute().await.unwrap();
    server
}

/// A dev server with a freshly migrated database named `database`, and a client bound to it.
pub(crate) async fn migrated(database: &str) -> (ClickHouseServer, clickhouse::Client) {
    let server = server_without(database).await;
    Migrator::new(server.client(), Target::single(database))
        .run()
        .await
        .expect("migrations apply");
    let client = server.client().with_database(database);
    (server, client)
}

async fn record_count(client: &clickhouse::Client, database: &str, final_: bool) -> u64 {
    let sql = format!(
        "SELECT count() FROM {database}.schema_migrations{}",
        if final_ { " FINAL" } else { "" }
    );
    client.query(&sql).fetch_one().await.unwrap()
}

async fn tables(client: &clickhouse::Client, database: &str) -> Vec<String> {
    client
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(database)
        .fetch_all()
        .await
        .unwrap()
}

async fn database_exists(client: &clickhouse::Client, database: &str) -> bool {
    let count: u64 = client
        .query("SELECT count() FROM system.databases WHERE name = ?")
        .bind(database)
        .fetch_one()
        .await
        .unwrap();
    count == 1
}

#[tokio::test]
async fn migrations_apply_from_empty_and_rerun_is_a_no_op() {
    let database = "migrate_apply_from_empty";
    let server = server_without(database).await;
    let client = server.client();
    let migrator = Migrator::new(client.clone(), Target::single(database));

    let first = migrator.run().await.unwrap();
    let versions: Vec<u32> = first.pending.iter().map(|m| m.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);

    let expected_tables = [
        "events",
        "events_1h",
        "events_1h_mv",
        "events_1h_v",
        "events_1m",
        "events_1m_mv",
        "events_1m_v",
        "metrics_1h",
        "metrics_1h_mv",
        "metrics_1h_v",
        "metrics_1m",
        "metrics_1m_mv",
        "metrics_1m_v",
        "schema_migrations",
        "sessions",
        "sessions_mv",
        "sessions_v",
    ];
    assert_eq!(tables(&client, database).await, expected_tables);

    let applied = migrator.applied().await.unwrap();
    let embedded = migration::embedded();
    assert_eq!(applied.len(), embedded.len());
    for (record, migration) in applied.iter().zip(&embedded) {
        assert_eq!(record.version, migration.version);
        assert_eq!(record.name, migration.name);
        assert_eq!(record.checksum, migration.checksum());
    }

    let second = migrator.run().await.unwrap();
    assert!(second.pending.is_empty(), "re-run applied {:?}", second.pending);
    assert_eq!(second.already_applied, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(record_count(&client, database, false).await, 6);
    assert_eq!(tables(&client, database).await, expected_tables);
}

#[tokio::test]
async fn modified_applied_file_is_refused() {
    let database = "migrate_modified_file_refused";
    let server = server_without(database).await;
    let migrator = Migrator::new(server.client(), Target::single(database));
    migrator.run().await.unwrap();

    let mut edited = migration::embedded();
    edited[1].sql.push_str("\n-- a harmless-looking edit\n");
    let edited = migrator.clone().with_migrations(edited).unwrap();

    for error in [edited.run().await.unwrap_err(), edited.plan().await.unwrap_err()] {
        match &error {
            Error::ChecksumMismatch { file_name, .. } => {
                assert_eq!(file_name, "0002_rollups_1m.sql")
            }
            other => panic!("expected a checksum mismatch, got {other}"),
        }
        assert!(error
            .to_string()
            .contains("0002_rollups_1m.sql was changed after it was applied"));
    }

    // A new file after the applied ones is fine.
    let mut extended = migration::embedded();
    extended.push(
        Migration::new(
            "0099_extra.sql",
            "CREATE TABLE IF NOT EXISTS {{db}}.extra {{on_cluster}} (x UInt8) ENGINE = {{engine:MergeTree}} ORDER BY x;",
        )
        .unwrap(),
    );
    let plan = migrator.clone().with_migrations(extended).unwrap().run().await.unwrap();
    let versions: Vec<u32> = plan.pending.iter().map(|m| m.version).collect();
    assert_eq!(versions, vec![99]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_all_succeed_and_apply_once() {
    let database = "migrate_concurrent_runs";
    let server = server_without(database).await;
    let client = server.client();
    // The dev server runs requests in parallel (a pool of engine connections), so these race
    // on creating the database, every table and every record.
    let runners: Vec<Migrator> = (0..4)
        .map(|index| Migrator::new(client.clone(), Target::single(database)).with_applied_by(format!("runner-{index}")))
        .collect();
    let results = futures::future::join_all(runners.iter().map(Migrator::run)).await;
    for (index, result) in results.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("runner {index}: {e}"));
    }

    // The dedup token drops the losers' records, so not even an unmerged duplicate row is left.
    assert_eq!(record_count(&client, database, false).await, 6);
    assert_eq!(record_count(&client, database, true).await, 6);
    assert!(runners[0].plan().await.unwrap().pending.is_empty());
    assert_eq!(tables(&client, database).await.len(), 17);
}

#[tokio::test]
async fn dry_run_runs_nothing() {
    let database = "migrate_dry_run";
    let server = server_without(database).await;
    let client = server.client();
    let migrator = Migrator::new(client.clone(), Target::single(database));

    let plan = migrator.plan().await.unwrap();
    assert_eq!(plan.pending.len(), 6);
    assert!(plan.already_applied.is_empty());
    let script = plan.to_sql();
    assert!(script.contains("CREATE DATABASE IF NOT EXISTS migrate_dry_run;"));
    assert!(script.contains("-- 0001_events.sql (checksum "));
    assert!(script.contains("CREATE TABLE IF NOT EXISTS migrate_dry_run.events\n("));
    assert!(
        !database_exists(&client, database).await,
        "dry run created the database"
    );

    migrator.run().await.unwrap();
    let plan = migrator.plan().await.unwrap();
    assert!(plan.pending.is_empty());
    assert!(plan.to_sql().contains("-- no pending migrations"));
}

fn golden_dir(mode: &str) -> PathBuf {
    chute_common::testing::workspace_root().join("sql/golden").join(mode)
}

/// Renders bootstrap + every migration for `target` and compares with `sql/golden/<mode>/`.
/// `CHUTE_UPDATE_GOLDEN=1` rewrites the files instead.
fn check_golden(mode: &str, target: &Target) {
    let mut rendered = vec![(
        "0000_bootstrap.sql".to_owned(),
        render::render_bootstrap(target).unwrap(),
    )];
    rendered.extend(render::render_all(&migration::embedded(), target).unwrap());
    // The users `aggregator migrate` manages when given their passwords (passwords hidden).
    let users = chute_schema::Users::default()
        .with(ServiceUser::new(Role::Migrate, users::DEFAULT_MIGRATE_USER, "x").unwrap())
        .with(ServiceUser::new(Role::Aggregator, users::DEFAULT_AGGREGATOR_USER, "x").unwrap())
        .with(ServiceUser::new(Role::Query, users::DEFAULT_QUERY_USER, "x").unwrap());
    let user_statements = users::render_users(&users, target, users::Passwords::Hidden).unwrap();
    rendered.push((
        "users.sql".to_owned(),
        user_statements.into_iter().map(|statement| statement.shown).collect(),
    ));

    let dir = golden_dir(mode);
    let update = std::env::var_os("CHUTE_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    if update {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let header = "-- Generated by `CHUTE_UPDATE_GOLDEN=1 cargo test -p chute-schema --test it golden`.\n\
                  -- Rendered from sql/migrations for database `chute`";
    let mut mismatched = Vec::new();
    for (file_name, statements) in rendered {
        let mut text = format!(
            "{header}{}.\n\n",
            match &target.cluster {
                Some(cluster) => format!(" on cluster `{cluster}`"),
                None => String::new(),
            }
        );
        for statement in statements {
            text.push_str(&statement);
            text.push_str(";\n\n");
        }
        let path = dir.join(&file_name);
        if update {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        if expected != text {
            mismatched.push(path.display().to_string());
        }
    }
    assert!(
        mismatched.is_empty(),
        "rendering differs from {mismatched:?}; inspect and run with CHUTE_UPDATE_GOLDEN=1 to accept"
    );
}

#[test]
fn golden_single_node() {
    check_golden("single", &Target::single("chute"));
}

#[test]
fn golden_cluster() {
    check_golden("cluster", &Target::cluster("chute", "chute_cluster"));
}

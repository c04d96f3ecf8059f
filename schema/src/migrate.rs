//! The schema runner: applies the pending migrations ([`crate::migration`]) in order to one
//! ClickHouse server or a cluster. It wires together three pure pieces, each with its own tests
//! — [`crate::split`] (a file into statements), [`crate::render`] (statements for a
//! [`Target`]) and [`crate::ledger`] (what `schema_migrations` says is applied, pending or
//! changed) — and adds only the I/O: reading the ledger, executing statements, recording files.
//!
//! # Running twice, or twice at once
//! There is no lock: ClickHouse has none that survives a crashed holder. Instead every step is
//! idempotent, so two runners racing on the same migration both succeed and the result is the
//! same as one run:
//! - every statement is `CREATE ... IF NOT EXISTS` (or another idempotent form such as
//!   `ALTER ... ADD COLUMN IF NOT EXISTS`, `MODIFY TTL`); ClickHouse serialises concurrent
//!   creation of one name, so the loser of the race sees "exists" and does nothing (a unit test
//!   in [`crate::migration`] checks every shipped `CREATE` carries `IF NOT EXISTS`);
//! - the record is inserted only after all statements of the file succeeded, with
//!   `insert_deduplication_token = schema_migrations:<version>:<checksum>` ([`record_token`])
//!   into a table with a dedup window, so a second record of the same file is dropped by
//!   ClickHouse; the table is a `ReplacingMergeTree` ordered by version and read with `FINAL` as
//!   a second net;
//! - a crash between statements leaves the file unrecorded, and the next run re-runs all of its
//!   (idempotent) statements.
//!
//! # Users
//! With [`Migrator::with_users`], every run then creates or updates the services' ClickHouse users
//! and their grants ([`crate::users`]): not versioned, idempotent, so a run converges passwords and
//! grants to what it was given. A user the runner is logged in as is left alone (it cannot
//! re-grant itself what a `WITH REPLACE OPTION` grant would first take away).

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::ledger::{record_token, AppliedMigration, Ledger};
use crate::migration::{embedded, sort_and_check, Migration, BOOTSTRAP_FILE};
use crate::render::{render, render_bootstrap, Target};
use crate::users::{render_users, Passwords, Users};

/// What a run would do (the dry run) or did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Database and `schema_migrations` creation; always run (they are idempotent).
    pub bootstrap: Vec<String>,
    /// Pending migrations with their rendered statements, in order.
    pub pending: Vec<PlannedMigration>,
    /// Versions already recorded in `schema_migrations`.
    pub already_applied: Vec<u32>,
    /// The user statements run after the migrations, passwords hidden.
    pub users: Vec<String>,
}

/// One pending migration, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMigration {
    pub version: u32,
    pub name: String,
    pub file_name: String,
    pub checksum: String,
    pub statements: Vec<String>,
}

impl Plan {
    /// What a run against `ledger` executes for `target`: the bootstrap, then every pending
    /// migration rendered. Fails if an applied file was changed since.
    pub fn new(migrations: &[Migration], ledger: &Ledger, target: &Target) -> Result<Self> {
        let pending = ledger
            .pending(migrations)?
            .into_iter()
            .map(|m| {
                Ok(PlannedMigration {
                    version: m.version,
                    name: m.name.clone(),
                    file_name: m.file_name.clone(),
                    checksum: m.checksum(),
                    statements: render(&m.file_name, &m.sql, target)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            bootstrap: render_bootstrap(target)?,
            pending,
            already_applied: ledger.applied_versions(),
            users: Vec::new(),
        })
    }

    /// The plan as a SQL script (what `migrate --dry-run` prints).
    pub fn to_sql(&self) -> String {
        let mut out = String::from("-- bootstrap\n");
        for statement in &self.bootstrap {
            let _ = write!(out, "{statement};\n\n");
        }
        for migration in &self.pending {
            let _ = writeln!(out, "-- {} (checksum {})", migration.file_name, migration.checksum);
            for statement in &migration.statements {
                let _ = write!(out, "{statement};\n\n");
            }
        }
        if self.pending.is_empty() {
            out.push_str("-- no pending migrations\n");
        }
        if !self.users.is_empty() {
            out.push_str("-- users (run every time)\n");
            for statement in &self.users {
                let _ = write!(out, "{statement};\n\n");
            }
        }
        out
    }
}

/// Applies migrations to one ClickHouse server or cluster through a `clickhouse::Client`.
///
/// Every statement names its database explicitly; requests go to the `default` database (which
/// exists on every server) until the target database exists.
#[derive(Clone)]
pub struct Migrator {
    client: clickhouse::Client,
    target: Target,
    migrations: Vec<Migration>,
    applied_by: String,
    users: Users,
    login_user: Option<String>,
}

impl Migrator {
    /// A runner for the [`embedded`] migrations.
    pub fn new(client: clickhouse::Client, target: Target) -> Self {
        Self {
            client,
            target,
            migrations: embedded(),
            applied_by: format!("chute {}", env!("CARGO_PKG_VERSION")),
            users: Users::default(),
            login_user: None,
        }
    }

    /// The user the client logs in as: [`Migrator::with_users`] leaves that user alone. (Given
    /// rather than asked with `currentUser()`, which the dev server's engine answers `default`.)
    pub fn logged_in_as(mut self, user: impl Into<String>) -> Self {
        self.login_user = Some(user.into());
        self
    }

    /// Also creates or updates these users and their grants on every run (see the module docs).
    pub fn with_users(mut self, users: Users) -> Self {
        self.users = users;
        self
    }

    /// Uses `migrations` instead of the embedded ones (e.g. from [`load_dir`](crate::migration::load_dir)).
    pub fn with_migrations(mut self, mut migrations: Vec<Migration>) -> Result<Self> {
        sort_and_check(&mut migrations)?;
        self.migrations = migrations;
        Ok(self)
    }

    /// Recorded as `applied_by` (e.g. host name and process).
    pub fn with_applied_by(mut self, applied_by: impl Into<String>) -> Self {
        self.applied_by = applied_by.into();
        self
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// The dry run: reads what is applied (if `schema_migrations` exists), checks checksums and
    /// renders what [`Migrator::run`] would execute. Changes nothing.
    pub async fn plan(&self) -> Result<Plan> {
        self.target.validate()?;
        let records = if self.bookkeeping_exists().await? {
            self.applied().await?
        } else {
            Vec::new()
        };
        let mut plan = Plan::new(&self.migrations, &Ledger::new(records), &self.target)?;
        plan.users = render_users(&self.users, &self.target, Passwords::Hidden)?
            .into_iter()
            .map(|statement| statement.shown)
            .collect();
        Ok(plan)
    }

    /// Applies every pending migration in order and returns what it ran. Safe to run again and
    /// concurrently (see the module docs).
    pub async fn run(&self) -> Result<Plan> {
        self.target.validate()?;
        let bootstrap = render_bootstrap(&self.target)?;
        for statement in &bootstrap {
            self.execute(BOOTSTRAP_FILE, statement).await?;
        }
        let mut plan = Plan::new(&self.migrations, &Ledger::new(self.applied().await?), &self.target)?;
        for migration in &plan.pending {
            tracing::info!(
                version = migration.version,
                file = %migration.file_name,
                statements = migration.statements.len(),
                "applying migration"
            );
            for statement in &migration.statements {
                self.execute(&migration.file_name, statement).await?;
            }
            self.record(migration).await?;
        }
        plan.users = self.apply_users().await?;
        Ok(plan)
    }

    /// Creates or updates the configured users (but the one logged in), returns what ran (hidden).
    async fn apply_users(&self) -> Result<Vec<String>> {
        if self.users.is_empty() {
            return Ok(Vec::new());
        }
        let mut users = self.users.clone();
        users.users.retain(|user| {
            let own = self.login_user.as_deref() == Some(user.name.as_str());
            if own {
                tracing::info!(user = %user.name, "logged in as this user: its password and grants are left as they are");
            }
            !own
        });
        // A fresh salt per run: the stored hash changes, the password does not.
        let salt = uuid::Uuid::new_v4().simple().to_string();
        let statements = render_users(&users, &self.target, Passwords::Hashed { salt: &salt })?;
        for statement in &statements {
            self.admin_client()
                .query(&statement.sql)
                .execute()
                .await
                .map_err(|source| Error::Statement {
                    file_name: "users".to_owned(),
                    statement: statement.shown.clone(),
                    source,
                })?;
        }
        tracing::info!(
            users = users.users.len(),
            statements = statements.len(),
            "users and grants applied"
        );
        Ok(statements.into_iter().map(|statement| statement.shown).collect())
    }

    /// What `schema_migrations` holds, by version.
    pub async fn applied(&self) -> Result<Vec<AppliedMigration>> {
        let sql = format!(
            "SELECT version, name, checksum FROM {}.schema_migrations FINAL ORDER BY version",
            self.target.database
        );
        Ok(self.admin_client().query(&sql).fetch_all().await?)
    }

    async fn bookkeeping_exists(&self) -> Result<bool> {
        let exists: u8 = self
            .admin_client()
            .query("SELECT count() > 0 FROM system.tables WHERE database = ? AND name = 'schema_migrations'")
            .bind(self.target.database.as_str())
            .fetch_one()
            .await?;
        Ok(exists != 0)
    }

    async fn execute(&self, file_name: &str, statement: &str) -> Result<()> {
        self.admin_client()
            .query(statement)
            .execute()
            .await
            .map_err(|source| Error::Statement {
                file_name: file_name.to_owned(),
                statement: statement.to_owned(),
                source,
            })
    }

    /// Records an applied migration. The token makes a second record of the same file (a
    /// concurrent runner) a no-op for ClickHouse's insert dedup.
    async fn record(&self, migration: &PlannedMigration) -> Result<()> {
        let sql = format!(
            "INSERT INTO {}.schema_migrations (version, name, checksum, applied_by) VALUES (?, ?, ?, ?)",
            self.target.database
        );
        let token = record_token(migration.version, &migration.checksum);
        self.admin_client()
            .query(&sql)
            .bind(migration.version)
            .bind(migration.name.as_str())
            .bind(migration.checksum.as_str())
            .bind(self.applied_by.as_str())
            .with_setting("insert_deduplication_token", token)
            .execute()
            .await?;
        Ok(())
    }

    /// Every statement is fully qualified, so the session database only has to exist.
    fn admin_client(&self) -> clickhouse::Client {
        self.client.clone().with_database("default")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_script_lists_pending_files() {
        let plan = Plan {
            bootstrap: vec!["CREATE DATABASE IF NOT EXISTS chute".into()],
            pending: vec![PlannedMigration {
                version: 1,
                name: "events".into(),
                file_name: "0001_events.sql".into(),
                checksum: "00".into(),
                statements: vec!["CREATE TABLE IF NOT EXISTS chute.events (x UInt8) ENGINE = Memory".into()],
            }],
            already_applied: vec![],
            users: vec!["GRANT SELECT ON chute.* TO chute_query WITH REPLACE OPTION".into()],
        };
        let script = plan.to_sql();
        assert!(script
            .ends_with("-- users (run every time)\nGRANT SELECT ON chute.* TO chute_query WITH REPLACE OPTION;\n\n"));
        assert!(script.contains("-- 0001_events.sql (checksum 00)\nCREATE TABLE IF NOT EXISTS chute.events"));
    }

    #[test]
    fn plan_renders_pending_files_and_lists_applied_ones() {
        let target = Target::single("chute");
        let migrations = vec![
            Migration::new(
                "0001_a.sql",
                "CREATE TABLE IF NOT EXISTS {{db}}.a (x UInt8) ENGINE = Memory;",
            )
            .unwrap(),
            Migration::new(
                "0002_b.sql",
                "CREATE TABLE IF NOT EXISTS {{db}}.b (x UInt8) ENGINE = Memory;",
            )
            .unwrap(),
        ];
        let ledger = Ledger::new(vec![AppliedMigration {
            version: 1,
            name: "a".into(),
            checksum: migrations[0].checksum(),
        }]);
        let plan = Plan::new(&migrations, &ledger, &target).unwrap();
        assert_eq!(plan.bootstrap, render_bootstrap(&target).unwrap());
        assert_eq!(plan.already_applied, vec![1]);
        assert_eq!(
            plan.pending,
            vec![PlannedMigration {
                version: 2,
                name: "b".into(),
                file_name: "0002_b.sql".into(),
                checksum: migrations[1].checksum(),
                statements: vec!["CREATE TABLE IF NOT EXISTS chute.b (x UInt8) ENGINE = Memory".into()],
            }]
        );
    }
}

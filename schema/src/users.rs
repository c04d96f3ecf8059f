//! The ClickHouse users Chute's services log in as, created and kept current by the migration
//! runner after the schema (`aggregator migrate` with their passwords), each with the least it
//! needs:
//!
//! | role | default name | grants | settings |
//! |---|---|---|---|
//! | migrations | `chute_migrate` | DDL on `<db>.*` (`CREATE DATABASE`, `CREATE TABLE`, `CREATE VIEW`, `ALTER`, `DROP TABLE`, `DROP VIEW`, `OPTIMIZE`, `SELECT`, `INSERT`) with grant option, `CREATE USER`, `ALTER USER` (and `CLUSTER` on a cluster) | |
//! | aggregator | `chute_aggregator` | `INSERT`, `SELECT` on `<db>.events` (and `events_local` on a cluster) | |
//! | query API | `chute_query` | `SELECT` on `<db>.*` | `readonly = 2`, `max_concurrent_queries_for_user` |
//!
//! Idempotent, so every run converges: `CREATE USER IF NOT EXISTS`, then `ALTER USER` (password
//! and settings now), then `GRANT ... WITH REPLACE OPTION` (exactly these grants, in one atomic
//! statement, never a moment without them). Passwords leave as salted SHA-256 hashes
//! (`IDENTIFIED WITH sha256_hash BY ... SALT ...`, what ClickHouse stores for `sha256_password`),
//! never in clear text, and the dry run prints `[HIDDEN]` for them.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::render::{validate_identifier, Target};

pub const DEFAULT_MIGRATE_USER: &str = "chute_migrate";
pub const DEFAULT_AGGREGATOR_USER: &str = "chute_aggregator";
pub const DEFAULT_QUERY_USER: &str = "chute_query";
/// `max_concurrent_queries_for_user` of the query API's user: above the query API's own cap, so
/// that this is the backstop for several replicas, not the first limit hit.
pub const DEFAULT_QUERY_MAX_CONCURRENT_QUERIES: u64 = 32;

/// What a service does with ClickHouse, and so what its user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Runs `aggregator migrate` after the first time: DDL on the database, user management.
    Migrate,
    /// Inserts into `events` (the rollups are written by the materialized views).
    Aggregator,
    /// Reads; `readonly = 2` so that it may still set its per-query limits.
    Query,
}

/// One user the runner manages.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub role: Role,
    pub name: String,
    password: String,
}

impl ServiceUser {
    /// A user for `role`; the password must not be empty.
    pub fn new(role: Role, name: impl Into<String>, password: impl Into<String>) -> Result<Self> {
        let user = Self {
            role,
            name: name.into(),
            password: password.into(),
        };
        validate_identifier("user", &user.name)?;
        if user.password.is_empty() {
            return Err(Error::EmptyPassword { user: user.name });
        }
        Ok(user)
    }
}

impl fmt::Debug for ServiceUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceUser")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("password", &"[HIDDEN]")
            .finish()
    }
}

/// The users to create or update, and the query user's concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Users {
    pub users: Vec<ServiceUser>,
    pub query_max_concurrent_queries: u64,
}

impl Default for Users {
    fn default() -> Self {
        Self {
            users: Vec::new(),
            query_max_concurrent_queries: DEFAULT_QUERY_MAX_CONCURRENT_QUERIES,
        }
    }
}

impl Users {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn with(mut self, user: ServiceUser) -> Self {
        self.users.retain(|u| u.role != user.role);
        self.users.push(user);
        self.users.sort_by_key(|u| u.role);
        self
    }
}

/// How passwords appear in rendered statements.
#[derive(Debug, Clone, Copy)]
pub enum Passwords<'a> {
    /// Salted SHA-256 hashes; each user's salt is this value and its role.
    Hashed { salt: &'a str },
    /// `[HIDDEN]` (the dry run, error messages).
    Hidden,
}

/// One rendered statement: what runs, and what may be shown (the hash hidden).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatement {
    pub sql: String,
    pub shown: String,
}

/// The statements that create or update `users` on `target`, in order.
pub fn render_users(users: &Users, target: &Target, passwords: Passwords<'_>) -> Result<Vec<UserStatement>> {
    target.validate()?;
    let on_cluster = target
        .cluster
        .as_deref()
        .map(|cluster| format!(" ON CLUSTER {cluster}"))
        .unwrap_or_default();
    let mut statements = Vec::new();
    for user in &users.users {
        validate_identifier("user", &user.name)?;
        let name = &user.name;
        let (identified, shown_identified) = match passwords {
            Passwords::Hashed { salt } => {
                let salt = format!("{salt}{}", role_tag(user.role));
                let hash = sha256_hex(&user.password, &salt);
                (
                    format!("IDENTIFIED WITH sha256_hash BY '{hash}' SALT '{salt}'"),
                    "IDENTIFIED WITH sha256_hash BY '[HIDDEN]' SALT '[HIDDEN]'".to_owned(),
                )
            }
            Passwords::Hidden => {
                let hidden = "IDENTIFIED WITH sha256_hash BY '[HIDDEN]' SALT '[HIDDEN]'".to_owned();
                (hidden.clone(), hidden)
            }
        };
        let settings = match user.role {
            Role::Query => format!(
                " SETTINGS readonly = 2, max_concurrent_queries_for_user = {}",
                users.query_max_concurrent_queries
            ),
            Role::Migrate | Role::Aggregator => String::new(),
        };
        let mut push = |sql: String, shown: String| statements.push(UserStatement { sql, shown });
        push(
            format!("CREATE USER IF NOT EXISTS {name}{on_cluster} {identified}"),
            format!("CREATE USER IF NOT EXISTS {name}{on_cluster} {shown_identified}"),
        );
        push(
            format!("ALTER USER {name}{on_cluster} {identified}{settings}"),
            format!("ALTER USER {name}{on_cluster} {shown_identified}{settings}"),
        );
        for grant in grants(user.role, name, target, &on_cluster) {
            push(grant.clone(), grant);
        }
    }
    Ok(statements)
}

fn grants(role: Role, name: &str, target: &Target, on_cluster: &str) -> Vec<String> {
    let database = &target.database;
    match role {
        Role::Migrate => {
            let mut global = "CREATE USER, ALTER USER".to_owned();
            if target.cluster.is_some() {
                global.push_str(", CLUSTER");
            }
            vec![
                format!(
                    "GRANT{on_cluster} CREATE DATABASE, CREATE TABLE, CREATE VIEW, ALTER, DROP TABLE, DROP VIEW, \
                     OPTIMIZE, SELECT, INSERT ON {database}.* TO {name} WITH GRANT OPTION WITH REPLACE OPTION"
                ),
                format!("GRANT{on_cluster} {global} ON *.* TO {name}"),
            ]
        }
        Role::Aggregator => {
            let mut on = format!("INSERT, SELECT ON {database}.events");
            if target.cluster.is_some() {
                // Inserts into the Distributed table reach `events_local` on every shard; with an
                // inter-server secret they run there as this user.
                on.push_str(&format!(
                    ", INSERT, SELECT ON {database}.{}",
                    target.local_table("events")
                ));
            }
            vec![format!("GRANT{on_cluster} {on} TO {name} WITH REPLACE OPTION")]
        }
        Role::Query => vec![format!(
            "GRANT{on_cluster} SELECT ON {database}.* TO {name} WITH REPLACE OPTION"
        )],
    }
}

fn role_tag(role: Role) -> &'static str {
    match role {
        Role::Migrate => "m",
        Role::Aggregator => "a",
        Role::Query => "q",
    }
}

/// What ClickHouse compares for `sha256_password`: hex SHA-256 of the password followed by the salt.
pub fn sha256_hex(password: &str, salt: &str) -> String {
    let digest = Sha256::new()
        .chain_update(password.as_bytes())
        .chain_update(salt.as_bytes())
        .finalize();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_users() -> Users {
        Users::default()
            .with(ServiceUser::new(Role::Query, "chute_query", "q-pass").unwrap())
            .with(ServiceUser::new(Role::Aggregator, "chute_aggregator", "a-pass").unwrap())
            .with(ServiceUser::new(Role::Migrate, "chute_migrate", "m-pass").unwrap())
    }

    #[test]
    fn hashes_match_clickhouse_sha256_password() {
        // `echo -n secretsalt | sha256sum`: the password followed by the salt.
        assert_eq!(
            sha256_hex("secret", "salt"),
            "f84fa2149dbb62ed4e0cf1f550d2949b33a6513d3a7707e08502511c79ccb0ee"
        );
        assert_eq!(
            sha256_hex("abc", ""),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn single_node_statements_are_idempotent_and_least_privilege() {
        let statements = render_users(&all_users(), &Target::single("chute"), Passwords::Hashed { salt: "s" }).unwrap();
        let sql: Vec<&str> = statements.iter().map(|s| s.sql.as_str()).collect();
        let migrate_hash = sha256_hex("m-pass", "sm");
        assert_eq!(
            sql[0],
            format!(
                "CREATE USER IF NOT EXISTS chute_migrate IDENTIFIED WITH sha256_hash BY '{migrate_hash}' SALT 'sm'"
            )
        );
        assert!(sql.contains(&"GRANT INSERT, SELECT ON chute.events TO chute_aggregator WITH REPLACE OPTION"));
        assert!(sql.contains(&"GRANT SELECT ON chute.* TO chute_query WITH REPLACE OPTION"));
        let query_alter = sql.iter().find(|s| s.starts_with("ALTER USER chute_query")).unwrap();
        assert!(query_alter.ends_with("SETTINGS readonly = 2, max_concurrent_queries_for_user = 32"));
        for statement in &statements {
            assert!(!statement.sql.contains("-pass") && !statement.shown.contains("-pass"));
            assert!(!statement.shown.contains(&migrate_hash));
        }
    }

    #[test]
    fn cluster_statements_run_on_every_node() {
        let statements = render_users(&all_users(), &Target::cluster("chute", "main"), Passwords::Hidden).unwrap();
        for statement in &statements {
            assert!(statement.sql.contains(" ON CLUSTER main "), "{}", statement.sql);
        }
        assert!(statements.iter().any(|s| s.sql
            == "GRANT ON CLUSTER main INSERT, SELECT ON chute.events, INSERT, SELECT ON chute.events_local \
                TO chute_aggregator WITH REPLACE OPTION"));
        assert!(statements
            .iter()
            .any(|s| s.sql == "GRANT ON CLUSTER main CREATE USER, ALTER USER, CLUSTER ON *.* TO chute_migrate"));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(ServiceUser::new(Role::Query, "bad name", "x").is_err());
        assert!(matches!(
            ServiceUser::new(Role::Query, "q", ""),
            Err(Error::EmptyPassword { .. })
        ));
        let debug = format!("{:?}", ServiceUser::new(Role::Query, "q", "topsecret").unwrap());
        assert!(!debug.contains("topsecret"), "{debug}");
    }
}

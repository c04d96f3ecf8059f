//! The template renderer: turns one migration file into the statements for one ClickHouse
//! server or for a cluster, described by a [`Target`].
//!
//! Placeholders rendered by [`render`]:
//!
//! | placeholder                 | single node                       | cluster `c`                                   |
//! |-----------------------------|-----------------------------------|-----------------------------------------------|
//! | `{{db}}`                    | the database                      | the database                                  |
//! | `{{on_cluster}}`            | nothing                           | `ON CLUSTER c`                                |
//! | `{{cluster}}`               | error                             | `c`                                           |
//! | `{{local:events}}`          | `events`                          | `events_local`                                |
//! | `{{engine:X(args)}}`        | `X(args)`                         | `ReplicatedX('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', args)` |
//! | `{{global_engine:X(args)}}` | `X(args)`                         | like `engine`, one copy for the whole cluster  |
//! | `{{dedup_window}}`          | `non_replicated_deduplication_window = N` | `replicated_deduplication_window = N, ..._seconds = S` |
//! | `{{cluster_only}}`          | drops the statement it starts     | nothing                                       |
//!
//! In cluster mode every storage table is `<name>_local` (Replicated engine) with a
//! `Distributed` table `<name>` over it, so readers and writers use the same names as on one
//! node, while materialized views read from and write to the `_local` tables on each shard.

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::migration::{Migration, BOOTSTRAP_FILE, BOOTSTRAP_SQL};
use crate::split::split_statements;

/// How many recent insert blocks every table remembers for `insert_deduplication_token`
/// (`non_replicated_deduplication_window`, or `replicated_deduplication_window` on a cluster).
/// The aggregator's exactly-once note explains why this covers its worst retry sequence; it is
/// the one place the number lives.
pub const DEDUP_WINDOW: u64 = 100_000;

/// On a cluster, replicated dedup also forgets blocks older than this many seconds (ClickHouse
/// default: one hour). A week covers a replay after a long ClickHouse or aggregator outage.
pub const REPLICATED_DEDUP_WINDOW_SECONDS: u64 = 7 * 24 * 3600;

/// Database used when none is configured.
pub const DEFAULT_DATABASE: &str = "chute";

/// Where and how to render: database, and the cluster name in cluster mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub database: String,
    /// `Some(name)`: render `ON CLUSTER name` with Replicated engines and Distributed tables.
    pub cluster: Option<String>,
    pub dedup_window: u64,
}

impl Target {
    /// One ClickHouse server, database `database`.
    pub fn single(database: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            cluster: None,
            dedup_window: DEDUP_WINDOW,
        }
    }

    /// A ClickHouse cluster named `cluster` (as in `remote_servers`), database `database`.
    pub fn cluster(database: impl Into<String>, cluster: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            cluster: Some(cluster.into()),
            dedup_window: DEDUP_WINDOW,
        }
    }

    /// Checks the names are plain identifiers, so they can be rendered unquoted.
    pub fn validate(&self) -> Result<()> {
        validate_identifier("database", &self.database)?;
        if let Some(cluster) = &self.cluster {
            validate_identifier("cluster", cluster)?;
        }
        Ok(())
    }

    /// The storage table behind `table`: itself on one node, `<table>_local` on a cluster.
    pub fn local_table(&self, table: &str) -> String {
        match self.cluster {
            Some(_) => format!("{table}_local"),
            None => table.to_owned(),
        }
    }
}

impl Default for Target {
    fn default() -> Self {
        Self::single(DEFAULT_DATABASE)
    }
}

/// Renders one file for `target`: splits it into statements and substitutes the placeholders
/// (see the module docs). Statements marked `{{cluster_only}}` are left out on one node.
pub fn render(file_name: &str, sql: &str, target: &Target) -> Result<Vec<String>> {
    target.validate()?;
    let mut rendered = Vec::new();
    for statement in split_statements(file_name, sql)? {
        let (cluster_only, body) = match statement.strip_prefix("{{cluster_only}}") {
            Some(rest) => (true, rest.trim_start()),
            None => (false, statement.as_str()),
        };
        if cluster_only && target.cluster.is_none() {
            continue;
        }
        let text = render_placeholders(file_name, body, target)?;
        if !text.is_empty() {
            rendered.push(text);
        }
    }
    Ok(rendered)
}

/// Renders every migration (without the bootstrap) for `target`, as `(file name, statements)`.
pub fn render_all(migrations: &[Migration], target: &Target) -> Result<Vec<(String, Vec<String>)>> {
    migrations
        .iter()
        .map(|m| Ok((m.file_name.clone(), render(&m.file_name, &m.sql, target)?)))
        .collect()
}

/// The bootstrap statements (database, `schema_migrations`) for `target`.
pub fn render_bootstrap(target: &Target) -> Result<Vec<String>> {
    render(BOOTSTRAP_FILE, BOOTSTRAP_SQL, target)
}

fn render_placeholders(file_name: &str, statement: &str, target: &Target) -> Result<String> {
    let mut out = String::with_capacity(statement.len() + 64);
    let mut rest = statement;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| Error::Unterminated {
            file_name: file_name.to_owned(),
            what: "placeholder",
        })?;
        let placeholder = &after[..end];
        let value = placeholder_value(file_name, placeholder, target)?;
        if value.is_empty() && out.ends_with(' ') {
            // `... events {{on_cluster}}` on one node: no dangling blank.
            out.pop();
        }
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out.trim().to_owned())
}

fn placeholder_value(file_name: &str, placeholder: &str, target: &Target) -> Result<String> {
    let (key, argument) = match placeholder.split_once(':') {
        Some((key, argument)) => (key.trim(), Some(argument.trim())),
        None => (placeholder.trim(), None),
    };
    let cluster = target.cluster.as_deref();
    let cluster_required = || Error::ClusterOnlyPlaceholder {
        file_name: file_name.to_owned(),
        placeholder: placeholder.to_owned(),
    };
    let value = match (key, argument) {
        ("db", None) => target.database.clone(),
        ("on_cluster", None) => cluster.map(|c| format!("ON CLUSTER {c}")).unwrap_or_default(),
        ("cluster", None) => cluster.ok_or_else(cluster_required)?.to_owned(),
        ("cluster_only", None) => {
            return Err(Error::MisplacedClusterOnly {
                file_name: file_name.to_owned(),
            })
        }
        ("local", Some(table)) => target.local_table(table),
        ("engine", Some(engine)) => engine_clause(engine, cluster, "{shard}/{database}/{table}"),
        ("global_engine", Some(engine)) => engine_clause(engine, cluster, "global/{database}/{table}"),
        ("dedup_window", None) => match cluster {
            None => format!("non_replicated_deduplication_window = {}", target.dedup_window),
            Some(_) => format!(
                "replicated_deduplication_window = {}, replicated_deduplication_window_seconds = {}",
                target.dedup_window, REPLICATED_DEDUP_WINDOW_SECONDS
            ),
        },
        _ => {
            return Err(Error::UnknownPlaceholder {
                file_name: file_name.to_owned(),
                placeholder: placeholder.to_owned(),
            })
        }
    };
    Ok(value)
}

/// `ReplacingMergeTree(v)` on one node; on a cluster
/// `ReplicatedReplacingMergeTree('/clickhouse/tables/<path>', '{replica}', v)`, where `{shard}`,
/// `{database}`, `{table}` and `{replica}` are ClickHouse macros expanded by each server.
fn engine_clause(engine: &str, cluster: Option<&str>, zookeeper_path: &str) -> String {
    if cluster.is_none() {
        return engine.to_owned();
    }
    let (name, arguments) = match engine.split_once('(') {
        Some((name, rest)) => (name.trim(), rest.trim_end().trim_end_matches(')').trim()),
        None => (engine.trim(), ""),
    };
    let mut clause = format!("Replicated{name}('/clickhouse/tables/{zookeeper_path}', '{{replica}}'");
    if !arguments.is_empty() {
        let _ = write!(clause, ", {arguments}");
    }
    clause.push(')');
    clause
}

pub(crate) fn validate_identifier(what: &'static str, name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Ok(());
    }
    Err(Error::InvalidIdentifier {
        what,
        name: name.to_owned(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The targets the schema's unit tests render for.
    pub(crate) fn single() -> Target {
        Target::single("chute")
    }

    pub(crate) fn cluster() -> Target {
        Target::cluster("chute", "main")
    }

    #[test]
    fn renders_single_node() {
        let sql = "CREATE TABLE IF NOT EXISTS {{db}}.{{local:events}} {{on_cluster}} (x UInt8)\n\
                   ENGINE = {{engine:ReplacingMergeTree(v)}} ORDER BY x SETTINGS {{dedup_window}};\n\
                   {{cluster_only}}\nCREATE TABLE {{db}}.events AS {{db}}.events_local ENGINE = Distributed({{cluster}}, {{db}}, events_local);";
        let statements = render("f.sql", sql, &single()).unwrap();
        assert_eq!(
            statements,
            vec![
                "CREATE TABLE IF NOT EXISTS chute.events (x UInt8)\n\
                 ENGINE = ReplacingMergeTree(v) ORDER BY x SETTINGS non_replicated_deduplication_window = 100000"
            ]
        );
    }

    #[test]
    fn renders_cluster() {
        let sql = "CREATE TABLE IF NOT EXISTS {{db}}.{{local:events}} {{on_cluster}} (x UInt8)\n\
                   ENGINE = {{engine:ReplacingMergeTree(v)}} ORDER BY x SETTINGS {{dedup_window}};\n\
                   CREATE TABLE t {{on_cluster}} ENGINE = {{engine:AggregatingMergeTree}} ORDER BY x;\n\
                   CREATE TABLE g ENGINE = {{global_engine:ReplacingMergeTree(v)}} ORDER BY x;\n\
                   {{cluster_only}}\nCREATE TABLE {{db}}.events AS {{db}}.events_local ENGINE = Distributed({{cluster}}, {{db}}, events_local);";
        let statements = render("f.sql", sql, &cluster()).unwrap();
        assert_eq!(
            statements,
            vec![
                "CREATE TABLE IF NOT EXISTS chute.events_local ON CLUSTER main (x UInt8)\n\
                 ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', v) \
                 ORDER BY x SETTINGS replicated_deduplication_window = 100000, replicated_deduplication_window_seconds = 604800",
                "CREATE TABLE t ON CLUSTER main ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}') ORDER BY x",
                "CREATE TABLE g ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/global/{database}/{table}', '{replica}', v) ORDER BY x",
                "CREATE TABLE chute.events AS chute.events_local ENGINE = Distributed(main, chute, events_local)",
            ]
        );
    }

    #[test]
    fn render_errors_name_the_file() {
        let error = render("0007_x.sql", "SELECT {{nope}}", &single()).unwrap_err();
        assert_eq!(error.to_string(), "0007_x.sql: unknown placeholder {{nope}}");
        let error = render("0007_x.sql", "SELECT {{cluster}}", &single()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "0007_x.sql: {{cluster}} is only valid in cluster mode"
        );
        let error = render("0007_x.sql", "SELECT 1 {{cluster_only}}", &cluster()).unwrap_err();
        assert_eq!(error.to_string(), "0007_x.sql: {{cluster_only}} must start a statement");
        let error = render("0007_x.sql", "SELECT {{db", &single()).unwrap_err();
        assert_eq!(error.to_string(), "0007_x.sql: unterminated placeholder");
    }

    #[test]
    fn rejects_names_that_would_need_quoting() {
        let error = render("f.sql", "SELECT 1", &Target::single("chute; DROP")).unwrap_err();
        assert!(matches!(error, Error::InvalidIdentifier { what: "database", .. }));
        assert!(Target::cluster("chute", "my-cluster").validate().is_err());
        assert!(Target::single("chute_test_1").validate().is_ok());
    }

    #[test]
    fn render_all_keeps_file_order_and_names() {
        let migrations = vec![
            Migration::new("0001_a.sql", "SELECT 1;").unwrap(),
            Migration::new("0002_b.sql", "{{cluster_only}} SELECT 2;").unwrap(),
        ];
        let rendered = render_all(&migrations, &single()).unwrap();
        assert_eq!(
            rendered,
            vec![
                ("0001_a.sql".to_owned(), vec!["SELECT 1".to_owned()]),
                ("0002_b.sql".to_owned(), vec![]),
            ]
        );
    }
}

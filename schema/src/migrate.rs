//! The ClickHouse schema runner: renders `sql/migrations/NNNN_name.sql` for one node or a
//! cluster and applies the pending ones in order.
//!
//! # Files and placeholders
//! The migrations are embedded in the binary ([`embedded`]), so a binary always carries the
//! schema it was built against; [`load_dir`] reads the same files from a directory instead. A
//! file may hold several statements, each ended by a `;` outside strings, quoted identifiers and
//! comments; comments are stripped. Placeholders rendered by [`render`] for a [`Target`]:
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
//!
//! # Bookkeeping
//! `schema_migrations` (created by `sql/bootstrap.sql`) holds version, name, checksum, applied
//! time and applier of every applied file. The checksum is FNV-1a 64 over the file text with
//! CRLF normalised to LF, as 16 lowercase hex digits ([`checksum`]): it detects edits, it is not
//! a security measure. A file whose text changed after it was applied is refused
//! ([`MigrateError::ChecksumMismatch`]): fix forward with a new file instead.
//!
//! # Running twice, or twice at once
//! There is no lock: ClickHouse has none that survives a crashed holder. Instead every step is
//! idempotent, so two runners racing on the same migration both succeed and the result is the
//! same as one run:
//! - every statement is `CREATE ... IF NOT EXISTS` (or another idempotent form such as
//!   `ALTER ... ADD COLUMN IF NOT EXISTS`, `MODIFY TTL`); ClickHouse serialises concurrent
//!   creation of one name, so the loser of the race sees "exists" and does nothing (a unit test
//!   checks every shipped `CREATE` carries `IF NOT EXISTS`);
//! - the record is inserted only after all statements of the file succeeded, with
//!   `insert_deduplication_token = schema_migrations:<version>:<checksum>` into a table with a
//!   dedup window, so a second record of the same file is dropped by ClickHouse; the table is a
//!   `ReplacingMergeTree` ordered by version and read with `FINAL` as a second net;
//! - a crash between statements leaves the file unrecorded, and the next run re-runs all of its
//!   (idempotent) statements.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// The statements run before any migration: database and `schema_migrations`.
const BOOTSTRAP_SQL: &str = include_str!("../../sql/bootstrap.sql");
const BOOTSTRAP_FILE: &str = "bootstrap.sql";

/// Every migration shipped with this binary, in order. A unit test checks this list matches
/// `sql/migrations/`.
const EMBEDDED: &[(&str, &str)] = &[
    ("0001_events.sql", include_str!("../../sql/migrations/0001_events.sql")),
    (
        "0002_rollups_1m.sql",
        include_str!("../../sql/migrations/0002_rollups_1m.sql"),
    ),
    (
        "0003_rollups_1h.sql",
        include_str!("../../sql/migrations/0003_rollups_1h.sql"),
    ),
    (
        "0004_sessions.sql",
        include_str!("../../sql/migrations/0004_sessions.sql"),
    ),
    ("0005_views.sql", include_str!("../../sql/migrations/0005_views.sql")),
    (
        "0006_dedup_window.sql",
        include_str!("../../sql/migrations/0006_dedup_window.sql"),
    ),
];

/// Errors of the migration runner.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("invalid migration file name {file_name:?}: expected NNNN_name.sql")]
    InvalidFileName { file_name: String },
    #[error("migrations {first} and {second} share version {version}")]
    DuplicateVersion {
        version: u32,
        first: String,
        second: String,
    },
    #[error(
        "migration {file_name} was changed after it was applied (applied checksum {applied}, \
         file checksum {current}); restore it and add a new migration instead"
    )]
    ChecksumMismatch {
        file_name: String,
        applied: String,
        current: String,
    },
    #[error("{file_name}: unknown placeholder {{{{{placeholder}}}}}")]
    UnknownPlaceholder { file_name: String, placeholder: String },
    #[error("{file_name}: {{{{{placeholder}}}}} is only valid in cluster mode")]
    ClusterOnlyPlaceholder { file_name: String, placeholder: String },
    #[error("{file_name}: {{{{cluster_only}}}} must start a statement")]
    MisplacedClusterOnly { file_name: String },
    #[error("{file_name}: unterminated {what}")]
    Unterminated { file_name: String, what: &'static str },
    #[error("invalid {what} name {name:?}: expected letters, digits and underscores")]
    InvalidIdentifier { what: &'static str, name: String },
    #[error("reading migrations from {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file_name}: statement failed: {source}\n{statement}")]
    Statement {
        file_name: String,
        statement: String,
        source: clickhouse::error::Error,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// `Result` with [`MigrateError`].
pub type Result<T, E = MigrateError> = std::result::Result<T, E>;

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// `NNNN` of the file name.
    pub version: u32,
    /// The file name without the version prefix and `.sql`, e.g. `events`.
    pub name: String,
    /// The file name, e.g. `0001_events.sql`; used in every message about this migration.
    pub file_name: String,
    /// The unrendered text; [`checksum`] is computed over it.
    pub sql: String,
}

impl Migration {
    /// Builds a migration from its file name (`NNNN_name.sql`) and text.
    pub fn new(file_name: &str, sql: impl Into<String>) -> Result<Self> {
        let (version, name) = parse_file_name(file_name).ok_or_else(|| MigrateError::InvalidFileName {
            file_name: file_name.to_owned(),
        })?;
        Ok(Self {
            version,
            name: name.to_owned(),
            file_name: file_name.to_owned(),
            sql: sql.into(),
        })
    }

    /// [`checksum`] of the file text.
    pub fn checksum(&self) -> String {
        checksum(&self.sql)
    }
}

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

/// The migrations embedded in this binary, in version order.
pub fn embedded() -> Vec<Migration> {
    EMBEDDED
        .iter()
        .map(|(file_name, sql)| Migration::new(file_name, *sql).expect("embedded file names are valid"))
        .collect()
}

/// Reads every `*.sql` file of `dir` as a migration, in version order.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>> {
    let io_error = |source| MigrateError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut migrations = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let sql = std::fs::read_to_string(&path).map_err(|source| MigrateError::Io {
            path: path.clone(),
            source,
        })?;
        migrations.push(Migration::new(&file_name, sql)?);
    }
    sort_and_check(&mut migrations)?;
    Ok(migrations)
}

/// Sorts by version and refuses two files with one version.
pub fn sort_and_check(migrations: &mut [Migration]) -> Result<()> {
    migrations.sort_by(|a, b| a.version.cmp(&b.version).then_with(|| a.file_name.cmp(&b.file_name)));
    for pair in migrations.windows(2) {
        if pair[0].version == pair[1].version {
            return Err(MigrateError::DuplicateVersion {
                version: pair[0].version,
                first: pair[0].file_name.clone(),
                second: pair[1].file_name.clone(),
            });
        }
    }
    Ok(())
}

/// `0001_events.sql` -> `(1, "events")`.
pub fn parse_file_name(file_name: &str) -> Option<(u32, &str)> {
    let stem = file_name.strip_suffix(".sql")?;
    let (digits, name) = stem.split_once('_')?;
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) || !name_ok {
        return None;
    }
    Some((digits.parse().ok()?, name))
}

/// FNV-1a 64 of `text` with CRLF normalised to LF, as 16 lowercase hex digits. Stable across
/// platforms and releases (it is stored in `schema_migrations`).
pub fn checksum(text: &str) -> String {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    let bytes = text.as_bytes();
    for (index, &byte) in bytes.iter().enumerate() {
        if byte == b'\r' && bytes.get(index + 1) == Some(&b'\n') {
            continue;
        }
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    format!("{hash:016x}")
}

/// Splits SQL text into statements: each ends at a `;` outside `'strings'`, `"identifiers"`,
/// `` `identifiers` ``, `-- comments` and `/* comments */`; the text after the last `;` is a
/// statement too. Comments are removed (a line holding only a comment disappears), statements
/// are trimmed, and empty ones dropped. `file_name` only labels errors.
pub fn split_statements(file_name: &str, sql: &str) -> Result<Vec<String>> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                current.push(c);
                let mut closed = false;
                while let Some(inner) = chars.next() {
                    current.push(inner);
                    if inner == '\\' {
                        if let Some(escaped) = chars.next() {
                            current.push(escaped);
                        }
                    } else if inner == c {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    let what = if c == '\'' {
                        "string literal"
                    } else {
                        "quoted identifier"
                    };
                    return Err(MigrateError::Unterminated {
                        file_name: file_name.to_owned(),
                        what,
                    });
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        break;
                    }
                }
                end_line_after_comment(&mut current);
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = '\0';
                let mut closed = false;
                for inner in chars.by_ref() {
                    if previous == '*' && inner == '/' {
                        closed = true;
                        break;
                    }
                    previous = inner;
                }
                if !closed {
                    return Err(MigrateError::Unterminated {
                        file_name: file_name.to_owned(),
                        what: "block comment",
                    });
                }
                current.push(' ');
            }
            ';' => push_statement(&mut statements, &mut current),
            _ => current.push(c),
        }
    }
    push_statement(&mut statements, &mut current);
    Ok(statements)
}

/// After a `--` comment: drop the line entirely if only whitespace preceded the comment,
/// otherwise end the line (without the trailing blanks before the comment).
fn end_line_after_comment(current: &mut String) {
    let trimmed_len = current.trim_end_matches([' ', '\t']).len();
    current.truncate(trimmed_len);
    if current.is_empty() || current.ends_with('\n') {
        return;
    }
    current.push('\n');
}

fn push_statement(statements: &mut Vec<String>, current: &mut String) {
    let statement = current.trim();
    if !statement.is_empty() {
        statements.push(statement.to_owned());
    }
    current.clear();
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
        let end = after.find("}}").ok_or_else(|| MigrateError::Unterminated {
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
    let cluster_required = || MigrateError::ClusterOnlyPlaceholder {
        file_name: file_name.to_owned(),
        placeholder: placeholder.to_owned(),
    };
    let value = match (key, argument) {
        ("db", None) => target.database.clone(),
        ("on_cluster", None) => cluster.map(|c| format!("ON CLUSTER {c}")).unwrap_or_default(),
        ("cluster", None) => cluster.ok_or_else(cluster_required)?.to_owned(),
        ("cluster_only", None) => {
            return Err(MigrateError::MisplacedClusterOnly {
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
            return Err(MigrateError::UnknownPlaceholder {
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

fn validate_identifier(what: &'static str, name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Ok(());
    }
    Err(MigrateError::InvalidIdentifier {
        what,
        name: name.to_owned(),
    })
}

/// A row of `schema_migrations` as the runner reads it.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct AppliedMigration {
    pub version: u32,
    pub name: String,
    pub checksum: String,
}

/// The migrations of `migrations` not in `applied`, in order, after checking that every applied
/// one still has the checksum it was applied with. Applied versions this binary does not know
/// (a newer binary ran first) are ignored.
pub fn pending<'m>(migrations: &'m [Migration], applied: &[AppliedMigration]) -> Result<Vec<&'m Migration>> {
    let mut pending = Vec::new();
    for migration in migrations {
        match applied.iter().find(|a| a.version == migration.version) {
            Some(record) => {
                let current = migration.checksum();
                if record.checksum != current {
                    return Err(MigrateError::ChecksumMismatch {
                        file_name: migration.file_name.clone(),
                        applied: record.checksum.clone(),
                        current,
                    });
                }
            }
            None => pending.push(migration),
        }
    }
    Ok(pending)
}

/// What a run would do (the dry run) or did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Database and `schema_migrations` creation; always run (they are idempotent).
    pub bootstrap: Vec<String>,
    /// Pending migrations with their rendered statements, in order.
    pub pending: Vec<PlannedMigration>,
    /// Versions already recorded in `schema_migrations`.
    pub already_applied: Vec<u32>,
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
}

impl Migrator {
    /// A runner for the [`embedded`] migrations.
    pub fn new(client: clickhouse::Client, target: Target) -> Self {
        Self {
            client,
            target,
            migrations: embedded(),
            applied_by: format!("chute {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Uses `migrations` instead of the embedded ones (e.g. from [`load_dir`]).
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
        let applied = if self.bookkeeping_exists().await? {
            self.applied().await?
        } else {
            Vec::new()
        };
        self.plan_from(&applied)
    }

    /// Applies every pending migration in order and returns what it ran. Safe to run again and
    /// concurrently (see the module docs).
    pub async fn run(&self) -> Result<Plan> {
        self.target.validate()?;
        let bootstrap = render_bootstrap(&self.target)?;
        for statement in &bootstrap {
            self.execute(BOOTSTRAP_FILE, statement).await?;
        }
        let plan = self.plan_from(&self.applied().await?)?;
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
        Ok(plan)
    }

    /// What `schema_migrations` holds, by version.
    pub async fn applied(&self) -> Result<Vec<AppliedMigration>> {
        let sql = format!(
            "SELECT version, name, checksum FROM {}.schema_migrations FINAL ORDER BY version",
            self.target.database
        );
        Ok(self.admin_client().query(&sql).fetch_all().await?)
    }

    fn plan_from(&self, applied: &[AppliedMigration]) -> Result<Plan> {
        let pending = pending(&self.migrations, applied)?;
        let pending = pending
            .into_iter()
            .map(|m| {
                Ok(PlannedMigration {
                    version: m.version,
                    name: m.name.clone(),
                    file_name: m.file_name.clone(),
                    checksum: m.checksum(),
                    statements: render(&m.file_name, &m.sql, &self.target)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            bootstrap: render_bootstrap(&self.target)?,
            pending,
            already_applied: applied.iter().map(|a| a.version).collect(),
        })
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
            .map_err(|source| MigrateError::Statement {
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
        let token = format!("schema_migrations:{}:{}", migration.version, migration.checksum);
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

    fn single() -> Target {
        Target::single("chute")
    }

    fn cluster() -> Target {
        Target::cluster("chute", "main")
    }

    #[test]
    fn splits_on_semicolons_outside_strings_and_comments() {
        let sql = "-- header; not a statement\n\
                   CREATE TABLE a (s String DEFAULT 'x;y') ENGINE = Memory;\n\
                   /* block; comment */ SELECT 'it''s; fine', \"we;ird\", `b;t` -- tail; comment\n\
                   FROM t;\n\
                   SELECT 'back\\'slash;';\n\
                   \n-- only a comment;\n";
        let statements = split_statements("f.sql", sql).unwrap();
        assert_eq!(
            statements,
            vec![
                "CREATE TABLE a (s String DEFAULT 'x;y') ENGINE = Memory",
                "SELECT 'it''s; fine', \"we;ird\", `b;t`\nFROM t",
                "SELECT 'back\\'slash;'",
            ]
        );
    }

    #[test]
    fn last_statement_needs_no_semicolon() {
        assert_eq!(
            split_statements("f.sql", "SELECT 1;\nSELECT 2\n").unwrap(),
            vec!["SELECT 1", "SELECT 2"]
        );
    }

    #[test]
    fn unterminated_string_names_the_file() {
        let error = split_statements("0009_bad.sql", "SELECT 'oops;").unwrap_err();
        assert_eq!(error.to_string(), "0009_bad.sql: unterminated string literal");
        let error = split_statements("0009_bad.sql", "SELECT 1 /* open").unwrap_err();
        assert_eq!(error.to_string(), "0009_bad.sql: unterminated block comment");
    }

    #[test]
    fn parses_file_names() {
        assert_eq!(parse_file_name("0001_events.sql"), Some((1, "events")));
        assert_eq!(parse_file_name("0012_rollups_1m.sql"), Some((12, "rollups_1m")));
        assert_eq!(parse_file_name("1_events.sql"), None);
        assert_eq!(parse_file_name("0001_events.txt"), None);
        assert_eq!(parse_file_name("0001_.sql"), None);
        assert_eq!(parse_file_name("0001-events.sql"), None);
        assert!(Migration::new("events.sql", "")
            .unwrap_err()
            .to_string()
            .contains("events.sql"));
    }

    #[test]
    fn checksum_is_stable_and_ignores_crlf() {
        // FNV-1a 64 reference values.
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_eq!(checksum("a"), "af63dc4c8601ec8c");
        assert_eq!(
            checksum("SELECT 1;\r\nSELECT 2;\r\n"),
            checksum("SELECT 1;\nSELECT 2;\n")
        );
        assert_ne!(checksum("SELECT 1"), checksum("SELECT 2"));
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
        assert!(matches!(
            error,
            MigrateError::InvalidIdentifier { what: "database", .. }
        ));
        assert!(Target::cluster("chute", "my-cluster").validate().is_err());
        assert!(Target::single("chute_test_1").validate().is_ok());
    }

    #[test]
    fn pending_skips_applied_and_refuses_changed_files() {
        let migrations = vec![
            Migration::new("0001_a.sql", "SELECT 1").unwrap(),
            Migration::new("0002_b.sql", "SELECT 2").unwrap(),
        ];
        let record = |version: u32, checksum: String| AppliedMigration {
            version,
            name: String::new(),
            checksum,
        };
        let applied = vec![record(1, checksum("SELECT 1")), record(9, "from a newer binary".into())];
        let pending_versions: Vec<u32> = pending(&migrations, &applied)
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(pending_versions, vec![2]);

        let applied = vec![record(1, checksum("SELECT 0"))];
        let error = pending(&migrations, &applied).unwrap_err();
        assert!(matches!(&error, MigrateError::ChecksumMismatch { file_name, .. } if file_name == "0001_a.sql"));
        assert!(error
            .to_string()
            .starts_with("migration 0001_a.sql was changed after it was applied"));
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let mut migrations = vec![
            Migration::new("0001_a.sql", "").unwrap(),
            Migration::new("0001_b.sql", "").unwrap(),
        ];
        let error = sort_and_check(&mut migrations).unwrap_err();
        assert_eq!(
            error.to_string(),
            "migrations 0001_a.sql and 0001_b.sql share version 1"
        );
    }

    #[test]
    fn embedded_list_matches_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/migrations");
        assert_eq!(
            load_dir(&dir).unwrap(),
            embedded(),
            "add new files to EMBEDDED in migrate.rs"
        );
    }

    /// The concurrency argument in the module docs rests on every statement being idempotent.
    #[test]
    fn every_shipped_create_is_idempotent() {
        for target in [single(), cluster()] {
            let mut statements = render_bootstrap(&target).unwrap();
            for (_, rendered) in render_all(&embedded(), &target).unwrap() {
                statements.extend(rendered);
            }
            for statement in &statements {
                let upper = statement.to_ascii_uppercase();
                // Setting a table setting to a fixed value is idempotent by nature.
                if upper.starts_with("ALTER TABLE ") && upper.contains(" MODIFY SETTING ") {
                    continue;
                }
                assert!(
                    upper.starts_with("CREATE "),
                    "only CREATE and ALTER ... MODIFY SETTING so far: {statement}"
                );
                assert!(upper.contains(" IF NOT EXISTS "), "not idempotent: {statement}");
            }
        }
    }

    /// Tables created before a change of the window get it from 0006: every MergeTree table a
    /// migration creates must be altered there too.
    #[test]
    fn the_window_migration_covers_every_merge_tree_table() {
        let target = single();
        let rendered = render_all(&embedded(), &target).unwrap();
        let (_, alters) = rendered
            .iter()
            .find(|(file_name, _)| file_name == "0006_dedup_window.sql")
            .expect("0006 exists");
        for (file_name, statements) in &rendered {
            for statement in statements
                .iter()
                .filter(|s| s.contains("MergeTree") && s.contains("CREATE TABLE"))
            {
                let table = statement
                    .split_whitespace()
                    .skip_while(|word| *word != "EXISTS")
                    .nth(1)
                    .expect("CREATE TABLE IF NOT EXISTS <name>");
                if table.ends_with("schema_migrations") {
                    continue;
                }
                assert!(
                    alters
                        .iter()
                        .any(|alter| alter.contains(&format!("ALTER TABLE {table} "))),
                    "{file_name}: {table} is not in 0006"
                );
            }
        }
    }

    /// Every MergeTree-family table must carry the dedup window, or a repeated insert would be
    /// counted twice there (the default window is 0); and on a cluster, materialized views must
    /// read and write the `_local` tables, never the Distributed ones.
    #[test]
    fn every_merge_tree_has_a_dedup_window_and_views_stay_local() {
        for target in [single(), cluster()] {
            for (file_name, statements) in render_all(&embedded(), &target).unwrap() {
                for statement in statements {
                    if statement.contains("MergeTree") {
                        assert!(
                            statement.contains(&format!("deduplication_window = {DEDUP_WINDOW}")),
                            "{file_name}: {statement}"
                        );
                    }
                    if target.cluster.is_some() && statement.contains("MATERIALIZED VIEW") {
                        let from_local = statement.contains("FROM chute.events_local");
                        let to_local = statement
                            .lines()
                            .any(|l| l.starts_with("TO chute.") && l.ends_with("_local"));
                        assert!(from_local && to_local, "{file_name}: {statement}");
                    }
                }
            }
        }
    }

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
        };
        let script = plan.to_sql();
        assert!(script.contains("-- 0001_events.sql (checksum 00)\nCREATE TABLE IF NOT EXISTS chute.events"));
    }
}

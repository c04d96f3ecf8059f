//! The migration files: `sql/migrations/NNNN_name.sql`, applied in version order.
//!
//! The files are embedded in the binary ([`embedded`]), so a binary always carries the schema it
//! was built against; [`load_dir`] reads the same files from a directory instead.

use std::path::Path;

use crate::error::{Error, Result};
use chute_common::hash::fnv1a64;

/// The statements run before any migration: database and `schema_migrations`.
pub(crate) const BOOTSTRAP_SQL: &str = include_str!("../../sql/bootstrap.sql");
pub(crate) const BOOTSTRAP_FILE: &str = "bootstrap.sql";

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
        let (version, name) = parse_file_name(file_name).ok_or_else(|| Error::InvalidFileName {
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

/// The migrations embedded in this binary, in version order.
pub fn embedded() -> Vec<Migration> {
    EMBEDDED
        .iter()
        .map(|(file_name, sql)| Migration::new(file_name, *sql).expect("embedded file names are valid"))
        .collect()
}

/// Reads every `*.sql` file of `dir` as a migration, in version order.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>> {
    let io_error = |source| Error::Io {
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
        let sql = std::fs::read_to_string(&path).map_err(|source| Error::Io {
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
            return Err(Error::DuplicateVersion {
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

/// FNV-1a 64 ([`fnv1a64`]) of `text` with CRLF normalised to LF, as 16 lowercase hex digits.
/// Stable across platforms and releases (it is stored in `schema_migrations`).
pub fn checksum(text: &str) -> String {
    let bytes = text.as_bytes();
    let without_cr_before_lf = bytes
        .iter()
        .enumerate()
        .filter(|&(index, &byte)| !(byte == b'\r' && bytes.get(index + 1) == Some(&b'\n')))
        .map(|(_, &byte)| byte);
    format!("{:016x}", fnv1a64(without_cr_before_lf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{cluster, single};
    use crate::render::{render_all, render_bootstrap, DEDUP_WINDOW};

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
            "add new files to EMBEDDED in migration.rs"
        );
    }

    /// `schema_migrations` of every existing install holds these checksums: a changed checksum
    /// function, or an edit to a shipped file, would make the runner refuse to start there.
    #[test]
    fn shipped_checksums_never_change() {
        let checksums: Vec<(String, String)> = embedded()
            .into_iter()
            .take(6)
            .map(|m| (m.file_name.clone(), m.checksum()))
            .collect();
        let pinned = [
            ("0001_events.sql", "7ad65caeb2a63994"),
            ("0002_rollups_1m.sql", "f54258b2ee143544"),
            ("0003_rollups_1h.sql", "6c60bf68a605d875"),
            ("0004_sessions.sql", "d2ad787ebdc6d6b9"),
            ("0005_views.sql", "4d311adf7c194a8e"),
            ("0006_dedup_window.sql", "3a3d8bb9d90e7b0d"),
        ];
        let pinned: Vec<(String, String)> = pinned.iter().map(|(f, c)| (f.to_string(), c.to_string())).collect();
        assert_eq!(checksums, pinned);
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
}

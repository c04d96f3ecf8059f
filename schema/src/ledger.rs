//! The ledger of applied migrations. `schema_migrations` (created by `sql/bootstrap.sql`) holds
//! version, name, checksum, applied time and applier of every applied file; [`Ledger`] compares
//! what it records with the files of this binary: what is applied, what is pending, and what was
//! changed after it was applied.
//!
//! The checksum is FNV-1a 64 over the file text with CRLF normalised to LF, as 16 lowercase hex
//! digits ([`checksum`](crate::migration::checksum)): it detects edits, it is not a security measure. A file whose text
//! changed after it was applied is refused ([`Error::ChecksumMismatch`]): fix forward with a new
//! file instead.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::migration::Migration;

/// A row of `schema_migrations` as the runner reads it.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct AppliedMigration {
    pub version: u32,
    pub name: String,
    pub checksum: String,
}

/// Where one migration file stands in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not recorded: the next run applies it.
    Pending,
    /// Recorded with the checksum the file still has.
    Applied,
    /// Recorded with another checksum: the file was edited after it was applied.
    Changed { applied_checksum: String },
}

/// What `schema_migrations` records, compared with migration files by version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    records: Vec<AppliedMigration>,
}

impl Ledger {
    /// The ledger holding `records` (what `schema_migrations` returned; none before the first run).
    pub fn new(records: Vec<AppliedMigration>) -> Self {
        Self { records }
    }

    pub fn records(&self) -> &[AppliedMigration] {
        &self.records
    }

    /// Every recorded version, in record order, including versions this binary has no file for
    /// (a newer binary ran first).
    pub fn applied_versions(&self) -> Vec<u32> {
        self.records.iter().map(|record| record.version).collect()
    }

    /// Where `migration` stands: a record of its version with its checksum, one with another
    /// checksum, or none.
    pub fn status(&self, migration: &Migration) -> Status {
        let Some(record) = self.records.iter().find(|record| record.version == migration.version) else {
            return Status::Pending;
        };
        if record.checksum == migration.checksum() {
            return Status::Applied;
        }
        Status::Changed {
            applied_checksum: record.checksum.clone(),
        }
    }

    /// The migrations of `migrations` not applied yet, in order, after checking that every
    /// applied one still has the checksum it was applied with. Applied versions this binary does
    /// not know (a newer binary ran first) are ignored.
    pub fn pending<'m>(&self, migrations: &'m [Migration]) -> Result<Vec<&'m Migration>> {
        let mut pending = Vec::new();
        for migration in migrations {
            match self.status(migration) {
                Status::Applied => {}
                Status::Pending => pending.push(migration),
                Status::Changed { applied_checksum } => {
                    return Err(Error::ChecksumMismatch {
                        file_name: migration.file_name.clone(),
                        applied: applied_checksum,
                        current: migration.checksum(),
                    });
                }
            }
        }
        Ok(pending)
    }
}

/// The `insert_deduplication_token` of the record of a file: a second record of the same file
/// (a concurrent runner) is then dropped by ClickHouse's insert dedup.
pub fn record_token(version: u32, checksum: &str) -> String {
    format!("schema_migrations:{version}:{checksum}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::checksum;

    fn record(version: u32, checksum: impl Into<String>) -> AppliedMigration {
        AppliedMigration {
            version,
            name: String::new(),
            checksum: checksum.into(),
        }
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
    fn status_of_each_file() {
        let first = Migration::new("0001_a.sql", "SELECT 1").unwrap();
        let second = Migration::new("0002_b.sql", "SELECT 2").unwrap();
        let third = Migration::new("0003_c.sql", "SELECT 3").unwrap();
        let ledger = Ledger::new(vec![record(1, checksum("SELECT 1")), record(2, "0123456789abcdef")]);
        assert_eq!(ledger.status(&first), Status::Applied);
        assert_eq!(
            ledger.status(&second),
            Status::Changed {
                applied_checksum: "0123456789abcdef".into()
            }
        );
        assert_eq!(ledger.status(&third), Status::Pending);
        assert_eq!(Ledger::default().status(&first), Status::Pending);
    }

    #[test]
    fn pending_skips_applied_and_refuses_changed_files() {
        let migrations = vec![
            Migration::new("0001_a.sql", "SELECT 1").unwrap(),
            Migration::new("0002_b.sql", "SELECT 2").unwrap(),
        ];
        let ledger = Ledger::new(vec![record(1, checksum("SELECT 1")), record(9, "from a newer binary")]);
        let pending_versions: Vec<u32> = ledger.pending(&migrations).unwrap().iter().map(|m| m.version).collect();
        assert_eq!(pending_versions, vec![2]);
        assert_eq!(ledger.applied_versions(), vec![1, 9]);

        let ledger = Ledger::new(vec![record(1, checksum("SELECT 0"))]);
        let error = ledger.pending(&migrations).unwrap_err();
        assert!(matches!(&error, Error::ChecksumMismatch { file_name, .. } if file_name == "0001_a.sql"));
        assert!(error
            .to_string()
            .starts_with("migration 0001_a.sql was changed after it was applied"));
    }

    /// Runners of different versions must write the same token for the same file, or a race
    /// between them would record it twice.
    #[test]
    fn record_token_is_stable() {
        assert_eq!(record_token(6, "00ff"), "schema_migrations:6:00ff");
    }
}

-- Bootstrap run by the migration runner before any migration (not itself versioned).
-- `schema_migrations` records one row per applied migration file. The runner inserts each row
-- with an insert_deduplication_token derived from the version and checksum, so two runners that
-- race on the same migration leave one row; ReplacingMergeTree on `version` (read with FINAL) is
-- the second net.
CREATE DATABASE IF NOT EXISTS {{db}} {{on_cluster}};

CREATE TABLE IF NOT EXISTS {{db}}.schema_migrations {{on_cluster}}
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3),
    applied_by String
)
ENGINE = {{global_engine:ReplacingMergeTree(applied_at)}}
ORDER BY version
SETTINGS {{dedup_window}};

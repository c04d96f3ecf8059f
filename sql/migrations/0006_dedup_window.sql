-- Raise the insert dedup window of every table a batch writes to (issue: the window counts one
-- entry per partition per insert, and `events` is partitioned by day; see "The window
-- arithmetic" in aggregator/EXACTLY_ONCE.md). 0001-0004 create new tables with the current
-- window already; this brings tables created before it up to the same number. Idempotent.
ALTER TABLE {{db}}.{{local:events}} {{on_cluster}} MODIFY SETTING {{dedup_window}};
ALTER TABLE {{db}}.{{local:events_1m}} {{on_cluster}} MODIFY SETTING {{dedup_window}};
ALTER TABLE {{db}}.{{local:metrics_1m}} {{on_cluster}} MODIFY SETTING {{dedup_window}};
ALTER TABLE {{db}}.{{local:events_1h}} {{on_cluster}} MODIFY SETTING {{dedup_window}};
ALTER TABLE {{db}}.{{local:metrics_1h}} {{on_cluster}} MODIFY SETTING {{dedup_window}};
ALTER TABLE {{db}}.{{local:sessions}} {{on_cluster}} MODIFY SETTING {{dedup_window}};

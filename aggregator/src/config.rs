//! Aggregator configuration: flags, each also settable through a `CHUTE_*` environment variable,
//! loaded by `chute_common::config::load` from the environment `main` passes in.

use std::net::SocketAddr;
use std::time::Duration;

use chute_common::config::{parse_bytes, parse_duration};
use chute_common::telemetry::LogFormat;
use chute_common::validate::Limits;

use crate::batcher::BatchLimits;
use crate::trim::TrimSettings;

/// Settings of the `aggregator` process (and its `migrate` / `dlq` subcommands).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Admin HTTP server: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "CHUTE_AGGREGATOR_ADMIN_LISTEN",
        default_value = "127.0.0.1:7410",
        global = true
    )]
    pub admin_listen: SocketAddr,

    /// NATS server URL(s).
    #[arg(long, env = "CHUTE_NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    pub nats_url: String,

    /// How long to keep trying to reach NATS at start.
    #[arg(long, env = "CHUTE_NATS_CONNECT_WAIT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub nats_connect_wait: Duration,

    /// ClickHouse HTTP URL.
    #[arg(
        long,
        env = "CHUTE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123",
        global = true
    )]
    pub clickhouse_url: String,

    /// ClickHouse database holding the Chute tables.
    #[arg(long, env = "CHUTE_CLICKHOUSE_DATABASE", default_value = "chute", global = true)]
    pub clickhouse_database: String,

    /// ClickHouse user.
    #[arg(long, env = "CHUTE_CLICKHOUSE_USER", default_value = "default", global = true)]
    pub clickhouse_user: String,

    /// ClickHouse password.
    #[arg(
        long,
        env = "CHUTE_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true,
        global = true
    )]
    pub clickhouse_password: String,

    /// Number of stream partitions P; must match the ingestors'.
    #[arg(long, env = "CHUTE_PARTITIONS", default_value_t = 16, global = true)]
    pub partitions: u32,

    /// Replicas of the ledger KV bucket and the dead-letter stream (3 on a NATS cluster).
    #[arg(long, env = "CHUTE_AGGREGATOR_REPLICAS", default_value_t = 1, global = true)]
    pub replicas: usize,

    /// Name of the KV bucket holding the ledger (leases, positions, pending batches).
    #[arg(long, env = "CHUTE_LEDGER_BUCKET", default_value = "chute_aggregator", global = true)]
    pub ledger_bucket: String,

    /// Partition lease duration; a stalled owner loses its partitions after this.
    #[arg(long, env = "CHUTE_LEASE_TTL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub lease_ttl: Duration,

    /// Flush a batch at this many rows.
    #[arg(long, env = "CHUTE_BATCH_MAX_ROWS", default_value_t = 200_000, global = true)]
    pub batch_max_rows: usize,

    /// Flush a batch at this many payload bytes.
    #[arg(long, env = "CHUTE_BATCH_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes, global = true)]
    pub batch_max_bytes: u64,

    /// Flush a batch this long after its first message at the latest.
    #[arg(long, env = "CHUTE_BATCH_LINGER", default_value = "200ms", value_parser = parse_duration, global = true)]
    pub batch_linger: Duration,

    /// Flush early when no message arrived for this long.
    #[arg(long, env = "CHUTE_BATCH_IDLE_FLUSH", default_value = "20ms", value_parser = parse_duration, global = true)]
    pub batch_idle_flush: Duration,

    /// Insert budget: at most this many ClickHouse inserts per second per aggregator.
    #[arg(long, env = "CHUTE_MAX_INSERTS_PER_SECOND", default_value_t = 5.0, global = true)]
    pub max_inserts_per_second: f64,

    /// Messages buffered between the partition readers and the batcher (memory bound:
    /// this many messages of up to max-message-bytes each, plus one batch).
    #[arg(long, env = "CHUTE_READ_BUFFER_MESSAGES", default_value_t = 64, global = true)]
    pub read_buffer_messages: usize,

    /// Oldest valid event time relative to the ingestor's receive time (events outside go to the DLQ).
    #[arg(long, env = "CHUTE_EVENT_MAX_PAST", default_value = "7d", value_parser = parse_duration, global = true)]
    pub event_max_past: Duration,

    /// Newest valid event time relative to the ingestor's receive time.
    #[arg(long, env = "CHUTE_EVENT_MAX_FUTURE", default_value = "5m", value_parser = parse_duration, global = true)]
    pub event_max_future: Duration,

    /// On SIGTERM, how long the final flush may take before exiting anyway (the batch stays
    /// recorded and the next owner replays it).
    #[arg(long, env = "CHUTE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration, global = true)]
    pub drain_timeout: Duration,

    /// Committed history kept in the EVENTS stream (a replay window): committed messages are
    /// purged only once their position was committed at least this long ago. The default covers
    /// JetStream's duplicate window across a NATS restart; above half the stream's cap it is
    /// ignored. 0 trims everything committed within one trim interval.
    #[arg(long, env = "CHUTE_STREAM_KEEP_COMMITTED", default_value = "10m", value_parser = parse_duration, global = true)]
    pub stream_keep_committed: Duration,

    /// How often committed messages are trimmed from the EVENTS stream.
    #[arg(long, env = "CHUTE_STREAM_TRIM_INTERVAL", default_value = "5s", value_parser = parse_duration, global = true)]
    pub stream_trim_interval: Duration,

    /// A partition that has work but whose committed position has not moved for this long is
    /// stalled: `chute_aggregator_partition_stalled` goes to 1 and `/readyz` answers 503.
    #[arg(long, env = "CHUTE_STALL_AFTER", default_value = "2m", value_parser = parse_duration, global = true)]
    pub stall_after: Duration,

    /// Instance id in the ledger (default: a random id per process start).
    #[arg(long, env = "CHUTE_INSTANCE_ID", global = true)]
    pub instance_id: Option<String>,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "CHUTE_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Log format: text or json.
    #[arg(long, env = "CHUTE_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

/// Command line: `aggregator [run]`, `aggregator migrate`, `aggregator dlq list|replay`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Chute aggregator: exactly-once JetStream -> ClickHouse"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Consume the EVENTS stream into ClickHouse (the default).
    Run,
    /// Apply pending ClickHouse migrations (safe to run twice or concurrently).
    Migrate {
        /// Print the statements that would run, run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Render ON CLUSTER with Replicated engines and Distributed tables.
        #[arg(long, env = "CHUTE_CLICKHOUSE_CLUSTER")]
        cluster: Option<String>,
    },
    /// Inspect or replay the dead-letter stream EVENTS_DLQ.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Inspect or rebuild the ledger (positions, leases, pending batches).
    Ledger {
        #[command(subcommand)]
        action: LedgerAction,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum LedgerAction {
    /// Print the ledger as JSON.
    Show,
    /// Rebuild the committed positions from what ClickHouse holds and bind the ledger to the
    /// EVENTS stream as it is now (after a lost ledger or a recreated stream). Stop every
    /// aggregator first.
    Reset {
        /// Required: the positions come from the raw `events` table.
        #[arg(long, required = true)]
        from_clickhouse: bool,
        /// Print the positions found, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Reset even though an aggregator's heartbeat has not expired.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqAction {
    /// List dead-lettered messages as JSON lines.
    List,
    /// Re-publish dead-lettered messages to their original subjects and remove them from the DLQ.
    Replay {
        /// Only the message with this EVENTS_DLQ sequence.
        #[arg(long)]
        sequence: Option<u64>,
    },
}

impl Default for Config {
    /// The documented defaults (no flags, no environment), whatever the process environment holds.
    fn default() -> Self {
        chute_common::config::defaults::<Cli>().config
    }
}

impl Config {
    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_rows: self.batch_max_rows,
            max_bytes: self.batch_max_bytes as usize,
            linger: self.batch_linger,
            idle_flush: self.batch_idle_flush,
            min_insert_interval: Duration::from_secs_f64(1.0 / self.max_inserts_per_second.max(0.01)),
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_past: self.event_max_past,
            max_future: self.event_max_future,
            ..Limits::default()
        }
    }

    pub fn trim_settings(&self) -> TrimSettings {
        TrimSettings {
            interval: self.stream_trim_interval,
            keep_committed: self.stream_keep_committed,
        }
    }

    pub fn clickhouse(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.clickhouse_url)
            .with_database(&self.clickhouse_database)
            .with_user(&self.clickhouse_user)
            .with_password(&self.clickhouse_password)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::{load, variables, NO_ENV};

    fn cli(args: &[&str], env: &[(&str, &str)]) -> Cli {
        load([&["aggregator"], args].concat(), env.iter().copied()).unwrap()
    }

    #[test]
    fn defaults_match_the_docs() {
        let Cli { config, command } = cli(&[], &[]);
        assert!(command.is_none());
        assert_eq!(config.partitions, 16);
        assert_eq!(config.batch_max_bytes, 64 << 20);
        assert_eq!(config.batch_linger, Duration::from_millis(200));
        assert_eq!(config.instance_id, None);
        assert_eq!(Config::default().partitions, 16);
        assert!(load::<Cli, _, _, _, _, _>(["aggregator", "--partitions", "x"], NO_ENV).is_err());
    }

    #[test]
    fn variables_reach_global_flags_and_subcommands_and_flags_win() {
        let env = [
            ("CHUTE_PARTITIONS", "3"),
            ("CHUTE_BATCH_MAX_BYTES", "1MiB"),
            ("CHUTE_CLICKHOUSE_CLUSTER", "main"),
        ];
        let Cli { config, command } = cli(&["migrate", "--batch-max-bytes", "2MiB"], &env);
        assert_eq!(config.partitions, 3);
        assert_eq!(config.batch_max_bytes, 2 << 20);
        let Some(Command::Migrate { dry_run, cluster }) = command else {
            panic!("migrate expected: {command:?}");
        };
        assert!(!dry_run);
        assert_eq!(cluster.as_deref(), Some("main"));
        assert_eq!(cli(&["--partitions", "4", "dlq", "list"], &env).config.partitions, 4);
    }

    #[test]
    fn every_variable_has_the_chute_prefix() {
        // Test harnesses strip `CHUTE_*` from the environment of the binaries they start.
        let names = variables::<Cli>();
        assert!(names.iter().all(|name| name.starts_with("CHUTE_")), "{names:?}");
    }
}

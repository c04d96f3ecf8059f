//! Aggregator configuration: flags, each also settable through a `CHUTE_*` environment variable,
//! loaded by `chute_common::config::load` from the environment `main` passes in.

use std::net::SocketAddr;
use std::time::Duration;

use std::path::PathBuf;

use chute_common::config::{
    parse_bytes, parse_duration, read_secret, ClickHouseLoginArgs, LogArgs, NatsArgs, ServiceCli, ServiceCommand,
};
use chute_common::validate::Limits;
use chute_schema::users::{self, Role, ServiceUser, Users};

use crate::batcher::BatchLimits;
use crate::trim::TrimSettings;

/// Settings of the `aggregator` process (and its `migrate`, `dlq` and `ledger` subcommands, which
/// accept them too: [`Cli`] makes every one global).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Admin HTTP server: /metrics, /healthz, /readyz.
    #[arg(long, env = "CHUTE_AGGREGATOR_ADMIN_LISTEN", default_value = "127.0.0.1:7410")]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// ClickHouse HTTP URL.
    #[arg(long, env = "CHUTE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,

    #[command(flatten)]
    pub clickhouse_login: ClickHouseLoginArgs,

    /// Number of stream partitions P; must match the ingestors'.
    #[arg(long, env = "CHUTE_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,

    /// Replicas of the dead-letter stream (3 on a NATS cluster).
    #[arg(long, env = "CHUTE_AGGREGATOR_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// Replicas of the ledger and replay-claims KV buckets, whose compare-and-set writes carry
    /// exactly-once. Default: `--replicas` (3 on a NATS cluster, so that no single node's loss
    /// stalls the aggregators). An existing bucket with fewer replicas is scaled up at start.
    /// Writes are a true compare-and-set at any replica count, nats-server 2.9.10 included
    /// (`ledger.rs`).
    #[arg(long, env = "CHUTE_LEDGER_REPLICAS")]
    pub ledger_replicas: Option<usize>,

    /// Name of the KV bucket holding the ledger (leases, positions, pending batches).
    #[arg(long, env = "CHUTE_LEDGER_BUCKET", default_value = "chute_aggregator")]
    pub ledger_bucket: String,

    /// Partition lease duration; a stalled owner loses its partitions after this.
    #[arg(long, env = "CHUTE_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Flush a batch at this many rows (events).
    #[arg(long, env = "CHUTE_BATCH_MAX_ROWS", default_value_t = 200_000)]
    pub batch_max_rows: usize,

    /// Memory bound: payload bytes of the batch being inserted plus the one being gathered
    /// (the RowBinary inserted is ~0.8 x). Gathering stops when they reach it; see README.
    #[arg(long, env = "CHUTE_BATCH_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub batch_max_bytes: u64,

    /// Flush a batch this long after its first message at the latest.
    #[arg(long, env = "CHUTE_BATCH_LINGER", default_value = "200ms", value_parser = parse_duration)]
    pub batch_linger: Duration,

    /// Flush early when no message arrived for this long.
    #[arg(long, env = "CHUTE_BATCH_IDLE_FLUSH", default_value = "20ms", value_parser = parse_duration)]
    pub batch_idle_flush: Duration,

    /// Insert budget: at most this many ClickHouse inserts per second per aggregator.
    #[arg(long, env = "CHUTE_MAX_INSERTS_PER_SECOND", default_value_t = 5.0)]
    pub max_inserts_per_second: f64,

    /// Messages buffered between the partition readers and the batcher, on top of
    /// `batch-max-bytes`; `read-buffer-bytes` bounds their payload bytes.
    #[arg(long, env = "CHUTE_READ_BUFFER_MESSAGES", default_value_t = 64)]
    pub read_buffer_messages: usize,

    /// Memory bound: payload bytes buffered between the partition readers and the batcher (a
    /// larger message than this still passes, alone).
    #[arg(long, env = "CHUTE_READ_BUFFER_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub read_buffer_bytes: u64,

    /// Oldest valid event time relative to the ingestor's receive time (events outside go to the DLQ).
    #[arg(long, env = "CHUTE_EVENT_MAX_PAST", default_value = "7d", value_parser = parse_duration)]
    pub event_max_past: Duration,

    /// Newest valid event time relative to the ingestor's receive time.
    #[arg(long, env = "CHUTE_EVENT_MAX_FUTURE", default_value = "5m", value_parser = parse_duration)]
    pub event_max_future: Duration,

    /// On SIGTERM, how long the final flush may take before exiting anyway (the batch stays
    /// recorded and the next owner replays it).
    #[arg(long, env = "CHUTE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Committed history kept in the EVENTS stream (a replay window): committed messages are
    /// purged only once their position was committed at least this long ago. The default covers
    /// JetStream's duplicate window across a NATS restart; above half the stream's cap it is
    /// ignored. 0 trims everything committed within one trim interval.
    #[arg(long, env = "CHUTE_STREAM_KEEP_COMMITTED", default_value = "10m", value_parser = parse_duration)]
    pub stream_keep_committed: Duration,

    /// How often committed messages are trimmed from the EVENTS stream.
    #[arg(long, env = "CHUTE_STREAM_TRIM_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub stream_trim_interval: Duration,

    /// A partition that has work but whose committed position has not moved for this long is
    /// stalled: `chute_aggregator_partition_stalled` goes to 1 and `/readyz` answers 503.
    #[arg(long, env = "CHUTE_STALL_AFTER", default_value = "2m", value_parser = parse_duration)]
    pub stall_after: Duration,

    /// Instance id in the ledger (default: a random id per process start).
    #[arg(long, env = "CHUTE_INSTANCE_ID")]
    pub instance_id: Option<String>,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Command line: `aggregator [run]`, `aggregator migrate`, `aggregator dlq list|replay`,
/// `aggregator ledger show|reset`.
pub type Cli = ServiceCli<Config, Command>;

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
        #[command(flatten)]
        users: Box<MigrateUsersArgs>,
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

impl ServiceCommand for Command {
    const NAME: &'static str = "aggregator";
    const ABOUT: &'static str = "Chute aggregator: exactly-once JetStream -> ClickHouse";
}

/// The services' ClickHouse users `migrate` creates and keeps current after the schema: each one
/// whose password (inline or file) is given. See `chute_schema::users` for their grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct MigrateUsersArgs {
    /// The aggregator's user (INSERT and SELECT on `events`).
    #[arg(long, env = "CHUTE_CLICKHOUSE_AGGREGATOR_USER", default_value = users::DEFAULT_AGGREGATOR_USER)]
    pub aggregator_user: String,
    /// Its password; with it (or the file) `migrate` creates or updates the user.
    #[arg(long, env = "CHUTE_CLICKHOUSE_AGGREGATOR_PASSWORD", hide_env_values = true)]
    pub aggregator_password: Option<String>,
    /// File holding the aggregator's password (wins over the inline one).
    #[arg(long, env = "CHUTE_CLICKHOUSE_AGGREGATOR_PASSWORD_FILE")]
    pub aggregator_password_file: Option<PathBuf>,

    /// The query API's user (SELECT on the database, `readonly = 2`).
    #[arg(long, env = "CHUTE_CLICKHOUSE_QUERY_USER", default_value = users::DEFAULT_QUERY_USER)]
    pub query_user: String,
    /// Its password; with it (or the file) `migrate` creates or updates the user.
    #[arg(long, env = "CHUTE_CLICKHOUSE_QUERY_PASSWORD", hide_env_values = true)]
    pub query_password: Option<String>,
    /// File holding the query API's password (wins over the inline one).
    #[arg(long, env = "CHUTE_CLICKHOUSE_QUERY_PASSWORD_FILE")]
    pub query_password_file: Option<PathBuf>,
    /// `max_concurrent_queries_for_user` of the query API's user (all its replicas together).
    #[arg(long, env = "CHUTE_CLICKHOUSE_QUERY_MAX_CONCURRENT_QUERIES",
          default_value_t = users::DEFAULT_QUERY_MAX_CONCURRENT_QUERIES)]
    pub query_max_concurrent_queries: u64,

    /// The migrations user (DDL on the database, CREATE/ALTER USER), for later `migrate` runs.
    #[arg(long, env = "CHUTE_CLICKHOUSE_MIGRATE_USER", default_value = users::DEFAULT_MIGRATE_USER)]
    pub migrate_user: String,
    /// Its password; with it (or the file) `migrate` creates or updates the user.
    #[arg(long, env = "CHUTE_CLICKHOUSE_MIGRATE_PASSWORD", hide_env_values = true)]
    pub migrate_password: Option<String>,
    /// File holding the migrations user's password (wins over the inline one).
    #[arg(long, env = "CHUTE_CLICKHOUSE_MIGRATE_PASSWORD_FILE")]
    pub migrate_password_file: Option<PathBuf>,
}

impl MigrateUsersArgs {
    /// The users whose password is given (empty when none is).
    pub fn users(&self) -> Result<Users, String> {
        let mut users = Users {
            query_max_concurrent_queries: self.query_max_concurrent_queries,
            ..Users::default()
        };
        for (role, name, inline, file) in [
            (
                Role::Migrate,
                &self.migrate_user,
                &self.migrate_password,
                &self.migrate_password_file,
            ),
            (
                Role::Aggregator,
                &self.aggregator_user,
                &self.aggregator_password,
                &self.aggregator_password_file,
            ),
            (
                Role::Query,
                &self.query_user,
                &self.query_password,
                &self.query_password_file,
            ),
        ] {
            if inline.is_none() && file.is_none() {
                continue;
            }
            let password = read_secret(file.as_deref(), inline.as_deref().unwrap_or_default())
                .map_err(|err| format!("user {name}: {err}"))?;
            let user = ServiceUser::new(role, name.as_str(), password).map_err(|err| err.to_string())?;
            users = users.with(user);
        }
        Ok(users)
    }
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
    /// Replicas of the ledger buckets: `--ledger-replicas`, else `--replicas`.
    pub fn ledger_replicas(&self) -> usize {
        self.ledger_replicas.unwrap_or(self.replicas)
    }

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

    /// A client for the configured server (HTTP or HTTPS with `--clickhouse-ca`) and login.
    pub fn clickhouse(&self) -> chute_schema::Result<clickhouse::Client> {
        chute_schema::client::client(&self.clickhouse_url, &self.clickhouse_login)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::load_str;
    use clap::CommandFactory;

    #[test]
    fn defaults_match_the_docs() {
        let Cli { config, command } = load_str(&[], &[]).unwrap();
        assert!(command.is_none());
        assert_eq!(config.partitions, 16);
        assert_eq!(config.batch_max_bytes, 64 << 20);
        assert_eq!((config.read_buffer_messages, config.read_buffer_bytes), (64, 16 << 20));
        assert_eq!(config.batch_limits().max_bytes, BatchLimits::default().max_bytes);
        assert_eq!(config.batch_linger, Duration::from_millis(200));
        assert_eq!(config.drain_timeout, Duration::from_secs(20));
        assert_eq!(config.instance_id, None);
        assert_eq!(Config::default().partitions, 16);
    }

    #[test]
    fn the_ledger_follows_the_replicas_unless_set() {
        let replicas = |args: &[&str], env: &[(&str, &str)]| {
            let Cli { config, .. } = load_str(args, env).unwrap();
            config.ledger_replicas()
        };
        assert_eq!(replicas(&[], &[]), 1);
        assert_eq!(replicas(&["--replicas", "3"], &[]), 3);
        assert_eq!(replicas(&[], &[("CHUTE_AGGREGATOR_REPLICAS", "3")]), 3);
        assert_eq!(replicas(&["--replicas", "3", "--ledger-replicas", "1"], &[]), 1);
        assert_eq!(replicas(&[], &[("CHUTE_LEDGER_REPLICAS", "3")]), 3);
    }

    #[test]
    fn variables_reach_global_flags_and_subcommands_and_flags_win() {
        let env = [
            ("CHUTE_PARTITIONS", "3"),
            ("CHUTE_BATCH_MAX_BYTES", "1MiB"),
            ("CHUTE_CLICKHOUSE_CLUSTER", "main"),
        ];
        let Cli { config, command } = load_str(&["migrate", "--batch-max-bytes", "2MiB"], &env).unwrap();
        assert_eq!(config.partitions, 3);
        assert_eq!(config.batch_max_bytes, 2 << 20);
        let Some(Command::Migrate {
            dry_run,
            cluster,
            users,
        }) = command
        else {
            panic!("migrate expected: {command:?}");
        };
        assert!(!dry_run);
        assert_eq!(cluster.as_deref(), Some("main"));
        assert!(users.users().unwrap().is_empty(), "no password, no user");
        let cli: Cli = load_str(&["--partitions", "4", "dlq", "list"], &env).unwrap();
        assert_eq!(cli.config.partitions, 4);
    }

    #[test]
    fn migrate_manages_the_users_whose_password_is_given() {
        let secret = std::env::temp_dir().join(format!("chute-agg-secret-{}", std::process::id()));
        std::fs::write(&secret, "from-a-file\n").unwrap();
        let secret_path = secret.to_str().unwrap();
        let env = [
            ("CHUTE_CLICKHOUSE_QUERY_PASSWORD", "query-secret"),
            ("CHUTE_CLICKHOUSE_AGGREGATOR_PASSWORD_FILE", secret_path),
            ("CHUTE_CLICKHOUSE_QUERY_MAX_CONCURRENT_QUERIES", "4"),
        ];
        let Cli { command, .. } = load_str(&["migrate", "--query-user", "reader"], &env).unwrap();
        let Some(Command::Migrate { users, .. }) = command else {
            panic!("migrate expected");
        };
        let users = users.users();
        let _ = std::fs::remove_file(&secret);
        let users = users.unwrap();
        let names: Vec<(Role, &str)> = users.users.iter().map(|u| (u.role, u.name.as_str())).collect();
        assert_eq!(names, [(Role::Aggregator, "chute_aggregator"), (Role::Query, "reader")]);
        assert_eq!(users.query_max_concurrent_queries, 4);
        assert_eq!(
            users.users[0],
            ServiceUser::new(Role::Aggregator, "chute_aggregator", "from-a-file").unwrap()
        );
        let missing = [("CHUTE_CLICKHOUSE_MIGRATE_PASSWORD_FILE", "/nonexistent/secret")];
        let Cli { command, .. } = load_str(&["migrate"], &missing).unwrap();
        let Some(Command::Migrate { users, .. }) = command else {
            panic!("migrate expected");
        };
        assert!(users.users().unwrap_err().contains("/nonexistent/secret"));
    }

    #[test]
    fn every_flag_is_accepted_after_a_subcommand() {
        let command = Cli::command();
        let local: Vec<_> = command.get_arguments().filter(|arg| !arg.is_global_set()).collect();
        assert!(local.is_empty(), "not global: {local:?}");
        let cli: Cli = load_str(&["dlq", "list", "--nats-url", "nats://a:4222", "--log", "debug"], &[]).unwrap();
        let config = cli.config;
        assert_eq!(
            (config.nats.url.as_str(), config.log.filter.as_str()),
            ("nats://a:4222", "debug")
        );
    }
}

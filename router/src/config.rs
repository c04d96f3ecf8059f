//! Router configuration: flags, each also settable through a `CHUTE_*` environment variable,
//! loaded by `chute_common::config::load` from the environment `main` passes in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chute_common::config::{
    parse_bytes, parse_duration, ClickHouseLoginArgs, LogArgs, NatsArgs, ServiceCli, ServiceCommand,
};

/// Settings of the `router` process and its subcommands ([`Cli`] makes every one global).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Admin HTTP server: /metrics, /healthz, /readyz.
    #[arg(long, env = "CHUTE_ROUTER_ADMIN_LISTEN", default_value = "127.0.0.1:7430")]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// The rules file (YAML; see router/RULES.md). Reloaded when it changes; a file that does
    /// not validate is refused with the line at fault and the previous rules stay active.
    /// Without it the router runs with no rules.
    #[arg(long, env = "CHUTE_ROUTER_RULES_FILE")]
    pub rules_file: Option<PathBuf>,

    /// How often the rules file is checked for changes.
    #[arg(long, env = "CHUTE_ROUTER_RULES_POLL", default_value = "1s", value_parser = parse_duration)]
    pub rules_poll: Duration,

    /// Name of the router's durable consumer on `EVENTS`. Routers sharing a name share the work
    /// (route rules only: see README "Rules and alerts" for why alerts want one router).
    #[arg(long, env = "CHUTE_ROUTER_CONSUMER", default_value = "chute-router")]
    pub consumer: String,

    /// Where a new consumer starts: `new` (messages published from now on) or `all` (what the
    /// stream still holds). An existing consumer always resumes where it was.
    #[arg(long, env = "CHUTE_ROUTER_START", default_value = "new", value_parser = ["new", "all"])]
    pub start: String,

    /// JetStream deletes the router's consumer after this long without a router, so an abandoned
    /// router no longer holds back the aggregators' trimming of `EVENTS`.
    #[arg(long, env = "CHUTE_ROUTER_CONSUMER_INACTIVE", default_value = "1h", value_parser = parse_duration)]
    pub consumer_inactive: Duration,

    /// How long a delivered message may stay unacknowledged before JetStream delivers it again
    /// (after a router crash, its messages come back after this).
    #[arg(long, env = "CHUTE_ROUTER_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// Messages delivered to the router and not yet acknowledged, at most.
    #[arg(long, env = "CHUTE_ROUTER_MAX_ACK_PENDING", default_value_t = 2048)]
    pub max_ack_pending: i64,

    /// Number of stream partitions P; must match the ingestors' (anomaly events are published
    /// into `EVENTS` like any other event).
    #[arg(long, env = "CHUTE_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,

    /// Replicas of the `ROUTES`, `WEBHOOKS` and `ROUTES_DLQ` streams and the state bucket.
    #[arg(long, env = "CHUTE_ROUTER_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// How long `ROUTES` keeps a routed event.
    #[arg(long, env = "CHUTE_ROUTES_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub routes_max_age: Duration,

    /// Byte cap of `ROUTES` (oldest routed events are dropped first beyond it).
    #[arg(long, env = "CHUTE_ROUTES_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub routes_max_bytes: u64,

    /// `ROUTES`' duplicate window: a routed event redelivered within it (a router crash) is
    /// stored once. Must exceed the longest router outage that should stay exactly-once.
    #[arg(long, env = "CHUTE_ROUTES_DUPLICATE_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub routes_duplicate_window: Duration,

    /// How often threshold alerts are evaluated.
    #[arg(long, env = "CHUTE_ROUTER_EVAL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub eval_interval: Duration,

    /// Windowed series (threshold) and baselines (anomaly) kept at most, each; events of a new
    /// series beyond it are not evaluated and are counted in `chute_router_series_dropped_total`.
    #[arg(long, env = "CHUTE_ROUTER_MAX_SERIES", default_value_t = 100_000)]
    pub max_series: usize,

    /// An anomaly series' minute closes this long after its end (late events still count).
    #[arg(long, env = "CHUTE_ROUTER_MINUTE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub minute_grace: Duration,

    /// How much history warms anomaly baselines at start (from the ClickHouse rollups).
    #[arg(long, env = "CHUTE_ROUTER_ANOMALY_HISTORY", default_value = "6h", value_parser = parse_duration)]
    pub anomaly_history: Duration,

    /// KV bucket holding alert states, so a restart neither re-fires nor loses an alert.
    #[arg(long, env = "CHUTE_ROUTER_STATE_BUCKET", default_value = "chute_router")]
    pub state_bucket: String,

    /// ClickHouse HTTP URL, read at start to rebuild windows and baselines. Empty: start with
    /// empty windows.
    #[arg(long, env = "CHUTE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,

    #[command(flatten)]
    pub clickhouse_login: ClickHouseLoginArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// `router [run]`, `router check`, `router dlq list|replay`.
pub type Cli = ServiceCli<Config, Command>;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run the router (the default).
    Run,
    /// Validate the rules file and print a summary; exit 1 with the line at fault if invalid.
    Check,
    /// Webhook deliveries that ran out of attempts (`ROUTES_DLQ`).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

impl ServiceCommand for Command {
    const NAME: &'static str = "router";
    const ABOUT: &'static str = "Chute router: live rules, alerts, anomalies and webhooks";
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqAction {
    /// Print every dead-lettered delivery as a JSON line.
    List,
    /// Queue dead-lettered deliveries again (same idempotency key) and remove them from the DLQ.
    Replay {
        /// Only the entry with this DLQ sequence (as `dlq list` shows it); default: all.
        #[arg(long)]
        sequence: Option<u64>,
    },
}

impl Config {
    /// The ClickHouse client for seeding, or `None` when no URL is set.
    pub fn clickhouse(&self) -> chute_schema::Result<Option<clickhouse::Client>> {
        if self.clickhouse_url.is_empty() {
            return Ok(None);
        }
        chute_schema::client::client(&self.clickhouse_url, &self.clickhouse_login).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::load_str;

    #[test]
    fn defaults_and_variables() {
        let config = chute_common::config::defaults::<Cli>().config;
        assert_eq!(config.admin_listen.port(), 7430);
        assert_eq!(config.consumer, "chute-router");
        assert_eq!(config.start, "new");
        assert!(config.rules_file.is_none());
        let env = [
            ("CHUTE_ROUTER_RULES_FILE", "/etc/chute/rules.yaml"),
            ("CHUTE_ROUTER_START", "all"),
        ];
        let Cli { config, command } = load_str(&["dlq", "list", "--eval-interval", "2s"], &env).unwrap();
        assert!(matches!(
            command,
            Some(Command::Dlq {
                action: DlqAction::List
            })
        ));
        assert_eq!(
            config.rules_file.as_deref(),
            Some(std::path::Path::new("/etc/chute/rules.yaml"))
        );
        assert_eq!(config.start, "all");
        assert_eq!(config.eval_interval, Duration::from_secs(2));
        assert!(
            load_str::<Cli>(&["--start", "middle"], &[]).is_err(),
            "start is new or all"
        );
    }
}

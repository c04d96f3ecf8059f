//! Command line: `loadtest [run]`, `loadtest ceiling`, `loadtest steady`, `loadtest summary`. Every endpoint flag
//! also reads a `CHUTE_*` variable (from the environment `main` passes to
//! `chute_common::config::load`), and what is still missing comes from the endpoints file that
//! `make up` writes (`.local/endpoints.env`), then from the services' defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chute_common::config::{parse_duration, ClickHouseLoginArgs};

use crate::generate::Workload;

#[derive(Debug, clap::Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Chute load generator: open/closed loop over gRPC, with ack, pipeline and live-stream latency and an exact loss check",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Send load through the ingestor and check what lands in ClickHouse (the default).
    Run(RunArgs),
    /// Measure the raw ceilings: bulk RowBinary insert of the generated rows straight into
    /// ClickHouse, and raw JetStream publish of the same batches.
    Ceiling(CeilingArgs),
    /// Search the highest open-loop rate the pipeline sustains (backlog flat, accepted ->
    /// queryable p99 under 1 s, every event exact) by bisection over 60 s probes.
    Steady(SteadyArgs),
    /// Combine the JSON files of a `make bench` run into one result and print the table.
    Summary(SummaryArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A fixed rate; latency from each request's intended send time.
    Open,
    /// `--concurrency` workers, each sending its next request when the previous is answered.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `Publish`, one call per request.
    Unary,
    /// `PublishStream`, requests pipelined on long-lived streams.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LiveMode {
    /// The query API's SSE stream when its URL is known, else NATS, else nothing.
    Auto,
    Sse,
    Nats,
    Off,
}

/// Where the services are.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Ingestor gRPC address (`host:port` or `http://host:port`); several, comma-separated,
    /// spread the connections over them (`--ingest a,b`, as `make up-cluster` writes it).
    #[arg(long, visible_alias = "ingest", env = "CHUTE_INGEST_GRPC")]
    pub grpc: Option<String>,
    /// ClickHouse HTTP URL.
    #[arg(long, env = "CHUTE_CLICKHOUSE_HTTP")]
    pub clickhouse_url: Option<String>,
    #[command(flatten)]
    pub clickhouse_login: ClickHouseLoginArgs,
    /// Query API base URL (for the live stream).
    #[arg(long, env = "CHUTE_QUERY_HTTP")]
    pub query_url: Option<String>,
    /// NATS URL (live-stream fallback, JetStream ceiling).
    #[arg(long, env = "CHUTE_NATS_URL")]
    pub nats_url: Option<String>,
    /// File of KEY=VALUE endpoints written by `make up`; a missing file is fine.
    #[arg(long, env = "CHUTE_ENDPOINTS_FILE", default_value = ".local/endpoints.env")]
    pub endpoints_file: PathBuf,
    /// API key sent as `authorization: Bearer <key>` (ingest and live stream).
    #[arg(long, env = "CHUTE_LOADTEST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// The shape of the generated events.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub events_per_request: usize,
    /// Tenants (`tenant-0`..); each request belongs to one.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Distinct event names.
    #[arg(long, default_value_t = 8)]
    pub event_names: usize,
    /// Distinct user ids.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Distinct session ids.
    #[arg(long, default_value_t = 2_000)]
    pub sessions: usize,
    /// Attributes per event besides `run_id`.
    #[arg(long, default_value_t = 3)]
    pub attributes: usize,
    /// Bytes of each attribute value.
    #[arg(long, default_value_t = 16)]
    pub attribute_bytes: usize,
    /// Metrics per event (tokens_in, tokens_out, latency_ms, cost_usd, then `metric_<i>`).
    #[arg(long, default_value_t = 4)]
    pub metrics: usize,
    /// Bytes of each event's body.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Distinct request templates encoded up front (requests reuse them with fresh keys).
    #[arg(long, default_value_t = 64)]
    pub templates: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl WorkloadArgs {
    pub fn workload(&self, run_id: &str) -> Workload {
        Workload {
            run_id: run_id.to_owned(),
            events_per_request: self.events_per_request.max(1),
            tenants: self.tenants.max(1),
            event_names: self.event_names,
            users: self.users,
            sessions: self.sessions,
            attributes: self.attributes,
            attribute_bytes: self.attribute_bytes,
            metrics: self.metrics,
            body_bytes: self.body_bytes,
            templates: self.templates,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Open loop (fixed rate) or closed loop (as fast as acks come back).
    #[arg(long, value_enum, default_value = "open")]
    pub mode: Mode,
    /// Open loop: events per second.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// How long to send.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many events (whichever of duration and count comes first).
    #[arg(long)]
    pub events: Option<u64>,
    /// Closed loop: concurrent workers (unary: one request in flight each; stream: one stream each).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// HTTP/2 connections to the ingestor.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    #[arg(long, value_enum, default_value = "unary")]
    pub transport: Transport,
    /// `chute` (chute.v1), or the same events as OTLP trace exports (one span per event):
    /// `otlp-grpc` to the ingestor's gRPC address, `otlp-http` to `--otlp-http-url`. OTLP is
    /// unary only (no `--transport stream`).
    #[arg(long, value_enum, default_value = "chute")]
    pub protocol: crate::otlp::Protocol,
    /// The ingestor's OTLP/HTTP base URL (`--protocol otlp-http`); else `CHUTE_OTLP_HTTP` from the
    /// endpoints file (`make up` writes it), else `http://127.0.0.1:4318`.
    #[arg(long, env = "CHUTE_OTLP_HTTP")]
    pub otlp_http_url: Option<String>,
    /// Stream transport: requests in flight per stream (the ingestor works on up to 16).
    #[arg(long, default_value_t = 8)]
    pub stream_window: usize,
    /// Open loop: streams used by the stream transport.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Open loop: requests in flight at most; beyond it sending waits (and the wait counts as
    /// latency, since latency runs from the intended send time).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    /// Retries of a failed request (same idempotency key).
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Accepted -> live latency source.
    #[arg(long, value_enum, default_value = "auto")]
    pub live: LiveMode,
    /// Skip the ClickHouse check.
    #[arg(long)]
    pub no_verify: bool,
    /// How long to wait for the pipeline to land every acknowledged event.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// JSON result file (default `.local/loadtest/<run id>.json`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run id (default `lt-<time>-<random>`); stored in attribute `run_id` of every event.
    #[arg(long)]
    pub run_id: Option<String>,
    /// A name for this run in reports (e.g. `open-50k`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// A process whose CPU time (`/proc/PID/stat`) is measured over the load window and
    /// reported per event, as `NAME=PID`; repeat for each. Chute's own path is `ingestor`,
    /// `nats-server` and `aggregator`; the load generator always measures itself (`loadtest`).
    #[arg(long = "pid", value_name = "NAME=PID", value_parser = crate::cpu::parse_process)]
    pub pids: Vec<crate::cpu::Process>,
    /// The aggregator's Prometheus endpoint (`http://<admin>/metrics`): its backlog
    /// (`chute_aggregator_partition_pending`, summed) is read once a second during the load and
    /// reported as `backlog` (start, end, growth).
    #[arg(long)]
    pub backlog_metrics_url: Option<String>,
    /// Open loop with `--backlog-metrics-url`: stop sending once the backlog holds more than this
    /// many seconds of the target rate (the rate is clearly more than the pipeline keeps up with).
    #[arg(long)]
    pub stop_backlog_seconds: Option<f64>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CeilingArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Database created (schema migrated) for the insert ceiling; dropped first.
    #[arg(long, default_value = "chute_ceiling")]
    pub ceiling_database: String,
    /// Rows inserted (and events published).
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Rows per insert (the aggregator's --batch-max-rows default).
    #[arg(long, default_value_t = 200_000)]
    pub batch_rows: usize,
    /// JetStream publishes awaiting their PubAck at once (the ingestor's default bound).
    #[arg(long, default_value_t = 512)]
    pub publish_window: usize,
    /// Give up a ceiling measurement after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Which ceilings to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub only: CeilingKind,
    /// JetStream ceiling: scratch streams the 16 partitions are spread over (partition % N), each
    /// with its own Raft group and leader on a cluster (`make bench-cluster` compares 1 and 4).
    #[arg(long, default_value_t = 1)]
    pub jetstream_streams: usize,
    /// JetStream ceiling: replicas of each scratch stream (3 on a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    pub jetstream_replicas: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CeilingKind {
    /// ClickHouse insert and JetStream publish.
    Both,
    Clickhouse,
    Jetstream,
}

/// `loadtest steady`: the search for the highest rate the pipeline sustains ([`crate::steady`]).
#[derive(Debug, Clone, clap::Args)]
pub struct SteadyArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Lowest rate searched, events/s (assumed sustainable; probed last if nothing above passes).
    #[arg(long, default_value_t = 10_000.0)]
    pub from: f64,
    /// Highest rate searched, events/s; default: the insert ceiling in `--ceiling-file`.
    #[arg(long)]
    pub to: Option<f64>,
    /// `loadtest ceiling --out` of the same run; its insert rows/s bound the search.
    #[arg(long)]
    pub ceiling_file: Option<PathBuf>,
    /// Probes at most.
    #[arg(long, default_value_t = 5)]
    pub probes: usize,
    /// Length of one probe.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub probe_duration: Duration,
    /// Stop when the bounds are this close, events/s.
    #[arg(long, default_value_t = 2_000.0)]
    pub resolution: f64,
    /// Accepted -> queryable p99 a passing probe stays under.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub max_queryable_p99: Duration,
    /// A probe stops sending once the backlog holds this many seconds of its rate.
    #[arg(long, default_value_t = 10.0)]
    pub abort_backlog_seconds: f64,
    /// Directory for each probe's run JSON (`probe-<rate>.json`).
    #[arg(long, default_value = ".local/loadtest/steady")]
    pub probe_dir: PathBuf,
    /// The search's JSON result.
    #[arg(long)]
    pub steady_out: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SummaryArgs {
    /// Directory with ceiling.json, the run JSONs and rss.json of one bench run.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where to write the combined result.
    #[arg(long)]
    pub out: PathBuf,
}

/// Resolved endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `http://host:port`.
    pub grpc: String,
    pub clickhouse: String,
    pub query: Option<String>,
    pub nats: String,
}

/// `KEY=VALUE` lines; blank lines and `#` comments ignored.
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().trim_matches('"').to_owned()))
        .collect()
}

impl EndpointArgs {
    /// Flags and variables first, then the endpoints file's `file` entries, then defaults.
    pub fn resolve(&self, file: &BTreeMap<String, String>) -> Endpoints {
        let pick = |flag: &Option<String>, key: &str| {
            flag.clone()
                .or_else(|| file.get(key).cloned())
                .filter(|value| !value.is_empty())
        };
        let grpc = pick(&self.grpc, "CHUTE_INGEST_GRPC").unwrap_or_else(|| "127.0.0.1:7400".to_owned());
        Endpoints {
            grpc: grpc
                .split(',')
                .map(str::trim)
                .filter(|address| !address.is_empty())
                .map(with_scheme)
                .collect::<Vec<_>>()
                .join(","),
            clickhouse: pick(&self.clickhouse_url, "CHUTE_CLICKHOUSE_HTTP")
                .unwrap_or_else(|| "http://127.0.0.1:8123".to_owned()),
            // One query API is enough to watch the live stream: the first of a list.
            query: pick(&self.query_url, "CHUTE_QUERY_HTTP").and_then(|urls| {
                urls.split(',')
                    .map(str::trim)
                    .find(|url| !url.is_empty())
                    .map(with_scheme)
            }),
            nats: pick(&self.nats_url, "CHUTE_NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
        }
    }

    /// Reads the endpoints file (absent -> empty) and resolves.
    pub fn load(&self) -> Endpoints {
        let text = std::fs::read_to_string(&self.endpoints_file).unwrap_or_default();
        self.resolve(&parse_env_file(&text))
    }

    /// A client for `url` logged in with `--clickhouse-user` and the password (or password file),
    /// HTTPS verified with `--clickhouse-ca`; the database is the caller's to pick.
    pub fn clickhouse(&self, url: &str) -> crate::error::Result<clickhouse::Client> {
        chute_schema::client::client(url, &self.clickhouse_login)
            .map(|client| client.with_database("default"))
            .map_err(|err| crate::error::Error::Config(err.to_string()))
    }
}

fn with_scheme(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.trim_end_matches('/').to_owned()
    } else {
        format!("http://{address}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::load_str;

    fn cli(args: &[&str], env: &[(&str, &str)]) -> Cli {
        load_str(args, env).unwrap()
    }

    #[test]
    fn several_ingestors_are_one_comma_separated_list() {
        let flags = cli(
            &[
                "--ingest",
                "127.0.0.1:7400, http://127.0.0.1:7402/",
                "--endpoints-file",
                "/nonexistent",
            ],
            &[],
        );
        let endpoints = flags.run.endpoints.resolve(&BTreeMap::new());
        assert_eq!(endpoints.grpc, "http://127.0.0.1:7400,http://127.0.0.1:7402");
        let file = parse_env_file("CHUTE_INGEST_GRPC=127.0.0.1:7400,127.0.0.1:7402\n");
        let endpoints = cli(&[], &[]).run.endpoints.resolve(&file);
        assert_eq!(endpoints.grpc, "http://127.0.0.1:7400,http://127.0.0.1:7402");
        let file = parse_env_file("CHUTE_QUERY_HTTP=http://127.0.0.1:7420,http://127.0.0.1:7421\n");
        let endpoints = cli(&[], &[]).run.endpoints.resolve(&file);
        assert_eq!(endpoints.query.as_deref(), Some("http://127.0.0.1:7420"));
    }

    #[test]
    fn flags_win_over_the_endpoints_file_which_wins_over_defaults() {
        let cli = cli(&["--grpc", "127.0.0.1:9000", "--endpoints-file", "/nonexistent"], &[]);
        let file = parse_env_file(
            "# make up\nCHUTE_INGEST_GRPC=127.0.0.1:7400\nCHUTE_CLICKHOUSE_HTTP=http://127.0.0.1:18123\n\nCHUTE_QUERY_HTTP=127.0.0.1:7420\n",
        );
        let endpoints = cli.run.endpoints.resolve(&file);
        assert_eq!(endpoints.grpc, "http://127.0.0.1:9000");
        assert_eq!(endpoints.clickhouse, "http://127.0.0.1:18123");
        assert_eq!(endpoints.query.as_deref(), Some("http://127.0.0.1:7420"));
        assert_eq!(endpoints.nats, "nats://127.0.0.1:4222");
    }

    #[test]
    fn subcommands_and_the_default_run_parse() {
        let parsed = cli(&["--mode", "closed", "--duration", "5s"], &[]);
        assert!(parsed.command.is_none());
        assert_eq!(parsed.run.mode, Mode::Closed);
        assert_eq!(parsed.run.duration, Duration::from_secs(5));
        let parsed = cli(&["ceiling", "--rows", "1000"], &[]);
        assert!(matches!(
            parsed.command,
            Some(Command::Ceiling(CeilingArgs { rows: 1000, .. }))
        ));
        assert!(load_str::<Cli>(&["--duration", "soon"], &[]).is_err());
    }

    #[test]
    fn endpoint_variables_come_from_the_given_environment() {
        let env = [
            ("CHUTE_INGEST_GRPC", "127.0.0.1:9100"),
            ("CHUTE_CLICKHOUSE_DATABASE", "bench"),
        ];
        let parsed = cli(&["--endpoints-file", "/nonexistent"], &env);
        assert_eq!(parsed.run.endpoints.grpc.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(parsed.run.endpoints.clickhouse_login.database, "bench");
        // The subcommands' endpoint flags read the same variables; a flag still wins.
        let parsed = cli(&["ceiling", "--clickhouse-database", "ceiling"], &env);
        let Some(Command::Ceiling(ceiling)) = parsed.command else {
            panic!("ceiling expected");
        };
        assert_eq!(ceiling.endpoints.grpc.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(ceiling.endpoints.clickhouse_login.database, "ceiling");
        assert_eq!(cli(&[], &[]).run.endpoints.grpc, None);
    }
}

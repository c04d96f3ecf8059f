//! Query API configuration: flags, each also settable through a `CHUTE_*` environment variable,
//! loaded by `chute_common::config::load` from the environment `main` passes in.

use std::net::SocketAddr;
use std::time::Duration;

use chute_common::config::{parse_bytes, parse_duration, ApiKeysArgs, LogArgs, NatsArgs};
use chute_common::tls::TlsArgs;

/// Chute query API: time series, top-N, sessions and raw events over the ClickHouse rollups,
/// with a moka hot cache, plus a Server-Sent Events live stream from NATS.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "query-api", version, about, long_about = None)]
// NATS is optional here: it only feeds the live stream.
#[command(mut_arg("url", |arg| arg.help(
    "NATS server URL for the live stream (core subscription on `events.*`); empty disables `/v1/stream`"
)))]
pub struct Config {
    /// Address of the HTTP server (/v1/*, /openapi.json, /metrics, /healthz, /readyz).
    #[arg(long, env = "CHUTE_QUERY_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// A separate plaintext listener for /metrics, /healthz and /readyz (they stay on --listen
    /// too): probes and scrapers that hold no client certificate when --tls-client-ca is set.
    #[arg(long, env = "CHUTE_QUERY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// ClickHouse HTTP interface.
    #[arg(long, env = "CHUTE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,

    /// Database holding the Chute schema.
    #[arg(long, env = "CHUTE_CLICKHOUSE_DATABASE", default_value = "chute")]
    pub clickhouse_database: String,

    /// ClickHouse user (a read-only user is recommended).
    #[arg(long, env = "CHUTE_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,

    /// ClickHouse password.
    #[arg(long, env = "CHUTE_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,

    /// File holding the ClickHouse password (a mounted Secret); wins over `--clickhouse-password`.
    #[arg(long, env = "CHUTE_CLICKHOUSE_PASSWORD_FILE")]
    pub clickhouse_password_file: Option<std::path::PathBuf>,

    /// PEM file of the CA certificate(s) of ClickHouse's HTTPS certificate (`https://` URLs);
    /// without it the system's trusted roots are used.
    #[arg(long, env = "CHUTE_CLICKHOUSE_CA")]
    pub clickhouse_ca: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub api_keys: ApiKeysArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Memory budget of the response cache (sum of cached body and key sizes).
    #[arg(long, env = "CHUTE_QUERY_CACHE_CAPACITY", default_value = "256MiB", value_parser = parse_bytes)]
    pub cache_capacity: u64,

    /// Cache lifetime of an answer whose range touches the last two minutes (still filling).
    #[arg(long, env = "CHUTE_QUERY_CACHE_FRESH_TTL", default_value = "1s", value_parser = parse_duration)]
    pub cache_fresh_ttl: Duration,

    /// Cache lifetime of an answer over a closed historical range.
    #[arg(long, env = "CHUTE_QUERY_CACHE_HISTORICAL_TTL", default_value = "10m", value_parser = parse_duration)]
    pub cache_historical_ttl: Duration,

    /// Most points one /v1/timeseries answer may have; more is a 400 naming `step`.
    #[arg(long, env = "CHUTE_QUERY_MAX_POINTS", default_value_t = 1500)]
    pub max_points: u64,

    /// ClickHouse `max_execution_time` of every query.
    #[arg(long, env = "CHUTE_QUERY_MAX_EXECUTION_TIME", default_value = "10s", value_parser = parse_duration)]
    pub max_execution_time: Duration,

    /// ClickHouse `max_result_rows` of every query, and the largest accepted `limit`.
    #[arg(long, env = "CHUTE_QUERY_MAX_RESULT_ROWS", default_value_t = 10_000)]
    pub max_result_rows: u64,

    /// ClickHouse `max_memory_usage` of every query, in bytes (`1GiB`).
    #[arg(long, env = "CHUTE_QUERY_MAX_MEMORY_USAGE", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_memory_usage: u64,

    /// ClickHouse `max_rows_to_read` of every query (rows scanned, before filtering).
    #[arg(long, env = "CHUTE_QUERY_MAX_ROWS_TO_READ", default_value_t = 1_000_000_000)]
    pub max_rows_to_read: u64,

    /// Longest `from`..`to` of a query over raw events (`/v1/events`, `/v1/top` by user, session
    /// or attribute); longer is a 400 naming `from`.
    #[arg(long, env = "CHUTE_QUERY_MAX_RAW_RANGE", default_value = "24h", value_parser = parse_duration)]
    pub max_raw_range: Duration,

    /// Most ClickHouse queries running at once (cache misses; identical ones share one query).
    #[arg(long, env = "CHUTE_QUERY_MAX_CONCURRENT_QUERIES", default_value_t = 8)]
    pub max_concurrent_queries: usize,

    /// Most queries waiting for a slot; beyond it a query is answered 503 with Retry-After.
    #[arg(long, env = "CHUTE_QUERY_MAX_QUEUED_QUERIES", default_value_t = 64)]
    pub max_queued_queries: usize,

    /// Longest wait for a query slot before the answer is 503 with Retry-After.
    #[arg(long, env = "CHUTE_QUERY_QUEUE_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub query_queue_wait: Duration,

    /// Live-stream events buffered per subscriber; a subscriber further behind gets a `lagged`
    /// event instead of the missed events.
    #[arg(long, env = "CHUTE_QUERY_STREAM_BUFFER", default_value_t = 4096)]
    pub stream_buffer: usize,

    /// Most open `/v1/stream` connections; more are answered 503.
    #[arg(long, env = "CHUTE_QUERY_MAX_STREAMS", default_value_t = 1000)]
    pub max_streams: usize,

    /// On SIGTERM, how long open requests (and streams) may take before the process exits anyway.
    #[arg(long, env = "CHUTE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Default for Config {
    /// The documented defaults (what `query-api` with no flags and no environment uses), whatever
    /// the process environment holds.
    fn default() -> Self {
        chute_common::config::defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::load_str;

    #[test]
    fn defaults_match_the_docs() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7420");
        assert_eq!(config.clickhouse_database, "chute");
        assert_eq!(config.cache_capacity, 256 << 20);
        assert_eq!(config.cache_fresh_ttl, Duration::from_secs(1));
        assert_eq!(config.max_points, 1500);
        assert_eq!(config.max_raw_range, Duration::from_secs(86_400));
        assert_eq!((config.max_concurrent_queries, config.max_queued_queries), (8, 64));
        assert_eq!((config.tls.cert, config.admin_listen), (None, None));
    }

    #[test]
    fn env_pairs_are_read_and_flags_win() {
        let env = [
            ("CHUTE_QUERY_MAX_POINTS", "99"),
            ("CHUTE_CLICKHOUSE_DATABASE", "analytics"),
            ("CHUTE_NATS_URL", ""),
        ];
        let config: Config = load_str(&["--max-points", "10"], &env).unwrap();
        assert_eq!(config.max_points, 10);
        assert_eq!(config.clickhouse_database, "analytics");
        assert!(config.nats.url.is_empty(), "an empty URL disables the live stream");
        let err = load_str::<Config>(&[], &[("CHUTE_QUERY_CACHE_FRESH_TTL", "soon")]).unwrap_err();
        assert!(err.to_string().contains("CHUTE_QUERY_CACHE_FRESH_TTL"), "{err}");
    }

    #[test]
    fn help_keeps_what_the_nats_url_means_here() {
        let help = load_str::<Config>(&["--help"], &[]).unwrap_err().to_string();
        assert!(help.contains("empty disables `/v1/stream`"), "{help}");
    }
}

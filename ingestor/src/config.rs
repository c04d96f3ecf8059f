//! Ingestor configuration: flags, each also settable through a `CHUTE_*` environment variable,
//! loaded by `chute_common::config::load` from the environment `main` passes in.

use std::net::SocketAddr;
use std::time::Duration;

use chute_common::config::{parse_bytes, parse_duration, ApiKeysArgs, LogArgs, NatsArgs};
use chute_common::stream::StreamSettings;
use chute_common::tls::TlsArgs;
use chute_common::validate::Limits;

/// Chute ingestor: accepts events over gRPC (chute.v1.IngestService), validates them and
/// acknowledges only once JetStream has stored them.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ingestor", version, about, long_about = None)]
pub struct Config {
    /// Address of the gRPC server (IngestService, grpc.health.v1, server reflection).
    #[arg(long, env = "CHUTE_INGEST_GRPC_LISTEN", default_value = "127.0.0.1:7400")]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP server: /metrics, /healthz, /readyz.
    #[arg(long, env = "CHUTE_INGEST_ADMIN_LISTEN", default_value = "127.0.0.1:7401")]
    pub admin_listen: SocketAddr,

    /// Address of the second OTLP/gRPC listener (TraceService, LogsService; the main gRPC server
    /// serves them too), or `off`.
    #[arg(long, env = "CHUTE_OTLP_GRPC_LISTEN", default_value = "127.0.0.1:4317", value_parser = parse_listen)]
    pub otlp_grpc_listen: Listen,

    /// Address of the OTLP/HTTP listener (`POST /v1/traces`, `POST /v1/logs`), or `off`.
    #[arg(long, env = "CHUTE_OTLP_HTTP_LISTEN", default_value = "127.0.0.1:4318", value_parser = parse_listen)]
    pub otlp_http_listen: Listen,

    /// Prices per model (YAML, see deploy/pricing.example.yaml): OTLP spans with GenAI token
    /// usage get a `cost_usd` metric. None by default: Chute ships no prices.
    #[arg(long, env = "CHUTE_PRICING_FILE")]
    pub pricing_file: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Number of stream partitions P (`events.0` .. `events.P-1`). Fixed for the life of a stream:
    /// every ingestor and aggregator must agree.
    #[arg(long, env = "CHUTE_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,

    /// Replicas of the EVENTS stream (3 on a NATS cluster).
    #[arg(long, env = "CHUTE_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,

    /// Maximum age of messages in the EVENTS stream.
    #[arg(long, env = "CHUTE_STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub stream_max_age: Duration,

    /// Size cap of the EVENTS stream; when full, publishes are refused (UNAVAILABLE), never dropped.
    #[arg(long, env = "CHUTE_STREAM_MAX_BYTES", default_value = "16GiB", value_parser = parse_bytes)]
    pub stream_max_bytes: u64,

    /// JetStream duplicate window: a retried request (same idempotency key) inside it is stored once.
    #[arg(long, env = "CHUTE_STREAM_DUPLICATE_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub stream_duplicate_window: Duration,

    /// Largest JetStream message; bigger requests are split into chunks (must stay under NATS max_payload).
    #[arg(long, env = "CHUTE_MAX_MESSAGE_BYTES", default_value = "512KiB", value_parser = parse_bytes)]
    pub max_message_bytes: u64,

    /// Most events in one request (more: INVALID_ARGUMENT).
    #[arg(long, env = "CHUTE_MAX_REQUEST_EVENTS", default_value_t = 10_000)]
    pub max_request_events: usize,

    /// Largest request (more: RESOURCE_EXHAUSTED).
    #[arg(long, env = "CHUTE_MAX_REQUEST_BYTES", default_value = "8MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,

    /// Most JetStream publishes awaiting their PubAck at once; callers beyond it wait (back-pressure).
    #[arg(long, env = "CHUTE_MAX_INFLIGHT_PUBLISHES", default_value_t = 512)]
    pub max_inflight_publishes: usize,

    /// How long a publish may wait for its PubAck (and for an in-flight slot) before the call
    /// fails with UNAVAILABLE.
    #[arg(long, env = "CHUTE_PUBLISH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub publish_timeout: Duration,

    /// Oldest accepted event time, relative to receive time.
    #[arg(long, env = "CHUTE_EVENT_MAX_PAST", default_value = "7d", value_parser = parse_duration)]
    pub event_max_past: Duration,

    /// Newest accepted event time, relative to receive time.
    #[arg(long, env = "CHUTE_EVENT_MAX_FUTURE", default_value = "5m", value_parser = parse_duration)]
    pub event_max_future: Duration,

    /// Most concurrent HTTP/2 streams (calls) per client connection.
    #[arg(long, env = "CHUTE_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,

    /// Most calls in progress at once over all connections (a PublishStream counts until it
    /// ends); more are answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "CHUTE_MAX_CONCURRENT_CALLS", default_value_t = 1024)]
    pub max_concurrent_calls: usize,

    /// Request bytes admitted and not yet answered, over all calls: a message's bytes reach the
    /// decoder only within this budget (the decoded request and its chunks live until answered).
    #[arg(long, env = "CHUTE_MAX_INFLIGHT_BYTES", default_value = "128MiB", value_parser = parse_bytes)]
    pub max_inflight_bytes: u64,

    /// How long a message may wait for room in --max-inflight-bytes before its call fails with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CHUTE_INFLIGHT_BYTES_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub inflight_bytes_wait: Duration,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub api_keys: ApiKeysArgs,

    /// On SIGTERM, how long in-flight calls may take to finish before the process exits anyway.
    #[arg(long, env = "CHUTE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

/// A listener address, or `off` (`None`) for no listener.
pub type Listen = Option<SocketAddr>;

fn parse_listen(value: &str) -> Result<Listen, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|err| format!("{err}: expected host:port or `off`"))
}

impl Default for Config {
    /// The documented defaults (what `ingestor` with no flags and no environment uses), whatever
    /// the process environment holds.
    fn default() -> Self {
        chute_common::config::defaults()
    }
}

impl Config {
    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            replicas: self.stream_replicas,
            max_age: self.stream_max_age,
            max_bytes: i64::try_from(self.stream_max_bytes).unwrap_or(i64::MAX),
            duplicate_window: self.stream_duplicate_window,
        }
    }

    pub fn admission(&self) -> crate::admission::AdmissionSettings {
        crate::admission::AdmissionSettings {
            max_concurrent_calls: self.max_concurrent_calls,
            max_inflight_bytes: self.max_inflight_bytes,
            inflight_bytes_wait: self.inflight_bytes_wait,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_past: self.event_max_past,
            max_future: self.event_max_future,
            ..Limits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chute_common::config::load_str;
    use chute_common::telemetry::LogFormat;

    #[test]
    fn defaults_match_the_docs() {
        let config = Config::default();
        assert_eq!(config.partitions, 16);
        assert_eq!(config.max_message_bytes, 512 << 10);
        assert_eq!(config.max_request_bytes, 8 << 20);
        assert_eq!(config.stream_duplicate_window, Duration::from_secs(600));
        assert_eq!(config.api_keys.file, None);
        assert_eq!(
            (config.max_concurrent_streams, config.max_concurrent_calls),
            (128, 1024)
        );
        assert_eq!(config.max_inflight_bytes, 128 << 20);
        assert_eq!(config.tls.cert, None);
        assert_eq!(config.otlp_grpc_listen, Some("127.0.0.1:4317".parse().unwrap()));
        assert_eq!(config.otlp_http_listen, Some("127.0.0.1:4318".parse().unwrap()));
        assert_eq!(config.pricing_file, None);
    }

    #[test]
    fn otlp_listeners_can_be_turned_off() {
        let env = [("CHUTE_OTLP_HTTP_LISTEN", "off")];
        let config: Config = load_str(&["--otlp-grpc-listen", "OFF"], &env).unwrap();
        assert_eq!((config.otlp_grpc_listen, config.otlp_http_listen), (None, None));
        let err = load_str::<Config>(&["--otlp-http-listen", "4318"], &[]).unwrap_err();
        assert!(err.to_string().contains("off"), "{err}");
    }

    #[test]
    fn flags_and_variables_reach_the_shared_groups() {
        let env = [("CHUTE_STREAM_MAX_BYTES", "1GiB"), ("CHUTE_LOG_FORMAT", "json")];
        let config: Config = load_str(&["--partitions", "8", "--nats-connect-wait", "1s"], &env).unwrap();
        assert_eq!((config.partitions, config.stream_max_bytes), (8, 1 << 30));
        assert_eq!(config.nats.connect_wait, Duration::from_secs(1));
        assert_eq!(config.log.format, LogFormat::Json);
        let err = load_str::<Config>(&[], &[("CHUTE_PARTITIONS", "0")]).unwrap_err();
        assert!(err.to_string().contains("CHUTE_PARTITIONS"), "{err}");
    }
}

//! OTLP end to end: the OpenTelemetry Python SDK's OTLP exporters (gRPC and HTTP) -> ingestor ->
//! JetStream -> aggregator -> ClickHouse, with exact counts and sums in raw and every rollup,
//! including exports the ingestor stored but answered UNAVAILABLE / 503 (the exporter retries).

use std::net::SocketAddr;
use std::time::Duration;

use chute_ingestor::hooks::Hooks;
use chute_ingestor::OtlpListeners;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio_util::sync::CancellationToken;

use crate::support::Stack;

/// A second, stateless ingestor on the stack's NATS that serves OTLP/gRPC and OTLP/HTTP on
/// their own listeners, with test hooks (the stack's own ingestor has neither).
struct OtlpIngestor {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
}

impl OtlpIngestor {
    async fn start(stack: &Stack, configure: impl FnOnce(&mut chute_ingestor::Config), hooks: Hooks) -> Self {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (main, admin, grpc, http) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let (admin_addr, grpc_addr, http_addr) = (
            admin.local_addr().unwrap(),
            grpc.local_addr().unwrap(),
            http.local_addr().unwrap(),
        );
        let mut config = chute_ingestor::Config {
            nats: chute_common::config::NatsArgs::with_url(stack.nats.url()),
            ..Default::default()
        };
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let listeners = OtlpListeners {
            grpc: Some(grpc),
            http: Some(http),
        };
        tokio::spawn(chute_ingestor::run_with_otlp(
            main,
            admin,
            listeners,
            config,
            hooks,
            shutdown.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while chute_common::testing::http_get(admin_addr, "/readyz").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "OTLP ingestor never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            grpc: grpc_addr,
            http: http_addr,
            shutdown,
        }
    }
}

impl Drop for OtlpIngestor {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `ingestor/tests/python/otlp_genai.py` with the exporter configured only through the
/// standard environment variables; returns its JSON summary.
async fn python_sdk(endpoint: &str, tenant: &str, args: &[&str]) -> serde_json::Value {
    let root = chute_common::testing::workspace_root();
    let python = chute_common::testing::python();
    let run = tokio::process::Command::new(&python)
        .arg(root.join("ingestor/tests/python/otlp_genai.py"))
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_RESOURCE_ATTRIBUTES", format!("chute.tenant={tenant}"))
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "20")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the Python exporter finishes within 60 s")
        .unwrap_or_else(|err| panic!("run {} (make venv installs the OTel SDK): {err}", python.display()));
    assert!(
        output.status.success(),
        "python exporter failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    assert_eq!(summary["result"], "SUCCESS", "{summary}");
    summary
}

const PRICING: &str = "models:
  gpt-4o-2024-08-06: {input: 2.5, output: 10, cached_input: 1.25}
  claude-sonnet-4: {input: 3, output: 15, cached_input: 0.3}
";

/// The cost of one summary's spans at [`PRICING`]: cached tokens at the cached rate, once.
fn expected_cost(summary: &serde_json::Value) -> f64 {
    let rates = [
        ("gpt-4o-2024-08-06", (2.5, 10.0, 1.25)),
        ("claude-sonnet-4", (3.0, 15.0, 0.3)),
    ];
    let mut cost = 0.0;
    for (model, (input, output, cached_input)) in rates {
        let used = &summary["by_model"][model];
        let (tokens_in, tokens_out, cached) = (
            used["input"].as_f64().unwrap(),
            used["output"].as_f64().unwrap(),
            used["cached"].as_f64().unwrap(),
        );
        cost += ((tokens_in - cached) * input + cached * cached_input + tokens_out * output) / 1e6;
    }
    cost
}

fn summed(summaries: &[&serde_json::Value], key: &str) -> f64 {
    summaries
        .iter()
        .flat_map(|summary| summary["by_model"].as_object().unwrap().values())
        .map(|model| model[key].as_f64().unwrap())
        .sum()
}

/// Waits (bounded) until `sql` returns `expected`, then asserts it.
async fn eventually(stack: &Stack, sql: &str, expected: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let value = stack.scalar(sql).await;
        if value == expected || tokio::time::Instant::now() > deadline {
            assert_eq!(value, expected, "{sql}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{what}: {actual} != {expected}"
    );
}

/// GenAI spans from the Python SDK over OTLP/gRPC and OTLP/HTTP, each export answered
/// UNAVAILABLE / 503 once after it was stored (so the exporter retries it): raw and every rollup
/// hold each span once, token sums in metrics_1m/1h are exact and cost matches the pricing file.
#[tokio::test]
async fn python_sdk_genai_spans_land_exactly_once_with_tokens_and_cost() {
    let stack = Stack::start("otlp_python_spans").await;
    let _aggregator = stack.aggregator(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pricing = dir.path().join("pricing.yaml");
    std::fs::write(&pricing, PRICING).unwrap();
    let hooks = Hooks::default();
    let ingestor = OtlpIngestor::start(
        &stack,
        |config| config.pricing_file = Some(pricing.clone()),
        hooks.clone(),
    )
    .await;

    let _ = hooks.clone().fail_next_exports_after_store(1);
    let grpc = python_sdk(
        &format!("http://{}", ingestor.grpc),
        "acme",
        &["traces", "grpc", "40", "g"],
    )
    .await;
    let _ = hooks.clone().fail_next_exports_after_store(1);
    let http = python_sdk(
        &format!("http://{}", ingestor.http),
        "acme",
        &["traces", "http", "30", "h"],
    )
    .await;
    assert_eq!((grpc["sent"].as_u64(), http["sent"].as_u64()), (Some(40), Some(30)));

    let spans = 70;
    eventually(&stack, "SELECT count() FROM events FINAL", spans).await;
    eventually(&stack, "SELECT toUInt64(sum(events)) FROM events_1h_v", spans).await;
    eventually(&stack, "SELECT toUInt64(sum(events)) FROM sessions_v", spans).await;
    assert_eq!(
        stack.scalar("SELECT count() FROM events").await,
        spans,
        "no duplicate row at all"
    );
    assert_eq!(
        stack
            .scalar("SELECT toUInt64(sum(events)) FROM events_1m_v WHERE tenant = 'acme' AND name = 'chat'")
            .await,
        spans
    );
    assert_eq!(
        stack.scalar("SELECT count() FROM sessions_v").await,
        8,
        "conversations g-conv-0..3, h-conv-0..3"
    );
    assert_eq!(
        stack
            .scalar("SELECT count() FROM events FINAL WHERE attributes['otel.status_code'] = 'ERROR'")
            .await,
        grpc["errors"].as_u64().unwrap() + http["errors"].as_u64().unwrap()
    );

    let both = [&grpc, &http];
    for (metric, key) in [
        ("gen_ai.usage.input_tokens", "input"),
        ("gen_ai.usage.output_tokens", "output"),
        ("gen_ai.usage.cache_read.input_tokens", "cached"),
    ] {
        for view in ["metrics_1m_v", "metrics_1h_v"] {
            let sum = stack
                .scalar_f64(&format!("SELECT sum(sum) FROM {view} WHERE metric = '{metric}'"))
                .await;
            close(sum, summed(&both, key), &format!("{view} {metric}"));
            let count = stack
                .scalar(&format!(
                    "SELECT toUInt64(sum(count)) FROM {view} WHERE metric = '{metric}'"
                ))
                .await;
            assert_eq!(count, spans, "{view} {metric} count");
        }
    }
    let cost = stack
        .scalar_f64("SELECT sum(sum) FROM metrics_1m_v WHERE metric = 'cost_usd'")
        .await;
    close(cost, expected_cost(&grpc) + expected_cost(&http), "cost_usd");
    let by_model = stack
        .scalar_f64(
            "SELECT sum(metrics['gen_ai.usage.input_tokens']) FROM events FINAL
             WHERE attributes['gen_ai.response.model'] = 'claude-sonnet-4'",
        )
        .await;
    close(
        by_model,
        grpc["by_model"]["claude-sonnet-4"]["input"].as_f64().unwrap()
            + http["by_model"]["claude-sonnet-4"]["input"].as_f64().unwrap(),
        "input tokens of one model",
    );
    let body = stack
        .scalar(
            "SELECT count() FROM events FINAL WHERE body LIKE '%\"gen_ai.user.message\"%' AND body LIKE '%question %'",
        )
        .await;
    assert_eq!(body, spans, "the span events are the body");
}

/// Log records from the Python SDK's logs exporters (gRPC and HTTP) land once each.
#[tokio::test]
async fn python_sdk_log_records_land_exactly_once() {
    let stack = Stack::start("otlp_python_logs").await;
    let _aggregator = stack.aggregator(&[]);
    let hooks = Hooks::default();
    let ingestor = OtlpIngestor::start(&stack, |_| {}, hooks.clone()).await;
    let _ = hooks.clone().fail_next_exports_after_store(1);
    python_sdk(
        &format!("http://{}", ingestor.grpc),
        "acme",
        &["logs", "grpc", "12", "g"],
    )
    .await;
    python_sdk(
        &format!("http://{}", ingestor.http),
        "acme",
        &["logs", "http", "8", "h"],
    )
    .await;
    eventually(&stack, "SELECT count() FROM events FINAL", 20).await;
    eventually(
        &stack,
        "SELECT toUInt64(sum(count)) FROM metrics_1h_v WHERE metric = 'gen_ai.usage.input_tokens'",
        20,
    )
    .await;
    assert_eq!(stack.scalar("SELECT count() FROM events").await, 20);
    let names: String = stack
        .db()
        .query("SELECT arrayStringConcat(arraySort(groupUniqArray(name)), ',') FROM events")
        .fetch_one()
        .await
        .unwrap();
    // Python's WARNING level: `severity_text` as the SDK sends it, lower-cased.
    assert!(names == "log.warn" || names == "log.warning", "event names: {names}");
    assert_eq!(
        stack
            .scalar(&format!(
                "SELECT toUInt64(sum(events)) FROM events_1m_v WHERE name = '{names}'"
            ))
            .await,
        20
    );
    assert_eq!(
        stack
            .scalar(
                "SELECT count() FROM events FINAL WHERE body LIKE 'model fallback %' AND session_id LIKE '%-conv-%'"
            )
            .await,
        20
    );
}

fn span(i: u8) -> Span {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - 1_000_000_000;
    Span {
        trace_id: vec![7; 16],
        span_id: vec![i; 8],
        name: "chat".into(),
        start_time_unix_nano: start,
        end_time_unix_nano: start + 1000,
        attributes: vec![KeyValue {
            key: "gen_ai.usage.input_tokens".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(10)),
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What the README promises for a retry outside the duplicate window: the `events` table
/// collapses it on the deterministic event ids (`FINAL`), the rollups count it again.
#[tokio::test]
async fn an_export_repeated_outside_the_duplicate_window_collapses_in_raw_only() {
    let window = Duration::from_secs(2);
    let stack =
        Stack::start_with_ingestor("otlp_outside_window", |config| config.stream_duplicate_window = window).await;
    let _aggregator = stack.aggregator(&[]);
    let ingestor = OtlpIngestor::start(
        &stack,
        |config| config.stream_duplicate_window = window,
        Hooks::default(),
    )
    .await;
    let export = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "chute.tenant".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("acme".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: (1..=5).map(span).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut client = TraceServiceClient::connect(format!("http://{}", ingestor.grpc))
        .await
        .unwrap();
    client.export(export.clone()).await.unwrap();
    // Inside the window: dropped by JetStream, counted nowhere.
    client.export(export.clone()).await.unwrap();
    eventually(&stack, "SELECT toUInt64(sum(events)) FROM events_1m_v", 5).await;
    tokio::time::sleep(window + Duration::from_millis(1500)).await;
    // Outside the window: stored again under the same event ids.
    client.export(export).await.unwrap();
    eventually(&stack, "SELECT toUInt64(sum(events)) FROM events_1m_v", 10).await;
    eventually(
        &stack,
        "SELECT toUInt64(sum(count)) FROM metrics_1m_v WHERE metric = 'gen_ai.usage.input_tokens'",
        10,
    )
    .await;
    assert_eq!(
        stack.scalar("SELECT count() FROM events FINAL").await,
        5,
        "raw collapses on event_id"
    );
    assert_eq!(
        stack.scalar("SELECT uniqExact(event_id) FROM events").await,
        5,
        "the repeat carries the same event ids"
    );
}

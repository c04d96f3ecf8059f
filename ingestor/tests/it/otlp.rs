//! OTLP ingest against a real nats-server: OTLP/gRPC through tonic's generated client (the
//! `opentelemetry-proto` types), OTLP/HTTP through `curl`, every answer checked against what
//! JetStream stored. The OpenTelemetry Python SDK end to end (ClickHouse, rollups) is in the
//! aggregator's tests (`aggregator/tests/it/otlp.rs`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use chute_ingestor::hooks::Hooks;
use chute_ingestor::otlp::http::RpcStatus;
use chute_ingestor::otlp::mapping::span_event_id;
use chute_ingestor::otlp::test_support::{self, kv, text};
use chute_ingestor::{Config, OtlpListeners};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::AnyValue;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::support::TestIngestor;

/// A test ingestor that also serves OTLP/gRPC and OTLP/HTTP on their own listeners.
struct OtlpIngestor {
    inner: TestIngestor,
    otlp_grpc: SocketAddr,
    otlp_http: SocketAddr,
}

impl OtlpIngestor {
    async fn start(customize: impl FnOnce(&mut Config), hooks: Hooks) -> Self {
        let nats = chute_common::testing::nats::NatsServer::start();
        let mut config = Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            publish_timeout: Duration::from_secs(2),
            ..Config::default()
        };
        customize(&mut config);
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (grpc, admin, otlp_grpc, otlp_http) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let addrs = [&grpc, &admin, &otlp_grpc, &otlp_http].map(|listener| listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let listeners = OtlpListeners {
            grpc: Some(otlp_grpc),
            http: Some(otlp_http),
        };
        let task = tokio::spawn(chute_ingestor::run_with_otlp(
            grpc,
            admin,
            listeners,
            config,
            hooks,
            shutdown.clone(),
        ));
        let inner = TestIngestor {
            nats,
            grpc_addr: addrs[0],
            admin_addr: addrs[1],
            shutdown,
            task,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while inner.admin_get("/readyz").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "ingestor never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            inner,
            otlp_grpc: addrs[2],
            otlp_http: addrs[3],
        }
    }

    async fn traces_client(&self, addr: SocketAddr) -> TraceServiceClient<tonic::transport::Channel> {
        TraceServiceClient::connect(format!("http://{addr}")).await.unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.otlp_http)
    }

    /// The events of every stored message, with each message's id.
    async fn stored(&self) -> Vec<(Option<String>, Vec<chute_proto::v1::Event>)> {
        self.inner
            .stored_messages()
            .await
            .into_iter()
            .map(|message| (message.msg_id, message.batch.events))
            .collect()
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A GenAI chat span of the trace and span ids given, ended a little over a second ago.
fn chat_span(trace: u8, span: u8, input_tokens: i64) -> Span {
    let start = now_nanos() - 2_000_000_000;
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![span; 8],
        ..test_support::chat_span("openai", "gpt-4o", start, 800_000_000, input_tokens, 7)
    }
}

fn traces(tenant: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", text("chatbot")), kv("chute.tenant", text(tenant))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// `curl -X POST` of `body`: (status, response headers, response body).
async fn curl_post(url: &str, headers: &[&str], body: &[u8]) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (request, response, response_headers) = (
        dir.path().join("request"),
        dir.path().join("response"),
        dir.path().join("headers"),
    );
    std::fs::File::create(&request).unwrap().write_all(body).unwrap();
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "20", "-X", "POST", url])
        .arg("--data-binary")
        .arg(format!("@{}", request.display()))
        .arg("-o")
        .arg(&response)
        .arg("-D")
        .arg(&response_headers)
        .args(["-w", "%{http_code}"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command.output().await.expect("run curl (apt-get install curl)");
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
    (
        status,
        std::fs::read_to_string(&response_headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        std::fs::read(&response).unwrap_or_default(),
    )
}

/// Over OTLP/gRPC (the main port and the OTLP listener): invalid spans are answered in
/// `partial_success`, valid ones stored with UUIDv5 ids, and the same export again (spans in
/// another order) is dropped by JetStream as a duplicate.
#[tokio::test]
async fn otlp_grpc_export_is_stored_once_with_partial_success() {
    let ingestor = OtlpIngestor::start(|_| {}, Hooks::default()).await;
    // grpc.health.v1 reports both OTLP services.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", ingestor.inner.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in [
        "opentelemetry.proto.collector.trace.v1.TraceService",
        "opentelemetry.proto.collector.logs.v1.LogsService",
    ] {
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await.unwrap().into_inner().status;
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(status, serving, "{service}");
    }
    // Server reflection lists them and describes their messages.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", ingestor.inner.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |message: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "opentelemetry.proto.collector.logs.v1.LogsService".into(),
        )),
    ];
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let services: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for service in [
        "opentelemetry.proto.collector.trace.v1.TraceService",
        "opentelemetry.proto.collector.logs.v1.LogsService",
        "chute.v1.IngestService",
    ] {
        assert!(
            services.iter().any(|name| name == service),
            "{service} not in {services:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor for LogsService");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    let mut nameless = chat_span(1, 2, 5);
    nameless.name.clear();
    nameless.attributes.clear();
    let spans = vec![chat_span(1, 1, 100), nameless, chat_span(1, 3, 50)];
    let mut client = ingestor.traces_client(ingestor.inner.grpc_addr).await;
    let response: ExportTraceServiceResponse = client
        .export(traces("acme", spans.clone()))
        .await
        .expect("export succeeds")
        .into_inner();
    let partial = response.partial_success.expect("one span was rejected");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.starts_with("1 rejected: span 1 \"\": name:"),
        "{}",
        partial.error_message
    );

    // The retry an exporter would send, spans in another order, on the OTLP listener.
    let mut reversed = spans;
    reversed.reverse();
    let mut otlp_client = ingestor.traces_client(ingestor.otlp_grpc).await;
    let again = otlp_client.export(traces("acme", reversed)).await.unwrap().into_inner();
    assert_eq!(again.partial_success.map(|p| p.rejected_spans), Some(1));

    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), 1, "the retry was a duplicate: {stored:?}");
    let (msg_id, events) = &stored[0];
    assert!(msg_id.is_some(), "OTLP chunks carry a Nats-Msg-Id");
    let mut ids: Vec<&str> = events.iter().map(|event| event.event_id.as_str()).collect();
    ids.sort();
    let mut expected = [
        span_event_id(&[1; 16], &[1; 8]).to_string(),
        span_event_id(&[1; 16], &[3; 8]).to_string(),
    ];
    expected.sort();
    assert_eq!(ids, expected);
    let event = &events[0];
    assert_eq!((event.tenant.as_str(), event.name.as_str()), ("acme", "chat"));
    assert_eq!(event.metrics["gen_ai.usage.output_tokens"], 7.0);
    assert_eq!(event.metrics["duration_ms"], 800.0);

    // Logs over the OTLP listener.
    let record = LogRecord {
        time_unix_nano: now_nanos(),
        severity_number: 9,
        body: Some(AnyValue {
            value: Some(text("hello")),
        }),
        ..Default::default()
    };
    let logs = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("chute.tenant", text("acme"))],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: vec![record],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut logs_client = LogsServiceClient::connect(format!("http://{}", ingestor.otlp_grpc))
        .await
        .unwrap();
    let answer = logs_client.export(logs).await.unwrap().into_inner();
    assert_eq!(answer.partial_success, None);
    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].1[0].name, "log.info");
    assert_eq!(stored[1].1[0].body, "hello");
    ingestor.inner.stop().await;
}

/// A large export is cut into several JetStream messages; the exporter's retry, even with its
/// spans in another order, is cut at the same events (they are sorted by event id first), so
/// JetStream drops every chunk of it as a duplicate.
#[tokio::test]
async fn a_large_export_retried_in_another_order_is_stored_once_per_chunk() {
    let ingestor = OtlpIngestor::start(|config| config.max_message_bytes = 16 * 1024, Hooks::default()).await;
    let spans: Vec<Span> = (0..200u16)
        .map(|i| {
            let mut span = chat_span(6, 0, i64::from(i));
            span.span_id = [[0xab; 6].as_slice(), &i.to_be_bytes()].concat();
            span
        })
        .collect();
    let mut client = ingestor.traces_client(ingestor.otlp_grpc).await;
    client.export(traces("acme", spans.clone())).await.unwrap();
    let first = ingestor.stored().await;
    assert!(first.len() >= 3, "the export is cut into chunks: {}", first.len());
    let mut shuffled = spans;
    shuffled.reverse();
    shuffled.swap(3, 150);
    client.export(traces("acme", shuffled)).await.unwrap();
    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), first.len(), "every chunk of the retry was a duplicate");
    let mut ids: Vec<String> = stored
        .iter()
        .flat_map(|(_, events)| events.iter().map(|event| event.event_id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "each span stored once");
    ingestor.inner.stop().await;
}

/// `curl` with an OTLP JSON body shaped as the OTLP specification's `examples/trace.json` and
/// `examples/logs.json` (upper-case hex ids, times as numbers and as strings); times are recent
/// so the event rules' 7-day window accepts them.
#[tokio::test]
async fn curl_posts_otlp_json_and_gzip() {
    let ingestor = OtlpIngestor::start(|_| {}, Hooks::default()).await;
    let start = now_nanos() - 1_000_000_000;
    let trace_json = format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[
            {{"key":"service.name","value":{{"stringValue":"my.service"}}}},
            {{"key":"chute.tenant","value":{{"stringValue":"acme"}}}}]}},
          "scopeSpans":[{{"scope":{{"name":"my.library","version":"1.0.0"}},
            "spans":[{{"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174",
              "parentSpanId":"EEE19B7EC3C1B173","name":"I'm a server span",
              "startTimeUnixNano":{start},"endTimeUnixNano":"{end}","kind":2,
              "attributes":[{{"key":"my.span.attr","value":{{"stringValue":"some value"}}}},
                            {{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"42"}}}}]}}]}}]}}]}}"#,
        end = start + 1_000_000_000,
    );
    let (status, headers, body) = curl_post(
        &ingestor.url("/v1/traces"),
        &["Content-Type: application/json"],
        trace_json.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers.contains("content-type: application/json"), "{headers}");
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(answer.get("partialSuccess").is_none(), "{answer}");

    let logs_json = format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[
            {{"key":"chute.tenant","value":{{"stringValue":"acme"}}}}]}},
          "scopeLogs":[{{"scope":{{"name":"my.library"}},"logRecords":[{{
            "timeUnixNano":"{start}","observedTimeUnixNano":{start},"severityText":"Information",
            "traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174",
            "body":{{"stringValue":"Example log record"}},
            "attributes":[{{"key":"int.attribute","value":{{"intValue":10}}}},
              {{"key":"array.attribute","value":{{"arrayValue":{{"values":[{{"stringValue":"many"}},{{"stringValue":"values"}}]}}}}}}]}}]}}]}}]}}"#
    );
    let mut gzipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzipped.write_all(logs_json.as_bytes()).unwrap();
    let (status, _, body) = curl_post(
        &ingestor.url("/v1/logs"),
        &["Content-Type: application/json", "Content-Encoding: gzip"],
        &gzipped.finish().unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), 2);
    let span = &stored[0].1[0];
    assert_eq!(span.name, "I_m_a_server_span");
    assert_eq!(span.attributes["trace_id"], "5b8efff798038103d269b633813fc60c");
    assert_eq!(span.attributes["parent_span_id"], "eee19b7ec3c1b173");
    assert_eq!(span.attributes["my.span.attr"], "some value");
    assert_eq!(span.attributes["span.kind"], "server");
    assert_eq!(span.metrics["gen_ai.usage.input_tokens"], 42.0);
    assert_eq!(span.metrics["duration_ms"], 1000.0);
    let log = &stored[1].1[0];
    assert_eq!(
        (log.name.as_str(), log.body.as_str()),
        ("log.information", "Example log record")
    );
    assert_eq!(log.metrics["int.attribute"], 10.0);
    assert_eq!(log.attributes["array.attribute"], r#"["many","values"]"#);
    ingestor.inner.stop().await;
}

/// Each bad input gets the OTLP-shaped answer, and nothing valid of the same request is lost.
#[tokio::test]
async fn bad_otlp_input_gets_otlp_errors_and_keeps_valid_items() {
    let ingestor = OtlpIngestor::start(|config| config.max_request_bytes = 64 * 1024, Hooks::default()).await;
    let url = ingestor.url("/v1/traces");
    let protobuf = "Content-Type: application/x-protobuf";

    // Malformed protobuf: 400 with a protobuf google.rpc.Status.
    let (status, headers, body) = curl_post(&url, &[protobuf], b"\x0a\xff\xff\xff\xff not otlp").await;
    assert_eq!(status, 400);
    assert!(headers.contains("content-type: application/x-protobuf"), "{headers}");
    let rpc_status = RpcStatus::decode(body.as_slice()).expect("a google.rpc.Status body");
    assert_eq!(rpc_status.code, tonic::Code::InvalidArgument as i32);
    assert!(
        rpc_status.message.contains("malformed protobuf"),
        "{}",
        rpc_status.message
    );

    // Malformed JSON: 400 with a JSON Status.
    let (status, _, body) = curl_post(&url, &["Content-Type: application/json"], b"{\"resourceSpans\": 7}").await;
    assert_eq!(status, 400);
    let rpc_status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(rpc_status["code"], 3);

    // Wrong content type: 415.
    let (status, _, body) = curl_post(&url, &["Content-Type: text/plain"], b"hello").await;
    assert_eq!(status, 415);
    let rpc_status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(rpc_status["message"].as_str().unwrap().contains("text/plain"));

    // Oversize: more than twice --max-request-bytes as sent, and after gzip.
    let huge = traces("acme", vec![chat_span(9, 9, 1); 3000]).encode_to_vec();
    assert!(huge.len() > 128 * 1024);
    let (status, _, _) = curl_post(&url, &[protobuf], &huge).await;
    assert_eq!(status, 413);
    let mut gzipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gzipped.write_all(&huge).unwrap();
    let gzipped = gzipped.finish().unwrap();
    assert!(
        gzipped.len() < 128 * 1024,
        "the compressed body itself is within the limit"
    );
    let (status, _, _) = curl_post(&url, &[protobuf, "Content-Encoding: gzip"], &gzipped).await;
    assert_eq!(status, 413);

    // One request: a valid span, a span without a name, a span whose attribute is not UTF-8.
    let mut nameless = chat_span(2, 2, 1);
    nameless.name.clear();
    nameless.attributes.clear();
    let mut bad_utf8 = chat_span(2, 3, 1);
    bad_utf8.attributes.push(kv("note", text("UTFX")));
    let mut body = traces("acme", vec![chat_span(2, 1, 11), nameless, bad_utf8]).encode_to_vec();
    let at = body.windows(4).position(|window| window == b"UTFX").unwrap();
    body[at + 3] = 0xff;
    let (status, _, answer) = curl_post(&url, &[protobuf], &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let answer = ExportTraceServiceResponse::decode(answer.as_slice()).unwrap();
    let partial = answer.partial_success.expect("two spans rejected");
    assert_eq!(partial.rejected_spans, 2);
    assert!(
        partial.error_message.contains("span 1 \"\": name:"),
        "{}",
        partial.error_message
    );
    assert!(
        partial.error_message.contains("span 2: protobuf:") && partial.error_message.contains("UTF-8"),
        "{}",
        partial.error_message
    );

    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), 1, "only the last request stored anything");
    assert_eq!(stored[0].1.len(), 1);
    assert_eq!(stored[0].1[0].event_id, span_event_id(&[2; 16], &[1; 8]).to_string());
    assert_eq!(stored[0].1[0].metrics["gen_ai.usage.input_tokens"], 11.0);
    ingestor.inner.stop().await;
}

/// Sends raw bytes as an OTLP/gRPC trace export (what a client with a corrupt encoder sends).
async fn raw_grpc_export(addr: SocketAddr, body: Vec<u8>) -> Result<ExportTraceServiceResponse, tonic::Status> {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    struct RawCodec;
    struct RawEncoder;
    struct ResponseDecoder;
    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = ExportTraceServiceResponse;
        type Encoder = RawEncoder;
        type Decoder = ResponseDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> ResponseDecoder {
            ResponseDecoder
        }
    }
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for ResponseDecoder {
        type Item = ExportTraceServiceResponse;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
            let bytes = src.copy_to_bytes(src.remaining());
            Ok(Some(ExportTraceServiceResponse::decode(bytes).unwrap()))
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// Over OTLP/gRPC too, a span whose attribute is not UTF-8 is rejected alone and the rest of
/// the export is stored; an export that is not protobuf at all is INVALID_ARGUMENT.
#[tokio::test]
async fn otlp_grpc_rejects_an_undecodable_span_alone() {
    let ingestor = OtlpIngestor::start(|_| {}, Hooks::default()).await;
    let mut bad_utf8 = chat_span(5, 2, 1);
    bad_utf8.attributes.push(kv("note", text("UTFX")));
    let mut body = traces("acme", vec![chat_span(5, 1, 11), bad_utf8, chat_span(5, 3, 13)]).encode_to_vec();
    let at = body.windows(4).position(|window| window == b"UTFX").unwrap();
    body[at + 3] = 0xff;
    for addr in [ingestor.inner.grpc_addr, ingestor.otlp_grpc] {
        let answer = raw_grpc_export(addr, body.clone()).await.expect("the export succeeds");
        let partial = answer.partial_success.expect("one span rejected");
        assert_eq!(partial.rejected_spans, 1);
        assert!(
            partial.error_message.contains("span 1: protobuf:") && partial.error_message.contains("UTF-8"),
            "{}",
            partial.error_message
        );
    }
    let refused = raw_grpc_export(ingestor.otlp_grpc, b"\x0a\xff\xff\xff\xff not otlp".to_vec())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let stored = ingestor.stored().await;
    assert_eq!(stored.len(), 1, "the second export was a duplicate of the first");
    let mut ids: Vec<String> = stored[0].1.iter().map(|event| event.event_id.clone()).collect();
    ids.sort();
    let mut expected = vec![
        span_event_id(&[5; 16], &[1; 8]).to_string(),
        span_event_id(&[5; 16], &[3; 8]).to_string(),
    ];
    expected.sort();
    assert_eq!(ids, expected);
    ingestor.inner.stop().await;
}

/// OTLP/HTTP requests take their body's bytes from `--max-inflight-bytes` before the body is
/// read: one that cannot get them within `--inflight-bytes-wait` is answered 429 with
/// Retry-After (OTLP exporters retry it); one that fits passes.
#[tokio::test]
async fn otlp_http_requests_wait_for_the_bytes_budget() {
    let ingestor = OtlpIngestor::start(
        |config| {
            config.max_inflight_bytes = 4 * 1024;
            config.inflight_bytes_wait = Duration::from_millis(200);
        },
        Hooks::default(),
    )
    .await;
    let url = ingestor.url("/v1/traces");
    let protobuf = "Content-Type: application/x-protobuf";
    let small = traces("acme", vec![chat_span(8, 1, 1)]).encode_to_vec();
    let large = traces("acme", (2..40).map(|i| chat_span(8, i, 1)).collect()).encode_to_vec();
    assert!(small.len() < 4 * 1024 && large.len() > 4 * 1024);
    let (status, headers, body) = curl_post(&url, &[protobuf], &large).await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert!(headers.contains("retry-after: 1"), "{headers}");
    let rpc_status = RpcStatus::decode(body.as_slice()).unwrap();
    assert!(
        rpc_status.message.contains("--max-inflight-bytes"),
        "{}",
        rpc_status.message
    );
    let (status, _, _) = curl_post(&url, &[protobuf], &small).await;
    assert_eq!(status, 200);
    assert_eq!(ingestor.stored().await.len(), 1);
    ingestor.inner.stop().await;
}

/// With API keys the tenant is the key's; a missing or unknown key is refused on both
/// transports, and a resource naming another tenant is rejected item by item.
#[tokio::test]
async fn otlp_uses_the_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "acme acme-key-0123456789\nglobex globex-key-0123456789\n").unwrap();
    let ingestor = OtlpIngestor::start(|config| config.api_keys.file = Some(keys), Hooks::default()).await;
    let url = ingestor.url("/v1/traces");
    let body = |tenant: &str, span: u8| traces(tenant, vec![chat_span(3, span, 1)]).encode_to_vec();
    let protobuf = "Content-Type: application/x-protobuf";

    let (status, _, answer) = curl_post(&url, &[protobuf], &body("", 1)).await;
    assert_eq!(status, 401);
    assert_eq!(
        RpcStatus::decode(answer.as_slice()).unwrap().code,
        tonic::Code::Unauthenticated as i32
    );
    let (status, _, _) = curl_post(
        &url,
        &[protobuf, "Authorization: Bearer nope-0123456789abcdef"],
        &body("", 1),
    )
    .await;
    assert_eq!(status, 401);

    let globex = "Authorization: Bearer globex-key-0123456789";
    let (status, _, _) = curl_post(&url, &[protobuf, globex], &body("", 1)).await;
    assert_eq!(status, 200);
    let (status, _, answer) = curl_post(&url, &[protobuf, globex], &body("acme", 2)).await;
    assert_eq!(status, 200);
    let partial = ExportTraceServiceResponse::decode(answer.as_slice())
        .unwrap()
        .partial_success
        .expect("another tenant's span is rejected");
    assert!(partial.error_message.contains("tenant"), "{}", partial.error_message);

    let mut client = ingestor.traces_client(ingestor.otlp_grpc).await;
    let refused = client.export(traces("", vec![chat_span(3, 3, 1)])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(traces("", vec![chat_span(3, 3, 1)]));
    request
        .metadata_mut()
        .insert("authorization", "Bearer acme-key-0123456789".parse().unwrap());
    client.export(request).await.expect("a valid key is accepted");

    let tenants: Vec<String> = ingestor
        .stored()
        .await
        .iter()
        .flat_map(|(_, events)| events.iter().map(|event| event.tenant.clone()))
        .collect();
    assert_eq!(tenants, ["globex", "acme"]);
    ingestor.inner.stop().await;
}

/// An export stored but answered UNAVAILABLE (gRPC) or 503 with Retry-After (HTTP) is stored
/// once when the exporter sends it again.
#[tokio::test]
async fn a_retry_after_unavailable_is_stored_once() {
    // The hooks share their state with the running ingestor: each failure is armed when needed.
    let hooks = Hooks::default();
    let ingestor = OtlpIngestor::start(|_| {}, hooks.clone()).await;
    let _ = hooks.clone().fail_next_exports_after_store(1);
    let export = traces("acme", vec![chat_span(4, 1, 1), chat_span(4, 2, 2)]);

    let mut client = ingestor.traces_client(ingestor.otlp_grpc).await;
    let failed = client.export(export.clone()).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    client.export(export.clone()).await.expect("the retry succeeds");

    let url = ingestor.url("/v1/traces");
    let other = traces("acme", vec![chat_span(4, 3, 3)]).encode_to_vec();
    let _ = hooks.clone().fail_next_exports_after_store(1);
    let (status, headers, _) = curl_post(&url, &["Content-Type: application/x-protobuf"], &other).await;
    assert_eq!(status, 503);
    assert!(headers.contains("retry-after: 1"), "{headers}");
    let (status, _, _) = curl_post(&url, &["Content-Type: application/x-protobuf"], &other).await;
    assert_eq!(status, 200);

    let stored = ingestor.stored().await;
    let events: usize = stored.iter().map(|(_, events)| events.len()).sum();
    assert_eq!((stored.len(), events), (2, 3), "each export stored once: {stored:?}");
    ingestor.inner.stop().await;
}

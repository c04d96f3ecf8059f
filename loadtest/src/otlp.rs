//! `--protocol otlp-grpc|otlp-http`: the same workload sent as OTLP trace exports, one span per
//! event, to the ingestor's OTLP/gRPC service (its gRPC port) or OTLP/HTTP listener.
//!
//! As for `chute.v1`, each template is encoded once. Every span of a request shares one trace id
//! derived from the request's idempotency key (its span ids are the event's index + 1), so every
//! request carries distinct spans and a retry carries the same ones: the template is encoded
//! with a placeholder trace id whose byte offsets are patched per request.

use bytes::Bytes;
use chute_proto::v1::Event;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::call::{publish_with_retries, Answer, Job, PreEncodedCodec, RetryPolicy};
use crate::error::{Error, Result};
use crate::stats::Recorder;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Stands for the trace id in an encoded template (16 bytes no generated text contains).
const TRACE_ID_PLACEHOLDER: [u8; 16] = *b"\xC7\x00trace\x00id\x00here\xC7";

/// How the load is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `chute.v1.IngestService` (`--transport` picks unary or stream).
    Chute,
    /// OTLP/gRPC `TraceService/Export` on the ingestor's gRPC address (unary).
    OtlpGrpc,
    /// OTLP/HTTP `POST /v1/traces` (protobuf) on `--otlp-http-url`.
    OtlpHttp,
}

/// A template encoded as an OTLP trace export, with where its trace ids go.
#[derive(Debug, Clone)]
pub struct OtlpTemplate {
    encoded: Bytes,
    trace_id_offsets: Vec<usize>,
}

impl OtlpTemplate {
    /// The export of `events` (all of `tenant`): one span per event, attributes and metrics as
    /// span attributes, session and user as `session.id` / `user.id`, the body as a span event.
    pub fn new(tenant: &str, events: &[Event]) -> Self {
        let spans = events
            .iter()
            .enumerate()
            .map(|(index, event)| span_of(index, event))
            .collect();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        text_attribute("chute.tenant", tenant),
                        text_attribute("service.name", "chute-loadtest"),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let encoded = request.encode_to_vec();
        let trace_id_offsets: Vec<usize> = encoded
            .windows(TRACE_ID_PLACEHOLDER.len())
            .enumerate()
            .filter(|(_, window)| *window == TRACE_ID_PLACEHOLDER)
            .map(|(offset, _)| offset)
            .collect();
        assert_eq!(trace_id_offsets.len(), events.len(), "one trace id per span");
        Self {
            encoded: Bytes::from(encoded),
            trace_id_offsets,
        }
    }

    /// The export with every span's trace id set to `trace_id`.
    pub fn request(&self, trace_id: &[u8; 16]) -> Bytes {
        let mut bytes = self.encoded.to_vec();
        for &offset in &self.trace_id_offsets {
            bytes[offset..offset + 16].copy_from_slice(trace_id);
        }
        Bytes::from(bytes)
    }
}

/// The trace id of the request with `idempotency_key`: never all zero, the same on a retry.
pub fn trace_id(idempotency_key: &str) -> [u8; 16] {
    let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, idempotency_key.as_bytes());
    let mut id = *uuid.as_bytes();
    id[0] |= 1;
    id
}

fn text_attribute(key: &str, value: &str) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.to_owned()))
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn span_of(index: usize, event: &Event) -> Span {
    let start = event
        .time
        .as_ref()
        .and_then(chute_common::validate::timestamp_to_nanos)
        .unwrap_or_default() as u64;
    let mut attributes: Vec<KeyValue> = event
        .attributes
        .iter()
        .map(|(key, value)| text_attribute(key, value))
        .collect();
    attributes.extend(
        event
            .metrics
            .iter()
            .map(|(key, value)| attribute(key, any_value::Value::DoubleValue(*value))),
    );
    attributes.push(text_attribute("session.id", &event.session_id));
    attributes.push(text_attribute("user.id", &event.user_id));
    let events = if event.body.is_empty() {
        Vec::new()
    } else {
        vec![span::Event {
            time_unix_nano: start,
            name: "body".into(),
            attributes: vec![text_attribute("content", &event.body)],
            dropped_attributes_count: 0,
        }]
    };
    Span {
        trace_id: TRACE_ID_PLACEHOLDER.to_vec(),
        span_id: (index as u64 + 1).to_be_bytes().to_vec(),
        name: event.name.clone(),
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 1_000_000,
        attributes,
        events,
        ..Default::default()
    }
}

/// Sends OTLP exports over gRPC or HTTP, retrying retryable failures with the same bytes.
pub struct OtlpClient {
    transport: OtlpTransport,
    authorization: Option<MetadataValue<Ascii>>,
    policy: RetryPolicy,
}

enum OtlpTransport {
    Grpc(Vec<Channel>),
    Http {
        client: Box<hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>>,
        url: String,
    },
}

impl OtlpClient {
    /// `channels`: connections to the ingestor's gRPC addresses (OTLP/gRPC is served there);
    /// `http_url`: its OTLP/HTTP base URL, pooled over up to `connections * 64` idle connections.
    /// The authorization and retry policy are the chute.v1 client's ([`crate::client::Client`]).
    pub fn new(
        protocol: Protocol,
        channels: Vec<Channel>,
        http_url: &str,
        connections: usize,
        authorization: Option<MetadataValue<Ascii>>,
        policy: RetryPolicy,
    ) -> Result<Self> {
        let transport = match protocol {
            Protocol::Chute => return Err(Error::Config("the chute protocol has its own client".into())),
            Protocol::OtlpGrpc => OtlpTransport::Grpc(channels),
            Protocol::OtlpHttp => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                OtlpTransport::Http {
                    client: Box::new(
                        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                            .pool_max_idle_per_host(connections.max(1) * 64)
                            .build(connector),
                    ),
                    url: format!("{}/v1/traces", http_url.trim_end_matches('/')),
                }
            }
        };
        Ok(Self {
            transport,
            authorization,
            policy,
        })
    }

    /// Exports one request (retrying retryable failures with the same spans) and records the
    /// outcome measured from `job.intended`.
    pub async fn publish(&self, connection: usize, job: Job, recorder: &Recorder) {
        publish_with_retries(job, self.policy, recorder, |request| {
            let (body, events) = (request.events.clone(), request.event_count);
            async move {
                let rejected = self.export(connection, body).await?;
                Ok(Answer {
                    accepted: events.saturating_sub(rejected),
                    rejected,
                })
            }
        })
        .await;
    }

    /// One export; `Ok` holds the rejected span count of `partial_success`.
    async fn export(&self, connection: usize, body: Bytes) -> Result<u64, Status> {
        match &self.transport {
            OtlpTransport::Grpc(channels) => {
                let mut grpc = tonic::client::Grpc::new(channels[connection % channels.len()].clone());
                grpc.ready().await.map_err(|err| Status::unavailable(err.to_string()))?;
                let mut request = tonic::Request::new(body);
                if let Some(value) = &self.authorization {
                    request.metadata_mut().insert("authorization", value.clone());
                }
                let response = grpc
                    .unary(request, PathAndQuery::from_static(EXPORT_PATH), ExportCodec::default())
                    .await?
                    .into_inner();
                Ok(rejected(&response))
            }
            OtlpTransport::Http { client, url } => {
                let mut request = hyper::Request::post(url.as_str()).header("content-type", "application/x-protobuf");
                if let Some(value) = &self.authorization {
                    request = request.header("authorization", value.as_encoded_bytes());
                }
                let request = request
                    .body(Full::new(body))
                    .map_err(|err| Status::internal(err.to_string()))?;
                let response = client
                    .request(request)
                    .await
                    .map_err(|err| Status::unavailable(err.to_string()))?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|err| Status::unavailable(err.to_string()))?
                    .to_bytes();
                match status.as_u16() {
                    200 => ExportTraceServiceResponse::decode(body)
                        .map(|response| rejected(&response))
                        .map_err(|err| Status::internal(format!("undecodable export response: {err}"))),
                    401 => Err(Status::unauthenticated("401")),
                    400 | 413 | 415 => Err(Status::invalid_argument(format!("HTTP {status}"))),
                    429 | 502..=504 => Err(Status::unavailable(format!("HTTP {status}"))),
                    _ => Err(Status::new(Code::Unknown, format!("HTTP {status}"))),
                }
            }
        }
    }
}

fn rejected(response: &ExportTraceServiceResponse) -> u64 {
    response
        .partial_success
        .as_ref()
        .map_or(0, |partial| partial.rejected_spans.max(0) as u64)
}

/// Sends pre-encoded export bytes and decodes the export response.
type ExportCodec = PreEncodedCodec<Bytes, ExportTraceServiceResponse>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Workload;

    #[test]
    fn templates_become_exports_with_one_trace_id_per_request() {
        let workload = Workload {
            run_id: "lt-otlp".into(),
            events_per_request: 5,
            tenants: 2,
            event_names: 3,
            users: 10,
            sessions: 10,
            attributes: 2,
            attribute_bytes: 8,
            metrics: 4,
            body_bytes: 12,
            templates: 2,
            seed: 1,
        };
        let template = &workload.templates(1_700_000_000_000_000_000)[1];
        let otlp = OtlpTemplate::new(&template.tenant, &template.events);
        let id = trace_id("lt-otlp-7");
        assert_eq!(id, trace_id("lt-otlp-7"), "a retry carries the same spans");
        assert_ne!(id, trace_id("lt-otlp-8"));
        let export = ExportTraceServiceRequest::decode(otlp.request(&id)).unwrap();
        let spans = &export.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 5);
        assert!(spans.iter().all(|span| span.trace_id == id));
        assert_eq!(spans[4].span_id, 5u64.to_be_bytes());
        assert_eq!(spans[0].name, template.events[0].name);
        let resource = export.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, "chute.tenant");
        // The ingestor's mapping turns each span back into the event's name, tenant and metrics.
        let mapped = chute_ingestor::otlp::mapping::map_traces(
            &export,
            &chute_ingestor::otlp::mapping::MappingSettings {
                max_body_bytes: 64 * 1024,
                pricing: None,
            },
        );
        let event = mapped[0].result.as_ref().expect("mapped");
        assert_eq!(event.tenant, template.tenant);
        assert_eq!(event.session_id, template.events[0].session_id);
        for (metric, value) in &template.events[0].metrics {
            assert_eq!(event.metrics[metric], *value);
        }
        assert_eq!(event.attributes["run_id"], "lt-otlp");
    }
}

//! Protobuf exports decoded item by item, so one bad span or log record (for example an
//! attribute that is not valid UTF-8, which makes prost refuse the whole message) is rejected
//! alone and the rest of the export is kept.
//!
//! The export is first read as a skeleton whose items are raw bytes (the same field numbers as
//! the OTLP messages, so the wire format is the same), then each item is decoded on its own. An
//! item that fails takes the place of an empty item in the export and is reported in
//! [`Lenient::undecodable`] by its position, which the mapping's verdict is replaced with.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::signal::{Logs, OtlpSignal, Traces};

/// An export, and the items (by position in export order) that could not be decoded.
#[derive(Debug, Default)]
pub struct Lenient<T> {
    pub request: T,
    pub undecodable: Vec<(usize, String)>,
}

/// `ExportTraceServiceRequest` / `ExportLogsServiceRequest`: field 1, the resources.
#[derive(Clone, PartialEq, Message)]
struct ExportSkeleton {
    #[prost(message, repeated, tag = "1")]
    resources: Vec<ResourceSkeleton>,
}

/// `ResourceSpans` / `ResourceLogs`: resource (1), scopes (2), schema_url (3).
#[derive(Clone, PartialEq, Message)]
struct ResourceSkeleton {
    #[prost(bytes = "bytes", optional, tag = "1")]
    resource: Option<Bytes>,
    #[prost(message, repeated, tag = "2")]
    scopes: Vec<ScopeSkeleton>,
    #[prost(bytes = "bytes", tag = "3")]
    schema_url: Bytes,
}

/// `ScopeSpans` / `ScopeLogs`: scope (1), items (2), schema_url (3).
#[derive(Clone, PartialEq, Message)]
struct ScopeSkeleton {
    #[prost(bytes = "bytes", optional, tag = "1")]
    scope: Option<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    items: Vec<Bytes>,
    #[prost(bytes = "bytes", tag = "3")]
    schema_url: Bytes,
}

/// Decodes an export of either signal; `Err` only when its structure (not an item) is malformed.
pub fn export<S: OtlpSignal>(body: Bytes) -> Result<Lenient<S::Request>, prost::DecodeError> {
    let skeleton = ExportSkeleton::decode(body)?;
    let mut undecodable = Vec::new();
    let mut position = 0;
    let mut resources = Vec::with_capacity(skeleton.resources.len());
    for resource in skeleton.resources {
        let decoded_resource = decode_optional::<Resource>(resource.resource);
        let mut scopes = Vec::with_capacity(resource.scopes.len());
        for scope in resource.scopes {
            let decoded_scope = decode_optional::<InstrumentationScope>(scope.scope);
            let mut items = Vec::with_capacity(scope.items.len());
            for item in scope.items {
                let decoded = match (&decoded_resource, &decoded_scope) {
                    (Err(err), _) => Err(format!("its resource: {err}")),
                    (_, Err(err)) => Err(format!("its scope: {err}")),
                    _ => S::Item::decode(item).map_err(|err| err.to_string()),
                };
                items.push(decoded.unwrap_or_else(|reason| {
                    undecodable.push((position, reason));
                    S::Item::default()
                }));
                position += 1;
            }
            scopes.push(S::new_scope(
                decoded_scope.ok().flatten(),
                items,
                String::from_utf8_lossy(&scope.schema_url).into_owned(),
            ));
        }
        resources.push(S::new_resource(
            decoded_resource.ok().flatten(),
            scopes,
            String::from_utf8_lossy(&resource.schema_url).into_owned(),
        ));
    }
    Ok(Lenient {
        request: S::new_request(resources),
        undecodable,
    })
}

/// [`export`] of a trace export.
pub fn traces(body: Bytes) -> Result<Lenient<ExportTraceServiceRequest>, prost::DecodeError> {
    export::<Traces>(body)
}

/// [`export`] of a logs export.
pub fn logs(body: Bytes) -> Result<Lenient<ExportLogsServiceRequest>, prost::DecodeError> {
    export::<Logs>(body)
}

fn decode_optional<M: Message + Default>(bytes: Option<Bytes>) -> Result<Option<M>, prost::DecodeError> {
    bytes.map(M::decode).transpose()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;
    use crate::otlp::test_support::{kv, text};

    fn span(name: &str) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            attributes: vec![kv("k", text("UTFX"))],
            ..Default::default()
        }
    }

    fn export(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource::default()),
                scope_spans: vec![ScopeSpans {
                    scope: None,
                    spans,
                    schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    #[test]
    fn a_valid_export_decodes_as_prost_decodes_it() {
        let sent = export(vec![span("a"), span("b")]);
        let decoded = traces(Bytes::from(sent.encode_to_vec())).unwrap();
        assert_eq!(decoded.request, sent);
        assert!(decoded.undecodable.is_empty());
    }

    #[test]
    fn a_span_with_invalid_utf8_is_reported_alone() {
        let mut bytes = export(vec![span("a"), span("b"), span("c")]).encode_to_vec();
        // Corrupt the middle span's attribute value: "UTFX" -> "UTF\xff".
        let positions: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, window)| *window == b"UTFX")
            .map(|(position, _)| position)
            .collect();
        assert_eq!(positions.len(), 3);
        bytes[positions[1] + 3] = 0xff;
        assert!(
            ExportTraceServiceRequest::decode(bytes.as_slice()).is_err(),
            "prost refuses it whole"
        );
        let decoded = traces(Bytes::from(bytes)).unwrap();
        let spans = &decoded.request.resource_spans[0].scope_spans[0].spans;
        assert_eq!((spans[0].name.as_str(), spans[2].name.as_str()), ("a", "c"));
        assert_eq!(decoded.undecodable.len(), 1);
        assert_eq!(decoded.undecodable[0].0, 1);
        assert!(decoded.undecodable[0].1.contains("UTF-8"), "{:?}", decoded.undecodable);
    }

    #[test]
    fn a_broken_structure_is_an_error() {
        assert!(traces(Bytes::from_static(b"\x0a\xff\xff\xff")).is_err());
        assert!(logs(Bytes::from_static(b"not protobuf at all")).is_err());
    }
}

//! What differs between the two OTLP signals, in one place: the export's messages and their
//! nesting (resources -> scopes -> items), what an item is called, the gRPC service and the
//! answer's `partial_success`. Every stage (`decode`, `mapping`, `export`, both
//! transports) is written once, generic over [`OtlpSignal`]; this module depends on none of
//! them.
//!
//! The generated OTLP types share no trait and name their fields after the signal
//! (`resource_spans` / `resource_logs`, `spans` / `log_records`), so the two impls are one
//! macro with those names as arguments.

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

/// The two OTLP signals Chute takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Logs,
}

impl Signal {
    /// The `method` label of `chute_ingest_requests_total`.
    pub fn method(self, transport: Transport) -> &'static str {
        match (self, transport) {
            (Signal::Traces, Transport::Grpc) => "otlp.TraceService/Export",
            (Signal::Logs, Transport::Grpc) => "otlp.LogsService/Export",
            (Signal::Traces, Transport::Http) => "otlp.POST /v1/traces",
            (Signal::Logs, Transport::Http) => "otlp.POST /v1/logs",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// One OTLP signal: its export request and response, and the three levels of the request.
pub trait OtlpSignal: Send + Sync + 'static {
    const SIGNAL: Signal;
    /// What one item is called in answers: `span`, `log record`.
    const ITEM: &'static str;
    /// The gRPC service and its `Export` method's path.
    const SERVICE: &'static str;
    const PATH: &'static str;
    type Request: Message + Default + serde::de::DeserializeOwned + Send + Sync + 'static;
    type Response: Message + Default + serde::Serialize + Send + 'static;
    /// `ResourceSpans` / `ResourceLogs`.
    type ResourceItems;
    /// `ScopeSpans` / `ScopeLogs`.
    type ScopeItems;
    /// `Span` / `LogRecord`.
    type Item: Message + Default + Send + Sync;

    fn resources(request: &Self::Request) -> &[Self::ResourceItems];
    fn resource(resource: &Self::ResourceItems) -> (Option<&Resource>, &[Self::ScopeItems]);
    fn scope(scope: &Self::ScopeItems) -> (Option<&InstrumentationScope>, &[Self::Item]);

    fn new_request(resources: Vec<Self::ResourceItems>) -> Self::Request;
    fn new_resource(
        resource: Option<Resource>,
        scopes: Vec<Self::ScopeItems>,
        schema_url: String,
    ) -> Self::ResourceItems;
    fn new_scope(scope: Option<InstrumentationScope>, items: Vec<Self::Item>, schema_url: String) -> Self::ScopeItems;

    /// The answer; `partial_success` (rejected items, message) only when something was rejected.
    fn response(partial_success: Option<(i64, String)>) -> Self::Response;
}

pub struct Traces;
pub struct Logs;

macro_rules! otlp_signal {
    (
        $signal:ident, item: $item_name:literal, service: $service:literal,
        $request:ident { $resources:ident }, $response:ident, $partial:ident { $rejected:ident },
        $resource:ident { $scopes:ident }, $scope:ident { $items:ident }, $item:ident
    ) => {
        impl OtlpSignal for $signal {
            const SIGNAL: Signal = Signal::$signal;
            const ITEM: &'static str = $item_name;
            const SERVICE: &'static str = $service;
            const PATH: &'static str = concat!("/", $service, "/Export");
            type Request = $request;
            type Response = $response;
            type ResourceItems = $resource;
            type ScopeItems = $scope;
            type Item = $item;

            fn resources(request: &$request) -> &[$resource] {
                &request.$resources
            }

            fn resource(resource: &$resource) -> (Option<&Resource>, &[$scope]) {
                (resource.resource.as_ref(), &resource.$scopes)
            }

            fn scope(scope: &$scope) -> (Option<&InstrumentationScope>, &[$item]) {
                (scope.scope.as_ref(), &scope.$items)
            }

            fn new_request($resources: Vec<$resource>) -> $request {
                $request { $resources }
            }

            fn new_resource(resource: Option<Resource>, $scopes: Vec<$scope>, schema_url: String) -> $resource {
                $resource {
                    resource,
                    $scopes,
                    schema_url,
                }
            }

            fn new_scope(scope: Option<InstrumentationScope>, $items: Vec<$item>, schema_url: String) -> $scope {
                $scope {
                    scope,
                    $items,
                    schema_url,
                }
            }

            fn response(partial_success: Option<(i64, String)>) -> $response {
                $response {
                    partial_success: partial_success.map(|($rejected, error_message)| $partial {
                        $rejected,
                        error_message,
                    }),
                }
            }
        }
    };
}

otlp_signal!(
    Traces, item: "span", service: "opentelemetry.proto.collector.trace.v1.TraceService",
    ExportTraceServiceRequest { resource_spans }, ExportTraceServiceResponse,
    ExportTracePartialSuccess { rejected_spans },
    ResourceSpans { scope_spans }, ScopeSpans { spans }, Span
);

otlp_signal!(
    Logs, item: "log record", service: "opentelemetry.proto.collector.logs.v1.LogsService",
    ExportLogsServiceRequest { resource_logs }, ExportLogsServiceResponse,
    ExportLogsPartialSuccess { rejected_log_records },
    ResourceLogs { scope_logs }, ScopeLogs { log_records }, LogRecord
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_paths_are_the_services_export_methods() {
        assert_eq!(
            Traces::PATH,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(Logs::PATH, "/opentelemetry.proto.collector.logs.v1.LogsService/Export");
    }

    #[test]
    fn partial_success_is_sent_only_when_given() {
        assert_eq!(Traces::response(None).partial_success, None);
        let logs = Logs::response(Some((2, "2 rejected".into())));
        let partial = logs.partial_success.unwrap();
        assert_eq!(
            (partial.rejected_log_records, partial.error_message.as_str()),
            (2, "2 rejected")
        );
    }
}

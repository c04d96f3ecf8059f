//! What the OTLP unit tests and the integration tests (feature `test-util`) share to build
//! exports.

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, Span};

/// An attribute.
pub fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// A string value.
pub fn text(value: &str) -> Value {
    Value::StringValue(value.into())
}

/// A GenAI chat span as the official instrumentations shape it: `chat <model>`, a client span
/// from `start` (unix ns) lasting `duration_ns`, with the operation, provider, request model and
/// token usage attributes. Ids, parent, events and status are left for the test to set.
pub fn chat_span(
    provider: &str,
    model: &str,
    start: u64,
    duration_ns: u64,
    input_tokens: i64,
    output_tokens: i64,
) -> Span {
    Span {
        name: format!("chat {model}"),
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + duration_ns,
        attributes: vec![
            kv("gen_ai.operation.name", text("chat")),
            kv("gen_ai.provider.name", text(provider)),
            kv("gen_ai.request.model", text(model)),
            kv("gen_ai.usage.input_tokens", Value::IntValue(input_tokens)),
            kv("gen_ai.usage.output_tokens", Value::IntValue(output_tokens)),
        ],
        ..Default::default()
    }
}

//! OTLP spans and log records -> `chute.v1.Event`s: plain functions over data, no I/O.
//!
//! Every output is a function of the export's content only (never of the receive time), so a
//! retried export maps to the same events, event ids and idempotency key. The README's "OTLP
//! mapping" table documents what goes where; keep the two in step.

use std::collections::HashMap;

use chute_common::validate::{is_valid_name, timestamp_from_nanos, Rejection};
use chute_proto::v1::Event;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, Span};
use prost::Message;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::pricing::{Pricing, Usage};
use super::signal::{Logs, OtlpSignal, Traces};

/// Namespace of span event ids: UUIDv5(trace_id ++ span_id) (a fixed random UUID).
pub const SPAN_EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x8c2f_5d1e_7a34_4b90_b6e1_03d9_5f7a_2c48);
/// Namespace of log record event ids: UUIDv5 of the record's content.
pub const LOG_EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x1e7b_94a2_c65d_4f03_8d1a_b2e4_70c9_56f1);
/// Namespace of an export's idempotency key: UUIDv5 of its sorted event ids.
pub const EXPORT_KEY_NAMESPACE: Uuid = Uuid::from_u128(0x5a90_3e6c_d812_47b5_a4f0_9c3b_e175_0d26);

/// Appended to a body cut at the body limit; the body is then no longer valid JSON.
pub const TRUNCATION_MARKER: &str = "…[truncated by chute]";
/// The resource attribute that names the tenant when API keys are off.
pub const TENANT_ATTRIBUTE: &str = "chute.tenant";
/// Resource attributes copied to every event of the resource (all others are dropped).
pub const RESOURCE_ATTRIBUTES: [&str; 9] = [
    "service.name",
    "service.namespace",
    "service.version",
    "service.instance.id",
    "deployment.environment",
    "deployment.environment.name",
    "host.name",
    "telemetry.sdk.language",
    "telemetry.sdk.name",
];
/// Span attributes reporting the time to the first token, in seconds (OpenLIT and the GenAI
/// server metric's name); `time_to_first_token_ms` is derived from the first one present.
pub const TIME_TO_FIRST_TOKEN_ATTRIBUTES: [&str; 2] = [
    "gen_ai.server.time_to_first_token",
    "gen_ai.response.time_to_first_token",
];

/// What the mapping needs besides the export itself.
#[derive(Clone, Debug, Default)]
pub struct MappingSettings {
    /// Bodies longer than this are cut, with [`TRUNCATION_MARKER`] at the end.
    pub max_body_bytes: usize,
    /// Prices per model: when given, spans with token usage get a `cost_usd` metric.
    pub pricing: Option<Pricing>,
}

/// One span or log record of an export, in export order (resources, then scopes, then items).
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// `span` or `log record`.
    pub item: &'static str,
    /// Position in the export, in export order.
    pub position: usize,
    /// What the caller is told when the mapping rejected this item (`span 3 "chat"`); empty for
    /// a mapped one (named `<item> <position>` if the event rules reject it later).
    pub label: String,
    pub result: Result<Event, Rejection>,
}

/// Maps every item (span or log record) of an export, in export order.
pub fn map_export<S: OtlpSignal>(request: &S::Request, settings: &MappingSettings) -> Vec<Mapped>
where
    S::Item: MapItem,
{
    let mut mapped = Vec::new();
    for resource_items in S::resources(request) {
        let (resource, scopes) = S::resource(resource_items);
        let resource = ResourceContext::new(resource);
        for scope_items in scopes {
            let (scope, items) = S::scope(scope_items);
            let at = Context {
                resource: &resource,
                scope,
                settings,
            };
            for item in items {
                let position = mapped.len();
                let result = item.map(&at);
                // Labels are only written for rejections: most items never need one.
                let label = match &result {
                    Ok(_) => String::new(),
                    Err(_) => item.label(position),
                };
                mapped.push(Mapped {
                    item: S::ITEM,
                    position,
                    label,
                    result,
                });
            }
        }
    }
    mapped
}

/// Maps every span of a trace export, in export order.
pub fn map_traces(request: &ExportTraceServiceRequest, settings: &MappingSettings) -> Vec<Mapped> {
    map_export::<Traces>(request, settings)
}

/// Maps every log record of a logs export, in export order.
pub fn map_logs(request: &ExportLogsServiceRequest, settings: &MappingSettings) -> Vec<Mapped> {
    map_export::<Logs>(request, settings)
}

/// How one span or log record becomes an event.
pub trait MapItem {
    /// What the caller is told names this item when the mapping rejects it.
    fn label(&self, position: usize) -> String;
    /// The event, or why the item cannot be one.
    fn map(&self, at: &Context<'_>) -> Result<Event, Rejection>;
}

/// Where an item stands in its export (its resource and scope), and the mapping's settings.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    resource: &'a ResourceContext,
    scope: Option<&'a InstrumentationScope>,
    settings: &'a MappingSettings,
}

/// What every event of one resource shares.
struct ResourceContext {
    tenant: String,
    attributes: Vec<(String, String)>,
    /// The resource's encoding, part of a log record's content id.
    encoded: Vec<u8>,
}

impl ResourceContext {
    fn new(resource: Option<&Resource>) -> Self {
        let Some(resource) = resource else {
            return Self {
                tenant: String::new(),
                attributes: Vec::new(),
                encoded: Vec::new(),
            };
        };
        let mut tenant = String::new();
        let mut attributes = Vec::new();
        for KeyValue { key, value, .. } in &resource.attributes {
            let Some(value) = value.as_ref().and_then(|value| value.value.as_ref()) else {
                continue;
            };
            if key == TENANT_ATTRIBUTE {
                tenant = scalar_text(value).unwrap_or_default();
            } else if RESOURCE_ATTRIBUTES.contains(&key.as_str()) {
                if let Some(text) = scalar_text(value) {
                    attributes.push((key.clone(), text));
                }
            }
        }
        Self {
            tenant,
            attributes,
            encoded: resource.encode_to_vec(),
        }
    }
}

impl MapItem for Span {
    fn label(&self, position: usize) -> String {
        format!(
            "span {position} {:?}",
            chute_common::validate::truncated(&self.name, 64)
        )
    }

    fn map(&self, at: &Context<'_>) -> Result<Event, Rejection> {
        let span = self;
        if span.trace_id.len() != 16 || span.trace_id.iter().all(|&b| b == 0) {
            return Err(rejection("trace_id", "must be 16 bytes, not all zero"));
        }
        if span.span_id.len() != 8 || span.span_id.iter().all(|&b| b == 0) {
            return Err(rejection("span_id", "must be 8 bytes, not all zero"));
        }
        let start = unix_nanos("start_time_unix_nano", span.start_time_unix_nano)?;
        let attributes = AttributeMap::new(&span.attributes);
        let raw_name = attributes
            .text("gen_ai.operation.name")
            .unwrap_or_else(|| span.name.clone());
        let name = normalize_name(&raw_name).ok_or_else(|| {
            if raw_name.is_empty() {
                rejection("name", "the span has no name and no gen_ai.operation.name")
            } else {
                rejection("name", "has no character of [A-Za-z0-9_.:-] to keep")
            }
        })?;

        let mut event = base_event(at, &attributes, name, start);
        event.event_id = span_event_id(&span.trace_id, &span.span_id).to_string();
        if span.end_time_unix_nano >= span.start_time_unix_nano && span.end_time_unix_nano != 0 {
            let duration_nanos = span.end_time_unix_nano - span.start_time_unix_nano;
            event.metrics.insert("duration_ms".into(), duration_nanos as f64 / 1e6);
        }
        if let Some(seconds) = TIME_TO_FIRST_TOKEN_ATTRIBUTES
            .iter()
            .find_map(|key| attributes.number(key))
        {
            event.metrics.insert("time_to_first_token_ms".into(), seconds * 1e3);
        }
        if let Some(pricing) = &at.settings.pricing {
            let usage = Usage {
                input_tokens: attributes.number("gen_ai.usage.input_tokens").unwrap_or(0.0),
                output_tokens: attributes.number("gen_ai.usage.output_tokens").unwrap_or(0.0),
                cache_read_input_tokens: attributes.number("gen_ai.usage.cache_read.input_tokens").unwrap_or(0.0),
                reasoning_output_tokens: attributes.number("gen_ai.usage.reasoning.output_tokens").unwrap_or(0.0),
            };
            // The response model (often dated) when it has a price, else the requested one.
            let cost = ["gen_ai.response.model", "gen_ai.request.model"]
                .iter()
                .filter_map(|key| attributes.text(key))
                .find_map(|model| pricing.cost_usd(&model, start, &usage));
            if let Some(cost) = cost {
                event.metrics.insert("cost_usd".into(), cost);
            }
        }

        let status = span.status.as_ref();
        let status_code = status.map_or(status::StatusCode::Unset, |status| {
            status::StatusCode::try_from(status.code).unwrap_or(status::StatusCode::Unset)
        });
        let status_name = match status_code {
            status::StatusCode::Unset => "UNSET",
            status::StatusCode::Ok => "OK",
            status::StatusCode::Error => "ERROR",
        };
        event.attributes.insert("otel.status_code".into(), status_name.into());
        if let Some(status) = status.filter(|status| !status.message.is_empty()) {
            event
                .attributes
                .insert("otel.status_description".into(), status.message.clone());
        }
        let kind = span::SpanKind::try_from(span.kind).unwrap_or(span::SpanKind::Unspecified);
        if kind != span::SpanKind::Unspecified {
            let kind = kind.as_str_name().trim_start_matches("SPAN_KIND_").to_ascii_lowercase();
            event.attributes.insert("span.kind".into(), kind);
        }
        event.attributes.insert("trace_id".into(), hex(&span.trace_id));
        event.attributes.insert("span_id".into(), hex(&span.span_id));
        if !span.parent_span_id.is_empty() {
            event
                .attributes
                .insert("parent_span_id".into(), hex(&span.parent_span_id));
        }
        if !span.events.is_empty() {
            let events: Vec<Json> = span
                .events
                .iter()
                .map(|span_event| {
                    let mut object = Map::new();
                    object.insert("name".into(), Json::String(span_event.name.clone()));
                    object.insert(
                        "time_unix_nano".into(),
                        Json::String(span_event.time_unix_nano.to_string()),
                    );
                    object.insert("attributes".into(), key_values_json(&span_event.attributes));
                    Json::Object(object)
                })
                .collect();
            event.body = truncate_body(Json::Array(events).to_string(), at.settings.max_body_bytes);
        }
        Ok(event)
    }
}

impl MapItem for LogRecord {
    fn label(&self, position: usize) -> String {
        format!("log record {position}")
    }

    fn map(&self, at: &Context<'_>) -> Result<Event, Rejection> {
        let record = self;
        let time_nanos = if record.time_unix_nano != 0 {
            record.time_unix_nano
        } else {
            record.observed_time_unix_nano
        };
        if time_nanos == 0 {
            return Err(rejection("time_unix_nano", "neither time nor observed time is set"));
        }
        let time = unix_nanos("time_unix_nano", time_nanos)?;
        let attributes = AttributeMap::new(&record.attributes);
        let severity = severity_name(record);
        let raw_name = Some(record.event_name.clone())
            .filter(|name| !name.is_empty())
            .or_else(|| attributes.text("event.name"))
            .unwrap_or_else(|| format!("log.{severity}"));
        let name = normalize_name(&raw_name)
            .ok_or_else(|| rejection("name", "has no character of [A-Za-z0-9_.:-] to keep"))?;

        let mut event = base_event(at, &attributes, name, time);
        event.event_id = attributes
            .text("log.record.uid")
            .and_then(|uid| Uuid::try_parse(&uid).ok())
            .unwrap_or_else(|| log_event_id(at.resource, at.scope, record))
            .to_string();
        event.attributes.insert("log.severity".into(), severity);
        if !record.trace_id.is_empty() {
            event.attributes.insert("trace_id".into(), hex(&record.trace_id));
        }
        if !record.span_id.is_empty() {
            event.attributes.insert("span_id".into(), hex(&record.span_id));
        }
        let body = match record.body.as_ref().and_then(|body| body.value.as_ref()) {
            None => String::new(),
            Some(Value::StringValue(text)) => text.clone(),
            Some(other) => any_value_json(other).to_string(),
        };
        event.body = truncate_body(body, at.settings.max_body_bytes);
        Ok(event)
    }
}

/// What spans and log records share: tenant, name, time, ids from attributes, resource and
/// scope attributes, and the record's own attributes (numbers as metrics, the rest as text).
fn base_event(at: &Context<'_>, attributes: &AttributeMap<'_>, name: String, time_unix_nanos: i64) -> Event {
    let mut event = Event {
        tenant: at.resource.tenant.clone(),
        name,
        time: Some(timestamp_from_nanos(time_unix_nanos)),
        session_id: attributes
            .text("gen_ai.conversation.id")
            .or_else(|| attributes.text("session.id"))
            .unwrap_or_default(),
        user_id: attributes
            .text("user.id")
            .or_else(|| attributes.text("enduser.id"))
            .unwrap_or_default(),
        ..Default::default()
    };
    for (key, value) in &at.resource.attributes {
        event.attributes.insert(key.clone(), value.clone());
    }
    if let Some(scope) = at.scope.filter(|scope| !scope.name.is_empty()) {
        event.attributes.insert("otel.scope.name".into(), scope.name.clone());
    }
    for (key, value) in &attributes.values {
        match value {
            Value::IntValue(number) => {
                event.metrics.insert((*key).to_owned(), *number as f64);
            }
            Value::DoubleValue(number) => {
                event.metrics.insert((*key).to_owned(), *number);
            }
            other => {
                let text = scalar_text(other).unwrap_or_else(|| any_value_json(other).to_string());
                event.attributes.insert((*key).to_owned(), text);
            }
        }
    }
    event
}

/// A record's attributes by key (the last value wins, as OTLP leaves duplicates undefined).
struct AttributeMap<'a> {
    values: Vec<(&'a str, &'a Value)>,
    index: HashMap<&'a str, usize>,
}

impl<'a> AttributeMap<'a> {
    fn new(key_values: &'a [KeyValue]) -> Self {
        let mut values: Vec<(&str, &Value)> = Vec::with_capacity(key_values.len());
        let mut index = HashMap::with_capacity(key_values.len());
        for KeyValue { key, value, .. } in key_values {
            let Some(value) = value.as_ref().and_then(|value| value.value.as_ref()) else {
                continue;
            };
            match index.get(key.as_str()) {
                Some(&position) => values[position] = (key.as_str(), value),
                None => {
                    index.insert(key.as_str(), values.len());
                    values.push((key.as_str(), value));
                }
            }
        }
        Self { values, index }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.index.get(key).map(|&position| self.values[position].1)
    }

    /// A string, number or bool attribute as text (ids are sometimes sent as numbers).
    fn text(&self, key: &str) -> Option<String> {
        self.get(key).and_then(scalar_text).filter(|text| !text.is_empty())
    }

    fn number(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::IntValue(number) => Some(*number as f64),
            Value::DoubleValue(number) => Some(*number),
            _ => None,
        }
    }
}

/// A scalar value as text; `None` for arrays, maps and bytes.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(text) => Some(text.clone()),
        Value::BoolValue(flag) => Some(flag.to_string()),
        Value::IntValue(number) => Some(number.to_string()),
        Value::DoubleValue(number) => Some(number.to_string()),
        // A string table index only means something in profiles, which Chute does not take.
        Value::ArrayValue(_) | Value::KvlistValue(_) | Value::BytesValue(_) | Value::StringValueStrindex(_) => None,
    }
}

/// An `AnyValue` as JSON: arrays and maps as JSON arrays and objects, bytes as hex text,
/// non-finite doubles as strings.
fn any_value_json(value: &Value) -> Json {
    match value {
        Value::StringValue(text) => Json::String(text.clone()),
        Value::BoolValue(flag) => Json::Bool(*flag),
        Value::IntValue(number) => Json::from(*number),
        Value::DoubleValue(number) => {
            serde_json::Number::from_f64(*number).map_or_else(|| Json::String(number.to_string()), Json::Number)
        }
        Value::ArrayValue(array) => Json::Array(array.values.iter().map(optional_any_value_json).collect()),
        Value::KvlistValue(list) => key_values_json(&list.values),
        Value::BytesValue(bytes) => Json::String(hex(bytes)),
        Value::StringValueStrindex(_) => Json::Null,
    }
}

fn optional_any_value_json(value: &AnyValue) -> Json {
    value.value.as_ref().map_or(Json::Null, any_value_json)
}

fn key_values_json(key_values: &[KeyValue]) -> Json {
    let mut object = Map::new();
    for KeyValue { key, value, .. } in key_values {
        object.insert(key.clone(), value.as_ref().map_or(Json::Null, optional_any_value_json));
    }
    Json::Object(object)
}

/// Makes `raw` a valid Chute event name: every run of characters outside `[A-Za-z0-9_.:-]`
/// becomes one `_` (none at either end), and the result is cut to 128 characters. `None` when
/// nothing is left.
pub fn normalize_name(raw: &str) -> Option<String> {
    let mut name = String::with_capacity(raw.len().min(128));
    let mut gap = false;
    for ch in raw.chars() {
        if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | ':' | '-') {
            if gap && !name.is_empty() {
                name.push('_');
            }
            gap = false;
            name.push(ch);
        } else {
            gap = true;
        }
    }
    // Only ASCII was pushed, so any byte index is a character boundary.
    name.truncate(128);
    debug_assert!(name.is_empty() || is_valid_name(&name));
    (!name.is_empty()).then_some(name)
}

/// The span's event id: UUIDv5 of its trace id followed by its span id, the same on every
/// export of the span.
pub fn span_event_id(trace_id: &[u8], span_id: &[u8]) -> Uuid {
    let mut name = Vec::with_capacity(trace_id.len() + span_id.len());
    name.extend_from_slice(trace_id);
    name.extend_from_slice(span_id);
    Uuid::new_v5(&SPAN_EVENT_ID_NAMESPACE, &name)
}

/// A log record's event id when it carries none: UUIDv5 of its resource, scope and record as
/// encoded, so two records differ in id exactly when they differ in content.
fn log_event_id(resource: &ResourceContext, scope: Option<&InstrumentationScope>, record: &LogRecord) -> Uuid {
    let mut name = resource.encoded.clone();
    name.push(0);
    if let Some(scope) = scope {
        scope.encode(&mut name).expect("a Vec grows as needed");
    }
    name.push(0);
    record.encode(&mut name).expect("a Vec grows as needed");
    Uuid::new_v5(&LOG_EVENT_ID_NAMESPACE, &name)
}

/// The idempotency key of an export: `otlp-` and a UUIDv5 of its accepted event ids, sorted.
/// A retried export (same spans in any order) gets the same key, and the publisher derives
/// each chunk's `Nats-Msg-Id` from the tenant and this key.
pub fn export_idempotency_key(sorted_event_ids: &[&str]) -> String {
    debug_assert!(sorted_event_ids.windows(2).all(|pair| pair[0] <= pair[1]));
    let mut name = Vec::with_capacity(sorted_event_ids.len() * 37);
    for id in sorted_event_ids {
        name.extend_from_slice(id.as_bytes());
        name.push(b'\n');
    }
    format!("otlp-{}", Uuid::new_v5(&EXPORT_KEY_NAMESPACE, &name))
}

/// `log.<severity>`'s severity: the text sent, lower case, else the name of the number's range.
fn severity_name(record: &LogRecord) -> String {
    if !record.severity_text.is_empty() {
        return record.severity_text.to_ascii_lowercase();
    }
    match record.severity_number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "fatal",
        _ => "unspecified",
    }
    .to_owned()
}

/// `body` cut at `max_bytes` (on a character boundary) with [`TRUNCATION_MARKER`] at the end.
pub fn truncate_body(body: String, max_bytes: usize) -> String {
    if body.len() <= max_bytes {
        return body;
    }
    let mut end = max_bytes.saturating_sub(TRUNCATION_MARKER.len());
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = body;
    cut.truncate(end);
    cut.push_str(TRUNCATION_MARKER);
    cut
}

fn unix_nanos(field: &str, nanos: u64) -> Result<i64, Rejection> {
    if nanos == 0 {
        return Err(rejection(field, "required"));
    }
    i64::try_from(nanos).map_err(|_| rejection(field, "after the year 2262"))
}

fn rejection(field: &str, reason: &str) -> Rejection {
    Rejection {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// At most `max` characters of `text`, for labels.
#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::ArrayValue;
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};

    use super::*;
    use crate::otlp::test_support::{chat_span, kv, text};

    const START: u64 = 1_780_000_000_123_456_789;

    fn genai_span() -> Span {
        let mut span = chat_span("openai", "gpt-4o", START, 1_500_000_000, 120, 40);
        span.trace_id = vec![0x5b; 16];
        span.span_id = vec![0xee; 8];
        span.parent_span_id = vec![0x01; 8];
        span.attributes.extend([
            kv("gen_ai.response.model", text("gpt-4o-2024-08-06")),
            kv("gen_ai.usage.cache_read.input_tokens", Value::IntValue(100)),
            kv("gen_ai.request.temperature", Value::DoubleValue(0.2)),
            kv("gen_ai.conversation.id", text("conv-1")),
            kv("user.id", text("u-7")),
            kv("gen_ai.server.time_to_first_token", Value::DoubleValue(0.25)),
            kv(
                "gen_ai.response.finish_reasons",
                Value::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(text("stop")),
                    }],
                }),
            ),
            kv("gen_ai.request.stream", Value::BoolValue(true)),
        ]);
        span.events = vec![span::Event {
            time_unix_nano: START + 10,
            name: "gen_ai.user.message".into(),
            attributes: vec![kv("content", text("hello"))],
            dropped_attributes_count: 0,
        }];
        span.status = Some(Status {
            message: String::new(),
            code: status::StatusCode::Ok as i32,
        });
        span
    }

    fn resource(attributes: Vec<KeyValue>) -> Option<Resource> {
        Some(Resource {
            attributes,
            ..Default::default()
        })
    }

    fn traces(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: resource(vec![
                    kv("service.name", text("chatbot")),
                    kv("chute.tenant", text("acme")),
                    kv("process.pid", Value::IntValue(42)),
                ]),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "opentelemetry.instrumentation.openai_v2".into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn settings() -> MappingSettings {
        MappingSettings {
            max_body_bytes: 64 * 1024,
            pricing: None,
        }
    }

    fn one_event(request: &ExportTraceServiceRequest, settings: &MappingSettings) -> Event {
        let mapped = map_traces(request, settings);
        assert_eq!(mapped.len(), 1);
        mapped.into_iter().next().unwrap().result.expect("accepted")
    }

    #[test]
    fn a_genai_span_becomes_one_event_with_the_documented_fields() {
        let event = one_event(&traces(vec![genai_span()]), &settings());
        assert_eq!(event.name, "chat");
        assert_eq!(event.tenant, "acme");
        assert_eq!(event.time, Some(timestamp_from_nanos(START as i64)));
        assert_eq!(event.event_id, span_event_id(&[0x5b; 16], &[0xee; 8]).to_string());
        assert_eq!((event.session_id.as_str(), event.user_id.as_str()), ("conv-1", "u-7"));
        let metric = |key: &str| event.metrics.get(key).copied();
        assert_eq!(metric("duration_ms"), Some(1500.0));
        assert_eq!(metric("gen_ai.usage.input_tokens"), Some(120.0));
        assert_eq!(metric("gen_ai.usage.output_tokens"), Some(40.0));
        assert_eq!(metric("gen_ai.usage.cache_read.input_tokens"), Some(100.0));
        assert_eq!(metric("gen_ai.request.temperature"), Some(0.2));
        assert_eq!(metric("time_to_first_token_ms"), Some(250.0));
        assert_eq!(metric("cost_usd"), None, "no pricing file, no cost");
        let attribute = |key: &str| event.attributes.get(key).map(String::as_str);
        assert_eq!(attribute("gen_ai.provider.name"), Some("openai"));
        assert_eq!(attribute("gen_ai.request.model"), Some("gpt-4o"));
        assert_eq!(attribute("gen_ai.response.model"), Some("gpt-4o-2024-08-06"));
        assert_eq!(attribute("gen_ai.response.finish_reasons"), Some(r#"["stop"]"#));
        assert_eq!(attribute("gen_ai.request.stream"), Some("true"));
        assert_eq!(attribute("service.name"), Some("chatbot"));
        assert_eq!(
            attribute("otel.scope.name"),
            Some("opentelemetry.instrumentation.openai_v2")
        );
        assert_eq!(attribute("otel.status_code"), Some("OK"));
        assert_eq!(attribute("span.kind"), Some("client"));
        assert_eq!(attribute("trace_id"), Some("5b".repeat(16).as_str()));
        assert_eq!(attribute("span_id"), Some("ee".repeat(8).as_str()));
        assert_eq!(attribute("parent_span_id"), Some("01".repeat(8).as_str()));
        // Not copied: the tenant attribute and resource attributes outside the selection.
        assert_eq!(attribute("chute.tenant"), None);
        assert_eq!(attribute("process.pid"), None);
        assert!(!event.metrics.contains_key("process.pid"));
        let body: Json = serde_json::from_str(&event.body).unwrap();
        assert_eq!(body[0]["name"], "gen_ai.user.message");
        assert_eq!(body[0]["attributes"]["content"], "hello");
        assert_eq!(body[0]["time_unix_nano"], (START + 10).to_string());
    }

    #[test]
    fn the_span_name_is_used_and_normalised_without_an_operation_name() {
        let mut span = genai_span();
        span.attributes.retain(|kv| kv.key != "gen_ai.operation.name");
        span.name = "GET /v1/chat completions".into();
        assert_eq!(
            one_event(&traces(vec![span]), &settings()).name,
            "GET_v1_chat_completions"
        );
        assert_eq!(normalize_name("  chat  "), Some("chat".into()));
        assert_eq!(normalize_name("café au lait"), Some("caf_au_lait".into()));
        assert_eq!(normalize_name(&"x".repeat(300)).map(|name| name.len()), Some(128));
        assert_eq!(normalize_name("✓ ✓"), None);
        assert_eq!(normalize_name(""), None);
    }

    #[test]
    fn impossible_spans_are_rejected_with_their_reason() {
        let reject = |edit: fn(&mut Span)| {
            let mut span = genai_span();
            edit(&mut span);
            map_traces(&traces(vec![span]), &settings())
                .remove(0)
                .result
                .expect_err("rejected")
        };
        let nameless = reject(|span| {
            span.name.clear();
            span.attributes.retain(|kv| kv.key != "gen_ai.operation.name");
        });
        assert_eq!(nameless.field, "name");
        assert!(nameless.reason.contains("no name"), "{nameless}");
        assert_eq!(
            reject(|span| {
                span.attributes.retain(|kv| kv.key != "gen_ai.operation.name");
                span.name = "日本".into();
            })
            .field,
            "name"
        );
        assert_eq!(reject(|span| span.trace_id = vec![0; 16]).field, "trace_id");
        assert_eq!(reject(|span| span.span_id = vec![1; 4]).field, "span_id");
        assert_eq!(
            reject(|span| span.start_time_unix_nano = 0).field,
            "start_time_unix_nano"
        );
        assert_eq!(
            reject(|span| span.start_time_unix_nano = u64::MAX).field,
            "start_time_unix_nano"
        );
    }

    #[test]
    fn ids_are_stable_across_exports_and_distinct_across_spans() {
        let first = one_event(&traces(vec![genai_span()]), &settings());
        let again = one_event(&traces(vec![genai_span()]), &settings());
        assert_eq!(first, again, "a retried export maps to the same event");
        let mut other = genai_span();
        other.span_id = vec![0xef; 8];
        assert_ne!(one_event(&traces(vec![other]), &settings()).event_id, first.event_id);
        let expected = Uuid::new_v5(&SPAN_EVENT_ID_NAMESPACE, &[vec![0x5b; 16], vec![0xee; 8]].concat());
        assert_eq!(first.event_id, expected.to_string());
    }

    #[test]
    fn the_export_key_depends_on_the_set_of_ids_only() {
        let key = export_idempotency_key(&["a", "b", "c"]);
        assert_eq!(key, export_idempotency_key(&["a", "b", "c"]));
        assert_ne!(key, export_idempotency_key(&["a", "b"]));
        assert_ne!(key, export_idempotency_key(&["a", "b", "d"]));
        assert!(key.starts_with("otlp-") && key.len() == 41, "{key}");
    }

    #[test]
    fn bodies_are_cut_at_the_limit_with_a_marker() {
        let mut span = genai_span();
        span.events[0].attributes = vec![kv("content", text(&"é".repeat(10_000)))];
        let limited = MappingSettings {
            max_body_bytes: 1000,
            pricing: None,
        };
        let body = one_event(&traces(vec![span]), &limited).body;
        assert!(body.len() <= 1000, "{}", body.len());
        assert!(body.ends_with(TRUNCATION_MARKER));
        assert_eq!(truncate_body("short".into(), 1000), "short");
        assert_eq!(truncate_body("x".repeat(1000), 1000).len(), 1000);
    }

    #[test]
    fn an_unset_status_and_missing_end_time_are_tolerated() {
        let mut span = genai_span();
        span.status = None;
        span.end_time_unix_nano = 0;
        span.events.clear();
        let event = one_event(&traces(vec![span]), &settings());
        assert_eq!(event.attributes["otel.status_code"], "UNSET");
        assert!(!event.metrics.contains_key("duration_ms"));
        assert_eq!(event.body, "");
        let mut failed = genai_span();
        failed.status = Some(Status {
            message: "rate limited".into(),
            code: status::StatusCode::Error as i32,
        });
        failed.attributes.push(kv("error.type", text("429")));
        let event = one_event(&traces(vec![failed]), &settings());
        assert_eq!(event.attributes["otel.status_code"], "ERROR");
        assert_eq!(event.attributes["otel.status_description"], "rate limited");
        assert_eq!(event.attributes["error.type"], "429");
    }

    fn logs(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource(vec![kv("service.name", text("chatbot"))]),
                scope_logs: vec![ScopeLogs {
                    scope: None,
                    log_records: records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn record() -> LogRecord {
        LogRecord {
            time_unix_nano: START,
            severity_number: 13,
            severity_text: "WARNING".into(),
            body: Some(AnyValue {
                value: Some(text("model fallback")),
            }),
            attributes: vec![
                kv("session.id", text("s-1")),
                kv("enduser.id", text("u-1")),
                kv("retry", Value::IntValue(2)),
            ],
            trace_id: vec![0x11; 16],
            span_id: vec![0x22; 8],
            ..Default::default()
        }
    }

    #[test]
    fn log_records_become_events_named_by_event_name_or_severity() {
        let mapped = map_logs(&logs(vec![record()]), &settings());
        let event = mapped[0].result.clone().expect("accepted");
        assert_eq!(event.name, "log.warning");
        assert_eq!(event.body, "model fallback");
        assert_eq!((event.session_id.as_str(), event.user_id.as_str()), ("s-1", "u-1"));
        assert_eq!(event.metrics["retry"], 2.0);
        assert_eq!(event.attributes["log.severity"], "warning");
        assert_eq!(event.attributes["trace_id"], "11".repeat(16));
        assert_eq!(event.attributes["service.name"], "chatbot");

        let mut named = record();
        named.event_name = "gen_ai.client.inference.operation.details".into();
        named.severity_text.clear();
        named.body = Some(AnyValue {
            value: Some(Value::KvlistValue(
                opentelemetry_proto::tonic::common::v1::KeyValueList {
                    values: vec![kv("role", text("user"))],
                },
            )),
        });
        let event = map_logs(&logs(vec![named]), &settings())[0].result.clone().unwrap();
        assert_eq!(event.name, "gen_ai.client.inference.operation.details");
        assert_eq!(event.attributes["log.severity"], "warn");
        assert_eq!(event.body, r#"{"role":"user"}"#);

        let mut by_attribute = record();
        by_attribute.attributes.push(kv("event.name", text("feedback given")));
        let event = map_logs(&logs(vec![by_attribute]), &settings())[0]
            .result
            .clone()
            .unwrap();
        assert_eq!(event.name, "feedback_given");
    }

    #[test]
    fn log_ids_follow_content_or_an_explicit_uid() {
        let id = |record: LogRecord| {
            map_logs(&logs(vec![record]), &settings())[0]
                .result
                .clone()
                .unwrap()
                .event_id
        };
        assert_eq!(id(record()), id(record()));
        let mut other = record();
        other.time_unix_nano += 1;
        assert_ne!(id(record()), id(other));
        let uid = "0190b7e4-6f1e-7c3a-9d2b-1f0e5a6b7c8d";
        let mut with_uid = record();
        with_uid.attributes.push(kv("log.record.uid", text(uid)));
        assert_eq!(id(with_uid), uid);
        let mut observed_only = record();
        observed_only.time_unix_nano = 0;
        observed_only.observed_time_unix_nano = START;
        assert!(map_logs(&logs(vec![observed_only]), &settings())[0].result.is_ok());
        let mut timeless = record();
        timeless.time_unix_nano = 0;
        let rejected = map_logs(&logs(vec![timeless]), &settings())[0]
            .result
            .clone()
            .unwrap_err();
        assert_eq!(rejected.field, "time_unix_nano");
    }
}

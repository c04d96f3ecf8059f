//! Per-event cost of the ingestor's CPU path: validation + normalization, then chunked
//! `EventBatch` encoding, for a 500-event request of realistic LLM-call events. The encoding
//! step is what `Ingest::handle` does: plan the chunks from the events as sent (this also
//! measures the request for its size limit), normalise, encode into the plan.

use std::time::{SystemTime, UNIX_EPOCH};

use chute_common::payload::{ChunkPlan, EncodedChunk};
use chute_common::validate::{normalize, timestamp_from_nanos, Limits, RequestContext};
use chute_proto::v1::Event;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn request(now: i64) -> Vec<Event> {
    (0..500)
        .map(|i| Event {
            tenant: "acme".into(),
            name: format!("llm.{}", ["request", "response", "tool_call"][i % 3]),
            time: Some(timestamp_from_nanos(now)),
            session_id: format!("conv-{}", i % 50),
            user_id: format!("user-{}", i % 200),
            attributes: [("model", "chute-large"), ("region", "eu-west-1"), ("route", "/v1/chat")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metrics: [
                ("tokens_in", 512.0),
                ("tokens_out", 128.0),
                ("latency_ms", 231.5),
                ("cost_usd", 0.0031),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            body: String::new(),
            ..Default::default()
        })
        .collect()
}

/// What `Ingest::handle` does with a request's events between the size checks and the publish.
/// Not inlined, so a callgrind run can read its instructions per call (see BENCHMARKS.md).
#[inline(never)]
fn validate_and_encode(events: Vec<Event>, now: i64, limits: &Limits) -> Vec<EncodedChunk> {
    let plan = ChunkPlan::new(&events, 512 * 1024);
    let ctx = RequestContext {
        received_unix_nanos: now,
        key_tenant: None,
        idempotency_key: "bench-key",
    };
    let mut events = events;
    let accepted: Vec<bool> = events
        .iter_mut()
        .enumerate()
        .map(|(i, event)| normalize(event, i, &ctx, limits).is_ok())
        .collect();
    assert!(accepted.iter().all(|&passed| passed));
    plan.encode(&events, &accepted, now, "bench-key")
}

fn bench(c: &mut Criterion) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    let limits = Limits::default();
    let events = request(now);
    let mut group = c.benchmark_group("ingest_cpu_path");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("validate_500", |b| {
        b.iter_batched(
            || events.clone(),
            |mut events| {
                let ctx = RequestContext {
                    received_unix_nanos: now,
                    key_tenant: None,
                    idempotency_key: "bench-key",
                };
                for (i, event) in events.iter_mut().enumerate() {
                    normalize(event, i, &ctx, &limits).unwrap();
                }
                events
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("validate_and_encode_500", |b| {
        b.iter_batched(
            || events.clone(),
            |events| validate_and_encode(events, now, &limits),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

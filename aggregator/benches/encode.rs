//! Encoding cost per event, before and after issue 13 item 1, on the same generated messages
//! (20 messages of 500 LLM-call events, as the ingestor encodes them):
//! - `reference`: prost decode, `validate::check`, one `EventsRow` per event, RowBinary;
//! - `transcode`: the one-pass transcoder (protobuf bytes -> RowBinary, validating as it reads);
//! - `decode_only`: the prost decode alone, which the reader (`PartitionMessage::new`) still does.
//!
//! `cargo bench -p chute-aggregator --bench encode`; report with `cat /proc/loadavg`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chute_aggregator::row::reference;
use chute_aggregator::transcode::Transcoder;
use chute_common::validate::{timestamp_from_nanos, Limits};
use chute_proto::v1::{Event, EventBatch};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;

const MESSAGES: usize = 20;
const EVENTS_PER_MESSAGE: usize = 500;

fn payload(index: usize, now: i64) -> Vec<u8> {
    let events = (0..EVENTS_PER_MESSAGE)
        .map(|i| {
            let n = index * EVENTS_PER_MESSAGE + i;
            Event {
                event_id: uuid::Uuid::from_u128(0x0190_b7e4_6f1e_7c3a_9d2b_0000_0000_0000 + n as u128).to_string(),
                tenant: format!("tenant-{}", n % 4),
                name: ["llm.request", "llm.response", "tool.call"][n % 3].into(),
                time: Some(timestamp_from_nanos(now - (n % 3600) as i64 * 1_000_000_000)),
                session_id: format!("conv-{}", n % 5000),
                user_id: format!("user-{}", n % 1000),
                attributes: [("model", "chute-large"), ("region", "eu-west-1"), ("route", "/v1/chat")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                metrics: [
                    ("tokens_in", (n % 900) as f64),
                    ("tokens_out", (n % 300) as f64),
                    ("latency_ms", 231.5),
                    ("cost_usd", 0.0031),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
                body: String::new(),
            }
        })
        .collect();
    EventBatch {
        version: chute_proto::BATCH_VERSION,
        received_unix_nanos: now,
        idempotency_key: format!("bench-{index}"),
        chunk_index: 0,
        chunk_count: 1,
        events,
    }
    .encode_to_vec()
}

fn bench(c: &mut Criterion) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    let limits = Limits::default();
    let payloads: Vec<Vec<u8>> = (0..MESSAGES).map(|index| payload(index, now)).collect();
    let mut out = Vec::with_capacity(payloads.iter().map(Vec::len).sum());

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements((MESSAGES * EVENTS_PER_MESSAGE) as u64));
    group.sample_size(30).measurement_time(Duration::from_secs(5));
    group.bench_function("reference", |b| {
        b.iter(|| {
            out.clear();
            for payload in &payloads {
                reference::encode_message(payload, &limits, &mut out).unwrap();
            }
            out.len()
        })
    });
    let mut transcoder = Transcoder::default();
    group.bench_function("transcode", |b| {
        b.iter(|| {
            out.clear();
            for payload in &payloads {
                transcoder.transcode(payload, &limits, &mut out).unwrap();
            }
            out.len()
        })
    });
    group.bench_function("decode_only", |b| {
        b.iter(|| {
            payloads
                .iter()
                .map(|payload| chute_common::payload::decode(payload).unwrap().events.len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

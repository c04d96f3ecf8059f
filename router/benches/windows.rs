//! Per-event and per-evaluation cost of the router's windows and anomaly series (pure logic, no
//! I/O): what a threshold or anomaly rule adds to the cost of an event it matches.
//!
//! `cargo bench -p chute-router --bench windows`.
//! - `observe/p99_5m`: one matching event into a p99-over-5-minutes window (sketch update), over
//!   1,000 series (tenant x model);
//! - `observe/count_5m`: the same for a count window (no sketch);
//! - `evaluate/p99_5m`: reading one series' p99 over a full 5-minute window (30 slots, 3,000
//!   latencies spread over 1 ms .. 10 s);
//! - `anomaly/observe`: one matching event into a rate anomaly series, over 1,000 series.

use std::time::Duration;

use chute_router::anomaly::AnomalyStore;
use chute_router::spec::{AnomalySpec, Direction, SeriesValue, Side, ThresholdSpec, WindowValue};
use chute_router::window::{SeriesKey, WindowStore};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const NOW: i64 = 1_800_000_000_000;
const EVENTS: u64 = 10_000;

fn threshold(value: WindowValue) -> ThresholdSpec {
    ThresholdSpec {
        value,
        window: Duration::from_secs(300),
        direction: Direction::Above,
        fire: 2000.0,
        resolve: 1500.0,
        group_by: Some("model".into()),
        min_events: 50,
    }
}

fn keys() -> Vec<SeriesKey> {
    (0..1000)
        .map(|i| SeriesKey {
            rule: 0,
            tenant: format!("tenant-{}", i / 10),
            group: Some(format!("model-{}", i % 10)),
        })
        .collect()
}

/// A latency (ms) between 1 and 10,000, log-spread, from a cheap deterministic sequence.
fn latency(i: u64) -> f64 {
    10f64.powf((i.wrapping_mul(2_654_435_761) % 4000) as f64 / 1000.0)
}

fn bench(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("observe");
    group.throughput(Throughput::Elements(EVENTS));
    for (name, spec) in [
        (
            "p99_5m",
            threshold(WindowValue::Quantile {
                q: 0.99,
                metric: "latency_ms".into(),
            }),
        ),
        ("count_5m", threshold(WindowValue::Count)),
    ] {
        let mut store = WindowStore::new(10_000);
        let mut next = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..EVENTS {
                    next += 1;
                    let key = &keys[(next % 1000) as usize];
                    // Event time within the last 5 minutes.
                    let time = NOW - (next % 300_000) as i64;
                    store.observe(key, &spec, NOW, time, Some(latency(next)), false);
                }
            })
        });
    }
    group.finish();

    let spec = threshold(WindowValue::Quantile {
        q: 0.99,
        metric: "latency_ms".into(),
    });
    let mut store = WindowStore::new(10);
    let key = &keys[0];
    for i in 0..3000u64 {
        store.observe(key, &spec, NOW, NOW - (i * 100) as i64, Some(latency(i)), false);
    }
    c.bench_function("evaluate/p99_5m", |b| b.iter(|| store.evaluate(key, &spec, NOW)));

    let anomaly = AnomalySpec {
        series: SeriesValue::Rate,
        group_by: None,
        sensitivity: 4.0,
        side: Side::Both,
        warmup_minutes: 60,
    };
    let mut store = AnomalyStore::new(10_000, Duration::from_secs(10));
    let mut next = 0u64;
    let mut group = c.benchmark_group("anomaly");
    group.throughput(Throughput::Elements(EVENTS));
    group.bench_function("observe", |b| {
        b.iter(|| {
            for _ in 0..EVENTS {
                next += 1;
                let key = &keys[(next % 1000) as usize];
                store.observe(key, &anomaly, NOW, NOW - (next % 50_000) as i64, None);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Cost per event of finding the rules an event matches (`RuleIndex::matching`), with 10, 100
//! and 1,000 rules parsed from a generated rules file. Target (issue 17): 100 rules <= 1 µs per
//! event.
//!
//! The mix is what a real file looks like: most rules name one event (`svc7.request`), some a
//! prefix (`svc7.*`) or another glob (`*.error`, `svc?.response`), a few look at every event;
//! about half test attributes (equals, in, regex, exists) or metrics (`latency_ms > 2000`), and
//! some are for one tenant. The events are spread over the same service names (and names no
//! rule mentions), with a handful of attributes and metrics each.

use std::fmt::Write as _;

use chute_proto::v1::Event;
use chute_router::rules::{self, RuleIndex};
use chute_router::spec::RuleSet;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// Distinct services in rule and event names.
const SERVICES: usize = 40;

fn rules_file(count: usize) -> String {
    let mut yaml = String::from("rules:\n");
    for i in 0..count {
        let service = (i * 7) % SERVICES;
        let event = match i % 10 {
            0..=5 => format!("svc{service}.request"),
            6 | 7 => format!("\"svc{service}.*\""),
            8 => ["\"*.error\"", "\"svc?.response\"", "\"svc1*.request\""][i % 3].to_owned(),
            _ => "\"*\"".to_owned(),
        };
        let mut body = format!("  - name: rule_{i}\n    match:\n      event: {event}\n");
        match i % 6 {
            0 => body.push_str("      attributes: { model: gpt-4o }\n"),
            1 => body.push_str("      attributes: { model: { in: [gpt-4o, claude-3, llama-3] }, region: eu }\n"),
            2 => body.push_str("      metrics: [\"latency_ms > 2000\"]\n"),
            3 => body.push_str(
                "      attributes: { path: { regex: \"^/api/v[0-9]+/chat\" } }\n      metrics: [\"quality < 0.7\"]\n",
            ),
            4 => body.push_str("      attributes: { error.type: { exists: true } }\n"),
            _ => {}
        }
        if i % 5 == 1 {
            body.push_str("    tenants: [acme, globex]\n");
        }
        body.push_str(if i % 4 == 2 {
            "    threshold: { value: p99(latency_ms), window: 5m, above: 2000 }\n"
        } else {
            "    route: {}\n"
        });
        yaml.push_str(&body);
    }
    yaml
}

fn events() -> Vec<Event> {
    let models = ["gpt-4o", "claude-3", "llama-3", "mistral"];
    let paths = ["/api/v1/chat", "/api/v2/chat/stream", "/web/home", "/api/v1/embed"];
    (0..1024)
        .map(|i: usize| {
            let service = (i * 13) % (SERVICES + 10);
            let kind = ["request", "response", "error"][i % 3];
            let mut event = Event {
                tenant: ["acme", "globex", "initech"][i % 3].to_owned(),
                name: format!("svc{service}.{kind}"),
                ..Event::default()
            };
            event.attributes.insert("model".into(), models[i % 4].into());
            event.attributes.insert("region".into(), ["eu", "us"][i % 2].into());
            event.attributes.insert("path".into(), paths[(i / 2) % 4].into());
            if i % 11 == 3 {
                event.attributes.insert("error.type".into(), "timeout".into());
            }
            event.metrics.insert("latency_ms".into(), ((i * 37) % 4000) as f64);
            event.metrics.insert("quality".into(), (i % 10) as f64 / 10.0);
            event.metrics.insert("tokens".into(), (i * 3) as f64);
            event
        })
        .collect()
}

fn bench_matching(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("rules_matching_per_event");
    for count in [10, 100, 1000] {
        let rule_set: RuleSet = rules::parse(&rules_file(count), &|_| None).expect("generated rules parse");
        let index = RuleIndex::new(&rule_set);
        let matches: usize = events.iter().map(|e| index.matching(&rule_set, e).count()).sum();
        let mut summary = String::new();
        let _ = write!(
            summary,
            "{count} rules: {:.2} matching rules per event",
            matches as f64 / events.len() as f64
        );
        eprintln!("{summary}");
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |b, _| {
            let mut next = 0;
            b.iter(|| {
                next = (next + 1) % events.len();
                index.matching(&rule_set, &events[next]).count()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matching);
criterion_main!(benches);

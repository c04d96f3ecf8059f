//! Route rules through the real ingestor: `ROUTES` holds exactly the matching events, each once,
//! through two kill -9s of the router under load.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{self, event, event_ids, now_ms, Stack};

const RULES: &str = r#"
rules:
  - name: low_quality
    match:
      event: "llm.*"
      metrics: ["quality < 0.7"]
    route: {}
  - name: eu_errors
    tenants: [acme]
    match:
      event: http.request
      attributes: { region: eu, status: { regex: "^5" } }
    route: {}
"#;

const TENANTS: [&str; 2] = ["acme", "globex"];
const REQUESTS: usize = 200;
const PER_REQUEST: usize = 500;

/// Request `r`'s events, and the ids each rule must route: (rule, tenant) -> ids.
fn request(
    r: usize,
    expected: &mut HashMap<(&'static str, &'static str), HashSet<String>>,
) -> Vec<chute_proto::v1::Event> {
    let now = now_ms();
    (0..PER_REQUEST)
        .map(|i| {
            let n = r * PER_REQUEST + i;
            let tenant = TENANTS[n % 2];
            let id = uuid::Uuid::new_v4().to_string();
            let mut e = match n % 3 {
                0 => {
                    let quality = ((n / 3) % 100) as f64 / 100.0;
                    if quality < 0.7 {
                        expected.entry(("low_quality", tenant)).or_default().insert(id.clone());
                    }
                    event(tenant, "llm.request", now, &[("model", "m1")], &[("quality", quality)])
                }
                1 => {
                    let region = match n % 5 {
                        0 => "eu",
                        _ => "us",
                    };
                    let status = match n % 7 {
                        0 => "503",
                        _ => "200",
                    };
                    if tenant == "acme" && region == "eu" && status == "503" {
                        expected.entry(("eu_errors", tenant)).or_default().insert(id.clone());
                    }
                    event(
                        tenant,
                        "http.request",
                        now,
                        &[("region", region), ("status", status)],
                        &[],
                    )
                }
                _ => event(tenant, "llm.response", now, &[], &[("latency_ms", 10.0)]),
            };
            e.event_id = id;
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_exactly_the_matching_events_through_two_kill9s() {
    let stack = Arc::new(Stack::start("router_routing", false).await);
    let rules = stack.rules_file(RULES);
    let flags = ["--ack-wait", "2s"];
    let mut router = stack.router(&rules, &[], &flags);
    support::ready(&router).await;

    let mut expected = HashMap::new();
    let requests: Vec<_> = (0..REQUESTS).map(|r| request(r, &mut expected)).collect();
    let total: usize = expected.values().map(HashSet::len).sum();
    assert!(total > 20_000, "a meaningful share matches: {total}");

    // Four senders; the router is killed twice while they run.
    let requests = Arc::new(requests);
    let mut senders = Vec::new();
    for worker in 0..4 {
        let stack = stack.clone();
        let requests = requests.clone();
        senders.push(tokio::spawn(async move {
            let mut client = stack.client().await;
            for r in (worker..REQUESTS).step_by(4) {
                stack
                    .publish(&mut client, &format!("routing-{r}"), requests[r].clone())
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        router.kill9().await;
        router = stack.router(&rules, &[], &flags);
    }
    for sender in senders {
        sender.await.unwrap();
    }
    support::ready(&router).await;

    let js = stack.jetstream().await;
    wait_routed(&js, "routes.>", total as u64).await;
    // Settle: a late redelivery would show as an extra message if dedup failed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ((rule, tenant), ids) in &expected {
        let stored = event_ids(&js, "ROUTES", &format!("routes.{tenant}.{rule}")).await;
        let doubled: Vec<_> = stored.iter().filter(|(_, count)| **count > 1).collect();
        assert!(doubled.is_empty(), "{rule}/{tenant}: stored twice: {doubled:?}");
        let stored: HashSet<String> = stored.into_keys().collect();
        let missing = ids.difference(&stored).count();
        let extra = stored.difference(ids).count();
        assert_eq!((missing, extra), (0, 0), "{rule}/{tenant}: {} expected", ids.len());
    }
    assert_eq!(
        routed(&js, "routes.>").await,
        total as u64,
        "nothing else in ROUTES (no globex eu_errors: the rule is acme's only)"
    );
    assert!(
        router.metric("chute_router_events_total").await > 0.0,
        "the last router evaluated events"
    );
    router.terminate().await;
}

/// Stored messages on `subject` (wildcards allowed) in ROUTES.
async fn routed(js: &async_nats::jetstream::Context, subject: &str) -> u64 {
    use futures::StreamExt;
    let stream = js.get_stream("ROUTES").await.unwrap();
    let mut subjects = stream.info_with_subjects(subject).await.unwrap();
    let mut total = 0;
    while let Some(Ok((_, count))) = subjects.next().await {
        total += count as u64;
    }
    total
}

/// Waits until ROUTES holds exactly `expected` messages on `subject` (panics on more, or after
/// 120 s).
async fn wait_routed(js: &async_nats::jetstream::Context, subject: &str, expected: u64) {
    let started = Instant::now();
    loop {
        let stored = routed(js, subject).await;
        if stored == expected {
            return;
        }
        assert!(stored < expected, "{subject}: {stored} > {expected}");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{subject}: {stored} of {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rules_file_is_refused_with_its_line_and_the_previous_rules_stay_active() {
    let stack = Stack::start("router_reload", false).await;
    let first = "rules:\n  - name: first\n    match: { event: a.event }\n    route: {}\n";
    let rules = stack.rules_file(first);
    let router = stack.router(&rules, &[], &["--rules-poll", "100ms"]);
    support::ready(&router).await;
    let js = stack.jetstream().await;
    let mut client = stack.client().await;
    let batch = |name: &str, n: usize| {
        (0..n)
            .map(|_| event("acme", name, now_ms(), &[], &[]))
            .collect::<Vec<_>>()
    };

    stack.publish(&mut client, "r1", batch("a.event", 10)).await;
    wait_routed(&js, "routes.acme.first", 10).await;

    // Each bad file is refused, names its line, and routing goes on with the first rules.
    let bad = [
        ("rules:\n  - name: first\n    match:\n      event: a.event\n      attributes: { path: { regex: \"(\" } }\n    route: {}\n", ":5:"),
        ("rules:\n  - name: first\n    match: { event: a.event }\n    threshold: { value: p101(latency_ms), window: 1m, above: 1 }\n", ":4:"),
        ("webhooks:\n  ops: { url: \"ftp://x\", secret_env: S }\nrules: []\n", ":2:"),
    ];
    for (refused, (text, line)) in bad.iter().enumerate() {
        std::fs::write(&rules, text).unwrap();
        let started = Instant::now();
        while router.metric("chute_router_rules_reload_failures_total").await < (refused + 1) as f64 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "bad file {refused} not refused"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_router"))
            .args(["check", "--rules-file", rules.to_str().unwrap()])
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "router check accepts bad file {refused}");
        assert!(stderr.contains(line), "router check names line {line}: {stderr}");
    }
    stack.publish(&mut client, "r2", batch("a.event", 10)).await;
    wait_routed(&js, "routes.acme.first", 20).await;

    // A good file replaces the rules.
    std::fs::write(
        &rules,
        "rules:\n  - name: second\n    match: { event: b.event }\n    route: {}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.publish(&mut client, "r3", batch("a.event", 3)).await;
    stack.publish(&mut client, "r4", batch("b.event", 5)).await;
    wait_routed(&js, "routes.acme.second", 5).await;
    assert_eq!(routed(&js, "routes.acme.first").await, 20, "the first rule is gone");
    router.terminate().await;
}

//! Threshold alerts and anomalies through the whole pipeline: events through the real ingestor,
//! the router process evaluating them, notifications to a real HTTP receiver and `chute.alert` /
//! `chute.anomaly` events landing in ClickHouse through the aggregator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::{self, event, now_ms, webhook_receiver, Received, Stack};

const SECRET: &str = "alerts-test-secret";

fn rules(url: &str) -> String {
    format!(
        r#"
webhooks:
  ops:
    url: {url}
    secret_env: HOOK_SECRET
    max_attempts: 5
    backoff: {{ initial: 100ms, max: 1s }}
rules:
  - name: slow_p99
    match: {{ event: llm.request }}
    threshold:
      value: p99(latency_ms)
      window: 30s
      above: 2000
      resolve: 1500
      group_by: model
      min_events: 20
    webhook: ops
  - name: checkout_rate
    match: {{ event: checkout }}
    anomaly: {{ series: rate, sensitivity: 4, side: up, warmup: 10 }}
    webhook: ops
"#
    )
}

/// The notifications received so far: (kind, state or direction, id) -> deliveries.
fn notifications(received: &Received) -> BTreeMap<(String, String), usize> {
    let mut seen = BTreeMap::new();
    for body in received.bodies() {
        let kind = body["kind"].as_str().unwrap_or_default().to_owned();
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        *seen.entry((kind, id)).or_default() += 1;
    }
    seen
}

/// Sends `per_second` llm.request events of `model` with `latency_ms` for `seconds`.
async fn traffic(stack: &Stack, tag: &str, model: &str, latency_ms: f64, per_second: usize, seconds: u64) {
    let mut client = stack.client().await;
    for second in 0..seconds {
        let started = Instant::now();
        let events = (0..per_second)
            .map(|_| {
                event(
                    "acme",
                    "llm.request",
                    now_ms(),
                    &[("model", model)],
                    &[("latency_ms", latency_ms)],
                )
            })
            .collect();
        stack.publish(&mut client, &format!("{tag}-{second}"), events).await;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_p99_alert_fires_in_one_interval_survives_a_restart_and_resolves_once() {
    let stack = Stack::start("router_alerts", true).await;
    let (url, received) = webhook_receiver().await;
    let rules = stack.rules_file(&rules(&url));
    let env = [("HOOK_SECRET", SECRET)];
    let flags = ["--eval-interval", "1s", "--ack-wait", "2s"];
    let router = stack.router(&rules, &env, &flags);
    support::ready(&router).await;

    traffic(&stack, "calm", "m1", 100.0, 40, 4).await;
    assert!(
        notifications(&received).is_empty(),
        "no alert on calm traffic: {:?}",
        received.bodies()
    );

    // p99 crosses 2000 ms now: the alert must fire within one evaluation interval (+ delivery).
    let crossed = Instant::now();
    traffic(&stack, "slow-a", "m1", 3000.0, 40, 1).await;
    wait_until("the fired alert", Duration::from_secs(10), || {
        received
            .bodies()
            .iter()
            .any(|body| body["kind"] == "alert" && body["state"] == "firing")
    })
    .await;
    let fired_after = crossed.elapsed();
    assert!(
        fired_after < Duration::from_secs(4),
        "fired {fired_after:?} after the crossing"
    );
    let fired = received
        .bodies()
        .into_iter()
        .find(|body| body["kind"] == "alert")
        .unwrap();
    assert_eq!(fired["rule"], "slow_p99");
    assert_eq!(fired["group"], "m1");
    assert!(fired["value"].as_f64().unwrap() > 2000.0, "{fired}");
    let alert_id = fired["alert_id"].as_str().unwrap().to_owned();

    // Restart mid-alert: kill -9 while firing, keep the slow traffic going across it.
    router.kill9().await;
    let slow_traffic = traffic(&stack, "slow-b", "m1", 3000.0, 40, 6);
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let router = stack.router(&rules, &env, &flags);
        support::ready(&router).await;
        router
    };
    let (_, router) = tokio::join!(slow_traffic, restart);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alerts: Vec<_> = notifications(&received)
        .into_iter()
        .filter(|((kind, _), _)| kind == "alert")
        .collect();
    assert_eq!(
        alerts.len(),
        1,
        "one alert, not fired again after the restart: {alerts:?}"
    );

    // Calm again: once the slow events left the 30 s window, the alert resolves, same id.
    traffic(&stack, "calm-b", "m1", 100.0, 40, 34).await;
    wait_until("the resolved alert", Duration::from_secs(20), || {
        received
            .bodies()
            .iter()
            .any(|body| body["kind"] == "alert" && body["state"] == "resolved")
    })
    .await;
    let resolved = received
        .bodies()
        .into_iter()
        .find(|body| body["kind"] == "alert" && body["state"] == "resolved")
        .unwrap();
    assert_eq!(
        resolved["alert_id"],
        alert_id.as_str(),
        "the resolve names the alert it ends"
    );
    let keys: Vec<_> = notifications(&received)
        .into_keys()
        .filter(|(kind, _)| kind == "alert")
        .collect();
    assert_eq!(keys.len(), 2, "exactly one fire and one resolve: {keys:?}");

    // Both transitions are events in ClickHouse too, once each.
    let started = Instant::now();
    loop {
        let stored = stack
            .scalar("SELECT count() FROM events FINAL WHERE tenant = 'acme' AND name = 'chute.alert'")
            .await;
        if stored == 2 {
            break;
        }
        assert!(stored < 2, "chute.alert stored {stored} times");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chute.alert events: {stored} of 2"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    router.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_spike_after_a_restart_from_history_is_one_anomaly_event_and_one_webhook() {
    let stack = Stack::start("router_anomaly", true).await;
    let (url, received) = webhook_receiver().await;
    let mut client = stack.client().await;

    // 40 minutes of history, 30 to 36 checkouts a minute, before the router ever ran.
    let now = now_ms();
    let this_minute = now.div_euclid(60_000) * 60_000;
    let mut history = 0;
    for minute in 1..=40 {
        let start = this_minute - minute * 60_000;
        let count = 30 + (minute * 5 % 7) as usize;
        let events = (0..count)
            .map(|i| event("acme", "checkout", start + i as i64 * 1000, &[], &[("amount", 10.0)]))
            .collect();
        stack.publish(&mut client, &format!("history-{minute}"), events).await;
        history += count as u64;
    }
    let started = Instant::now();
    while stack.scalar("SELECT count() FROM events WHERE name = 'checkout'").await < history {
        assert!(started.elapsed() < Duration::from_secs(60), "history not inserted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let rules = stack.rules_file(&rules(&url));
    let router = stack.router(&rules, &[("HOOK_SECRET", SECRET)], &["--eval-interval", "1s"]);
    support::ready(&router).await;
    // The spike: 400 checkouts in the current minute, sent now.
    let spike_minute = now_ms().div_euclid(60_000) * 60_000;
    let events = (0..400)
        .map(|i| {
            event(
                "acme",
                "checkout",
                spike_minute + (i % 50) as i64 * 100,
                &[],
                &[("amount", 10.0)],
            )
        })
        .collect();
    stack.publish(&mut client, "spike", events).await;

    // The minute closes 10 s after its end; the anomaly follows within an evaluation interval.
    wait_until("the anomaly webhook", Duration::from_secs(90), || {
        received.bodies().iter().any(|body| body["kind"] == "anomaly")
    })
    .await;
    let anomaly = received
        .bodies()
        .into_iter()
        .find(|body| body["kind"] == "anomaly")
        .unwrap();
    assert_eq!(anomaly["rule"], "checkout_rate");
    assert_eq!(anomaly["minute_ms"], spike_minute, "{anomaly}");
    assert_eq!(anomaly["value"].as_f64(), Some(400.0), "{anomaly}");
    assert!(
        anomaly["expected"].as_f64().unwrap() < 40.0,
        "the baseline came from history: {anomaly}"
    );

    let started = Instant::now();
    loop {
        let stored = stack
            .scalar("SELECT count() FROM events FINAL WHERE tenant = 'acme' AND name = 'chute.anomaly'")
            .await;
        if stored == 1 {
            break;
        }
        assert!(stored == 0, "chute.anomaly stored {stored} times");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no chute.anomaly event in ClickHouse"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let keys: Vec<_> = notifications(&received).into_keys().collect();
    assert_eq!(keys.len(), 1, "one anomaly, no alert: {keys:?}");
    router.terminate().await;
}

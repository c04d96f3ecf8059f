//! Webhook deliveries end to end: a real nats-server, the router's dispatcher, and a real HTTP
//! receiver (axum, in process) that verifies every signature the way the README tells receivers
//! to, answers 500 or is down (listener closed), and records what it got.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chute_common::testing::nats::NatsServer;
use chute_router::dlq::{self, DeadLetterReason};
use chute_router::spec::{RuleSet, WebhookSpec};
use chute_router::webhook::{self, Delivery, DeliveryKind};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_it_3f9a";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    attempt: u32,
    body: Bytes,
    answered: StatusCode,
    at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    /// Answer 500 to this many more requests to `/hook`.
    fail_first: AtomicUsize,
    /// Answer 500 to every request to `/hook`.
    always_fail: AtomicBool,
    /// Record this many more requests to `/hook` as answered 200 but hold the answer for 10 s
    /// (a crash of the sender while it waits is the point).
    hold_first: AtomicUsize,
    bad_signatures: AtomicUsize,
    log: Mutex<Vec<Received>>,
}

impl ReceiverState {
    fn log(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Keys answered 2xx, with how many times each was.
    fn delivered(&self) -> BTreeMap<String, usize> {
        let mut delivered = BTreeMap::new();
        for request in self.log().into_iter().filter(|r| r.answered.is_success()) {
            *delivered.entry(request.key).or_default() += 1;
        }
        delivered
    }
}

/// Verifies `Chute-Signature: t=<secs>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` and a
/// timestamp within 5 minutes, as a receiver should.
fn signature_is_valid(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(header) = headers.get("chute-signature").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => signature = Some(value.to_owned()),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return false;
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    if now.abs_diff(timestamp) > 300 {
        return false;
    }
    let Some(tag) = (0..signature.len())
        .step_by(2)
        .map(|i| signature.get(i..i + 2).and_then(|hex| u8::from_str_radix(hex, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

async fn receive(state: &ReceiverState, headers: &HeaderMap, body: Bytes, answer: StatusCode) -> StatusCode {
    if !signature_is_valid(headers, &body) {
        state.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let json: serde_json::Value = serde_json::from_slice(&body).expect("the body is JSON");
    let key = header("idempotency-key");
    assert_eq!(json["id"], key.as_str(), "the body's id is the Idempotency-Key");
    assert_eq!(header("content-type"), "application/json");
    state.log.lock().unwrap().push(Received {
        key,
        attempt: header("chute-delivery-attempt")
            .parse()
            .expect("Chute-Delivery-Attempt"),
        body,
        answered: answer,
        at: Instant::now(),
    });
    answer
}

async fn hook(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if state
        .hold_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let answer = receive(&state, &headers, body, StatusCode::OK).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        return answer;
    }
    let failing = state.always_fail.load(Ordering::SeqCst)
        || state
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let answer = if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    receive(&state, &headers, body, answer).await
}

async fn reject(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    receive(&state, &headers, body, StatusCode::BAD_REQUEST).await
}

/// 429 with `Retry-After: 1` to a key's first request, then 200.
async fn busy(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let seen = state.log().iter().any(|r| r.key == key);
    if seen {
        return receive(&state, &headers, body, StatusCode::OK).await.into_response();
    }
    let status = receive(&state, &headers, body, StatusCode::TOO_MANY_REQUESTS).await;
    (status, [("retry-after", "1")]).into_response()
}

/// A key's first request gets no answer for 5 s (past the sender's timeout), later ones 200.
async fn slow(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let seen = state.log().iter().any(|r| r.key == key);
    if seen {
        return receive(&state, &headers, body, StatusCode::OK).await;
    }
    let answer = receive(&state, &headers, body, StatusCode::GATEWAY_TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    answer
}

/// The HTTP receiver on a fixed loopback port that can be closed and opened again.
struct Receiver {
    state: Arc<ReceiverState>,
    port: u16,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Receiver {
    async fn start() -> Self {
        let mut receiver = Self {
            state: Arc::default(),
            port: chute_common::testing::free_port(),
            running: None,
        };
        receiver.open().await;
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn open(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the receiver's port");
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .route("/reject", post(reject))
            .route("/busy", post(busy))
            .route("/slow", post(slow))
            .with_state(self.state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("receiver server");
        });
        self.running = Some((stop, server));
    }

    /// Stops accepting and closes the listener (connections are refused until `open`).
    async fn close(&mut self) {
        let (stop, server) = self.running.take().expect("the receiver is running");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the receiver stops within 10 s")
            .expect("receiver task");
    }
}

fn destination(name: &str, url: String, max_attempts: u32) -> WebhookSpec {
    WebhookSpec {
        name: name.to_owned(),
        url,
        secret: SECRET.to_owned(),
        timeout: Duration::from_secs(2),
        concurrency: 4,
        max_attempts,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(800),
    }
}

fn delivery(destination: &str, key: &str) -> Delivery {
    Delivery {
        destination: destination.to_owned(),
        idempotency_key: key.to_owned(),
        kind: DeliveryKind::Alert,
        tenant: "acme".to_owned(),
        rule: "p99_latency".to_owned(),
        payload: serde_json::json!({"state": "firing", "value": 2450.0, "threshold": 2000.0}),
    }
}

/// Waits until `done` holds, polling every 100 ms; panics with `what` after `limit`.
async fn wait_until<F: FnMut() -> bool>(what: &str, limit: Duration, mut done: F) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dlq_entries_when(js: &jetstream::Context, count: usize, limit: Duration) -> Vec<dlq::DlqEntry> {
    let deadline = Instant::now() + limit;
    loop {
        let entries = dlq::list(js).await.expect("dlq list");
        if entries.len() >= count {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {count} ROUTES_DLQ entries; have {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Dispatcher {
    shutdown: CancellationToken,
    task: JoinHandle<chute_router::Result<()>>,
}

impl Dispatcher {
    fn start(js: &jetstream::Context, rules: watch::Receiver<Arc<RuleSet>>) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(webhook::run_dispatcher(js.clone(), rules, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Drops the dispatcher as a crash would: nothing is acked or handed back.
    fn kill(self) {
        self.task.abort();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the dispatcher stops within 15 s of shutdown")
            .expect("dispatcher task")
            .expect("dispatcher result");
    }
}

async fn jetstream_for(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect to NATS"));
    webhook::ensure_streams(&js, 1).await.expect("WEBHOOKS and ROUTES_DLQ");
    js
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_survive_errors_and_a_receiver_outage_without_the_dlq() {
    let metrics = chute_common::telemetry::prometheus_handle();
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    receiver.state.fail_first.store(5, Ordering::SeqCst);
    let mut rules = RuleSet::default();
    rules.webhooks.insert(
        "outage_ops".to_owned(),
        destination("outage_ops", receiver.url("/hook"), 60),
    );
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let dispatcher = Dispatcher::start(&js, rules_rx);

    // Phase 1: the receiver answers 500 to the first five requests.
    let first: Vec<String> = (0..10).map(|i| format!("p99_latency:alert-{i}:firing")).collect();
    for key in &first {
        let enqueued = webhook::enqueue(&js, &delivery("outage_ops", key)).await.unwrap();
        assert!(!enqueued.duplicate, "{key} is new");
    }
    // The engine evaluating the same event again after a restart queues nothing new.
    let again = webhook::enqueue(&js, &delivery("outage_ops", &first[0])).await.unwrap();
    assert!(
        again.duplicate,
        "a repeat of the same key inside the duplicate window is not stored"
    );
    wait_until("the first 10 deliveries", Duration::from_secs(30), || {
        receiver.state.delivered().len() == first.len()
    })
    .await;
    let errors = receiver
        .state
        .log()
        .iter()
        .filter(|r| r.answered.is_server_error())
        .count();
    assert_eq!(errors, 5, "the first five requests were answered 500");

    // Phase 2: the receiver is down (listener closed) for 10 s while 10 more are queued.
    receiver.close().await;
    let down_since = Instant::now();
    let second: Vec<String> = (10..20).map(|i| format!("p99_latency:alert-{i}:firing")).collect();
    for key in &second {
        webhook::enqueue(&js, &delivery("outage_ops", key)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_since.elapsed())).await;
    let refused = receiver.state.log().len();
    receiver.open().await;
    wait_until("all 20 deliveries after the outage", Duration::from_secs(30), || {
        receiver.state.delivered().len() == first.len() + second.len()
    })
    .await;

    let log = receiver.state.log();
    assert_eq!(
        receiver.state.bad_signatures.load(Ordering::SeqCst),
        0,
        "every signature verifies"
    );
    let expected: BTreeSet<String> = first.iter().chain(&second).cloned().collect();
    let delivered = receiver.state.delivered();
    assert_eq!(delivered.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(
        delivered.values().all(|&times| times == 1),
        "each delivery was answered 2xx once: {delivered:?}"
    );
    // A retried delivery is the same request again: same key, same body, a higher attempt
    // number (attempts refused while the receiver was down never reached it), the last one
    // answered 2xx; before the outage every attempt reached it: 1, 2, ...
    for key in &expected {
        let requests: Vec<&Received> = log.iter().filter(|r| &r.key == key).collect();
        let attempts: Vec<u32> = requests.iter().map(|r| r.attempt).collect();
        assert!(attempts.windows(2).all(|pair| pair[0] < pair[1]), "{key}: {attempts:?}");
        assert!(requests.last().unwrap().answered.is_success(), "{key}");
        if first.contains(key) {
            assert_eq!(attempts, (1..=requests.len() as u32).collect::<Vec<_>>(), "{key}");
        }
        assert!(
            requests.iter().all(|r| r.body == requests[0].body),
            "{key}: same body on every attempt"
        );
    }
    // Nothing reached the receiver while it was down, and the deliveries queued meanwhile were
    // attempted (connection refused) before it came back.
    assert_eq!(log[..refused].iter().filter(|r| second.contains(&r.key)).count(), 0);
    for key in &second {
        let attempt = log
            .iter()
            .find(|r| &r.key == key && r.answered.is_success())
            .unwrap()
            .attempt;
        assert!(
            attempt > 1,
            "{key} was retried through the outage (delivered at attempt {attempt})"
        );
    }
    let retried = log.iter().filter(|r| r.attempt > 1).count();
    assert!(retried >= 5, "the 500s were retried");
    assert!(dlq::list(&js).await.unwrap().is_empty(), "nothing in ROUTES_DLQ");

    let text = metrics.render();
    let outage = "destination=\"outage_ops\"";
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_attempts_total",
            &[outage, "outcome=\"delivered\""]
        ),
        20.0
    );
    assert!(
        metric(
            &text,
            "chute_router_webhook_failures_total",
            &[outage, "reason=\"http_5xx\""]
        ) >= 5.0
    );
    assert!(
        metric(
            &text,
            "chute_router_webhook_failures_total",
            &[outage, "reason=\"connect\""]
        ) >= 10.0
    );
    assert_eq!(
        metric(&text, "chute_router_webhook_delivery_seconds_count", &[outage]),
        20.0
    );

    dispatcher.stop().await;
    let mut stream = js.get_stream(webhook::WEBHOOKS_STREAM).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "delivered entries leave WEBHOOKS"
    );
    receiver.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_dead_letters_once_and_replay_delivers_it() {
    let metrics = chute_common::telemetry::prometheus_handle();
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    receiver.state.always_fail.store(true, Ordering::SeqCst);
    let mut rules = RuleSet::default();
    for spec in [
        destination("budget_ops", receiver.url("/hook"), 2),
        destination("budget_strict", receiver.url("/reject"), 5),
    ] {
        rules.webhooks.insert(spec.name.clone(), spec);
    }
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let dispatcher = Dispatcher::start(&js, rules_rx);

    webhook::enqueue(&js, &delivery("budget_ops", "budget:exhausted"))
        .await
        .unwrap();
    webhook::enqueue(&js, &delivery("budget_strict", "budget:rejected"))
        .await
        .unwrap();
    webhook::enqueue(&js, &delivery("budget_gone", "budget:gone"))
        .await
        .unwrap();
    let entries = dlq_entries_when(&js, 3, Duration::from_secs(30)).await;
    // Once each: wait a little longer and look again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let entries_later = dlq::list(&js).await.unwrap();
    assert_eq!(entries_later, entries, "each delivery is in ROUTES_DLQ once");
    assert_eq!(entries.len(), 3, "{entries:?}");
    let by_key: BTreeMap<&str, &dlq::DlqEntry> = entries.iter().map(|e| (e.idempotency_key.as_str(), e)).collect();

    let exhausted = by_key["budget:exhausted"];
    assert_eq!(exhausted.reason(), Some(DeadLetterReason::Exhausted));
    assert_eq!(exhausted.attempts, 2);
    assert_eq!(exhausted.destination, "budget_ops");
    assert!(exhausted.error.contains("500"), "{}", exhausted.error);
    assert_eq!(exhausted.delivery["idempotency_key"], "budget:exhausted");

    let rejected = by_key["budget:rejected"];
    assert_eq!(rejected.reason(), Some(DeadLetterReason::Rejected));
    assert_eq!(rejected.attempts, 1, "a 400 is not retried");
    assert!(rejected.error.contains("400"), "{}", rejected.error);

    let gone = by_key["budget:gone"];
    assert_eq!(gone.reason(), Some(DeadLetterReason::UndefinedDestination));
    assert_eq!(gone.attempts, 0);
    assert!(gone.error.contains("budget_gone"), "{}", gone.error);

    let attempts_of = |key: &str| -> Vec<u32> {
        receiver
            .state
            .log()
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.attempt)
            .collect()
    };
    assert_eq!(attempts_of("budget:exhausted"), [1, 2], "max_attempts 2");
    assert_eq!(attempts_of("budget:rejected"), [1]);
    assert_eq!(receiver.state.bad_signatures.load(Ordering::SeqCst), 0);

    // The receiver is fixed; replay the exhausted one (seconds after it was first queued, well
    // inside WEBHOOKS' duplicate window).
    receiver.state.always_fail.store(false, Ordering::SeqCst);
    let replayed = webhook::replay_dead_letters(&js, Some(exhausted.dlq_sequence))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    wait_until("the replayed delivery", Duration::from_secs(20), || {
        receiver.state.delivered().contains_key("budget:exhausted")
    })
    .await;
    let log = receiver.state.log();
    let success = log
        .iter()
        .find(|r| r.key == "budget:exhausted" && r.answered.is_success())
        .unwrap();
    let first_body = &log.iter().find(|r| r.key == "budget:exhausted").unwrap().body;
    assert_eq!(&success.body, first_body, "the replay sends the same delivery");
    let remaining = dlq::list(&js).await.unwrap();
    let keys: BTreeSet<&str> = remaining.iter().map(|e| e.idempotency_key.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["budget:rejected", "budget:gone"]),
        "the replayed entry left the DLQ"
    );

    let text = metrics.render();
    let ops = "destination=\"budget_ops\"";
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_dead_lettered_total",
            &[ops, "reason=\"exhausted\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_dead_lettered_total",
            &["destination=\"budget_gone\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_attempts_total",
            &[ops, "outcome=\"retryable\""]
        ),
        2.0
    );

    dispatcher.stop().await;
    receiver.close().await;
}

#[test]
fn the_alert_rules_use_only_exported_webhook_metrics() {
    let alerts = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml");
    let exported: BTreeSet<&str> = webhook::METRICS.iter().map(|m| m.name).collect();
    let used: BTreeSet<&str> = alerts
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("chute_router_webhook_"))
        .collect();
    assert!(
        used.contains("chute_router_webhook_attempts_total"),
        "alerts.yml has the failing-destination rule"
    );
    for name in used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|base| exported.contains(base)))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "{name} is used by alerts.yml but not in webhook::METRICS"
        );
    }
}

/// The Python snippet the README gives receivers accepts the router's signatures and refuses a
/// changed body, another secret and an old timestamp.
#[test]
fn the_readme_python_verifier_accepts_router_signatures() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let marker = readme
        .find("<!-- webhook-verify")
        .expect("README marks the verification snippet with <!-- webhook-verify");
    let start = marker
        + readme[marker..]
            .find("```python\n")
            .expect("a python block after the marker")
        + 10;
    let snippet = &readme[start..start + readme[start..].find("```").expect("the block ends")];
    let body = webhook::request_body(&delivery("ops", "p99_latency:alert-7:firing"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let fresh = webhook::signature(SECRET, now, &body);
    let old = webhook::signature(SECRET, now - 3600, &body);
    let script = format!(
        "{snippet}\nimport sys\nbody = sys.stdin.buffer.read()\nsecret = {SECRET:?}.encode()\n\
         print(verify(secret, {fresh:?}, body), verify(secret, {fresh:?}, body + b' '),\n\
         verify(b'other', {fresh:?}, body), verify(secret, {old:?}, body))\n"
    );
    let python = format!("{root}/.venv/bin/python");
    let mut child = std::process::Command::new(&python)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("run {python} (python3 -m venv .venv): {err}"));
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&body).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "True False False False");
}

/// A destination that is down, with more deliveries queued than the dispatcher has slots, does
/// not hold up another destination queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_is_down_does_not_stall_the_others() {
    let metrics = chute_common::telemetry::prometheus_handle();
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    // Nothing listens on this port: every attempt is refused, then waits seconds to retry.
    let nowhere = format!("http://127.0.0.1:{}/hook", chute_common::testing::free_port());
    let mut down = destination("stall_down", nowhere, 1000);
    down.concurrency = 1;
    down.backoff_initial = Duration::from_secs(20);
    down.backoff_max = Duration::from_secs(20);
    let mut rules = RuleSet::default();
    rules.webhooks.insert(down.name.clone(), down);
    rules.webhooks.insert(
        "stall_healthy".to_owned(),
        destination("stall_healthy", receiver.url("/hook"), 5),
    );
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));

    // 600 deliveries to the dead destination first (more than the 512 slots), then 5 healthy.
    for i in 0..600 {
        webhook::enqueue(&js, &delivery("stall_down", &format!("stall:down-{i}")))
            .await
            .unwrap();
    }
    let healthy: Vec<String> = (0..5).map(|i| format!("stall:healthy-{i}")).collect();
    for key in &healthy {
        webhook::enqueue(&js, &delivery("stall_healthy", key)).await.unwrap();
    }
    let started = Instant::now();
    let dispatcher = Dispatcher::start(&js, rules_rx);
    wait_until(
        "the healthy destination's deliveries behind 600 stuck ones",
        Duration::from_secs(15),
        || receiver.state.delivered().len() == healthy.len(),
    )
    .await;
    println!("healthy deliveries done {:?} after start", started.elapsed());
    let in_flight = metric(
        &metrics.render(),
        "chute_router_webhook_in_flight",
        &["destination=\"stall_down\""],
    );
    assert!(
        (1.0..=64.0).contains(&in_flight),
        "the dead destination holds at most 64 slots (has {in_flight})"
    );
    assert!(dlq::list(&js).await.unwrap().is_empty());
    dispatcher.stop().await;
    receiver.close().await;
}

/// A healthy destination with a backlog far above its share of slots drains at the speed of its
/// HTTP concurrency: deliveries over the share wait for a place rather than being handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_to_a_healthy_destination_drains_without_hand_backs() {
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    let mut spec = destination("backlog_ops", receiver.url("/hook"), 5);
    spec.concurrency = 16;
    let mut rules = RuleSet::default();
    rules.webhooks.insert(spec.name.clone(), spec);
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let backlog = 1000;
    for i in 0..backlog {
        webhook::enqueue(&js, &delivery("backlog_ops", &format!("backlog:{i}")))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let dispatcher = Dispatcher::start(&js, rules_rx);
    // Handed-back deliveries would come back only after 30 s.
    wait_until("a 1000-delivery backlog", Duration::from_secs(25), || {
        receiver.state.delivered().len() == backlog
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "{backlog} deliveries in {elapsed:?} ({:.0}/s)",
        backlog as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(receiver.state.log().len(), backlog, "no retries were needed");
    dispatcher.stop().await;
    receiver.close().await;
}

/// A dispatcher that dies while a POST is in flight has not acked it: JetStream redelivers it
/// after the ack wait (30 s) and the next dispatcher sends the same request again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_flight_when_the_dispatcher_dies_is_sent_again() {
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    receiver.state.hold_first.store(1, Ordering::SeqCst);
    let mut rules = RuleSet::default();
    rules.webhooks.insert(
        "crash_ops".to_owned(),
        destination("crash_ops", receiver.url("/hook"), 5),
    );
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let key = "p99_latency:alert-crash:firing";
    webhook::enqueue(&js, &delivery("crash_ops", key)).await.unwrap();
    let first = Dispatcher::start(&js, rules_rx.clone());
    wait_until("the first POST", Duration::from_secs(10), || {
        !receiver.state.log().is_empty()
    })
    .await;
    first.kill();
    let killed_at = Instant::now();
    let second = Dispatcher::start(&js, rules_rx);
    wait_until("the redelivery", Duration::from_secs(45), || {
        receiver.state.log().len() >= 2
    })
    .await;
    let redelivered_after = killed_at.elapsed();
    println!("redelivered {redelivered_after:?} after the dispatcher was killed");
    assert!(
        redelivered_after >= Duration::from_secs(15),
        "not before the ack wait ran out ({redelivered_after:?})"
    );
    let log = receiver.state.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log.iter().all(|r| r.key == key), "the same idempotency key");
    assert_eq!(log[0].body, log[1].body, "the same body");
    assert_eq!(
        (log[0].attempt, log[1].attempt),
        (1, 1),
        "the attempt count starts again"
    );
    assert_eq!(receiver.state.bad_signatures.load(Ordering::SeqCst), 0);
    second.stop().await;
    let mut stream = js.get_stream(webhook::WEBHOOKS_STREAM).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "acked after the redelivery"
    );
    assert!(dlq::list(&js).await.unwrap().is_empty());
    receiver.close().await;
}

/// A 429's `Retry-After` is waited out although the backoff is shorter, and an attempt past the
/// destination's timeout is abandoned and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_and_the_attempt_timeout_are_honoured() {
    let metrics = chute_common::telemetry::prometheus_handle();
    let nats = NatsServer::start();
    let js = jetstream_for(&nats).await;
    let mut receiver = Receiver::start().await;
    let mut busy = destination("pace_busy", receiver.url("/busy"), 5);
    busy.backoff_max = Duration::from_secs(5);
    let mut slow = destination("pace_slow", receiver.url("/slow"), 5);
    slow.timeout = Duration::from_millis(500);
    let mut rules = RuleSet::default();
    rules.webhooks.insert(busy.name.clone(), busy);
    rules.webhooks.insert(slow.name.clone(), slow);
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let dispatcher = Dispatcher::start(&js, rules_rx);
    webhook::enqueue(&js, &delivery("pace_busy", "pace:busy"))
        .await
        .unwrap();
    webhook::enqueue(&js, &delivery("pace_slow", "pace:slow"))
        .await
        .unwrap();
    wait_until("both deliveries", Duration::from_secs(20), || {
        receiver.state.delivered().len() == 2
    })
    .await;
    let log = receiver.state.log();
    let requests = |key: &str| -> Vec<Received> { log.iter().filter(|r| r.key == key).cloned().collect() };

    let busy = requests("pace:busy");
    assert_eq!(busy.len(), 2, "{busy:?}");
    let gap = busy[1].at - busy[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 was honoured over a 50 ms backoff (gap {gap:?})"
    );
    assert_eq!((busy[0].attempt, busy[1].attempt), (1, 2));

    let slow = requests("pace:slow");
    assert_eq!(slow.len(), 2, "{slow:?}");
    let gap = slow[1].at - slow[0].at;
    assert!(
        gap >= Duration::from_millis(500) && gap < Duration::from_secs(4),
        "the first attempt was abandoned at its 500 ms timeout, not after the 5 s answer (gap {gap:?})"
    );
    let text = metrics.render();
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_failures_total",
            &["destination=\"pace_slow\"", "reason=\"timeout\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "chute_router_webhook_failures_total",
            &["destination=\"pace_busy\"", "reason=\"http_429\""]
        ),
        1.0
    );
    assert!(dlq::list(&js).await.unwrap().is_empty());
    dispatcher.stop().await;
    receiver.close().await;
}

/// An https destination: the client verifies the server against its trusted roots (a test CA
/// here) and sends the same signed request; a server it does not trust is a connect failure,
/// retried and never sent in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_destinations_are_verified() {
    use chute_common::testing::certs::TestCa;
    use chute_common::tls::{ReloadingConfig, TlsArgs, TlsIncoming};
    use chute_router::webhook::{Attempt, FailureReason, HttpSender};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("chute webhook test CA");
    let server = ca.server("chute webhook receiver");
    std::fs::write(dir.path().join("cert.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &server.key_pem).unwrap();
    let args = TlsArgs {
        cert: Some(dir.path().join("cert.pem")),
        key: Some(dir.path().join("key.pem")),
        ..TlsArgs::default()
    };
    let tls = ReloadingConfig::load(&args, &[b"http/1.1"])
        .expect("server TLS config")
        .expect("TLS is on");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(ReceiverState::default());
    let app = axum::Router::new().route("/hook", post(hook)).with_state(state.clone());
    let incoming = TlsIncoming::new(listener, tls).unwrap();
    let server_task = tokio::spawn(async move {
        let _ = axum::serve(incoming, app).await;
    });

    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let spec = destination("tls_ops", format!("https://127.0.0.1:{port}/hook"), 3);
    let body = Bytes::from(webhook::request_body(&delivery("tls_ops", "tls:1")));
    let trusting = HttpSender::with_roots(roots).unwrap();
    let outcome = trusting.post(&spec, "tls:1", 1, body.clone()).await;
    assert_eq!(outcome, Attempt::Delivered { status: 200 });
    let log = state.log();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].key.as_str(), &log[0].body), ("tls:1", &body));
    assert_eq!(
        state.bad_signatures.load(Ordering::SeqCst),
        0,
        "the signature verifies over TLS too"
    );

    let untrusting = HttpSender::with_roots(rustls::RootCertStore::empty()).unwrap();
    match untrusting.post(&spec, "tls:2", 1, body).await {
        Attempt::Failed { reason, error, .. } => {
            assert_eq!(reason, FailureReason::Connect, "{error}");
            assert!(reason.is_retryable());
            assert!(error.to_lowercase().contains("certificate"), "{error}");
        }
        other => panic!("an untrusted server was accepted: {other:?}"),
    }
    assert_eq!(state.log().len(), 1, "nothing reached the untrusted server's handler");
    server_task.abort();
}

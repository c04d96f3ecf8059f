//! Wires the router: NATS streams and the state bucket, the rules file and its reloads, the
//! durable consumer on `EVENTS`, the evaluation ticker, the webhook dispatcher and `/metrics`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chute_common::admin::{self, Readiness};
use chute_common::error::NatsFailure;
use chute_common::stream::{EVENTS_STREAM, EVENTS_SUBJECT_PREFIX};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{self, Engine};
use crate::evaluate::{Evaluation, Outputs};
use crate::spec::RuleSet;
use crate::{rules, telemetry, webhook, Error, Result};

/// The environment the rules file's `secret_env` names are read from (`main` passes the
/// process's; tests pass their own).
pub type Env = Arc<HashMap<String, String>>;

/// Runs the router until `shutdown`.
pub async fn run(admin_listener: TcpListener, config: Config, env: Env, shutdown: CancellationToken) -> Result<()> {
    telemetry::describe();
    let initial = load_rules(config.rules_file.as_ref(), &env)?;
    telemetry::rules_loaded(initial.rules.len());
    let (rules_tx, rules_rx) = watch::channel(Arc::new(initial));

    let client = config.nats.connect("chute-router").await?;
    let js = jetstream::new(client.clone());
    chute_common::stream::get_or_create(
        &js,
        engine::routes_config(
            config.routes_max_age,
            config.routes_max_bytes,
            config.routes_duplicate_window,
            config.replicas,
        ),
    )
    .await?;
    webhook::ensure_streams(&js, config.replicas).await?;
    let state = chute_common::stream::open_kv_bucket(
        &js,
        &config.state_bucket,
        "Chute router: threshold alert states",
        config.replicas,
        Duration::ZERO,
    )
    .await?;

    let readiness = Readiness::default();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(readiness.clone()),
        shutdown.clone(),
    ));
    if let Some(path) = config.rules_file.clone() {
        tokio::spawn(watch_rules(
            path,
            env.clone(),
            config.rules_poll,
            rules_tx,
            shutdown.clone(),
        ));
    }

    let Some(stream) = wait_for_events_stream(&js, &shutdown).await else {
        let _ = admin_task.await;
        return Ok(());
    };
    let consumer = open_consumer(&stream, &config).await?;

    let outputs = Outputs::new(js.clone(), state, config.partitions);
    let mut evaluation = Evaluation::new(&config);
    let rules_now = rules_rx.borrow().clone();
    evaluation.restore(&outputs, &rules_now).await?;
    if let Some(clickhouse) = config.clickhouse()? {
        let boundary = consumer_boundary(&stream, &config).await;
        crate::seed::seed(
            &clickhouse,
            boundary,
            &rules_now,
            &mut evaluation,
            config.anomaly_history,
        )
        .await;
    }
    let evaluation = Arc::new(Mutex::new(evaluation));
    tokio::spawn(crate::evaluate::run_ticker(
        evaluation.clone(),
        outputs,
        rules_rx.clone(),
        config.eval_interval,
        shutdown.clone(),
    ));
    let dispatcher = tokio::spawn(webhook::run_dispatcher(js.clone(), rules_rx.clone(), shutdown.clone()));
    tokio::spawn(watch_lag(consumer.clone(), shutdown.clone()));

    readiness.set(true);
    tracing::info!(consumer = %config.consumer, rules = rules_rx.borrow().rules.len(), "router started");
    let engine = Engine {
        js,
        rules: rules_rx,
        evaluation,
    };
    let result = engine.run(consumer, shutdown.clone()).await;
    readiness.set(false);
    shutdown.cancel();
    let _ = dispatcher.await;
    let _ = admin_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!("router stopped");
    result
}

/// The rules in `path`, or none without a file.
pub fn load_rules(path: Option<&PathBuf>, env: &Env) -> Result<RuleSet> {
    let Some(path) = path else {
        tracing::warn!("no --rules-file: the router runs with no rules");
        return Ok(RuleSet::default());
    };
    let lookup = |name: &str| env.get(name).cloned();
    rules::load(path, &lookup).map_err(|err| Error::Rules(err.to_string()))
}

/// Reloads the rules file when its contents change. A file that does not validate is refused
/// (logged with the line, counted) and the previous rules stay active.
async fn watch_rules(
    path: PathBuf,
    env: Env,
    poll: Duration,
    rules: watch::Sender<Arc<RuleSet>>,
    shutdown: CancellationToken,
) {
    let mut last = tokio::fs::read(&path).await.ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
        let Ok(contents) = tokio::fs::read(&path).await else {
            continue;
        };
        if last.as_ref() == Some(&contents) {
            continue;
        }
        last = Some(contents);
        match load_rules(Some(&path), &env) {
            Ok(loaded) => {
                tracing::info!(path = %path.display(), rules = loaded.rules.len(), "rules reloaded");
                telemetry::rules_loaded(loaded.rules.len());
                rules.send_replace(Arc::new(loaded));
            }
            Err(err) => telemetry::rules_refused(&err),
        }
    }
}

/// Waits until an ingestor created `EVENTS`; `None` when `shutdown` came first.
async fn wait_for_events_stream(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Option<jetstream::stream::Stream> {
    let mut logged = false;
    loop {
        match js.get_stream(EVENTS_STREAM).await {
            Ok(stream) => return Some(stream),
            Err(err) if !logged => {
                tracing::info!(error = %err, "waiting for an ingestor to create the EVENTS stream");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The router's durable consumer on `EVENTS` (created on first start).
async fn open_consumer(stream: &jetstream::stream::Stream, config: &Config) -> Result<consumer::PullConsumer> {
    let deliver_policy = match config.start.as_str() {
        "all" => consumer::DeliverPolicy::All,
        _ => consumer::DeliverPolicy::New,
    };
    stream
        .get_or_create_consumer(
            &config.consumer,
            consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                description: Some("Chute router: live rules".to_owned()),
                filter_subject: format!("{EVENTS_SUBJECT_PREFIX}.>"),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: config.max_ack_pending,
                deliver_policy,
                inactive_threshold: config.consumer_inactive,
                ..Default::default()
            },
        )
        .await
        .map_err(|err| Error::nats(format!("consumer {} on {EVENTS_STREAM}", config.consumer), err))
}

/// Where the router's consumer resumes (see [`crate::seed`]): the receive time of the last
/// message it acknowledged. A consumer that acknowledged nothing yet and started with new
/// messages resumes after the stream's newest message when it started (what came before is in
/// ClickHouse); with `--start all` nothing is rebuilt (the stream replays what it holds).
async fn consumer_boundary(stream: &jetstream::stream::Stream, config: &Config) -> crate::seed::Boundary {
    use crate::seed::Boundary;
    let mut consumer: consumer::PullConsumer = match stream.get_consumer(&config.consumer).await {
        Ok(consumer) => consumer,
        Err(_) => return Boundary::default(),
    };
    let Ok(info) = consumer.info().await else {
        return Boundary::default();
    };
    let floor = info.ack_floor;
    if floor.stream_sequence == 0 && info.config.deliver_policy != consumer::DeliverPolicy::New {
        return Boundary::default();
    }
    // A new consumer's floor is the stream's last sequence when it was created (or 0).
    if floor.stream_sequence > 0 {
        if let Some(boundary) = Boundary::at_message(stream, floor.stream_sequence).await {
            return boundary;
        }
    }
    // Gone from the stream: trimmed once committed, so ClickHouse holds it.
    Boundary::at_time(floor.last_active.unwrap_or(info.created))
}

/// Keeps `chute_router_pending_messages` current.
async fn watch_lag(mut consumer: consumer::PullConsumer, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(info) = consumer.info().await {
            telemetry::pending(info.num_pending);
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

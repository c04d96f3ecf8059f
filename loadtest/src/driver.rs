//! A load run: connect, subscribe to the live stream, send (open or closed loop), then ask
//! ClickHouse what landed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backlog::BacklogSampler;
use crate::call::{Job, RawRequest};
use crate::client::Client;
use crate::config::{LiveMode, Mode, RunArgs, Transport};
use crate::error::{Error, Result};
use crate::generate::{idempotency_key, key_field, Template};
use crate::live::{LiveMeasurement, LiveReport, LiveSource};
use crate::otlp::{OtlpTemplate, Protocol};
use crate::pacing::{request_budget, Schedule};
use crate::stats::{LatencySummary, Recorder};
use crate::verify::Sent;
use crate::warehouse::{DeliveryReport, RunQuery};

/// Everything a run measured; also the JSON result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub run_id: String,
    pub started_at: String,
    pub mode: String,
    pub transport: String,
    /// Open loop: the intended rate (events/s).
    pub target_rate: Option<f64>,
    pub concurrency: usize,
    pub connections: usize,
    pub events_per_request: usize,
    pub grpc: String,
    pub duration_seconds: f64,
    pub requests: RequestCounts,
    pub events: EventCounts,
    /// Acknowledged events per second over the load phase.
    pub achieved_rate: f64,
    /// Intended send -> acknowledgement (open loop: coordinated omission accounted).
    pub ack_latency: LatencySummary,
    /// Failed attempts by gRPC code (retried or not).
    pub errors: BTreeMap<String, u64>,
    pub clickhouse: Option<DeliveryReport>,
    pub clickhouse_error: Option<String>,
    pub live: Option<LiveReport>,
    pub live_error: Option<String>,
    /// Peak resident memory of the load generator itself (VmHWM), KiB.
    pub loadtest_peak_rss_kib: Option<u64>,
    /// CPU per event of each process (`--pid`, and the load generator) over the load window.
    #[serde(default)]
    pub cpu: Option<crate::cpu::CpuReport>,
    /// The aggregator's backlog over the load window (`--backlog-metrics-url`).
    #[serde(default)]
    pub backlog: Option<crate::backlog::BacklogReport>,
}

/// One fixed-rate latency run in the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateLatency {
    pub label: String,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub ack_p99_ms: f64,
    pub queryable_p99_ms: Option<f64>,
    pub live_p99_ms: Option<f64>,
    pub live_source: Option<String>,
    pub delivery_ok: bool,
    /// `exact`, `NOT exact` or `not verified` ([`delivery_word`]).
    #[serde(default)]
    pub delivery: String,
    /// Run with ClickHouse pinned to one core and the pipeline to the other (`taskset`; label
    /// ending in `-pinned`): reported beside the others, not used for CPU or target checks.
    #[serde(default)]
    pub pinned: bool,
}

impl RateLatency {
    /// The headline figures of an open-loop run.
    pub fn of(run: &RunReport) -> Self {
        Self {
            label: run.label.clone(),
            target_rate: run.target_rate.unwrap_or_default(),
            achieved_rate: run.achieved_rate,
            ack_p99_ms: run.ack_latency.p99_ms,
            queryable_p99_ms: run
                .clickhouse
                .as_ref()
                .map(|delivery| delivery.accepted_to_inserted.p99_ms),
            live_p99_ms: run
                .live
                .as_ref()
                .filter(|live| live.events > 0)
                .map(|live| live.latency.p99_ms),
            live_source: run.live.as_ref().map(|live| live.source.clone()),
            delivery_ok: run.clickhouse.as_ref().is_some_and(|delivery| delivery.ok),
            delivery: delivery_word(run).to_owned(),
            pinned: run.label.ends_with("-pinned"),
        }
    }
}

/// How a run's delivery check ended: `exact`; `NOT exact` (a duplicate or an unexpected event,
/// or events missing after they all had time to land); or `not verified` (no check, or the check
/// gave up, after its timeout or 30 s without progress, while acknowledged events were still
/// missing and none was doubled: they may have landed later).
pub fn delivery_word(run: &RunReport) -> &'static str {
    use crate::verify::Verdict;
    match &run.clickhouse {
        Some(delivery) if delivery.ok => "exact",
        Some(delivery) if !delivery.drained && matches!(delivery.verdict, Verdict::Lost { .. }) => "not verified",
        Some(_) => "NOT exact",
        None => "not verified",
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Attempts, retries included.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub retries: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventCounts {
    pub acked: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Events of failed requests that may have been stored anyway.
    pub unknown: u64,
}

impl RunReport {
    /// The run passed: events were acknowledged and, when checked, landed exactly once.
    pub fn ok(&self) -> bool {
        self.events.acked > 0
            && self.clickhouse_error.is_none()
            && self.clickhouse.as_ref().is_none_or(|delivery| delivery.ok)
    }
}

/// Runs the load described by `args` and returns the report (also written to the JSON file).
pub async fn run(args: &RunArgs) -> Result<RunReport> {
    let endpoints = args.endpoints.load();
    let run_id = args.run_id.clone().unwrap_or_else(new_run_id);
    let workload = args.workload.workload(&run_id);
    let started_unix_nanos = chute_common::validate::unix_nanos_now();
    let mut templates = workload.templates(started_unix_nanos);
    let mut client = Client::connect(
        &endpoints.grpc,
        args.connections,
        args.endpoints.api_key.as_deref(),
        args.request_timeout,
        args.max_retries,
    )
    .await?;
    if args.protocol != Protocol::Chute {
        if args.transport == Transport::Stream {
            return Err(Error::Config(
                "--protocol otlp-* sends unary exports: drop --transport stream".into(),
            ));
        }
        for template in &mut templates {
            template.otlp = Some(OtlpTemplate::new(&template.tenant, &template.events));
        }
        let otlp_http_url = args.otlp_http_url.clone().unwrap_or_else(|| {
            let text = std::fs::read_to_string(&args.endpoints.endpoints_file).unwrap_or_default();
            crate::config::parse_env_file(&text)
                .remove("CHUTE_OTLP_HTTP")
                .unwrap_or_else(|| "http://127.0.0.1:4318".to_owned())
        });
        client = client.with_otlp(args.protocol, &otlp_http_url)?;
    }
    let templates = Arc::new(templates);

    let live_source = match args.live {
        LiveMode::Off => None,
        LiveMode::Sse | LiveMode::Auto if endpoints.query.is_some() => Some(LiveSource::Sse {
            base_url: endpoints.query.clone().expect("checked"),
            tenant: workload.tenant_names()[0].clone(),
            api_key: args.endpoints.api_key.clone(),
        }),
        LiveMode::Sse => return Err(Error::Config("--live sse needs --query-url (CHUTE_QUERY_HTTP)".into())),
        LiveMode::Nats | LiveMode::Auto => Some(LiveSource::Nats {
            url: endpoints.nats.clone(),
        }),
    };
    let mut live_error = None;
    let live = match live_source {
        Some(source) => match LiveMeasurement::start(source, &run_id).await {
            Ok(live) => Some(live),
            Err(err) if args.live == LiveMode::Auto => {
                live_error = Some(err.to_string());
                None
            }
            Err(err) => return Err(err),
        },
        None => None,
    };

    let recorder = Arc::new(Recorder::default());
    let progress = Progress::start(args, recorder.clone());
    let measured = crate::cpu::with_self(&args.pids);
    let cpu_before = crate::cpu::read(&measured);
    let stop = Arc::new(AtomicBool::new(false));
    let backlog = args.backlog_metrics_url.clone().map(|url| {
        let messages_per_second = args.rate / workload.events_per_request as f64;
        let stop_above = args.stop_backlog_seconds.map(|seconds| seconds * messages_per_second);
        BacklogSampler::start(url, workload.events_per_request as f64, stop_above, stop.clone())
    });
    let load_started = Instant::now();
    let load = Load {
        args,
        client: &client,
        templates: &templates,
        run_id: &run_id,
        recorder: &recorder,
        stop: &stop,
    };
    match args.mode {
        Mode::Open => open_loop(load).await,
        Mode::Closed => closed_loop(load).await,
    }
    let elapsed = load_started.elapsed();
    let cpu_after = crate::cpu::read(&measured);
    let backlog = match backlog {
        Some(sampler) => Some(sampler.finish().await),
        None => None,
    };
    progress.finish();
    let cpu = crate::cpu::cpu_report(
        &measured.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>(),
        &cpu_before,
        &cpu_after,
        recorder.events_acked.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        crate::cpu::clock_ticks_per_second(),
    );

    // Events acknowledged last may still be on their way to the live subscriber.
    let live = match live {
        Some(live) => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match live.finish().await {
                Ok(report) => Some(report),
                Err(err) => {
                    live_error = Some(err.to_string());
                    None
                }
            }
        }
        None => None,
    };

    let sent = Sent {
        acked: recorder.events_acked.load(Ordering::Relaxed),
        unknown: recorder.events_unknown.load(Ordering::Relaxed),
    };
    let (clickhouse, clickhouse_error) = if args.no_verify {
        (None, None)
    } else {
        let client = args
            .endpoints
            .clickhouse(&endpoints.clickhouse)?
            .with_database(&args.endpoints.clickhouse_login.database);
        let tenants = workload.tenant_names();
        let query = RunQuery {
            client: &client,
            run_id: &run_id,
            tenants: &tenants,
            since_ms: started_unix_nanos / 1_000_000 - 1,
        };
        if !args.no_progress {
            eprintln!(
                "waiting up to {:?} for ClickHouse to hold all {} acknowledged events",
                args.drain_timeout, sent.acked
            );
        }
        match query
            .wait_and_verify(sent, args.drain_timeout, Duration::from_millis(500))
            .await
        {
            Ok(report) => (Some(report), None),
            Err(err) => (None, Some(err.to_string())),
        }
    };

    let report = RunReport {
        label: args.label.clone(),
        run_id,
        started_at: rfc3339(started_unix_nanos),
        mode: format!("{:?}", args.mode).to_lowercase(),
        transport: format!("{:?}", args.transport).to_lowercase(),
        target_rate: (args.mode == Mode::Open).then_some(args.rate),
        concurrency: args.concurrency,
        connections: args.connections,
        events_per_request: workload.events_per_request,
        grpc: endpoints.grpc,
        duration_seconds: elapsed.as_secs_f64(),
        requests: RequestCounts {
            sent: recorder.requests_sent.load(Ordering::Relaxed),
            acked: recorder.requests_acked.load(Ordering::Relaxed),
            failed: recorder.requests_failed.load(Ordering::Relaxed),
            retries: recorder.retries.load(Ordering::Relaxed),
        },
        events: EventCounts {
            acked: sent.acked,
            rejected: recorder.events_rejected.load(Ordering::Relaxed),
            failed: recorder.events_failed.load(Ordering::Relaxed),
            unknown: sent.unknown,
        },
        achieved_rate: sent.acked as f64 / elapsed.as_secs_f64().max(1e-9),
        ack_latency: recorder.latency(),
        errors: recorder.errors(),
        clickhouse,
        clickhouse_error,
        live,
        live_error,
        loadtest_peak_rss_kib: peak_rss_kib(),
        cpu: Some(cpu),
        backlog,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(".local/loadtest").join(format!("{}.json", report.run_id)));
    crate::json::write_json(&out, &report)?;
    Ok(report)
}

/// The request of sequence number `index`.
fn job(templates: &[Template], run_id: &str, index: u64, intended: Instant) -> Job {
    let template = &templates[(index % templates.len() as u64) as usize];
    let key = idempotency_key(run_id, index);
    let request = match &template.otlp {
        // The export's spans get the request's own trace id; the key field is not sent.
        Some(otlp) => RawRequest {
            events: otlp.request(&crate::otlp::trace_id(&key)),
            key_field: Bytes::new(),
            event_count: template.events.len() as u64,
        },
        None => RawRequest {
            events: template.encoded_events.clone(),
            key_field: key_field(&key),
            event_count: template.events.len() as u64,
        },
    };
    Job {
        request,
        intended,
        attempts: 0,
    }
}

/// What a load loop drives: the request templates, the client, and where results go.
#[derive(Clone, Copy)]
struct Load<'a> {
    args: &'a RunArgs,
    client: &'a Client,
    templates: &'a Arc<Vec<Template>>,
    run_id: &'a str,
    recorder: &'a Arc<Recorder>,
    /// Raised by the backlog sampler (`--stop-backlog-seconds`): the open loop stops sending.
    stop: &'a AtomicBool,
}

/// Open loop: requests leave at their intended times, whatever the latency.
async fn open_loop(load: Load<'_>) {
    let (args, client, templates) = (load.args, load.client, load.templates);
    let (run_id, recorder) = (load.run_id, load.recorder);
    let events_per_request = templates[0].events.len();
    let schedule = Schedule::new(args.rate.max(0.001), events_per_request);
    let total = schedule.total_requests(args.duration, args.events, events_per_request);
    let start = Instant::now();
    match args.transport {
        Transport::Unary => {
            let max_inflight = args.max_inflight.clamp(1, Semaphore::MAX_PERMITS) as u32;
            let slots = Arc::new(Semaphore::new(max_inflight as usize));
            for index in 0..total {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                let intended = start + schedule.intended_offset(index);
                tokio::time::sleep_until(intended.into()).await;
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let job = job(templates, run_id, index, intended);
                let (client, recorder) = (client.clone(), recorder.clone());
                tokio::spawn(async move {
                    client.publish(index as usize, job, &recorder).await;
                    drop(permit);
                });
            }
            let _all = slots.acquire_many(max_inflight).await;
        }
        Transport::Stream => {
            let streams = args.streams.max(1);
            let capacity = (args.max_inflight / streams).max(1);
            let mut senders = Vec::with_capacity(streams);
            let mut workers = Vec::with_capacity(streams);
            for stream in 0..streams {
                let (sender, receiver) = mpsc::channel(capacity);
                senders.push(sender);
                let (client, recorder, window) = (client.clone(), recorder.clone(), args.stream_window);
                workers.push(tokio::spawn(async move {
                    client.stream_worker(stream, receiver, window, false, recorder).await
                }));
            }
            for index in 0..total {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                let intended = start + schedule.intended_offset(index);
                tokio::time::sleep_until(intended.into()).await;
                let job = job(templates, run_id, index, intended);
                let _ = senders[(index % streams as u64) as usize].send(job).await;
            }
            drop(senders);
            for worker in workers {
                let _ = worker.await;
            }
        }
    }
}

/// Closed loop: each worker sends its next request once the previous one is acknowledged.
async fn closed_loop(load: Load<'_>) {
    let (args, client, templates) = (load.args, load.client, load.templates);
    let (run_id, recorder) = (load.run_id, load.recorder);
    let budget = request_budget(args.events, templates[0].events.len());
    let deadline = Instant::now() + args.duration;
    let next = Arc::new(AtomicU64::new(0));
    let take = move || {
        let index = next.fetch_add(1, Ordering::Relaxed);
        (index < budget && Instant::now() < deadline).then_some(index)
    };
    let mut workers = Vec::with_capacity(args.concurrency.max(1));
    for worker in 0..args.concurrency.max(1) {
        let (client, recorder, templates, run_id, take) = (
            client.clone(),
            recorder.clone(),
            templates.clone(),
            run_id.to_owned(),
            take.clone(),
        );
        match args.transport {
            Transport::Unary => workers.push(tokio::spawn(async move {
                while let Some(index) = take() {
                    let job = job(&templates, &run_id, index, Instant::now());
                    client.publish(worker, job, &recorder).await;
                }
            })),
            Transport::Stream => {
                let (sender, receiver) = mpsc::channel(1);
                let window = args.stream_window;
                workers.push(tokio::spawn(async move {
                    client.stream_worker(worker, receiver, window, true, recorder).await
                }));
                workers.push(tokio::spawn(async move {
                    while let Some(index) = take() {
                        if sender
                            .send(job(&templates, &run_id, index, Instant::now()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }));
            }
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// The progress bar: elapsed against the planned duration, live rate, errors, in flight.
struct Progress {
    bar: ProgressBar,
    stop: CancellationToken,
}

impl Progress {
    fn start(args: &RunArgs, recorder: Arc<Recorder>) -> Self {
        let bar = if args.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(args.duration.as_millis() as u64), ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let stop = CancellationToken::new();
        let started = Instant::now();
        let (ticker_bar, ticker_stop) = (bar.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut window: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
            loop {
                tokio::select! {
                    _ = ticker_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let acked = recorder.events_acked.load(Ordering::Relaxed);
                window.push_back((now, acked));
                while window.len() > 5 {
                    window.pop_front();
                }
                let (then, before) = window[0];
                let rate = (acked - before) as f64 / now.duration_since(then).as_secs_f64().max(0.25);
                ticker_bar.set_position(started.elapsed().as_millis() as u64);
                ticker_bar.set_message(format!(
                    "acked {acked} ev | {} ev/s | errors {} | in flight {}",
                    rate.round(),
                    recorder.error_count(),
                    recorder.inflight.load(Ordering::Relaxed)
                ));
            }
        });
        Self { bar, stop }
    }

    fn finish(self) {
        self.stop.cancel();
        self.bar.finish_and_clear();
    }
}

fn new_run_id() -> String {
    format!(
        "lt-{}-{:04x}",
        time::OffsetDateTime::now_utc().unix_timestamp(),
        rand::random::<u16>()
    )
}

fn rfc3339(unix_nanos: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nanos))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// VmHWM of this process (Linux), KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// `VmHWM` (peak resident set) from a `/proc/<pid>/status` text, KiB.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_from_proc_status() {
        let status = "Name:\tingestor\nVmPeak:\t  900 kB\nVmHWM:\t   51234 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(51234));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }
}

//! A few seconds of load through a real pipeline — nats-server, the ClickHouse dev server, an
//! in-process ingestor and aggregator — then the exact loss/duplicate check.

use std::time::Duration;

use chute_common::config::NO_ENV;
use chute_common::testing::nats::NatsServer;
use chute_loadtest::verify::Verdict;
use chute_loadtest::Cli;
use chute_schema::testing::ClickHouseServer;
use tokio_util::sync::CancellationToken;

struct Pipeline {
    nats: NatsServer,
    clickhouse: ClickHouseServer,
    database: String,
    grpc: String,
    /// The ingestor's OTLP/HTTP base URL (OTLP/gRPC is served on `grpc` too).
    otlp_http: String,
    /// The aggregator's admin address (`/metrics`).
    aggregator_admin: String,
    shutdown: CancellationToken,
}

impl Pipeline {
    async fn start(database: &str) -> Self {
        let nats = NatsServer::start();
        let clickhouse = ClickHouseServer::start().await;
        clickhouse.migrate(database).await;
        let shutdown = CancellationToken::new();
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap().to_string();
        let otlp_http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let otlp_http = format!("http://{}", otlp_http_listener.local_addr().unwrap());
        let ingestor = chute_ingestor::Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            ..Default::default()
        };
        tokio::spawn(chute_ingestor::run_with_otlp(
            grpc_listener,
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            chute_ingestor::OtlpListeners {
                grpc: None,
                http: Some(otlp_http_listener),
            },
            ingestor,
            Default::default(),
            shutdown.clone(),
        ));
        let aggregator = chute_aggregator::Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            clickhouse_url: clickhouse.url(),
            clickhouse_login: chute_common::config::ClickHouseLoginArgs::for_database(database),
            ..Default::default()
        };
        let aggregator_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let aggregator_admin = aggregator_listener.local_addr().unwrap().to_string();
        tokio::spawn(chute_aggregator::run(aggregator_listener, aggregator, shutdown.clone()));
        let pipeline = Self {
            nats,
            clickhouse,
            database: database.to_owned(),
            grpc,
            otlp_http,
            aggregator_admin,
            shutdown,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&pipeline.grpc).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        pipeline
    }

    fn args(&self, out: &std::path::Path, extra: &[&str]) -> chute_loadtest::config::RunArgs {
        self.cli(&["loadtest"], out, extra).run
    }

    /// `loadtest <prefix...> <this pipeline's endpoints> --out OUT <extra...>`.
    fn cli(&self, prefix: &[&str], out: &std::path::Path, extra: &[&str]) -> Cli {
        let nats = self.nats.url();
        let clickhouse = self.clickhouse.url();
        let mut argv = prefix.to_vec();
        argv.extend_from_slice(&[
            "--endpoints-file",
            "/nonexistent/endpoints.env",
            "--grpc",
            &self.grpc,
            "--otlp-http-url",
            &self.otlp_http,
            "--nats-url",
            &nats,
            "--clickhouse-url",
            &clickhouse,
            "--clickhouse-database",
            &self.database,
            "--live",
            "nats",
            "--no-progress",
            "--drain-timeout",
            "60s",
            "--out",
            out.to_str().unwrap(),
        ]);
        argv.extend_from_slice(extra);
        chute_common::config::load(argv, NO_ENV).expect("loadtest flags parse")
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn assert_exact(report: &chute_loadtest::RunReport) {
    let delivery = report
        .clickhouse
        .as_ref()
        .unwrap_or_else(|| panic!("no ClickHouse check: {report:?}"));
    assert!(report.events.acked > 0, "{report:?}");
    assert_eq!(report.events.failed, 0, "{report:?}");
    assert_eq!(delivery.verdict, Verdict::Exact, "{delivery:?}");
    assert_eq!(delivery.stored.unique, report.events.acked);
    assert_eq!(delivery.stored.rows, report.events.acked);
    assert!(
        delivery.accepted_to_inserted.count == report.events.acked,
        "{delivery:?}"
    );
    assert!(report.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_runs_land_exactly_once() {
    let pipeline = Pipeline::start("loadtest_it").await;
    let dir = tempfile::tempdir().unwrap();

    // Closed loop over unary Publish.
    let closed = dir.path().join("closed.json");
    let args = pipeline.args(
        &closed,
        &[
            "--mode",
            "closed",
            "--duration",
            "3s",
            "--concurrency",
            "4",
            "--events-per-request",
            "50",
        ],
    );
    let report = chute_loadtest::run(&args).await.expect("closed-loop run");
    assert_exact(&report);
    assert!(report.ack_latency.count > 0 && report.ack_latency.p99_ms > 0.0);
    let live = report.live.as_ref().expect("live latency measured over NATS");
    assert_eq!(live.events, report.events.acked, "the live subscriber saw every event");
    let written: chute_loadtest::RunReport = serde_json::from_slice(&std::fs::read(&closed).unwrap()).unwrap();
    assert_eq!(written.run_id, report.run_id);

    // Open loop over PublishStream, at a fixed rate with an event budget, measuring the CPU of
    // nats-server (the ingestor and aggregator run in this process: `loadtest` counts them).
    let open = dir.path().join("open.json");
    let nats_pid = format!("nats-server={}", pipeline.nats.pid().expect("nats-server runs"));
    let args = pipeline.args(
        &open,
        &[
            "--pid",
            &nats_pid,
            "--mode",
            "open",
            "--rate",
            "2000",
            "--duration",
            "3s",
            "--events",
            "5000",
            "--transport",
            "stream",
            "--events-per-request",
            "20",
        ],
    );
    let report = chute_loadtest::run(&args).await.expect("open-loop run");
    assert_exact(&report);
    // 3 s at 2000/s = 6000 events, capped by the 5000-event budget.
    assert_eq!(report.events.acked, 5000);
    assert!(
        report.achieved_rate > 1000.0 && report.achieved_rate < 3000.0,
        "{}",
        report.achieved_rate
    );
    let cpu = report.cpu.as_ref().expect("CPU per event measured");
    assert_eq!(cpu.events, 5000);
    assert!(cpu.missing.is_empty(), "{cpu:?}");
    // 5000 events in ~2.5 s: nats-server and this process each spend at least a clock tick.
    for name in ["nats-server", "loadtest"] {
        let us = cpu.cpu_us_per_event[name];
        assert!(us > 0.0 && us < 10_000.0, "{name}: {us} µs/event; {cpu:?}");
    }
    assert_eq!(
        cpu.chute_path_cpu_us_per_event, None,
        "no ingestor/aggregator pid given"
    );
}

/// `--protocol otlp-grpc|otlp-http`: the same workload as OTLP trace exports (one span per
/// event) through the ingestor's OTLP services lands exactly once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_load_runs_land_exactly_once() {
    let pipeline = Pipeline::start("loadtest_it_otlp").await;
    let dir = tempfile::tempdir().unwrap();
    let mut acked = 0;
    for protocol in ["otlp-grpc", "otlp-http"] {
        let out = dir.path().join(format!("{protocol}.json"));
        let args = pipeline.args(
            &out,
            &[
                "--protocol",
                protocol,
                "--mode",
                "open",
                "--rate",
                "1000",
                "--duration",
                "2s",
                "--events",
                "1000",
                "--events-per-request",
                "20",
            ],
        );
        let report = chute_loadtest::run(&args)
            .await
            .unwrap_or_else(|err| panic!("{protocol} run: {err}"));
        assert_eq!(report.events.acked, 1000, "{protocol}: {report:?}");
        assert_eq!(report.events.rejected, 0, "{protocol}: {report:?}");
        assert_exact(&report);
        acked += report.events.acked;
    }
    assert_eq!(acked, 2000);
}

/// `loadtest steady`: bisection over short open-loop probes against the real pipeline, the
/// backlog read from the aggregator's own `/metrics`; a rate the pipeline keeps up with passes,
/// and a criterion nobody meets fails every probe with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_search_probes_the_pipeline_and_judges_each_rate() {
    let pipeline = Pipeline::start("loadtest_steady").await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("http://{}/metrics", pipeline.aggregator_admin);
    let search = |max_p99: &'static str, probes: &'static str| {
        let cli = pipeline.cli(
            &["loadtest", "steady"],
            &dir.path().join("unused.json"),
            &[
                "--backlog-metrics-url",
                &metrics,
                "--from",
                "1000",
                "--to",
                "5000",
                "--probes",
                probes,
                "--probe-duration",
                "4s",
                "--resolution",
                "500",
                "--max-queryable-p99",
                max_p99,
                "--events-per-request",
                "50",
                "--probe-dir",
                dir.path().to_str().unwrap(),
            ],
        );
        match cli.command {
            Some(chute_loadtest::config::Command::Steady(args)) => args,
            other => panic!("not the steady subcommand: {other:?}"),
        }
    };

    // 3,000 then 4,000 events/s: a debug-build pipeline keeps up with both within 10 s p99.
    let report = chute_loadtest::steady::run(&search("10s", "2")).await.expect("search");
    let rates: Vec<f64> = report.probes.iter().map(|probe| probe.rate).collect();
    assert_eq!(rates, [3_000.0, 4_000.0], "{:?}", report.probes);
    for (probe, run) in report.probes.iter().zip(&report.runs) {
        assert!(probe.passed, "{probe:?}");
        assert_exact(run);
        let backlog = run.backlog.as_ref().expect("backlog sampled");
        assert!(backlog.samples >= 3, "{backlog:?}");
        assert!(!backlog.stopped_early, "{backlog:?}");
        assert!(dir.path().join(format!("probe-{:07.0}.json", probe.rate)).exists());
    }
    assert_eq!(report.steady_state_events_per_s, Some(4_000.0));
    assert_eq!(report.lowest_failing_events_per_s, None);

    // Nobody lands events within 1 ms: the probe fails on that and says so.
    let report = chute_loadtest::steady::run(&search("1ms", "1")).await.expect("search");
    assert_eq!(report.probes.len(), 1);
    let probe = &report.probes[0];
    assert!(!probe.passed, "{probe:?}");
    assert!(
        probe.run.delivery_ok,
        "the failing criterion is latency, not delivery: {probe:?}"
    );
    assert!(
        probe.reasons.iter().any(|reason| reason.contains("queryable p99")),
        "{probe:?}"
    );
    assert_eq!(report.steady_state_events_per_s, None);
    assert_eq!(report.lowest_failing_events_per_s, Some(3_000.0));
}

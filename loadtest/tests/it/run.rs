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
        tokio::spawn(chute_aggregator::run(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            aggregator,
            shutdown.clone(),
        ));
        let pipeline = Self {
            nats,
            clickhouse,
            database: database.to_owned(),
            grpc,
            otlp_http,
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
        let nats = self.nats.url();
        let clickhouse = self.clickhouse.url();
        let mut argv = vec![
            "loadtest",
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
        ];
        argv.extend_from_slice(extra);
        let cli: Cli = chute_common::config::load(argv, NO_ENV).expect("loadtest flags parse");
        cli.run
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

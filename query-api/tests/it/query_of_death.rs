//! A query of death: 200 clients asking `/v1/top` over 30 days with a different `to` each time
//! (every request a cache miss), while the aggregator inserts a steady ingest load. The query
//! gate keeps ClickHouse to a few queries at a time, so the aggregator's insert latency
//! (`chute_aggregator_insert_duration_seconds`) stays close to what it was before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::{Event, PublishRequest};
use tokio_util::sync::CancellationToken;

use crate::edge::RunningApi;
use crate::support::*;

const CLIENTS: usize = 200;
const PHASE: Duration = Duration::from_secs(10);
const DAY_MS: i64 = 24 * HOUR_MS;

/// The insert-latency histogram as (upper bound, cumulative count) pairs, plus sum and count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

fn insert_histogram() -> Histogram {
    let text = chute_common::telemetry::prometheus_handle().render();
    let name = "chute_aggregator_insert_duration_seconds";
    let mut histogram = Histogram::default();
    for line in text.lines().filter(|line| line.starts_with(name)) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        if let Some(le) = series.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let le = le.trim_end_matches("\"}");
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            histogram.buckets.push((bound, value.parse().unwrap()));
        } else if series == format!("{name}_sum") {
            histogram.sum = value.parse().unwrap();
        } else if series == format!("{name}_count") {
            histogram.count = value.parse().unwrap();
        }
    }
    histogram
}

/// Inserts between two snapshots: count, mean and the p99 bucket's upper bound (seconds).
fn between(before: &Histogram, after: &Histogram) -> (u64, f64, f64) {
    let count = after.count - before.count;
    let mean = (after.sum - before.sum) / count.max(1) as f64;
    let earlier = |bound: f64| {
        before
            .buckets
            .iter()
            .find(|(le, _)| *le == bound)
            .map_or(0, |(_, cumulative)| *cumulative)
    };
    let wanted = (count as f64 * 0.99).ceil() as u64;
    let p99 = after
        .buckets
        .iter()
        .find(|(le, cumulative)| cumulative - earlier(*le) >= wanted)
        .map_or(f64::INFINITY, |(le, _)| *le);
    (count, mean, p99)
}

/// What a storm did: the aggregator's inserts meanwhile and the answers by status.
struct Storm {
    inserts: (u64, f64, f64),
    statuses: std::collections::BTreeMap<u16, u64>,
}

/// 200 clients for [`PHASE`], each asking `/v1/top` over 30 days ending at a different minute
/// (top by name widens to whole minutes, so nearly every request misses the cache) as soon as
/// it has its answer, or one second after a 503 (its Retry-After).
async fn storm(addr: std::net::SocketAddr, now: i64) -> Storm {
    let querying = Arc::new(AtomicBool::new(true));
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (querying, statuses) = (querying.clone(), statuses.clone());
            tokio::spawn(async move {
                let mut round = 0i64;
                while querying.load(Ordering::Relaxed) {
                    round += 1;
                    let minute = (client as i64 * 7_919 + round * 104_729) % (30 * 24 * 60);
                    let to = now - minute * 60_000 - 30_000;
                    let uri = format!("/v1/top?tenant=acme&by=name&from={}&to={to}", to - 30 * DAY_MS);
                    let (status, _) = chute_common::testing::http_get(addr, &uri).await;
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                    if status == 503 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            })
        })
        .collect();
    let start = insert_histogram();
    tokio::time::sleep(PHASE).await;
    let end = insert_histogram();
    querying.store(false, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("every query client stops within 30 s")
            .unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    Storm {
        inserts: between(&start, &end),
        statuses,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_of_death_leaves_the_aggregators_inserts_unharmed() {
    // 30 days of history for the queries to chew on, straight into ClickHouse.
    let running = RunningApi::start("qa_query_of_death", |_| {}).await;
    let now = now_ms();
    let history = generate(11, 200_000, now - 30 * DAY_MS, 30 * 24 * 60);
    running.api.insert(&history).await;

    // Ingestor -> NATS -> aggregator -> the same database, in this process.
    let nats = chute_common::testing::nats::NatsServer::start();
    let shutdown = CancellationToken::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let ingestor_config = chute_ingestor::Config {
        nats: chute_common::config::NatsArgs::with_url(nats.url()),
        ..Default::default()
    };
    let ingestor_admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ingestor = tokio::spawn(chute_ingestor::run(
        grpc,
        ingestor_admin,
        ingestor_config,
        shutdown.clone(),
    ));
    let mut aggregator_config = chute_aggregator::Config {
        nats: chute_common::config::NatsArgs::with_url(nats.url()),
        clickhouse_url: server().url(),
        ..Default::default()
    };
    aggregator_config.clickhouse_login.database = running.api.database.clone();
    // On a runtime of its own, as in its own process: the test's 200 clients must not starve
    // its tasks, only ClickHouse may.
    let aggregator_admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    aggregator_admin.set_nonblocking(true).unwrap();
    let aggregator_admin_addr = aggregator_admin.local_addr().unwrap();
    let aggregator = std::thread::spawn({
        let shutdown = shutdown.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = tokio::net::TcpListener::from_std(aggregator_admin).unwrap();
                chute_aggregator::run(admin, aggregator_config, shutdown).await
            })
        }
    });

    // The aggregator first (its ledger must exist before the stream holds messages).
    let deadline = Instant::now() + Duration::from_secs(60);
    while chute_common::testing::http_get(aggregator_admin_addr, "/readyz")
        .await
        .0
        != 200
    {
        assert!(
            !aggregator.is_finished(),
            "the aggregator stopped: {:?}",
            aggregator.join()
        );
        assert!(Instant::now() < deadline, "the aggregator never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A steady load: 100 events every 50 ms (2,000 events/s).
    let mut client = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match IngestServiceClient::connect(format!("http://{grpc_addr}")).await {
                Ok(client) => break client,
                Err(err) => {
                    assert!(Instant::now() < deadline, "the ingestor never listened: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let loading = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (loading, accepted) = (loading.clone(), accepted.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut batch = 0u64;
            while loading.load(Ordering::Relaxed) {
                tick.tick().await;
                batch += 1;
                let events = generate(1000 + batch, 100, now_ms() - 1_000, 1)
                    .into_iter()
                    .map(|row| Event {
                        tenant: "acme".into(),
                        name: row.name,
                        user_id: row.user_id,
                        session_id: row.session_id,
                        metrics: row.metrics.into_iter().collect(),
                        attributes: row.attributes.into_iter().collect(),
                        ..Default::default()
                    })
                    .collect();
                let request = PublishRequest {
                    events,
                    idempotency_key: format!("qod-{batch}"),
                };
                if let Ok(response) = client.publish(request).await {
                    accepted.fetch_add(u64::from(response.into_inner().accepted), Ordering::Relaxed);
                }
            }
        }
    });

    // Warm up until inserts flow, then measure a quiet phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    while insert_histogram().count < 5 {
        assert!(!ingestor.is_finished(), "the ingestor stopped: {:?}", ingestor.await);
        assert!(
            !aggregator.is_finished(),
            "the aggregator stopped: {:?}",
            aggregator.join()
        );
        assert!(
            Instant::now() < deadline,
            "the aggregator never inserted ({} events accepted)",
            accepted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet_start = insert_histogram();
    tokio::time::sleep(PHASE).await;
    let quiet_end = insert_histogram();

    // The query of death against the query API as configured (the gate's defaults), then, for
    // comparison, against a second one whose gate lets every query through.
    let gated = storm(running.addr, now).await;
    let ungated_api = RunningApi::start("qa_query_of_death_ungated", |config| {
        config.clickhouse_database = running.api.database.clone();
        config.max_concurrent_queries = CLIENTS;
        config.max_queued_queries = CLIENTS;
    })
    .await;
    let ungated = storm(ungated_api.addr, now).await;
    loading.store(false, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .unwrap()
        .unwrap();

    let quiet = between(&quiet_start, &quiet_end);
    let report = |name: &str, (inserts, mean, p99): (u64, f64, f64)| {
        format!(
            "{name}: {inserts} inserts, mean {:.1} ms, p99 <= {:.0} ms",
            mean * 1e3,
            p99 * 1e3
        )
    };
    println!(
        "query of death: {CLIENTS} clients, /v1/top over 30 days, each answered query at once \
         followed by the next (after Retry-After on 503); {} events accepted.\n  \
         aggregator inserts {}\n  {} (answers {:?})\n  {} (answers {:?})",
        accepted.load(Ordering::Relaxed),
        report("before", quiet),
        report("during, gated", gated.inserts),
        gated.statuses,
        report("during, ungated", ungated.inserts),
        ungated.statuses,
    );
    let ((quiet_count, quiet_mean, quiet_p99), (storm_count, storm_mean, storm_p99)) = (quiet, gated.inserts);
    assert!(quiet_count > 0 && storm_count > 0, "inserts must keep flowing");
    assert!(
        gated.statuses.get(&200).copied().unwrap_or(0) > 0,
        "the queries themselves are answered: {:?}",
        gated.statuses
    );
    // Generous (2 shared cores run ClickHouse, the services and the 200 clients, and CI runs
    // other tests beside): the p99 bucket may move up, not to the ungated 5 s; the mean stays
    // within 6x or half a second (ungated it passed a second).
    let bound = (quiet_p99 * 4.0).max(2.5);
    assert!(
        storm_p99 <= bound,
        "insert p99 went from <= {quiet_p99} s to <= {storm_p99} s under the query storm (bound {bound} s)"
    );
    assert!(
        storm_mean <= (quiet_mean * 6.0).max(0.5),
        "insert mean {quiet_mean} s -> {storm_mean} s"
    );
    ungated_api.stop().await;
    shutdown.cancel();
    running.stop().await;
}

//! Wiring: NATS, the ledger bucket, the dead-letter stream, ClickHouse, the admin server, and
//! the pipeline loop.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self, kv};
use chute_common::admin::{self, Readiness};
use chute_common::stream::DLQ_STREAM;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::commit::Committer;
use crate::config::Config;
use crate::consumer::ReadBufferLimits;
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::pipeline::Pipeline;
use crate::writer::Backoff;
use crate::{consumer, dlq, telemetry};

/// Runs the aggregator until `shutdown` is cancelled, then drains (final flush and commit,
/// leases released).
pub async fn run(admin_listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<()> {
    telemetry::describe();
    let client = config.nats.connect("chute-aggregator").await?;
    let js = jetstream::new(client.clone());
    at_start("dead-letter stream", || dlq::ensure_stream(&js, config.replicas)).await?;
    let ledger = at_start("ledger bucket", || open_ledger(&js, &config)).await?;

    let instance_id = config
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("agg-{}", uuid::Uuid::now_v7().simple()));
    let readiness = Readiness::default();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(readiness.clone()),
        shutdown.clone(),
    ));
    tokio::spawn(watch_dlq(js.clone(), shutdown.clone()));

    let Some(stream) = wait_for_events_stream(&js, &shutdown).await else {
        let _ = admin_task.await;
        return Ok(());
    };
    let epoch = bind_ledger(&ledger, &stream, &config).await?;
    // Trimming starts only once the ledger is known to describe this stream: positions of
    // another incarnation must never purge anything.
    tokio::spawn(crate::trim::run(
        js.clone(),
        ledger.clone(),
        instance_id.clone(),
        config.trim_settings(),
        shutdown.clone(),
    ));
    let committer = Arc::new(Committer {
        instance_id: instance_id.clone(),
        lease: config.lease_ttl,
        limits: config.limits(),
        ledger: ledger.clone(),
        jetstream: js.clone(),
        clickhouse: config.clickhouse()?,
        backoff: Backoff::default(),
        replay_claims: at_start("replay-claims bucket", || replay_claims_bucket(&js, &config)).await?,
    });
    let pipeline = Pipeline {
        instance_id: instance_id.clone(),
        partitions: config.partitions,
        lease: config.lease_ttl,
        batch_limits: config.batch_limits(),
        ledger,
        stream,
        epoch,
        read_buffer: ReadBufferLimits {
            messages: config.read_buffer_messages,
            bytes: config.read_buffer_bytes as usize,
        },
        pull_max_bytes: consumer::pull_max_bytes(client.server_info().max_payload),
        drain_timeout: config.drain_timeout,
        stall_after: config.stall_after,
        readiness: readiness.clone(),
        committer,
    };
    tracing::info!(instance = %instance_id, partitions = config.partitions, epoch, "aggregator starting");
    let result = Arc::new(pipeline).run(shutdown.clone()).await;
    readiness.set(false);
    shutdown.cancel();
    let _ = admin_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!(instance = %instance_id, "aggregator stopped");
    result
}

/// Waits until the `EVENTS` stream exists; `None` when `shutdown` came first. Ingestors create
/// it with their settings (size, replicas, retention). The aggregator never creates it: with
/// defaults it would reserve 16 GiB of JetStream storage that the operator may have sized down,
/// and it has nothing to read before an ingestor is up anyway.
async fn wait_for_events_stream(js: &jetstream::Context, shutdown: &CancellationToken) -> Option<Stream> {
    let started = tokio::time::Instant::now();
    let mut next_log = started;
    loop {
        match consumer::events_stream(js).await {
            Ok(stream) => return Some(stream),
            Err(err) if tokio::time::Instant::now() >= next_log => {
                tracing::info!(
                    error = %err,
                    waited_s = started.elapsed().as_secs(),
                    "waiting for an ingestor to create the EVENTS stream"
                );
                next_log += Duration::from_secs(30);
            }
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Binds the ledger to the `EVENTS` stream incarnation (its epoch, `stream_epoch`) and returns it.
/// Refuses to start when the ledger belongs to another incarnation, or when it is missing while
/// the stream and ClickHouse already hold data: either way, positions would be guessed.
async fn bind_ledger(ledger: &Ledger, stream: &Stream, config: &Config) -> Result<i64> {
    let info = stream.cached_info();
    let epoch = chute_common::stream::stream_epoch(info);
    let last_sequence = info.state.last_sequence;
    let (state, revision) = at_start("ledger read", || ledger.read()).await?;
    if revision == 0 && last_sequence > 0 && events_table_has_rows(config).await? {
        return Err(Error::LedgerMissing {
            stream: info.config.name.clone(),
            last_sequence,
        });
    }
    if state.stream_epoch == epoch {
        return Ok(epoch);
    }
    match ledger.update(|state| state.bind_epoch(epoch)).await? {
        Ok(adopted) => {
            if adopted {
                tracing::info!(epoch, "ledger bound to the EVENTS stream");
            }
            Ok(epoch)
        }
        Err(ledger_epoch) => Err(Error::EpochMismatch {
            stream: info.config.name.clone(),
            ledger_epoch,
            stream_epoch: epoch,
        }),
    }
}

/// How long a start-up step against JetStream is retried before the aggregator gives up.
const START_RETRY_FOR: Duration = Duration::from_secs(60);

/// Runs a start-up step against JetStream, retried for up to [`START_RETRY_FOR`]: a cluster that
/// just created a bucket, is electing a leader, or has a node down answers late or "temporarily
/// unavailable" for a while, and exiting would leave an orchestrator to restart the aggregator
/// with a growing back-off instead.
async fn at_start<T, Step, Stepping>(what: &str, mut step: Step) -> Result<T>
where
    Step: FnMut() -> Stepping,
    Stepping: std::future::Future<Output = Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut attempt = 0u64;
    loop {
        match step().await {
            Ok(done) => return Ok(done),
            Err(err) if started.elapsed() < START_RETRY_FOR => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %err, step = what, waited_s = started.elapsed().as_secs(), "start-up step failed; retrying for up to a minute");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn events_table_has_rows(config: &Config) -> Result<bool> {
    let rows: Option<u8> = config
        .clickhouse()?
        .query("SELECT 1 FROM ? LIMIT 1")
        .bind(clickhouse::sql::Identifier(chute_schema::row::EVENTS_TABLE))
        .fetch_optional()
        .await?;
    Ok(rows.is_some())
}

/// The ledger in its KV bucket (created if missing, scaled up to `--ledger-replicas`).
pub async fn open_ledger(js: &jetstream::Context, config: &Config) -> Result<Ledger> {
    Ledger::open(js, &config.ledger_bucket, config.ledger_replicas()).await
}

/// The bucket of replay claims (`commit.rs`): `<ledger bucket>_replays`. A claim must outlive
/// the dead-letter entry it names (EVENTS_DLQ keeps 30 days), so a replay re-run while the
/// entry still exists always finds it.
pub async fn replay_claims_bucket(js: &jetstream::Context, config: &Config) -> Result<kv::Store> {
    let name = format!("{}_replays", config.ledger_bucket);
    chute_common::stream::open_kv_bucket(
        js,
        &name,
        "Chute aggregator: which batch inserted each replayed dead-letter message",
        config.ledger_replicas(),
        Duration::from_secs(31 * 86_400),
    )
    .await
    .map_err(|err| Error::ledger(format!("open bucket {name}"), err))
}

/// Keeps the DLQ size gauge current.
async fn watch_dlq(js: jetstream::Context, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(mut stream) = js.get_stream(DLQ_STREAM).await {
            if let Ok(info) = stream.info().await {
                telemetry::dlq_size(info.state.messages);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use chute_common::error::NatsFailure;

    #[tokio::test(start_paused = true)]
    async fn a_start_up_step_is_retried_for_a_minute_then_its_error_returned() {
        let calls = AtomicU32::new(0);
        let done = at_start("test", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=9 => Err(Error::nats("test", "temporarily unavailable")),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(done.unwrap(), 10, "succeeds at the eleventh try");

        let started = tokio::time::Instant::now();
        let failed: Result<()> = at_start("test", || async { Err(Error::nats("test", "no quorum")) }).await;
        assert!(failed.unwrap_err().to_string().contains("no quorum"));
        let waited = started.elapsed();
        assert!(
            (START_RETRY_FOR..START_RETRY_FOR + Duration::from_secs(1)).contains(&waited),
            "{waited:?}"
        );
    }
}

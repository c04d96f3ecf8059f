//! The raw ceilings of the pipeline's two storage hops, measured with the load generator's own
//! rows and batches so the end-to-end rate can be read as a fraction of them:
//!
//! - ClickHouse: the generated events, normalized as the ingestor does and encoded into rows by
//!   the aggregator's own code, inserted by the aggregator's own insert function (same settings:
//!   dedup token, `optimize_on_insert=0`, batches of `--batch-rows`) into a fresh database with
//!   the full schema (raw table and every rollup view), one insert at a time.
//! - JetStream: the same `EventBatch` payloads published to a scratch stream with the EVENTS
//!   stream's settings, `Nats-Msg-Id` on every message, with up to `--publish-window` PubAcks
//!   outstanding (the ingestor's in-flight bound).
//!
//! Preparing rows and payloads happens off the clock; only the inserts and publishes are timed.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chute_aggregator::consumer::PartitionMessage;
use chute_common::payload::encode_chunks;
use chute_common::stream::StreamSettings;
use chute_common::validate::{normalize, unix_nanos_now, Limits, RequestContext};
use chute_proto::v1::Event;
use chute_schema::{Migrator, Target};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::{CeilingArgs, CeilingKind};
use crate::error::{Error, Result};
use crate::generate::{idempotency_key, Template};

/// The ingestor's default `--max-message-bytes`.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// Scratch streams of the JetStream ceiling (`<name>` or `<name>_<i>`; deleted afterwards).
const CEILING_STREAM: &str = "CHUTE_BENCH_CEILING";
/// Partitions the published messages are spread over, as the ingestor does.
const PARTITIONS: u64 = 16;
/// Storage each scratch stream may use (JetStream reserves it up front).
const CEILING_STREAM_BYTES: i64 = 4 << 30;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CeilingReport {
    pub rows: u64,
    pub batch_rows: usize,
    pub events_per_request: usize,
    /// Average encoded size of one event in a JetStream payload, bytes.
    pub event_bytes: f64,
    pub insert_batches: u64,
    pub insert_seconds: f64,
    pub insert_rows_per_second: f64,
    pub jetstream_messages: u64,
    pub jetstream_events: u64,
    pub jetstream_seconds: f64,
    pub jetstream_events_per_second: f64,
    pub jetstream_mib_per_second: f64,
    /// Scratch streams and their replicas in the JetStream ceiling.
    #[serde(default)]
    pub jetstream_streams: usize,
    #[serde(default)]
    pub jetstream_replicas: usize,
}

pub async fn run(args: &CeilingArgs) -> Result<CeilingReport> {
    let endpoints = args.endpoints.load();
    let run_id = format!("ceiling-{}", unix_nanos_now() / 1_000_000);
    let workload = args.workload.workload(&run_id);
    let templates = workload.templates(unix_nanos_now());
    let events_per_request = workload.events_per_request;
    let requests = args.rows.div_ceil(events_per_request) as u64;

    let mut report = CeilingReport {
        batch_rows: args.batch_rows,
        events_per_request,
        ..Default::default()
    };
    let ceiling = Ceiling {
        args,
        templates: &templates,
        run_id: &run_id,
        requests,
    };
    if args.only != CeilingKind::Jetstream {
        ceiling.insert(&endpoints.clickhouse, &mut report).await?;
    }
    if args.only != CeilingKind::Clickhouse {
        ceiling.jetstream(&endpoints.nats, &mut report).await?;
    }
    if let Some(out) = &args.out {
        crate::json::write_json(out, &report)?;
    }
    Ok(report)
}

/// Normalizes a request's events as the ingestor would (event ids derived from the key) and
/// encodes them as the JetStream payload(s) the ingestor would publish.
fn payloads(template: &Template, key: &str, received_unix_nanos: i64) -> Vec<Bytes> {
    let limits = Limits::default();
    let ctx = RequestContext {
        received_unix_nanos,
        key_tenant: None,
        idempotency_key: key,
    };
    let events: Vec<Event> = template
        .events
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, mut event)| {
            normalize(&mut event, index, &ctx, &limits).expect("generated events are valid");
            event
        })
        .collect();
    encode_chunks(events, received_unix_nanos, key, MAX_MESSAGE_BYTES)
        .into_iter()
        .map(|chunk| chunk.payload)
        .collect()
}

/// The rows the aggregator would insert for requests `first..first + count` (RowBinary, count).
fn rows(templates: &[Template], run_id: &str, first: u64, count: u64) -> (Bytes, usize) {
    let received = unix_nanos_now();
    let messages: Vec<PartitionMessage> = (first..first + count)
        .flat_map(|index| {
            let template = &templates[(index % templates.len() as u64) as usize];
            payloads(template, &idempotency_key(run_id, index), received)
        })
        .enumerate()
        .map(|(sequence, payload)| PartitionMessage::new(0, 0, sequence as u64 + 1, 0, payload))
        .collect();
    let encoded = chute_aggregator::row::encode(messages, &Limits::default());
    debug_assert!(encoded.poison.is_empty());
    (encoded.rows, encoded.row_count)
}

/// One ceiling run: the same requests measured against ClickHouse and against JetStream.
struct Ceiling<'a> {
    args: &'a CeilingArgs,
    templates: &'a [Template],
    run_id: &'a str,
    requests: u64,
}

impl Ceiling<'_> {
    async fn insert(&self, url: &str, report: &mut CeilingReport) -> Result<()> {
        let admin = self.args.endpoints.clickhouse(url)?;
        admin
            .query(&format!("DROP DATABASE IF EXISTS `{}`", self.args.ceiling_database))
            .execute()
            .await?;
        Migrator::new(admin.clone(), Target::single(&self.args.ceiling_database))
            .run()
            .await
            .map_err(|err| Error::Migrate(err.to_string()))?;
        let client = admin.with_database(&self.args.ceiling_database);
        let requests_per_batch = (self.args.batch_rows / self.templates[0].events.len()).max(1) as u64;
        let deadline = Instant::now() + self.args.timeout;
        let mut timed = Duration::ZERO;
        let mut first = 0;
        while first < self.requests && Instant::now() < deadline {
            let count = requests_per_batch.min(self.requests - first);
            let (rows, row_count) = rows(self.templates, self.run_id, first, count);
            let token = format!("{}:{first}", self.run_id);
            let started = Instant::now();
            chute_aggregator::writer::insert_batch(&client, rows, row_count, &token)
                .await
                .map_err(|err| Error::Insert(err.to_string()))?;
            timed += started.elapsed();
            report.rows += row_count as u64;
            report.insert_batches += 1;
            first += count;
        }
        report.insert_seconds = timed.as_secs_f64();
        report.insert_rows_per_second = report.rows as f64 / report.insert_seconds.max(1e-9);
        Ok(())
    }

    async fn jetstream(&self, url: &str, report: &mut CeilingReport) -> Result<()> {
        let client = async_nats::connect(chute_common::stream::server_list(url))
            .await
            .map_err(|err| Error::Nats(format!("connect {url}: {err}")))?;
        let js = jetstream::new(client.clone());
        let streams = self.args.jetstream_streams.clamp(1, PARTITIONS as usize) as u64;
        let names: Vec<String> = (0..streams)
            .map(|i| {
                if streams == 1 {
                    CEILING_STREAM.to_owned()
                } else {
                    format!("{CEILING_STREAM}_{i}")
                }
            })
            .collect();
        for (i, name) in names.iter().enumerate() {
            let _ = js.delete_stream(name).await;
            let config = jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("bench.ceiling.{i}.>")],
                description: Some("loadtest ceiling scratch stream (deleted after the measurement)".to_owned()),
                num_replicas: self.args.jetstream_replicas.max(1),
                max_bytes: CEILING_STREAM_BYTES,
                ..StreamSettings::default().events_config(0)
            };
            js.create_stream(config)
                .await
                .map_err(|err| Error::Nats(format!("create {name}: {err}")))?;
        }
        report.jetstream_streams = streams as usize;
        report.jetstream_replicas = self.args.jetstream_replicas.max(1);

        // One payload set per template, published under distinct message ids.
        let received = unix_nanos_now();
        let prepared: Vec<Vec<Bytes>> = self
            .templates
            .iter()
            .enumerate()
            .map(|(index, template)| payloads(template, &idempotency_key(self.run_id, index as u64), received))
            .collect();
        let events_per_request = self.templates[0].events.len() as u64;
        let bytes_per_request: f64 = prepared
            .iter()
            .flatten()
            .map(|payload| payload.len() as f64)
            .sum::<f64>()
            / prepared.len() as f64;
        report.event_bytes = bytes_per_request / events_per_request as f64;

        let deadline = Instant::now() + self.args.timeout;
        let started = Instant::now();
        let mut acks = FuturesUnordered::new();
        let mut published_bytes = 0u64;
        let mut failure = None;
        'publish: for index in 0..self.requests {
            if Instant::now() >= deadline {
                break;
            }
            for (chunk, payload) in prepared[(index % prepared.len() as u64) as usize].iter().enumerate() {
                while acks.len() >= self.args.publish_window.max(1) {
                    if let Some(Err(err)) = acks.next().await {
                        failure = Some(err);
                        break 'publish;
                    }
                }
                let message = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("{}-{index}-{chunk}", self.run_id));
                let partition = index % PARTITIONS;
                let subject = format!("bench.ceiling.{}.{partition}", partition % streams);
                match js.send_publish(subject, message).await {
                    Ok(ack) => acks.push(ack.into_future()),
                    Err(err) => {
                        failure = Some(err);
                        break 'publish;
                    }
                }
                published_bytes += payload.len() as u64;
                report.jetstream_messages += 1;
            }
            report.jetstream_events += events_per_request;
        }
        while let Some(result) = acks.next().await {
            if let Err(err) = result {
                failure.get_or_insert(err);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        for name in &names {
            let _ = js.delete_stream(name).await;
        }
        if let Some(err) = failure {
            return Err(Error::Nats(format!("ceiling publish: {err}")));
        }
        report.jetstream_seconds = elapsed;
        report.jetstream_events_per_second = report.jetstream_events as f64 / elapsed.max(1e-9);
        report.jetstream_mib_per_second = published_bytes as f64 / elapsed.max(1e-9) / (1024.0 * 1024.0);
        Ok(())
    }
}

//! Accepted -> live latency: how long after the ingestor accepted an event a live-stream
//! subscriber sees it.
//!
//! Two sources: the query API's `GET /v1/stream` (Server-Sent Events, what a dashboard uses;
//! each event carries `ingested_at_ms`), or — when no query API is configured — a core NATS
//! subscription on `events.*` decoded here (each batch carries the ingestor's receive time in
//! nanoseconds). The subscriber runs inside the load generator, on the same clock as the
//! ingestor (one machine).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::generate::RUN_ID_ATTRIBUTE;
use crate::stats::{new_histogram, LatencySummary};

/// Where live latency is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveSource {
    /// The query API's SSE endpoint, e.g. `http://127.0.0.1:7420`, for one tenant.
    Sse {
        base_url: String,
        tenant: String,
        api_key: Option<String>,
    },
    /// A core NATS subscription on `events.*`.
    Nats { url: String },
}

/// The result of a live measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveReport {
    /// `sse` or `nats`.
    pub source: String,
    /// The tenant whose events were sampled (SSE streams are per tenant); empty for NATS.
    pub sampled_tenant: String,
    /// Events of this run seen.
    pub events: u64,
    /// Events the query API skipped because this subscriber fell behind.
    pub lagged_missed: u64,
    pub latency: LatencySummary,
}

#[derive(Default)]
struct Collected {
    histogram: Option<Histogram<u64>>,
    events: u64,
    lagged: u64,
}

/// A running subscriber; [`LiveMeasurement::finish`] stops it and summarizes.
pub struct LiveMeasurement {
    source: LiveSource,
    collected: Arc<Mutex<Collected>>,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl LiveMeasurement {
    /// Subscribes and returns once the subscription is in place (events accepted after this
    /// returns are seen).
    pub async fn start(source: LiveSource, run_id: &str) -> Result<Self> {
        let collected = Arc::new(Mutex::new(Collected {
            histogram: Some(new_histogram()),
            ..Default::default()
        }));
        let stop = CancellationToken::new();
        let task = match &source {
            LiveSource::Sse {
                base_url,
                tenant,
                api_key,
            } => {
                let reader = open_sse(base_url, tenant, api_key.as_deref()).await?;
                tokio::spawn(read_sse(reader, run_id.to_owned(), collected.clone(), stop.clone()))
            }
            LiveSource::Nats { url } => {
                let client = async_nats::connect(chute_common::stream::server_list(url))
                    .await
                    .map_err(|err| Error::Nats(format!("connect {url}: {err}")))?;
                let subject = format!("{}.*", chute_common::stream::EVENTS_SUBJECT_PREFIX);
                let subscriber = client
                    .subscribe(subject)
                    .await
                    .map_err(|err| Error::Nats(err.to_string()))?;
                client.flush().await.map_err(|err| Error::Nats(err.to_string()))?;
                tokio::spawn(read_nats(
                    client,
                    subscriber,
                    run_id.to_owned(),
                    collected.clone(),
                    stop.clone(),
                ))
            }
        };
        Ok(Self {
            source,
            collected,
            stop,
            task,
        })
    }

    /// Stops the subscriber and summarizes what it saw.
    pub async fn finish(self) -> Result<LiveReport> {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result?,
            Err(err) => return Err(Error::Live(format!("subscriber task failed: {err}"))),
        }
        let mut collected = self.collected.lock().expect("live lock");
        let histogram = collected.histogram.take().unwrap_or_else(new_histogram);
        let (source, sampled_tenant) = match &self.source {
            LiveSource::Sse { tenant, .. } => ("sse", tenant.clone()),
            LiveSource::Nats { .. } => ("nats", String::new()),
        };
        Ok(LiveReport {
            source: source.to_owned(),
            sampled_tenant,
            events: collected.events,
            lagged_missed: collected.lagged,
            latency: LatencySummary::from_micros(&histogram),
        })
    }
}

/// Opens `GET /v1/stream?tenant=..` as HTTP/1.0, so the body comes close-delimited (no
/// chunked framing to undo), and returns the reader positioned after the response head.
async fn open_sse(base_url: &str, tenant: &str, api_key: Option<&str>) -> Result<BufReader<TcpStream>> {
    let authority = base_url
        .strip_prefix("http://")
        .ok_or_else(|| Error::Config(format!("query API url must be http://host:port, got {base_url}")))?
        .trim_end_matches('/');
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|err| Error::Live(format!("connect {authority}: {err}")))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut head =
        format!("GET /v1/stream?tenant={tenant} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/event-stream\r\n");
    if let Some(key) = api_key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    head.push_str("\r\n");
    reader
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .map_err(|err| Error::Live(err.to_string()))?;
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .await
        .map_err(|err| Error::Live(err.to_string()))?;
    if !status.contains(" 200") {
        return Err(Error::Live(format!(
            "GET {base_url}/v1/stream answered {}",
            status.trim()
        )));
    }
    loop {
        let mut line = String::new();
        let read = reader
            .read_line(&mut line)
            .await
            .map_err(|err| Error::Live(err.to_string()))?;
        if read == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if line.to_ascii_lowercase().starts_with("transfer-encoding: chunked") {
            return Err(Error::Live(
                "the SSE response is chunked; expected a close-delimited body".into(),
            ));
        }
    }
    Ok(reader)
}

/// The fields of an SSE `event` needed here.
#[derive(Deserialize)]
struct LiveEventJson {
    ingested_at_ms: i64,
    #[serde(default)]
    attributes: HashMap<String, String>,
}

async fn read_sse(
    mut reader: BufReader<TcpStream>,
    run_id: String,
    collected: Arc<Mutex<Collected>>,
    stop: CancellationToken,
) -> Result<()> {
    let mut event_type = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let read = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            read = reader.read_line(&mut line) => read.map_err(|err| Error::Live(err.to_string()))?,
        };
        if read == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("event:") {
            event_type = name.trim().to_owned();
        } else if let Some(data) = line.strip_prefix("data:") {
            let now = chute_common::validate::unix_nanos_now() / 1_000;
            let mut collected = collected.lock().expect("live lock");
            match event_type.as_str() {
                "event" => {
                    let Ok(event) = serde_json::from_str::<LiveEventJson>(data.trim()) else {
                        continue;
                    };
                    if event.attributes.get(RUN_ID_ATTRIBUTE) != Some(&run_id) {
                        continue;
                    }
                    collected.events += 1;
                    let latency = (now - event.ingested_at_ms * 1000).max(1) as u64;
                    if let Some(histogram) = collected.histogram.as_mut() {
                        histogram.saturating_record(latency);
                    }
                }
                "lagged" => {
                    let missed = serde_json::from_str::<serde_json::Value>(data.trim())
                        .ok()
                        .and_then(|value| value["missed"].as_u64())
                        .unwrap_or(0);
                    collected.lagged += missed;
                }
                _ => {}
            }
        } else if line.is_empty() {
            event_type.clear();
        }
    }
}

async fn read_nats(
    _client: async_nats::Client,
    mut subscriber: async_nats::Subscriber,
    run_id: String,
    collected: Arc<Mutex<Collected>>,
    stop: CancellationToken,
) -> Result<()> {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = subscriber.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let now_nanos = chute_common::validate::unix_nanos_now() / 1_000 * 1000;
        let Ok(batch) = chute_common::payload::decode(&message.payload) else {
            continue;
        };
        let ours = batch
            .events
            .first()
            .is_some_and(|event| event.attributes.get(RUN_ID_ATTRIBUTE) == Some(&run_id));
        if !ours {
            continue;
        }
        let latency = ((now_nanos - batch.received_unix_nanos) / 1000).max(1) as u64;
        let count = batch.events.len() as u64;
        let mut collected = collected.lock().expect("live lock");
        collected.events += count;
        if let Some(histogram) = collected.histogram.as_mut() {
            let _ = histogram.record_n(latency.min(histogram.high()), count);
        }
    }
}

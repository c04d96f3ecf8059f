//! The live stream: a core NATS subscription on `events.*` (the subjects the ingestor publishes
//! to JetStream; a core subscriber sees each message as the server receives it, without a
//! consumer), decoded once and fanned out to `/v1/stream` subscribers through a bounded tokio
//! broadcast channel. A subscriber that falls more than the buffer behind gets a `lagged` event
//! with the number of events it missed, never unbounded memory. Every subscriber also gets a
//! `summary` event once a second: events delivered to it since the previous summary and the
//! rate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event as SseEvent;
use chute_proto::v1::{Event, EventBatch};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::params::StreamQuery;
use crate::telemetry;

/// One accepted event, serialized once for every subscriber.
#[derive(Debug)]
pub struct LiveEvent {
    pub tenant: String,
    pub name: String,
    pub json: String,
}

/// The fan-out point between the NATS subscription and the SSE connections.
#[derive(Clone)]
pub struct StreamHub {
    sender: broadcast::Sender<Arc<LiveEvent>>,
    /// One permit per open `/v1/stream` connection (bounded memory and fan-out work).
    slots: Arc<tokio::sync::Semaphore>,
}

/// The JSON of one `event` SSE event (the body is left out: it may be large and dashboards
/// read it from `/v1/events`).
#[derive(Serialize)]
struct LiveEventJson<'a> {
    event_id: &'a str,
    tenant: &'a str,
    name: &'a str,
    time: Option<String>,
    session_id: &'a str,
    user_id: &'a str,
    attributes: &'a std::collections::HashMap<String, String>,
    metrics: &'a std::collections::HashMap<String, f64>,
    /// When the ingestor accepted the event (unix ms): `now - ingested_at_ms` is the live
    /// stream latency.
    ingested_at_ms: i64,
}

impl StreamHub {
    /// `buffer` events are kept for the slowest subscriber.
    pub fn new(buffer: usize) -> Self {
        Self::with_max_subscribers(buffer, tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// Like [`StreamHub::new`], refusing subscribers beyond `max_subscribers` open streams.
    pub fn with_max_subscribers(buffer: usize, max_subscribers: usize) -> Self {
        let (sender, _) = broadcast::channel(buffer.max(1));
        Self {
            sender,
            slots: Arc::new(tokio::sync::Semaphore::new(max_subscribers)),
        }
    }

    /// Hands every event of `batch` to the subscribers (none listening is fine).
    pub fn publish_batch(&self, batch: &EventBatch) {
        telemetry::stream_events(batch.events.len());
        if self.sender.receiver_count() == 0 {
            return;
        }
        let ingested_at_ms = batch.received_unix_nanos.div_euclid(1_000_000);
        for event in &batch.events {
            let _ = self.sender.send(Arc::new(live_event(event, ingested_at_ms)));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.sender.subscribe()
    }

    /// Reads `events.*` until `shutdown`; undecodable messages are logged and skipped.
    pub async fn run(self, client: async_nats::Client, shutdown: CancellationToken) {
        let subject = format!("{}.*", chute_common::stream::EVENTS_SUBJECT_PREFIX);
        let mut subscription = match client.subscribe(subject.clone()).await {
            Ok(subscription) => subscription,
            Err(err) => {
                tracing::error!(%subject, error = %err, "live stream subscription failed");
                return;
            }
        };
        tracing::info!(%subject, "live stream subscribed");
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = subscription.next() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            match chute_common::payload::decode(&message.payload) {
                Ok(batch) => self.publish_batch(&batch),
                Err(err) => tracing::warn!(subject = %message.subject, error = %err,
                    "undecodable message on the events subjects skipped"),
            }
        }
        let _ = subscription.unsubscribe().await;
    }
}

fn live_event(event: &Event, ingested_at_ms: i64) -> LiveEvent {
    let time = event.time.as_ref().and_then(|ts| {
        let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| crate::render::rfc3339(t).ok())
    });
    let json = serde_json::to_string(&LiveEventJson {
        event_id: &event.event_id,
        tenant: &event.tenant,
        name: &event.name,
        time,
        session_id: &event.session_id,
        user_id: &event.user_id,
        attributes: &event.attributes,
        metrics: &event.metrics,
        ingested_at_ms,
    })
    .unwrap_or_else(|_| "{}".to_owned());
    LiveEvent {
        tenant: event.tenant.clone(),
        name: event.name.clone(),
        json,
    }
}

/// Decrements the subscriber gauge when the SSE connection goes away.
struct SubscriberGuard;

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        telemetry::stream_unsubscribed();
    }
}

struct Subscriber {
    receiver: broadcast::Receiver<Arc<LiveEvent>>,
    filter: StreamQuery,
    ticker: tokio::time::Interval,
    delivered_since_summary: u64,
    delivered_total: u64,
    last_summary: Instant,
    shutdown: CancellationToken,
    _guard: SubscriberGuard,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The SSE events of one subscriber: `event` (matching events), `summary` (every second),
/// `lagged` (events skipped because the subscriber fell behind). Ends on shutdown.
/// Fails when the hub already serves its maximum number of subscribers.
pub fn subscribe(
    hub: &StreamHub,
    filter: StreamQuery,
    shutdown: CancellationToken,
) -> Result<impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static, Error> {
    let slot = Arc::clone(&hub.slots)
        .try_acquire_owned()
        .map_err(|_| Error::StreamUnavailable("too many open live streams; retry later"))?;
    telemetry::stream_subscribed(&filter.tenant);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset();
    let state = Subscriber {
        receiver: hub.subscribe(),
        filter,
        ticker,
        delivered_since_summary: 0,
        delivered_total: 0,
        last_summary: Instant::now(),
        shutdown,
        _guard: SubscriberGuard,
        _slot: slot,
    };
    Ok(futures::stream::unfold(state, |mut state| async move {
        let event = next_event(&mut state).await?;
        Some((Ok(event), state))
    }))
}

async fn next_event(state: &mut Subscriber) -> Option<SseEvent> {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return None,
            _ = state.ticker.tick() => {
                let elapsed = state.last_summary.elapsed().as_secs_f64().max(1e-3);
                let data = serde_json::json!({
                    "count": state.delivered_since_summary,
                    "rate": state.delivered_since_summary as f64 / elapsed,
                    "total": state.delivered_total,
                });
                state.delivered_since_summary = 0;
                state.last_summary = Instant::now();
                return Some(SseEvent::default().event("summary").data(data.to_string()));
            }
            received = state.receiver.recv() => match received {
                Ok(event) => {
                    if event.tenant != state.filter.tenant
                        || state.filter.name.as_ref().is_some_and(|name| *name != event.name)
                    {
                        continue;
                    }
                    state.delivered_since_summary += 1;
                    state.delivered_total += 1;
                    return Some(SseEvent::default().event("event").data(event.json.as_str()));
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    telemetry::stream_lagged(&state.filter.tenant, missed);
                    let data = serde_json::json!({ "missed": missed });
                    return Some(SseEvent::default().event("lagged").data(data.to_string()));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(tenant: &str, names: &[&str]) -> EventBatch {
        EventBatch {
            version: 1,
            received_unix_nanos: 1_700_000_000_000_000_000,
            events: names
                .iter()
                .map(|name| Event {
                    event_id: "00000000-0000-0000-0000-000000000001".into(),
                    tenant: tenant.into(),
                    name: (*name).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn filters_by_tenant_and_name_and_reports_lag() {
        let hub = StreamHub::new(4);
        let filter = StreamQuery {
            tenant: "acme".into(),
            name: Some("a".into()),
        };
        let stream = subscribe(&hub, filter, CancellationToken::new()).unwrap();
        futures::pin_mut!(stream);
        hub.publish_batch(&batch("globex", &["a"]));
        hub.publish_batch(&batch("acme", &["b", "a"]));
        let first = format!("{:?}", stream.next().await.unwrap().unwrap());
        assert!(first.contains("event: event") || first.contains("\"acme\""), "{first}");
        // Overflow the 4-slot buffer: the subscriber learns how many it missed.
        hub.publish_batch(&batch("acme", &["a"; 10]));
        let lagged = format!("{:?}", stream.next().await.unwrap().unwrap());
        assert!(lagged.contains("lagged") && lagged.contains("missed"), "{lagged}");
    }

    #[tokio::test]
    async fn open_streams_are_capped_and_a_closed_one_frees_its_slot() {
        let hub = StreamHub::with_max_subscribers(4, 1);
        let filter = || StreamQuery {
            tenant: "acme".into(),
            name: None,
        };
        let first = subscribe(&hub, filter(), CancellationToken::new()).unwrap();
        let refused = subscribe(&hub, filter(), CancellationToken::new())
            .err()
            .expect("second stream refused");
        assert!(
            matches!(refused, Error::StreamUnavailable(reason) if reason.contains("too many")),
            "{refused:?}"
        );
        drop(first);
        assert!(subscribe(&hub, filter(), CancellationToken::new()).is_ok());
    }
}

//! The live stream: one core NATS subscription per tenant in use, on `live.<tenant>` (the
//! ingestor publishes a copy of every message JetStream stored there, after the PubAck and not
//! for duplicates), decoded once and fanned out to that tenant's `/v1/stream` subscribers
//! through a bounded tokio broadcast channel. The subscription is made when a tenant's first
//! subscriber arrives and dropped when its last one leaves, so a subscriber costs the query API
//! its own tenant's traffic, never every tenant's, and the query API's NATS user needs to read
//! `live.*` only. A subscriber that falls more than the buffer behind gets a `lagged` event with
//! the number of events it missed, never unbounded memory. Every subscriber also gets a
//! `summary` event once a second: events delivered to it since the previous summary and the
//! rate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The fan-out point between the per-tenant NATS subscriptions and the SSE connections.
#[derive(Clone)]
pub struct StreamHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// Events kept per tenant for its slowest subscriber.
    buffer: usize,
    /// One permit per open `/v1/stream` connection (bounded memory and fan-out work).
    slots: Arc<tokio::sync::Semaphore>,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    /// The NATS client and the shutdown token, once [`StreamHub::run`] was called; feeds made
    /// before subscribe then.
    nats: Option<(async_nats::Client, CancellationToken)>,
    feeds: HashMap<String, Feed>,
}

/// One tenant's broadcast channel and, with NATS, its `live.<tenant>` subscription.
struct Feed {
    sender: broadcast::Sender<Arc<LiveEvent>>,
    subscribers: usize,
    /// Ends the tenant's NATS subscription task.
    stop: CancellationToken,
    /// Set once the server has the subscription (nothing published afterwards is missed).
    subscribed: Arc<AtomicBool>,
    /// Whether the subscription task was started.
    started: bool,
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
    /// `buffer` events are kept per tenant for the slowest subscriber.
    pub fn new(buffer: usize) -> Self {
        Self::with_max_subscribers(buffer, tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// Like [`StreamHub::new`], refusing subscribers beyond `max_subscribers` open streams.
    pub fn with_max_subscribers(buffer: usize, max_subscribers: usize) -> Self {
        Self {
            inner: Arc::new(HubInner {
                buffer: buffer.max(1),
                slots: Arc::new(tokio::sync::Semaphore::new(max_subscribers)),
                state: Mutex::new(HubState::default()),
            }),
        }
    }

    /// Hands every event of `batch` to the subscribers of its tenant (none listening is fine).
    pub fn publish_batch(&self, batch: &EventBatch) {
        telemetry::stream_events(batch.events.len());
        let ingested_at_ms = batch.received_unix_nanos.div_euclid(1_000_000);
        let state = self.lock();
        for event in &batch.events {
            if let Some(feed) = state.feeds.get(&event.tenant) {
                let _ = feed.sender.send(Arc::new(live_event(event, ingested_at_ms)));
            }
        }
    }

    /// Tenants with at least one subscriber (each has one NATS subscription while `run` runs).
    pub fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<String> = self.lock().feeds.keys().cloned().collect();
        tenants.sort();
        tenants
    }

    /// Whether the NATS server has the `live.<tenant>` subscription: events the ingestor stores
    /// from then on reach the tenant's subscribers.
    pub fn is_subscribed(&self, tenant: &str) -> bool {
        self.lock()
            .feeds
            .get(tenant)
            .is_some_and(|feed| feed.subscribed.load(Ordering::Acquire))
    }

    /// Serves the tenants' `live.<tenant>` subscriptions on `client` until `shutdown`: those of
    /// tenants already subscribed at once, the others as their first subscriber arrives.
    pub async fn run(self, client: async_nats::Client, shutdown: CancellationToken) {
        {
            let mut state = self.lock();
            state.nats = Some((client.clone(), shutdown.clone()));
            let tenants: Vec<String> = state.feeds.keys().cloned().collect();
            for tenant in tenants {
                self.start_feed(&mut state, &tenant);
            }
        }
        tracing::info!("live stream serving per-tenant subscriptions on live.<tenant>");
        shutdown.cancelled().await;
        let mut state = self.lock();
        state.nats = None;
        for feed in state.feeds.values() {
            feed.stop.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // The state is a map and counters, consistent after every statement: a panic while it
        // was held leaves nothing half-done, so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver of `tenant`'s events; the first one of a tenant makes its feed (and its NATS
    /// subscription). Paired with [`StreamHub::leave`] by [`FeedLease`].
    fn join(&self, tenant: &str) -> broadcast::Receiver<Arc<LiveEvent>> {
        let mut state = self.lock();
        if !state.feeds.contains_key(tenant) {
            let (sender, _) = broadcast::channel(self.inner.buffer);
            let feed = Feed {
                sender,
                subscribers: 0,
                stop: CancellationToken::new(),
                subscribed: Arc::new(AtomicBool::new(false)),
                started: false,
            };
            state.feeds.insert(tenant.to_owned(), feed);
            self.start_feed(&mut state, tenant);
        }
        let feed = state.feeds.get_mut(tenant).expect("inserted above");
        feed.subscribers += 1;
        feed.sender.subscribe()
    }

    /// One subscriber of `tenant` left; the last one drops the feed and its NATS subscription.
    fn leave(&self, tenant: &str) {
        let mut state = self.lock();
        let Some(feed) = state.feeds.get_mut(tenant) else {
            return;
        };
        feed.subscribers = feed.subscribers.saturating_sub(1);
        if feed.subscribers == 0 {
            feed.stop.cancel();
            state.feeds.remove(tenant);
        }
    }

    /// Starts `tenant`'s subscription task when NATS is there and it has none yet.
    fn start_feed(&self, state: &mut HubState, tenant: &str) {
        let Some((client, shutdown)) = state.nats.clone() else {
            return;
        };
        let Some(feed) = state.feeds.get_mut(tenant) else {
            return;
        };
        if feed.started {
            return;
        }
        feed.started = true;
        tokio::spawn(run_feed(
            client,
            tenant.to_owned(),
            feed.sender.clone(),
            feed.subscribed.clone(),
            feed.stop.clone(),
            shutdown,
        ));
    }
}

/// Reads `live.<tenant>` into the tenant's channel until the feed is stopped or the service
/// shuts down; undecodable messages are logged and skipped, and events of another tenant (which
/// the ingestor never publishes there) are dropped.
async fn run_feed(
    client: async_nats::Client,
    tenant: String,
    sender: broadcast::Sender<Arc<LiveEvent>>,
    subscribed: Arc<AtomicBool>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let subject = chute_common::stream::live_subject(&tenant);
    let mut subscription = match client.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::error!(%subject, error = %err, "live stream subscription failed");
            return;
        }
    };
    // The server has processed the SUB once it answers the flush's PING.
    if let Err(err) = client.flush().await {
        tracing::warn!(%subject, error = %err, "live stream subscription not confirmed");
    }
    subscribed.store(true, Ordering::Release);
    telemetry::stream_tenant_subscribed(&tenant);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            _ = shutdown.cancelled() => break,
            message = subscription.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let batch = match chute_common::payload::decode(&message.payload) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(%subject, error = %err, "undecodable live message skipped");
                continue;
            }
        };
        telemetry::stream_events(batch.events.len());
        let ingested_at_ms = batch.received_unix_nanos.div_euclid(1_000_000);
        for event in batch.events.iter().filter(|event| event.tenant == tenant) {
            let _ = sender.send(Arc::new(live_event(event, ingested_at_ms)));
        }
    }
    let _ = subscription.unsubscribe().await;
    telemetry::stream_tenant_unsubscribed(&tenant);
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

/// A subscriber's hold on its tenant's feed, released when the SSE connection goes away.
struct FeedLease {
    hub: StreamHub,
    tenant: String,
}

impl Drop for FeedLease {
    fn drop(&mut self) {
        self.hub.leave(&self.tenant);
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
    _lease: FeedLease,
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
    let slot = Arc::clone(&hub.inner.slots)
        .try_acquire_owned()
        .map_err(|_| Error::StreamUnavailable("too many open live streams; retry later"))?;
    telemetry::stream_subscribed(&filter.tenant);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset();
    let receiver = hub.join(&filter.tenant);
    let lease = FeedLease {
        hub: hub.clone(),
        tenant: filter.tenant.clone(),
    };
    let state = Subscriber {
        receiver,
        filter,
        ticker,
        delivered_since_summary: 0,
        delivered_total: 0,
        last_summary: Instant::now(),
        shutdown,
        _guard: SubscriberGuard,
        _lease: lease,
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
    async fn a_tenant_feed_lives_as_long_as_its_subscribers() {
        let hub = StreamHub::new(4);
        let filter = |tenant: &str| StreamQuery {
            tenant: tenant.into(),
            name: None,
        };
        let first = subscribe(&hub, filter("acme"), CancellationToken::new()).unwrap();
        let second = subscribe(&hub, filter("acme"), CancellationToken::new()).unwrap();
        let other = subscribe(&hub, filter("globex"), CancellationToken::new()).unwrap();
        assert_eq!(hub.tenants(), ["acme", "globex"]);
        drop(first);
        assert_eq!(hub.tenants(), ["acme", "globex"], "acme still has a subscriber");
        drop(second);
        assert_eq!(hub.tenants(), ["globex"]);
        drop(other);
        assert!(hub.tenants().is_empty());
        // Without NATS (`run` not called) nothing subscribes.
        assert!(!hub.is_subscribed("globex"));
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

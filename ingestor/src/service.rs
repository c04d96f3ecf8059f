//! `chute.v1.IngestService`: validate -> chunk -> publish -> answer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use chute_common::auth::ApiKeys;
use chute_common::partition::{partition_for, random_partition};
use chute_common::payload::ChunkPlan;
use chute_common::stream::live_subject;
use chute_common::validate::{is_valid_tenant, normalize, Limits, RequestContext};
use chute_proto::v1::ingest_service_server::IngestService;
use chute_proto::v1::{Event, EventError, PublishRequest, PublishResponse};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::admission::{Caller, MessagePermits};
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::publisher::{LiveCopies, Publisher};
use crate::telemetry;

/// Longest accepted idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Requests of one `PublishStream` processed concurrently (responses still come back in order).
const STREAM_PIPELINE_DEPTH: usize = 16;

/// Request-independent settings of the service.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    pub partitions: u32,
    pub max_message_bytes: usize,
    pub max_request_events: usize,
    pub max_request_bytes: u64,
    pub limits: Limits,
}

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

struct Inner {
    settings: IngestSettings,
    api_keys: Option<ApiKeys>,
    publisher: Publisher,
    hooks: Hooks,
}

impl Ingest {
    pub fn new(settings: IngestSettings, api_keys: Option<ApiKeys>, publisher: Publisher) -> Self {
        Self::with_hooks(settings, api_keys, publisher, Hooks::default())
    }

    /// The service with test seams (the receive clock); see [`Hooks`].
    pub fn with_hooks(settings: IngestSettings, api_keys: Option<ApiKeys>, publisher: Publisher, hooks: Hooks) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                api_keys,
                publisher,
                hooks,
            }),
        }
    }

    /// The tenant bound to the caller's key, or `None` when keys are not enforced. Behind the
    /// admission layer the caller was authenticated before its body was read; without it (the
    /// service mounted alone) the key is checked here.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<String>> {
        if let Some(caller) = request.extensions().get::<Caller>() {
            return Ok(caller.tenant.clone());
        }
        let Some(keys) = &self.inner.api_keys else {
            return Ok(None);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        Ok(Some(keys.authenticate(header)?.to_owned()))
    }

    /// Handles one request: partial success for invalid events, all-or-nothing for storage.
    pub async fn handle(&self, key_tenant: Option<&str>, request: PublishRequest) -> Result<PublishResponse> {
        let settings = &self.inner.settings;
        if request.events.len() > settings.max_request_events {
            return Err(Error::TooManyEvents {
                count: request.events.len(),
                limit: settings.max_request_events,
            });
        }
        // Planned from the request as sent, before normalisation fills in receive times and ids:
        // every attempt of a request cuts it at the same events (see `payload::ChunkPlan`).
        let plan = ChunkPlan::new(&request.events, settings.max_message_bytes);
        let size = request_len(&plan, &request.idempotency_key);
        if size as u64 > settings.max_request_bytes {
            return Err(Error::RequestTooLarge {
                size,
                limit: settings.max_request_bytes,
            });
        }
        let idempotency_key = request.idempotency_key;
        check_idempotency_key(&idempotency_key)?;
        // Partition and message ids by the request's tenant: the key's, or (no keys) the first
        // valid one sent. Both come from the request as sent, so a retry whose verdicts differ
        // (the time window moves with the receive time) still lands on the same message ids.
        let tenant = request_tenant(key_tenant, &request.events);

        let ctx = RequestContext {
            received_unix_nanos: self.inner.hooks.received_unix_nanos(),
            key_tenant,
            idempotency_key: &idempotency_key,
        };
        // Normalised in place: the chunks are encoded from the request's own events.
        let mut events = request.events;
        let mut accepted = Vec::with_capacity(events.len());
        let mut errors = Vec::new();
        for (index, event) in events.iter_mut().enumerate() {
            match normalize(event, index, &ctx, &settings.limits) {
                Ok(()) => accepted.push(true),
                Err(rejection) => {
                    telemetry::event_rejected(rejection.metric_label());
                    errors.push(EventError {
                        index: index as u32,
                        field: rejection.field,
                        reason: rejection.reason,
                    });
                    accepted.push(false);
                }
            }
        }
        let rejected = errors.len() as u32;
        let count = events.len() - errors.len();
        if count == 0 {
            return Ok(PublishResponse {
                accepted: 0,
                rejected,
                errors,
            });
        }

        // An accepted event has a valid tenant, so `request_tenant` found one.
        debug_assert!(tenant.is_some());
        let tenant = tenant.unwrap_or_default();
        let partition = if idempotency_key.is_empty() {
            random_partition(settings.partitions)
        } else {
            partition_for(&tenant, &idempotency_key, settings.partitions)
        };
        let chunks = plan.encode(&events, &accepted, ctx.received_unix_nanos, &idempotency_key);
        // With API keys every accepted event is of the key's tenant (`normalize` refuses others).
        let single_tenant = key_tenant.is_some()
            || events
                .iter()
                .zip(&accepted)
                .all(|(event, &passed)| !passed || event.tenant == tenant);
        let live = if single_tenant {
            LiveCopies::Tenant(live_subject(&tenant).into())
        } else {
            split_live_copies(&plan, &events, &accepted, ctx.received_unix_nanos, &idempotency_key)
        };
        // Everything publish needs is in the payloads now; free the events before the PubAcks.
        drop(events);
        self.inner
            .publisher
            .publish(partition, &tenant, &idempotency_key, chunks, &live)
            .await?;
        telemetry::events_accepted(count);
        Ok(PublishResponse {
            accepted: count as u32,
            rejected,
            errors,
        })
    }
}

/// The live copies of a request whose accepted events belong to several tenants (only possible
/// without API keys): per tenant, the planned chunks encoded with that tenant's events alone.
fn split_live_copies(
    plan: &ChunkPlan,
    events: &[Event],
    accepted: &[bool],
    received_unix_nanos: i64,
    idempotency_key: &str,
) -> LiveCopies {
    let mut tenants: Vec<&str> = events
        .iter()
        .zip(accepted)
        .filter(|(_, &passed)| passed)
        .map(|(event, _)| event.tenant.as_str())
        .collect();
    tenants.sort_unstable();
    tenants.dedup();
    let mut copies = Vec::new();
    for tenant in tenants {
        let of_tenant: Vec<bool> = events
            .iter()
            .zip(accepted)
            .map(|(event, &passed)| passed && event.tenant == tenant)
            .collect();
        let subject = async_nats::Subject::from(live_subject(tenant));
        for chunk in plan.encode(events, &of_tenant, received_unix_nanos, idempotency_key) {
            copies.push((chunk.chunk_index, subject.clone(), chunk.payload));
        }
    }
    LiveCopies::Split(copies)
}

/// The tenant a request is partitioned and deduplicated by: the API key's, else the first valid
/// tenant among the events as sent.
fn request_tenant(key_tenant: Option<&str>, sent_events: &[Event]) -> Option<String> {
    key_tenant
        .or_else(|| {
            sent_events
                .iter()
                .map(|event| event.tenant.as_str())
                .find(|tenant| is_valid_tenant(tenant))
        })
        .map(str::to_owned)
}

/// `PublishRequest::encoded_len`, from the event sizes the chunk plan already measured.
fn request_len(plan: &ChunkPlan, idempotency_key: &str) -> usize {
    let key_len = match idempotency_key.len() {
        0 => 0,
        len => prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(len as u64) + len,
    };
    plan.sent_events_len() + key_len
}

fn check_idempotency_key(key: &str) -> Result<()> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Error::IdempotencyKey("longer than 256 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::IdempotencyKey("contains control characters"));
    }
    Ok(())
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for Ingest {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let started = Instant::now();
        // The request's bytes-budget permit is held until it is answered.
        let _budget = request
            .extensions()
            .get::<MessagePermits>()
            .and_then(MessagePermits::take_next);
        let result = match self.authenticate(&request) {
            Ok(key_tenant) => self.handle(key_tenant.as_deref(), request.into_inner()).await,
            Err(err) => Err(err),
        };
        let result = result.map(Response::new).map_err(Status::from);
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        telemetry::request_finished("Publish", code, started.elapsed());
        result
    }

    type PublishStreamStream = ResponseStream;

    /// One response per request, in order. Up to 16 requests of a stream are in flight at once.
    /// A request that fails (e.g. UNAVAILABLE) ends the stream with that status; responses
    /// received before it stand, and the client resends from the first unanswered request
    /// (with idempotency keys, resending is safe).
    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let key_tenant = self.authenticate(&request).map_err(Status::from)?;
        let permits = request.extensions().get::<MessagePermits>().cloned();
        let service = self.clone();
        let responses = request
            .into_inner()
            .map(move |item| {
                let service = service.clone();
                let key_tenant = key_tenant.clone();
                // Taken as the message arrives (in order), held until it is answered.
                let budget = permits.as_ref().and_then(MessagePermits::take_next);
                async move {
                    let _budget = budget;
                    let started = Instant::now();
                    let result = match item {
                        Ok(request) => service
                            .handle(key_tenant.as_deref(), request)
                            .await
                            .map_err(Status::from),
                        Err(status) => Err(status),
                    };
                    let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
                    telemetry::request_finished("PublishStream", code, started.elapsed());
                    result
                }
            })
            .buffered(STREAM_PIPELINE_DEPTH);
        Ok(Response::new(Box::pin(responses)))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn idempotency_keys_are_bounded_and_printable() {
        assert!(check_idempotency_key("req-42").is_ok());
        assert!(check_idempotency_key(&"k".repeat(256)).is_ok());
        assert!(check_idempotency_key(&"k".repeat(257)).is_err());
        assert!(check_idempotency_key("a\nb").is_err());
    }

    #[test]
    fn the_request_length_comes_from_the_planned_sizes() {
        let events: Vec<Event> = (0..300)
            .map(|i| Event {
                name: "n".into(),
                body: "b".repeat(i * 7),
                ..Default::default()
            })
            .collect();
        for key in ["", "k", &"k".repeat(256)] {
            let request = PublishRequest {
                events: events.clone(),
                idempotency_key: key.to_owned(),
            };
            let plan = ChunkPlan::new(&request.events, 64 * 1024);
            assert_eq!(request_len(&plan, key), request.encoded_len());
        }
    }

    #[test]
    fn the_request_tenant_comes_from_the_events_as_sent() {
        let sent = |tenants: &[&str]| -> Vec<Event> {
            tenants
                .iter()
                .map(|tenant| Event {
                    tenant: (*tenant).to_owned(),
                    ..Default::default()
                })
                .collect()
        };
        assert_eq!(
            request_tenant(Some("acme"), &sent(&["globex"])).as_deref(),
            Some("acme")
        );
        // The first valid tenant, whether or not that event passes the other checks.
        assert_eq!(
            request_tenant(None, &sent(&["", "Not Valid", "globex", "acme"])).as_deref(),
            Some("globex")
        );
        assert_eq!(request_tenant(None, &sent(&["", "UPPER"])), None);
    }
}

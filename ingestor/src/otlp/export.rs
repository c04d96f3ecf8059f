//! One OTLP export, whatever its transport: authenticate, map, publish through the ingestor's
//! own path under a content-derived idempotency key, and shape the OTLP partial success.

use std::time::Instant;

use chute_common::auth::ApiKeys;
use chute_common::validate::Rejection;
use chute_proto::v1::{Event, PublishRequest};

use super::mapping::{self, export_idempotency_key, MapItem, Mapped, MappingSettings};
use super::signal::OtlpSignal;
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::service::Ingest;
use crate::telemetry;

/// Problems named in `error_message`; the count covers the rest.
const NAMED_PROBLEMS: usize = 5;

/// What an export's answer reports: the OTLP `partial_success` (zero and empty when all was
/// stored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: u32,
    pub rejected: i64,
    pub error_message: String,
}

impl Outcome {
    /// The signal's OTLP answer: `partial_success` only when something was rejected.
    pub fn response<S: OtlpSignal>(self) -> S::Response {
        S::response((self.rejected > 0).then_some((self.rejected, self.error_message)))
    }
}

/// The OTLP front of the ingestor. Cheap to clone.
#[derive(Clone)]
pub struct Otlp {
    ingest: Ingest,
    api_keys: Option<ApiKeys>,
    settings: MappingSettings,
    hooks: Hooks,
}

impl Otlp {
    pub fn new(ingest: Ingest, api_keys: Option<ApiKeys>, settings: MappingSettings, hooks: Hooks) -> Self {
        Self {
            ingest,
            api_keys,
            settings,
            hooks,
        }
    }

    /// The caller's tenant: its key's (`authorization: Bearer <key>`), else its verified client
    /// certificate's (`client_names`, empty without mutual TLS); `None` when keys are not
    /// enforced.
    pub fn authenticate(&self, authorization: Option<&str>, client_names: &[String]) -> Result<Option<String>> {
        let Some(keys) = &self.api_keys else {
            return Ok(None);
        };
        Ok(Some(keys.authenticate_caller(authorization, client_names)?.to_owned()))
    }

    /// Maps and publishes an export. `undecodable` lists the items (by position) that the
    /// lenient protobuf decoder could not read, with why: they are rejected with that reason.
    pub async fn export<S: OtlpSignal>(
        &self,
        key_tenant: Option<&str>,
        request: &S::Request,
        undecodable: Vec<(usize, String)>,
    ) -> Result<Outcome>
    where
        S::Item: MapItem,
    {
        let mut mapped = mapping::map_export::<S>(request, &self.settings);
        reject_undecodable(&mut mapped, undecodable, S::ITEM);
        self.publish(key_tenant, mapped).await
    }

    /// Publishes the mapped items that passed, in event id order under the export's key, and
    /// reports every rejection (the mapping's and the event rules') by its item's label.
    pub async fn publish(&self, key_tenant: Option<&str>, mapped: Vec<Mapped>) -> Result<Outcome> {
        let started = Instant::now();
        let prepared = prepare(mapped);
        let mut problems = prepared.rejected;
        let mut accepted = 0;
        if !prepared.events.is_empty() {
            let request = PublishRequest {
                events: prepared.events,
                idempotency_key: prepared.idempotency_key,
            };
            let response = self.ingest.handle(key_tenant, request).await?;
            // Test seam (feature `test-util`): the export was stored, but the caller is told
            // UNAVAILABLE and retries it.
            if self.hooks.fail_after_store() {
                return Err(Error::Unavailable(
                    "test hook: failing after the export was stored".into(),
                ));
            }
            accepted = response.accepted;
            for error in response.errors {
                let (item, position) = prepared.labels[error.index as usize];
                let label = format!("{item} {position}");
                problems.push((
                    label,
                    Rejection {
                        field: error.field,
                        reason: error.reason,
                    },
                ));
            }
        }
        tracing::debug!(accepted, rejected = problems.len(), elapsed = ?started.elapsed(), "otlp export");
        Ok(Outcome {
            accepted,
            rejected: problems.len() as i64,
            error_message: error_message(&mut problems),
        })
    }
}

/// Replaces the verdict on each undecodable item (mapped from an empty placeholder) with why
/// it could not be decoded.
fn reject_undecodable(mapped: &mut [Mapped], undecodable: Vec<(usize, String)>, item: &str) {
    for (position, reason) in undecodable {
        if let Some(slot) = mapped.get_mut(position) {
            slot.label = format!("{item} {position}");
            slot.result = Err(Rejection {
                field: "protobuf".to_owned(),
                reason,
            });
        }
    }
}

/// An export ready for `Ingest::handle`.
struct Prepared {
    /// Accepted by the mapping, sorted by event id, duplicates (the same span twice) removed.
    events: Vec<Event>,
    /// `labels[i]` names `events[i]` in error messages: item kind and position.
    labels: Vec<(&'static str, usize)>,
    idempotency_key: String,
    rejected: Vec<(String, Rejection)>,
}

/// Splits the mapping's verdicts, puts the events in event id order (so the chunk plan, and
/// with it each chunk's events, depends on the export's content, not on the order an exporter
/// put its spans in) and derives the export's idempotency key from the ids.
fn prepare(mapped: Vec<Mapped>) -> Prepared {
    let mut rejected = Vec::new();
    let mut labelled = Vec::with_capacity(mapped.len());
    for Mapped {
        item,
        position,
        label,
        result,
    } in mapped
    {
        match result {
            Ok(event) => labelled.push((event, (item, position))),
            Err(rejection) => {
                telemetry::event_rejected(rejection.metric_label());
                rejected.push((label, rejection));
            }
        }
    }
    labelled.sort_by(|(a, _), (b, _)| a.event_id.cmp(&b.event_id));
    // The same span or record twice in one export is one event: stored once, counted once.
    labelled.dedup_by(|(a, _), (b, _)| a.event_id == b.event_id);
    let ids: Vec<&str> = labelled.iter().map(|(event, _)| event.event_id.as_str()).collect();
    let idempotency_key = export_idempotency_key(&ids);
    let (events, labels) = labelled.into_iter().unzip();
    Prepared {
        events,
        labels,
        idempotency_key,
        rejected,
    }
}

/// "2 rejected: span 3 \"chat\": name: required; log record 7: time: more than 7d in the past".
fn error_message(problems: &mut [(String, Rejection)]) -> String {
    if problems.is_empty() {
        return String::new();
    }
    // Labels start with the item's position: name the first ones of the export.
    problems.sort_by_key(|(label, _)| item_position(label));
    let named: Vec<String> = problems
        .iter()
        .take(NAMED_PROBLEMS)
        .map(|(label, rejection)| format!("{label}: {rejection}"))
        .collect();
    let more = problems.len().saturating_sub(NAMED_PROBLEMS);
    let tail = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    format!("{} rejected: {}{tail}", problems.len(), named.join("; "))
}

/// The position in "span 12 ..." / "log record 12".
fn item_position(label: &str) -> usize {
    label
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            event_id: id.into(),
            name: "chat".into(),
            ..Default::default()
        }
    }

    fn ok(label: &str, id: &str) -> Mapped {
        Mapped {
            item: "span",
            position: item_position(label),
            label: String::new(),
            result: Ok(event(id)),
        }
    }

    fn bad(label: &str, field: &str) -> Mapped {
        Mapped {
            item: "span",
            position: item_position(label),
            label: label.into(),
            result: Err(Rejection {
                field: field.into(),
                reason: "required".into(),
            }),
        }
    }

    #[test]
    fn events_are_ordered_by_id_and_the_key_ignores_export_order() {
        let one = prepare(vec![ok("span 0", "b"), bad("span 1", "name"), ok("span 2", "a")]);
        let other = prepare(vec![ok("span 0", "a"), ok("span 1", "b")]);
        let ids = |prepared: &Prepared| prepared.events.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&one), ["a", "b"]);
        assert_eq!(one.labels, [("span", 2), ("span", 0)]);
        assert_eq!(one.idempotency_key, other.idempotency_key);
        assert_eq!(one.rejected.len(), 1);
        assert_ne!(prepare(vec![ok("span 0", "a")]).idempotency_key, one.idempotency_key);
    }

    #[test]
    fn the_same_span_twice_is_one_event() {
        let prepared = prepare(vec![ok("span 0", "a"), ok("span 1", "a"), ok("span 2", "b")]);
        assert_eq!(prepared.events.len(), 2);
        assert_eq!(
            prepared.idempotency_key,
            prepare(vec![ok("span 0", "a"), ok("span 1", "b")]).idempotency_key
        );
    }

    #[test]
    fn the_error_message_names_the_first_problems_in_export_order() {
        let rejection = |field: &str| Rejection {
            field: field.into(),
            reason: "required".into(),
        };
        let mut problems: Vec<(String, Rejection)> = (0..8)
            .rev()
            .map(|i| (format!("span {i} \"s\""), rejection("name")))
            .collect();
        let message = error_message(&mut problems);
        assert!(
            message.starts_with("8 rejected: span 0 \"s\": name: required; span 1"),
            "{message}"
        );
        assert!(message.ends_with("; and 3 more"), "{message}");
        assert_eq!(error_message(&mut []), "");
    }
}

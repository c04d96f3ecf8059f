//! Rows as ClickHouse returns them and the JSON answers built from them. Pure.

use bytes::Bytes;
use chute_schema::row::EventsRow;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::params::{TimeseriesQuery, TopQuery};

/// One point with data: `k` indexes `from + k * step`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize)]
pub struct PointRow {
    pub k: u64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize)]
pub struct TopRow {
    pub key: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize)]
pub struct SessionRow {
    pub session_id: String,
    /// Unix ms.
    pub start: i64,
    pub end: i64,
    pub duration_ms: i64,
    pub events: u64,
    pub users: u64,
    pub metrics: Vec<(String, f64)>,
}

pub fn rfc3339(time: OffsetDateTime) -> Result<String, time::error::Format> {
    time.format(&Rfc3339)
}

/// Unix ms as RFC 3339 (UTC); out-of-range times render as their number.
pub fn ms_to_rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| rfc3339(t).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[derive(Serialize)]
struct Point {
    t: String,
    value: Option<f64>,
}

/// Every point of the range, in order: buckets without data are 0 for counts and sums and
/// `null` for min, max, avg and percentiles. Non-finite values (e.g. avg over nothing) are
/// `null`.
pub fn timeseries(query: &TimeseriesQuery, rows: &[PointRow]) -> Bytes {
    let empty = query.measure.agg.zero_when_empty().then_some(0.0);
    let mut values = vec![empty; query.points() as usize];
    for row in rows {
        if let Some(slot) = values.get_mut(row.k as usize) {
            *slot = Some(row.value).filter(|v| v.is_finite());
        }
    }
    let points: Vec<Point> = values
        .into_iter()
        .enumerate()
        .map(|(k, value)| Point {
            t: ms_to_rfc3339((query.from + k as i64 * query.step) * 1000),
            value,
        })
        .collect();
    json(&serde_json::json!({
        "points": points,
        "source": query.source.label(),
        "from": ms_to_rfc3339(query.from * 1000),
        "to": ms_to_rfc3339(query.to * 1000),
        "step_seconds": query.step,
        "window_seconds": query.window,
    }))
}

pub fn top(query: &TopQuery, rows: &[TopRow]) -> Bytes {
    let items: Vec<_> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "key": row.key,
                "value": Some(row.value).filter(|v| v.is_finite()),
            })
        })
        .collect();
    json(&serde_json::json!({
        "items": items,
        "source": query.source.label(),
        "from": ms_to_rfc3339(query.from_ms),
        "to": ms_to_rfc3339(query.to_ms),
    }))
}

pub fn sessions(rows: &[SessionRow]) -> Bytes {
    let sessions: Vec<_> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "session_id": row.session_id,
                "start": ms_to_rfc3339(row.start),
                "end": ms_to_rfc3339(row.end),
                "duration_ms": row.duration_ms,
                "events": row.events,
                "users": row.users,
                "metric_sums": json_object(&row.metrics),
            })
        })
        .collect();
    json(&serde_json::json!({ "sessions": sessions, "source": "sessions" }))
}

pub fn events(rows: &[EventsRow]) -> Bytes {
    let events: Vec<_> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "event_id": row.event_id.to_string(),
                "name": row.name,
                "time": ms_to_rfc3339(row.time),
                "session_id": row.session_id,
                "user_id": row.user_id,
                "attributes": json_object(&row.attributes),
                "metrics": json_object(&row.metrics),
                "body": row.body,
                "ingested_at": ms_to_rfc3339(row.ingested_at),
            })
        })
        .collect();
    json(&serde_json::json!({ "events": events, "source": "raw" }))
}

/// A ClickHouse `Map` (read as key/value pairs) as a JSON object.
fn json_object<V: Serialize>(pairs: &[(String, V)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(key, value)| (key.clone(), serde_json::json!(value)))
        .collect()
}

fn json(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON values serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Agg, Measure, Source};

    fn query(agg: Agg) -> TimeseriesQuery {
        TimeseriesQuery {
            tenant: "acme".into(),
            measure: Measure {
                name: None,
                metric: Some("m".into()),
                agg,
            },
            from: 1_700_000_000 - 1_700_000_000 % 60,
            to: 1_700_000_000 - 1_700_000_000 % 60 + 180,
            step: 60,
            window: 60,
            source: Source::Minute,
        }
    }

    #[test]
    fn gaps_are_filled_by_aggregation() {
        let rows = [PointRow { k: 1, value: 2.5 }];
        let count: serde_json::Value = serde_json::from_slice(&timeseries(&query(Agg::Count), &rows)).unwrap();
        let values: Vec<_> = count["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].clone())
            .collect();
        assert_eq!(
            values,
            [serde_json::json!(0.0), serde_json::json!(2.5), serde_json::json!(0.0)]
        );
        assert_eq!(count["points"][0]["t"], "2023-11-14T22:13:00Z");
        let max: serde_json::Value =
            serde_json::from_slice(&timeseries(&query(Agg::Max), &[PointRow { k: 2, value: f64::NAN }])).unwrap();
        assert!(max["points"].as_array().unwrap().iter().all(|p| p["value"].is_null()));
        assert_eq!(max["source"], "rollup_1m");
    }

    #[test]
    fn map_columns_render_as_objects() {
        let row = EventsRow {
            tenant: "acme".into(),
            name: "llm.request".into(),
            time: 1_700_000_000_000,
            event_id: uuid::Uuid::from_u128(1),
            session_id: "s".into(),
            user_id: "u".into(),
            attributes: vec![("model".into(), "m1".into())],
            metrics: vec![("tokens".into(), 12.0), ("latency_ms".into(), f64::NAN)],
            body: "{}".into(),
            ingested_at: 1_700_000_000_005,
        };
        let answer: serde_json::Value = serde_json::from_slice(&events(&[row])).unwrap();
        let event = &answer["events"][0];
        assert_eq!(event["attributes"], serde_json::json!({"model": "m1"}));
        assert_eq!(
            event["metrics"],
            serde_json::json!({"tokens": 12.0, "latency_ms": null})
        );
        assert_eq!(event["time"], "2023-11-14T22:13:20Z");
        assert_eq!(event["event_id"], "00000000-0000-0000-0000-000000000001");
    }
}

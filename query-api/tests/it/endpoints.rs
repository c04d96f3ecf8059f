//! Every endpoint's values against a recomputation from the generated raw events.

use std::collections::{BTreeMap, BTreeSet};

use chute_schema::row::EventsRow;

use crate::support::*;

const EVENTS: usize = 6_000;

/// Rows of `tenant`/`name` in `[from_ms, to_ms)`.
fn select<'a>(rows: &'a [EventsRow], tenant: &str, name: Option<&str>, from_ms: i64, to_ms: i64) -> Vec<&'a EventsRow> {
    rows.iter()
        .filter(|r| r.tenant == tenant && name.is_none_or(|n| r.name == n))
        .filter(|r| r.time >= from_ms && r.time < to_ms)
        .collect()
}

/// Recomputes point `k` of a series: the window ending at the end of bucket k.
fn expected(
    rows: &[EventsRow],
    query: (&str, Option<&str>, i64, i64, i64),
    k: i64,
    agg: &str,
    metric_name: Option<&str>,
) -> (Option<f64>, Vec<f64>) {
    let (tenant, name, from_ms, step_ms, window_ms) = query;
    let end = from_ms + (k + 1) * step_ms;
    let selected = select(rows, tenant, name, end - window_ms, end);
    let values: Vec<f64> = metric_name
        .map(|m| selected.iter().filter_map(|r| metric(r, m)).collect())
        .unwrap_or_default();
    let value = match agg {
        "count" if metric_name.is_some() => Some(values.len() as f64),
        "count" => Some(selected.len() as f64),
        "sum" => Some(values.iter().sum()),
        "min" => values.iter().copied().reduce(f64::min),
        "max" => values.iter().copied().reduce(f64::max),
        "avg" if values.is_empty() => None,
        "avg" => Some(values.iter().sum::<f64>() / values.len() as f64),
        "uniq_users" => Some(
            selected
                .iter()
                .filter(|r| !r.user_id.is_empty())
                .map(|r| &r.user_id)
                .collect::<BTreeSet<_>>()
                .len() as f64,
        ),
        "uniq_sessions" => Some(
            selected
                .iter()
                .filter(|r| !r.session_id.is_empty())
                .map(|r| &r.session_id)
                .collect::<BTreeSet<_>>()
                .len() as f64,
        ),
        _ => None,
    };
    (value, values)
}

/// (agg, metric, step, window, expected source)
type Case = (
    &'static str,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
    &'static str,
);

#[tokio::test]
async fn timeseries_matches_recomputation() {
    let api = TestApi::start("qa_timeseries_matches_recomputation", |_| {}).await;
    let base = hours_ago(3);
    let rows = generate(1, EVENTS, base, 150);
    api.insert(&rows).await;

    let cases: &[Case] = &[
        ("count", None, "5m", None, "rollup_1m"),
        ("count", None, "5m", Some("sliding:15m"), "rollup_1m"),
        ("count", Some("tokens"), "15m", None, "rollup_1m"),
        ("sum", Some("tokens"), "5m", Some("sliding:30m"), "rollup_1m"),
        ("min", Some("latency_ms"), "15m", Some("sliding:45m"), "rollup_1m"),
        ("max", Some("latency_ms"), "1h", None, "rollup_1h"),
        ("avg", Some("tokens"), "15m", None, "rollup_1m"),
        ("uniq_users", None, "15m", Some("sliding:30m"), "rollup_1m"),
        ("uniq_sessions", None, "1h", Some("sliding:2h"), "rollup_1h"),
        ("count", None, "1h", Some("sliding:2h"), "rollup_1h"),
        ("sum", Some("tokens"), "1h", None, "rollup_1h"),
        ("p50", Some("latency_ms"), "1h", None, "rollup_1h"),
        ("p99", Some("latency_ms"), "1h", Some("sliding:2h"), "rollup_1h"),
        ("p90", Some("latency_ms"), "15m", Some("sliding:30m"), "rollup_1m"),
    ];
    let (from, to) = (base, base + 3 * HOUR_MS);
    for (agg, metric_name, step, window, source) in cases {
        let mut uri = format!("/v1/timeseries?tenant=acme&name=llm.request&agg={agg}&from={from}&to={to}&step={step}");
        if let Some(m) = metric_name {
            uri.push_str(&format!("&metric={m}"));
        }
        if let Some(w) = window {
            uri.push_str(&format!("&window={w}"));
        }
        let (status, _, body) = api.get(&uri).await;
        assert_eq!(status, 200, "{uri}: {body}");
        assert_eq!(body["source"], *source, "{uri}");
        let step_ms = body["step_seconds"].as_i64().unwrap() * 1000;
        let window_ms = body["window_seconds"].as_i64().unwrap() * 1000;
        let got = points(&body);
        assert_eq!(got.len() as i64, (to - from) / step_ms, "{uri}");
        for (k, (_, value)) in got.iter().enumerate() {
            let (want, values) = expected(
                &rows,
                ("acme", Some("llm.request"), from, step_ms, window_ms),
                k as i64,
                agg,
                *metric_name,
            );
            if let Some(q) = agg.strip_prefix('p') {
                let q: f64 = q.parse::<f64>().unwrap() / 100.0;
                if values.is_empty() {
                    assert_eq!(*value, None, "{uri} point {k}");
                    continue;
                }
                // t-digest: the estimate's rank is within a few percent of the level.
                let (low, high) = rank_of(&values, value.unwrap());
                assert!(
                    low - 0.03 <= q && q <= high + 0.03,
                    "{uri} point {k}: estimate {value:?} at ranks {low}..{high}, want {q}"
                );
                continue;
            }
            match (want, value) {
                (Some(w), Some(v)) => assert!(approx(w, *v), "{uri} point {k}: {v} != {w}"),
                (None, None) => {}
                // Buckets without data: counts and sums are 0, the others null.
                (w, v) => assert_eq!(w, *v, "{uri} point {k}"),
            }
        }
    }

    // Too many points: a clear 400 naming step.
    let (status, _, body) = api
        .get(&format!(
            "/v1/timeseries?tenant=acme&from={}&to={to}&step=1m",
            to - 30 * 24 * HOUR_MS
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["parameter"], "step");
    assert!(body["error"].as_str().unwrap().contains("at most"), "{body}");
}

#[tokio::test]
async fn top_sessions_and_events_match_recomputation() {
    let api = TestApi::start("qa_top_sessions_events_match", |_| {}).await;
    let base = hours_ago(3);
    let rows = generate(2, EVENTS, base, 150);
    api.insert(&rows).await;
    let (from, to) = (base + 10 * MINUTE_MS, base + 2 * HOUR_MS);
    let acme = select(&rows, "acme", None, from, to);

    // Top names by count (minute rollups).
    let (status, _, body) = api
        .get(&format!("/v1/top?tenant=acme&by=name&from={from}&to={to}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "rollup_1m");
    let mut counts: BTreeMap<&str, f64> = BTreeMap::new();
    for row in &acme {
        *counts.entry(&row.name).or_default() += 1.0;
    }
    for item in body["items"].as_array().unwrap() {
        let key = item["key"].as_str().unwrap();
        assert_eq!(item["value"].as_f64().unwrap(), counts[key], "{key}");
    }
    assert_eq!(body["items"].as_array().unwrap().len(), counts.len());

    // Top users by summed tokens (raw events), and attribute values by count.
    let mut by_user: BTreeMap<&str, f64> = BTreeMap::new();
    for row in acme.iter().filter(|r| !r.user_id.is_empty()) {
        if let Some(tokens) = metric(row, "tokens") {
            *by_user.entry(&row.user_id).or_default() += tokens;
        }
    }
    let mut ranked: Vec<(&str, f64)> = by_user.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let (status, _, body) = api
        .get(&format!(
            "/v1/top?tenant=acme&by=user&metric=tokens&agg=sum&from={from}&to={to}&limit=5"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "raw");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    for (item, (user, sum)) in items.iter().zip(&ranked) {
        assert_eq!(item["key"], *user);
        assert!(approx(item["value"].as_f64().unwrap(), *sum));
    }
    let (status, _, body) = api
        .get(&format!("/v1/top?tenant=acme&by=attribute:model&from={from}&to={to}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut by_model: BTreeMap<String, f64> = BTreeMap::new();
    for row in &acme {
        *by_model.entry(row.attributes[0].1.clone()).or_default() += 1.0;
    }
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["value"].as_f64().unwrap(), by_model[item["key"].as_str().unwrap()]);
    }

    // Sessions overlapping the range, with at least 3 events.
    let mut sessions: BTreeMap<&str, (i64, i64, u64, f64)> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.tenant == "acme" && !r.session_id.is_empty()) {
        let entry = sessions.entry(&row.session_id).or_insert((i64::MAX, i64::MIN, 0, 0.0));
        entry.0 = entry.0.min(row.time);
        entry.1 = entry.1.max(row.time);
        entry.2 += 1;
        entry.3 += metric(row, "tokens").unwrap_or(0.0);
    }
    sessions.retain(|_, s| s.1 >= from && s.0 < to && s.2 >= 3);
    let (status, _, body) = api
        .get(&format!(
            "/v1/sessions?tenant=acme&from={from}&to={to}&min_events=3&limit=1000"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = body["sessions"].as_array().unwrap();
    assert_eq!(got.len(), sessions.len());
    for session in got {
        let id = session["session_id"].as_str().unwrap();
        let (start, end, events, tokens) = sessions[id];
        assert_eq!(session["events"].as_u64().unwrap(), events, "{id}");
        assert_eq!(session["duration_ms"].as_i64().unwrap(), end - start, "{id}");
        assert_eq!(session["start"], chute_query_api::render::ms_to_rfc3339(start), "{id}");
        let got_tokens = session["metric_sums"]["tokens"].as_f64().unwrap_or(0.0);
        assert!(approx(got_tokens, tokens), "{id}: {got_tokens} != {tokens}");
    }

    // Raw events, newest first; a duplicate insert of some rows is collapsed (FINAL).
    api.insert(&rows[..500]).await;
    let (status, _, body) = api
        .get(&format!(
            "/v1/events?tenant=acme&name=page.view&from={from}&to={to}&limit=50"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut want = select(&rows, "acme", Some("page.view"), from, to);
    want.sort_by(|a, b| {
        b.time
            .cmp(&a.time)
            .then(a.event_id.to_string().cmp(&b.event_id.to_string()))
    });
    let got: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = want.iter().take(50).map(|r| r.event_id.to_string()).collect();
    assert_eq!(got, want);
}

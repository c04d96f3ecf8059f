//! `/v1/sessions` with a `limit` below the number of matching sessions: the newest `limit`
//! sessions, each merged from every partial row (the statement picks the sessions from times
//! and counts first, then merges the costly states of those only).

use std::collections::{BTreeMap, BTreeSet};

use crate::support::*;

#[tokio::test]
async fn a_limit_answers_the_newest_sessions_merged_from_every_partial_row() {
    let api = TestApi::start("qa_sessions_limit", |_| {}).await;
    let base = hours_ago(3);
    let rows = generate(11, 3_000, base, 150);
    // Three inserts: most sessions have a partial row in each part (and rollup part).
    for chunk in rows.chunks(1_000) {
        api.insert(chunk).await;
    }
    let (from, to) = (base + 10 * MINUTE_MS, base + 2 * HOUR_MS);

    // (start, end, events, users, tokens) per session of acme.
    let mut sessions: BTreeMap<&str, (i64, i64, u64, BTreeSet<&str>, f64)> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.tenant == "acme" && !r.session_id.is_empty()) {
        let entry = sessions
            .entry(&row.session_id)
            .or_insert((i64::MAX, i64::MIN, 0, BTreeSet::new(), 0.0));
        entry.0 = entry.0.min(row.time);
        entry.1 = entry.1.max(row.time);
        entry.2 += 1;
        if !row.user_id.is_empty() {
            entry.3.insert(&row.user_id);
        }
        entry.4 += metric(row, "tokens").unwrap_or(0.0);
    }
    sessions.retain(|_, s| s.1 >= from && s.0 < to && s.2 >= 2);
    let mut newest: Vec<(&str, i64)> = sessions.iter().map(|(id, s)| (*id, s.0)).collect();
    newest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let limit = 7;
    assert!(
        newest.len() > 3 * limit,
        "the data set must have more sessions than the limit"
    );

    let (status, _, body) = api
        .get(&format!(
            "/v1/sessions?tenant=acme&from={from}&to={to}&min_events=2&limit={limit}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = body["sessions"].as_array().unwrap();
    let got_ids: Vec<&str> = got.iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    let want_ids: Vec<&str> = newest.iter().take(limit).map(|(id, _)| *id).collect();
    assert_eq!(got_ids, want_ids);
    for session in got {
        let id = session["session_id"].as_str().unwrap();
        let (start, end, events, users, tokens) = &sessions[id];
        assert_eq!(session["events"].as_u64().unwrap(), *events, "{id}");
        assert_eq!(session["users"].as_u64().unwrap(), users.len() as u64, "{id}");
        assert_eq!(session["duration_ms"].as_i64().unwrap(), end - start, "{id}");
        let got_tokens = session["metric_sums"]["tokens"].as_f64().unwrap_or(0.0);
        assert!(approx(got_tokens, *tokens), "{id}: {got_tokens} != {tokens}");
    }
}

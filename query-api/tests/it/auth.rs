//! API keys scope a caller to its tenant.

use crate::support::*;

const KEYS: &str = "acme acme-key-0123456789\nglobex globex-key-0123456789\n";

#[tokio::test]
async fn api_keys_refuse_other_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let api = TestApi::start("qa_auth_cross_tenant", |config| {
        config.api_keys.file = Some(keys.clone());
    })
    .await;
    let base = hours_ago(2);
    let rows = generate(6, 1_000, base, 60);
    api.insert(&rows).await;
    let range = format!("from={base}&to={}", base + HOUR_MS);
    let acme = ("authorization", "Bearer acme-key-0123456789");

    for endpoint in ["timeseries", "top", "sessions", "events", "stream"] {
        let uri = format!("/v1/{endpoint}?tenant=globex&{range}");
        let (status, _, body) = api.get(&uri).await;
        assert_eq!(status, 401, "{uri} without a key: {body}");
        let (status, _, _) = api
            .get_with(&uri, &[("authorization", "Bearer nope-nope-nope-nope")])
            .await;
        assert_eq!(status, 401, "{uri} with an unknown key");
        let (status, _, body) = api.get_with(&uri, &[acme]).await;
        assert_eq!(status, 403, "{uri} with acme's key: {body}");
        assert!(body["error"].as_str().unwrap().contains("globex"));
    }

    // Without a tenant parameter the key's tenant is used; with its own tenant it is allowed.
    let (status, headers, body) = api.get_with(&format!("/v1/timeseries?{range}&step=1h"), &[acme]).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers["cache-control"].to_str().unwrap().starts_with("private"));
    let total: f64 = points(&body).iter().filter_map(|(_, v)| *v).sum();
    let acme_rows = rows.iter().filter(|r| r.tenant == "acme").count();
    assert_eq!(total, acme_rows as f64, "only acme's events are counted");
    let (status, _, _) = api.get_with(&format!("/v1/events?tenant=acme&{range}"), &[acme]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_keys_the_tenant_parameter_is_required() {
    let api = TestApi::start("qa_auth_tenant_required", |_| {}).await;
    let (status, _, body) = api.get("/v1/timeseries").await;
    assert_eq!(status, 400);
    assert_eq!(body["parameter"], "tenant");
}
